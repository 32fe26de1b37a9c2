"""Fixed evaluation sets: a folder of images plus a parquet manifest, the same bytes for every user who builds them.

Three kinds (the Dagster assets ``attrface_test``, ``celeba_test_levels`` and ``real_lq`` are thin wrappers):

- the AttrFace test split as (LQ, source GT, target GT, both prompts) at each degradation level;
- any folder of aligned HQ faces (CelebA-Test in the papers) degraded at each level;
- folders of real low-quality photos, aligned by the project's detector (no GT, no synthetic degradation).

Every LQ is drawn from a generator seeded by ``sha256(seed, set, level, key)``: it depends on nothing but the
image's key, so adding images, reordering folders or running in parallel never changes an existing LQ, and the
degradation parameters are recorded per row. Images are HWC uint8 RGB; keys never contain dots.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from training.degradation import DegradationPreset, degrade
from training.eval.metrics import psnr

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("set", pa.string()),
    ("level", pa.string()),
    ("lq_path", pa.string()),
    ("gt_path", pa.string()),  # "" for real LQ (no ground truth)
    ("tar_path", pa.string()),  # "" unless the set has attribute-edited targets
    ("source_prompt", pa.string()),
    ("target_prompt", pa.string()),
    ("attribute", pa.string()),
    ("direction", pa.string()),
    ("origin", pa.string()),  # where the GT (or the real photo) came from
    ("degradation", pa.string()),  # JSON of the sampled parameters ("" for real LQ)
    ("psnr", pa.float64()),  # LQ vs GT in dB (NaN without a GT)
])


@dataclass(frozen=True)
class BenchItem:
    """One face of a set: the GT the LQ is degraded from, and for AttrFace pairs the edited target and prompts."""

    key: str
    gt: np.ndarray
    origin: str
    tar: np.ndarray | None = None
    source_prompt: str = ""
    target_prompt: str = ""
    attribute: str = ""
    direction: str = ""

    def __post_init__(self) -> None:
        if "." in self.key or "/" in self.key:
            raise ValueError(f"benchmark key {self.key!r} must not contain '.' or '/'")


def level_rng(seed: int, set_name: str, level: str, key: str) -> np.random.Generator:
    """The generator of one (set, level, key): independent of order, batch and process."""
    digest = hashlib.sha256(f"{seed}:{set_name}:{level}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _resized(img: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or img.shape[:2] == (size, size):
        return img
    interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img[..., ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def write_degraded_set(items: Iterable[BenchItem], out_dir: Path, *, name: str,
                       presets: Mapping[str, DegradationPreset], seed: int, resolution: int | None,
                       write: Callable[[Path, bytes], None]) -> list[dict]:
    """Write ``gt/``, ``tar/`` and ``lq/<level>/`` PNGs for every item and return the manifest rows (one per level).

    ``presets`` maps level name -> preset (in the order the levels are reported); ``write`` is an atomic writer.
    """
    rows = []
    for item in items:
        gt = _resized(item.gt, resolution)
        write(out_dir / "gt" / f"{item.key}.png", _png(gt))
        tar_path = ""
        if item.tar is not None:
            tar_path = f"tar/{item.key}.png"
            write(out_dir / tar_path, _png(_resized(item.tar, gt.shape[0])))
        for level, preset in presets.items():
            lq, params = degrade(gt, preset, level_rng(seed, name, level, item.key))
            lq_path = f"lq/{level}/{item.key}.png"
            write(out_dir / lq_path, _png(lq))
            rows.append({
                "key": item.key, "set": name, "level": level, "lq_path": lq_path, "gt_path": f"gt/{item.key}.png",
                "tar_path": tar_path, "source_prompt": item.source_prompt, "target_prompt": item.target_prompt,
                "attribute": item.attribute, "direction": item.direction, "origin": item.origin,
                "degradation": json.dumps(params, sort_keys=True), "psnr": psnr(lq, gt),
            })
    return rows


def write_real_set(faces: Iterable[tuple[str, np.ndarray, str]], out_dir: Path, *, name: str,
                   resolution: int | None, write: Callable[[Path, bytes], None]) -> list[dict]:
    """Write real LQ faces ``(key, aligned crop, origin)`` to ``lq/real/`` and return their manifest rows."""
    rows = []
    for key, crop, origin in faces:
        lq_path = f"lq/real/{key}.png"
        write(out_dir / lq_path, _png(_resized(crop, resolution)))
        rows.append({"key": key, "set": name, "level": "real", "lq_path": lq_path, "gt_path": "", "tar_path": "",
                     "source_prompt": "", "target_prompt": "", "attribute": "", "direction": "", "origin": origin,
                     "degradation": "", "psnr": float("nan")})
    return rows


def level_psnr(rows: Sequence[dict]) -> dict[str, float]:
    """Mean PSNR (dB) per level, in the order levels first appear."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if not np.isnan(r["psnr"]):
            out.setdefault(r["level"], []).append(r["psnr"])
    return {level: round(float(np.mean(v)), 3) for level, v in out.items()}


# --- item sources -----------------------------------------------------------------------------------------------
def _decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("undecodable image member")
    return np.ascontiguousarray(img[..., ::-1])


def attrface_items(shard_dir: Path, *, lq_from: str = "src") -> Iterator[BenchItem]:
    """The pairs of every ``*.tar`` shard in ``shard_dir`` (a published split), in key order.

    ``lq_from`` says which GT the LQ is degraded from (``src`` | ``tar``); the other becomes the target.
    """
    shards = sorted(Path(shard_dir).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shards (*.tar) in {shard_dir}; publish the dataset first (job build_dataset)")
    from attrface_pipeline.stages.shards import read_back

    samples = {m["__key__"]: (shard.name, m) for shard in shards for m in read_back(shard)}
    for key in sorted(samples):
        shard_name, members = samples[key]
        image_ext = next((e for e in ("jpg", "png", "webp") if f"src.{e}" in members), None)
        missing = [m for m in ("json", "src.txt", "tar.txt") if m not in members]
        if image_ext is None or f"tar.{image_ext}" not in members or missing:
            raise ValueError(f"sample {key} in {shard_name} lacks members "
                             f"{missing or ['src/tar image']}; is {shard_dir} an AttrFace shard folder?")
        meta = json.loads(members["json"])
        src, tar = _decode(members[f"src.{image_ext}"]), _decode(members[f"tar.{image_ext}"])
        src_prompt, tar_prompt = members["src.txt"].decode(), members["tar.txt"].decode()
        if lq_from == "tar":
            src, tar, src_prompt, tar_prompt = tar, src, tar_prompt, src_prompt
        elif lq_from != "src":
            raise ValueError(f"lq_from must be 'src' or 'tar', got {lq_from!r}")
        yield BenchItem(key=key, gt=src, tar=tar, source_prompt=src_prompt, target_prompt=tar_prompt,
                        attribute=meta["edit"]["attribute"], direction=meta["edit"]["direction"],
                        origin=f"{shard_name}:{key}")


def list_images(paths: Sequence[str | Path], extensions: Sequence[str]) -> list[Path]:
    """Image files under the given folders (recursive) or files, sorted; a missing path is an error."""
    exts = {e.lower() for e in extensions}
    found: list[Path] = []
    for spec in paths:
        p = Path(spec).expanduser()
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"benchmark source {p} is not a folder or file")
    return found


def content_key(data: bytes) -> str:
    """The project's content key (16 hex chars of sha256): stable across renames and folders."""
    return hashlib.sha256(data).hexdigest()[:16]


def folder_items(files: Iterable[Path], *, decode: Callable[[bytes], np.ndarray],
                 failures: list[dict] | None = None) -> Iterator[BenchItem]:
    """Aligned HQ faces from files, keyed by content; a file that repeats an earlier one's bytes is skipped, and
    one that cannot be read or decoded becomes a row of ``failures`` (origin, key, reason), never an error."""
    seen: set[str] = set()
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as err:
            _fail(failures, f, "", f"unreadable: {err}")
            continue
        key = content_key(data)
        if key in seen:
            continue
        seen.add(key)
        try:
            gt = decode(data)
        except Exception as err:  # noqa: BLE001 - one bad file is a failure row, never the end of the set
            _fail(failures, f, key, f"undecodable: {err}")
            continue
        yield BenchItem(key=key, gt=gt, origin=str(f))


def _fail(failures: list[dict] | None, origin: Path, key: str, reason: str) -> None:
    if failures is None:
        raise ValueError(f"{origin}: {reason}")
    failures.append({"origin": str(origin), "key": key, "reason": reason})


def preview_rows(items_rows: Sequence[dict], root: Path, *, limit: int, read: Callable[[Path], np.ndarray],
                 levels: Sequence[str]) -> list[list[np.ndarray]]:
    """Rows of images ``GT | level 1 | level 2 | ...`` for the first ``limit`` keys (for preview grids)."""
    by_key: dict[str, dict[str, dict]] = {}
    for r in items_rows:
        by_key.setdefault(r["key"], {})[r["level"]] = r
    out = []
    for key in list(by_key)[:limit]:
        rows = by_key[key]
        first = next(iter(rows.values()))
        tiles = [read(root / first["gt_path"])] if first["gt_path"] else []
        tiles += [read(root / rows[level]["lq_path"]) for level in levels if level in rows]
        out.append(tiles)
    return out



def align_real_faces(files: Iterable[Path], *, detector, decode: Callable[[bytes], np.ndarray],
                     reject: Callable[[object], str], size: int,
                     align: str = "detect") -> tuple[list[tuple[str, np.ndarray, str]], list[dict]]:
    """Real LQ photos -> ``(key, aligned crop, origin)`` per kept face, and a failure row per photo or face lost.

    ``align='detect'`` finds every face with ``detector`` (the project's), drops those ``reject`` names a reason for,
    and warps each to the FFHQ template; ``as_is`` takes pre-aligned crops unchanged (key = the photo's key).
    """
    from attrface_pipeline.stages.align import align_face

    faces, failures = [], []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as err:
            _fail(failures, f, "", f"unreadable: {err}")
            continue
        key = content_key(data)
        try:
            image = decode(data)
        except Exception as err:  # noqa: BLE001 - one bad photo is a failure row, never the end of the set
            _fail(failures, f, key, f"undecodable: {err}")
            continue
        if align == "as_is":
            faces.append((key, image, str(f)))
            continue
        try:  # degenerate sizes (a 2000x16 strip) make the detector itself fail
            found = sorted(detector.detect(image), key=lambda face: (face.bbox[0], face.bbox[1]))
        except Exception as err:  # noqa: BLE001 - that photo's failure row
            _fail(failures, f, key, f"detector_failed: {type(err).__name__}: {err}")
            continue
        if not found:
            _fail(failures, f, key, "no_face")
        for index, face in enumerate(found):
            reason = reject(face)
            if not reason:
                try:
                    crop, _ = align_face(image, face.landmarks5, size=size)
                except ValueError as err:  # degenerate landmarks
                    reason = f"unalignable: {err}"
            if reason:
                _fail(failures, f, f"{key}_{index}", reason)
                continue
            faces.append((f"{key}_{index}", crop, str(f)))
    return faces, failures
