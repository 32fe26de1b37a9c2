"""Restore the faces of ordinary photos with any face restorer that works on aligned crops (A²BFR, RoboFace).

A restorer is a :data:`RestoreFn`: aligned RGB uint8 crops in, restored crops of the same size out. A restorer may
also offer ``restore_native(crops)`` (restored at its own output size, e.g. A²BFR's width x height: what the
official inference returns) and ``settings()`` (what decides its output). :func:`restore_photo` makes it work on
any photo, the way GFPGAN/CodeFormer's "whole image" mode does:

- an already aligned face (``input_kind="aligned"``, or ``"auto"`` when :func:`looks_aligned` says so) is restored
  whole: given as it is to ``restore_native`` where the restorer has it (A²BFR resizes it as the official code
  does; any aspect ratio), else resized to the crop size;
- a photo: every face is detected (the project's detector; ``only_center_face`` keeps the one nearest the centre),
  aligned with ``stages.align.align_face`` to the same FFHQ template and size the dataset uses, all crops are
  restored in one call, and each is warped back with the inverse of its alignment matrix and blended in under a
  soft mask (eroded, then Gaussian-feathered, so the blend reaches zero inside the crop's footprint). Faces are
  pasted in left-to-right order; with ``upscale`` 1 pixels outside every footprint are returned bit-identical.

``upscale`` > 1 enlarges the whole photo first (``bg_upsampler``: ``none`` only resizes the background with
Lanczos, as CodeFormer/GFPGAN do without an upsampler; ``bicubic`` resizes it bicubic) and pastes the faces at the
enlarged scale. No learned background upsampler (Real-ESRGAN) is bundled.

:func:`restore_folder` is ``attrface restore``: CodeFormer's output layout (``cropped_faces/``,
``restored_faces/``, ``restored_imgs/``, ``cmp/``), the resolved settings in ``settings.json`` (with a content
fingerprint of the weights), one checksummed JSON line per input in ``restore_log.jsonl`` written as the run goes, a
re-run that skips an input only when its content, the settings and its outputs are those its record names, and one
bad file never stopping the others. Every file written is checked to lie inside the output folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from attrface_pipeline.artifacts import (ArtifactError, ArtifactKind, append_jsonl, content_fingerprint, file_sha256,
                                         finite_json, read_json, read_jsonl, register, write_json)
from attrface_pipeline.config import IngestConfig, SourceConfig
from attrface_pipeline.images import EXTENSIONS, check_rgb, encode_image
from attrface_pipeline.stages.align import align_face, template_points, transform_points
from attrface_pipeline.stages.detect import Face, FaceDetector
from attrface_pipeline.stages.faces import AlignSpec
from attrface_pipeline.stages.ingest import QuarantineError, load_rgb
from attrface_pipeline.storage import atomic_write_bytes

RestoreFn = Callable[[list[np.ndarray]], list[np.ndarray]]  # aligned RGB uint8 crops (size x size) -> same size
BG_UPSAMPLERS = {"none": cv2.INTER_LANCZOS4, "bicubic": cv2.INTER_CUBIC}
TEMPLATE = "ffhq"  # the dataset's alignment (stages.faces aligns with align_face's default template)
IMAGE_SUFFIXES = frozenset(SourceConfig.model_fields["extensions"].default_factory())
_WRITE_FORMATS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}


@dataclass
class FaceRestoreReport:
    faces: int  # faces restored (1 for an aligned input)
    aligned_input: bool
    boxes: list = field(default_factory=list)  # [x0, y0, x1, y1] per restored face, source pixels
    seconds: float = 0.0
    crops: list = field(default_factory=list)  # the aligned LQ crops (the aligned input itself), RGB uint8
    restored: list = field(default_factory=list)  # each restored face at the restorer's output size


def _matches_template(faces: list[Face], shape: tuple[int, ...], tolerance: float) -> bool:
    h, w = shape[:2]
    if h != w or len(faces) != 1:
        return False
    error = np.linalg.norm(faces[0].landmarks5 - template_points(TEMPLATE, w), axis=1).mean()
    return bool(error <= tolerance * w)


def looks_aligned(rgb: np.ndarray, detector: FaceDetector, align_spec: AlignSpec, *, tolerance: float = 0.06) -> bool:
    """True for a square image with one detected face whose 5 landmarks lie on the FFHQ template at that size.

    ``tolerance``: mean landmark distance as a fraction of the side. Measured with dlib on the sample faces:
    aligned 512² faces (HQ and real LQ) 0.018-0.042; a square crop of an unaligned portrait 0.09-0.31.
    ``align_spec`` is accepted for symmetry with :func:`restore_photo`: any size is compared at its own scale.
    """
    check_rgb(rgb)
    if rgb.shape[0] != rgb.shape[1]:
        return False
    return _matches_template(detector.detect(rgb), rgb.shape, tolerance)


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    shrink = width < rgb.shape[1]
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def paste_back(photo: np.ndarray, restored: np.ndarray, matrix: np.ndarray, *, feather: float = 0.05) -> np.ndarray:
    """Warp ``restored`` (a crop aligned by the 2x3 ``matrix``) back into ``photo`` and blend it under a soft mask.

    ``feather``: the mask is eroded by this fraction of the face's side in the photo, then blurred over the same
    width, so it is 1 inside, 0 at the crop's edge and beyond; only the region around the footprint is warped.
    """
    check_rgb(photo)
    check_rgb(restored)
    h, w = photo.shape[:2]
    size = restored.shape[0]
    inverse = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    corners = transform_points(np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64), inverse)
    x0, y0 = (max(0, math.floor(v) - 1) for v in corners.min(0))
    x1, y1 = min(w, math.ceil(corners[:, 0].max()) + 2), min(h, math.ceil(corners[:, 1].max()) + 2)
    out = photo.copy()
    if x1 <= x0 or y1 <= y0:  # the crop lies outside the photo
        return out
    shifted = inverse.copy()
    shifted[:, 2] -= (x0, y0)
    roi = (x1 - x0, y1 - y0)
    face = cv2.warpAffine(restored, shifted, roi, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(np.ones((size, size), np.float32), shifted, roi, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    side = size * math.sqrt(abs(np.linalg.det(inverse[:, :2])))  # the crop's side in photo pixels
    radius = max(1, round(feather * side))
    kernel = 2 * radius + 1
    # erode() leaves the photo's own border alone (a face cut by the edge stays opaque up to that edge)
    mask = cv2.erode(mask, np.ones((kernel, kernel), np.uint8))
    mask = cv2.GaussianBlur(mask, (kernel, kernel), sigmaX=radius / 2)[..., None]  # support = radius: stays inside
    region = out[y0:y1, x0:x1]
    blended = np.rint(mask * face.astype(np.float32) + (1 - mask) * region.astype(np.float32)).astype(np.uint8)
    out[y0:y1, x0:x1] = np.where(mask > 0, blended, region)
    return out


def _check_restored(restored: list[np.ndarray], crops: list[np.ndarray]) -> None:
    if len(restored) != len(crops):
        raise ValueError(f"the restore function returned {len(restored)} crops for {len(crops)}")
    for r, c in zip(restored, crops):
        if not (isinstance(r, np.ndarray) and r.dtype == np.uint8 and r.shape == c.shape):
            raise ValueError(f"the restore function must return uint8 RGB crops of shape {c.shape}, got "
                             f"{getattr(r, 'dtype', type(r).__name__)} {getattr(r, 'shape', '')}")


def _native(restore: RestoreFn, crops: list[np.ndarray]) -> list[np.ndarray]:
    """The restorer's own output (``restore_native`` where it has one, else the same-size contract), checked."""
    native = getattr(restore, "restore_native", None)
    restored = native(crops) if native is not None else restore(crops)
    if len(restored) != len(crops):
        raise ValueError(f"the restore function returned {len(restored)} crops for {len(crops)}")
    if native is None:
        _check_restored(restored, crops)
    for r in restored:
        check_rgb(r)
    return restored


def center_face(faces: list[Face], shape: tuple[int, ...]) -> list[Face]:
    """The face whose box centre lies nearest the image centre (facexlib's ``only_center_face``), or none."""
    if not faces:
        return []
    h, w = shape[:2]

    def distance(f: Face) -> float:
        x0, y0, x1, y1 = f.bbox
        return (0.5 * (x0 + x1) - w / 2) ** 2 + (0.5 * (y0 + y1) - h / 2) ** 2

    return [min(faces, key=distance)]


MAX_UPSCALE = 8
MAX_OUTPUT_PIXELS = 400_000_000  # an enlarged photo above this is refused (1.2 GB of RGB before encoding)


def check_upsample(upscale: float, bg_upsampler: str) -> None:
    if bg_upsampler not in BG_UPSAMPLERS:
        raise ValueError(f"bg_upsampler must be one of {sorted(BG_UPSAMPLERS)}, not {bg_upsampler!r}")
    if not math.isfinite(upscale) or not 1 <= upscale <= MAX_UPSCALE:
        raise ValueError(f"upscale must be a finite number from 1 to {MAX_UPSCALE}, got {upscale}")


def upsample(rgb: np.ndarray, upscale: float, bg_upsampler: str = "none") -> np.ndarray:
    """The photo at ``upscale`` times its size (``rgb`` itself at 1); see the module docstring for the choices."""
    check_upsample(upscale, bg_upsampler)
    if upscale == 1:
        return rgb
    h, w = rgb.shape[:2]
    pixels = round(w * upscale) * round(h * upscale)
    if pixels > MAX_OUTPUT_PIXELS:
        raise ValueError(f"a {w}x{h} photo enlarged {upscale:g}x would have {pixels / 1e6:.0f} MP; at most "
                         f"{MAX_OUTPUT_PIXELS / 1e6:.0f} MP: use a smaller --upscale")
    return cv2.resize(rgb, (round(w * upscale), round(h * upscale)), interpolation=BG_UPSAMPLERS[bg_upsampler])


def restore_photo(rgb: np.ndarray, restore: RestoreFn, *, detector: FaceDetector, align_spec: AlignSpec,
                  input_kind: Literal["auto", "aligned", "photo"] = "auto", min_face: int = 32,
                  min_score: float = 0.5, feather: float = 0.05, aligned_tolerance: float = 0.06,
                  only_center_face: bool = False, upscale: float = 1, bg_upsampler: str = "none",
                  ) -> tuple[np.ndarray, FaceRestoreReport]:
    """Restore every face of an RGB photo (or one aligned face); a photo without faces comes back unchanged
    (enlarged by ``upscale``).

    ``min_face``: detections whose box is smaller (source pixels) are left alone; ``min_score``: detector
    confidence below which a detection is ignored (dlib mmod score / insightface probability). The returned image
    of an aligned input is the restored face at the input's size; the report holds the crops and the restorer's
    own outputs.
    """
    check_rgb(rgb)
    if input_kind not in ("auto", "aligned", "photo"):
        raise ValueError(f"input_kind must be 'auto', 'aligned' or 'photo', got {input_kind!r}")
    t0 = time.perf_counter()
    h, w = rgb.shape[:2]
    faces = None
    aligned = input_kind == "aligned"
    if input_kind == "auto" and h == w:
        faces = detector.detect(rgb)
        aligned = _matches_template(faces, rgb.shape, aligned_tolerance)
    if aligned:
        if h != w and not hasattr(restore, "restore_native"):
            raise ValueError(f"an aligned face must be square, got {w}x{h}; use input_kind='photo' or 'auto'")
        crop = rgb if hasattr(restore, "restore_native") else _resize(rgb, align_spec.size, align_spec.size)
        restored = _native(restore, [crop])
        out = _resize(restored[0], w, h)
        return out, FaceRestoreReport(1, True, [[0.0, 0.0, float(w), float(h)]], time.perf_counter() - t0,
                                      [crop], restored)

    if faces is None:
        faces = detector.detect(rgb)
    kept = [f for f in faces if f.size >= min_face and f.score >= min_score]
    if only_center_face:
        kept = center_face(kept, rgb.shape)
    kept.sort(key=lambda f: (f.bbox[0], f.bbox[1]))
    crops, matrices, boxes = [], [], []
    for face in kept:
        try:
            crop, matrix = align_face(rgb, face.landmarks5, size=align_spec.size, template=TEMPLATE)
        except ValueError:  # degenerate landmarks: nothing to align, leave that region as it is
            continue
        crops.append(crop)
        matrices.append(matrix)
        boxes.append([float(v) for v in face.bbox])
    out = upsample(rgb, upscale, bg_upsampler)
    if not crops:
        return out.copy(), FaceRestoreReport(0, False, [], time.perf_counter() - t0)
    restored = _native(restore, crops)
    for face_rgb, crop, matrix in zip(restored, crops, matrices):
        scaled = np.asarray(matrix, np.float64).copy()
        scaled[:, :2] /= upscale  # photo -> crop at the enlarged scale
        out = paste_back(out, _resize(face_rgb, crop.shape[1], crop.shape[0]), scaled, feather=feather)
    return out, FaceRestoreReport(len(crops), False, boxes, time.perf_counter() - t0, crops, restored)


def output_format(path: Path) -> str:
    """The image format a file name asks for; ValueError for a suffix nothing here can write."""
    suffix = Path(path).suffix.lower()
    if suffix in _WRITE_FORMATS:
        return _WRITE_FORMATS[suffix]
    Image.init()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"cannot write {path}: unknown image suffix {suffix!r}; use .png, .jpg or .webp")
    return fmt


def encode_for_path(rgb: np.ndarray, path: Path) -> bytes:
    """Encode ``rgb`` in the format the file name asks for (png/jpg/webp as the project writes them, else PIL's)."""
    fmt = output_format(path)
    if fmt in EXTENSIONS:
        return encode_image(rgb, fmt)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, fmt)
    return buf.getvalue()


def check_suffix(suffix: str | None) -> None:
    """ValueError unless ``suffix`` (``--suffix``, appended to file names) is None or a plain piece of a file name."""
    if suffix is None:
        return
    if (not isinstance(suffix, str) or not suffix.strip() or "/" in suffix or "\\" in suffix or ".." in suffix
            or any(ord(c) < 32 or ord(c) == 127 for c in suffix)):
        raise ValueError(f"--suffix {suffix!r} is not allowed: it is appended to output file names (name_SUFFIX.png), "
                         f"so it must be non-empty and hold no path separator (/ or \\), no '..' and no control "
                         f"character (NUL, newline); e.g. --suffix v1")


@dataclass
class RestoreOptions:
    """How :func:`restore_folder` treats each input (CodeFormer's / GFPGAN's flags)."""

    input_kind: Literal["auto", "aligned", "photo"] = "auto"
    only_center_face: bool = False
    upscale: float = 1
    bg_upsampler: str = "none"
    suffix: str | None = None
    ext: Literal["auto", "png", "jpg", "webp"] = "auto"  # restored_imgs/ format; auto: the input's where writable
    min_face: int = 32

    def __post_init__(self):
        if self.input_kind not in ("auto", "aligned", "photo"):
            raise ValueError(f"input_kind must be auto, aligned or photo, not {self.input_kind!r}")
        if self.ext not in ("auto", "png", "jpg", "webp"):
            raise ValueError(f"ext must be auto, png, jpg or webp, not {self.ext!r}")
        check_upsample(self.upscale, self.bg_upsampler)
        check_suffix(self.suffix)


SETTINGS_FILE = "settings.json"
LOG_FILE = "restore_log.jsonl"
MIN_FREE_BYTES = 64 << 20


def list_inputs(src: Path, out_dir: Path | None = None) -> list[tuple[Path, str]]:
    """(image path, name relative to ``src``) for a file or a folder: entries named like images found recursively
    (the pipeline's source suffixes; hidden files and anything under ``out_dir``, when it lies inside ``src``,
    skipped). Entries that are not regular files (a dangling link, a folder named like an image) are listed too:
    their record says why they were not restored, instead of their vanishing from the counts."""
    src = Path(src)
    if src.is_file():
        return [(src, src.name)]
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist")
    skip = Path(out_dir).resolve() if out_dir is not None else None
    found = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if (p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel.parts)
                and not (skip is not None and p.resolve().is_relative_to(skip))):
            found.append((p, rel.as_posix()))
    return found


def prepare_output_dir(out_dir: Path, *, min_free: int = MIN_FREE_BYTES) -> Path:
    """Create ``out_dir`` and prove it writable with room to spare, before any model loads; a
    :class:`~attrface_pipeline.storage.StorageError` naming the path otherwise."""
    import errno
    import shutil

    from attrface_pipeline.storage import storage_error

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output {out_dir} is a file: pass a folder (-o results/)")
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(out_dir).free
    except OSError as err:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise storage_error(out_dir, err) from None
    if free < min_free:
        raise storage_error(out_dir, OSError(errno.ENOSPC, f"{free >> 20} MiB free, {min_free >> 20} MiB needed"))
    return out_dir


RESTORE_REMEDY = "choose another output folder (-o) or pass --overwrite to redo everything there"
LOG_REMEDY = "a re-run redoes the inputs of damaged lines; or pass --overwrite to redo everything"
WEIGHTS_KEY = "weights_sha256"  # the settings key holding weights_fingerprint(settings["weights"])


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_fingerprint(path: str | Path) -> str:
    """sha256 over the content of a weights file or folder (every file, by its path inside the folder; streamed,
    memoized per file for the process): other weights at the same path give another fingerprint."""
    return content_fingerprint([Path(path)])


def with_weights_fingerprint(settings: dict) -> dict:
    """``settings`` with :data:`WEIGHTS_KEY` added when ``settings["weights"]`` is an existing local file or folder
    (and the caller has not given one)."""
    weights = settings.get("weights")
    if WEIGHTS_KEY in settings or not isinstance(weights, (str, os.PathLike)) or not str(weights):
        return settings
    path = Path(weights).expanduser()
    if not path.exists():
        return settings
    return {**settings, WEIGHTS_KEY: weights_fingerprint(path)}


def output_path(out_dir: Path, rel: str | Path) -> Path:
    """``out_dir / rel``; ValueError when it would resolve outside ``out_dir`` (a '..' or absolute name, a link
    placed in the folder)."""
    root = Path(out_dir).resolve()
    path = Path(out_dir) / rel
    if not (root / rel).resolve().is_relative_to(root):
        raise ValueError(f"refusing to write {path}: it lies outside the output folder {out_dir} (name {str(rel)!r})")
    return path


def write_settings(path: Path, settings: dict) -> None:
    """``settings.json``: the run's settings and their fingerprint, with its integrity record."""
    write_json(path, "restore.settings", {"settings": settings, "fingerprint": settings_fingerprint(settings)})


def read_settings(path: Path) -> dict:
    """The settings a restore folder was made with; :class:`ArtifactError` names the path, what is wrong and the
    remedy (a missing file: ``ArtifactMissingError``)."""
    payload = read_json(path, "restore.settings")
    if not isinstance(payload.get("settings"), dict):
        raise ArtifactError(path, "the restore settings hold no 'settings' mapping", RESTORE_REMEDY)
    return payload["settings"]


def append_record(path: Path, record: dict) -> None:
    """One input's record, appended to ``restore_log.jsonl`` with its line checksum."""
    append_jsonl(path, record)


def read_log(path: Path) -> list[dict]:
    """Every record of a restore log, strictly: a damaged line raises :class:`ArtifactError` (a torn last line, the
    record a killed run was writing, is dropped)."""
    records, problems = read_jsonl(path, "restore.log")
    if problems:
        raise ArtifactError(path, f"the restore log has {len(problems)} damaged line(s) ({'; '.join(problems[:3])})",
                            LOG_REMEDY)
    return records


_NAME_FIELD = re.compile(rb'"name":\s*("(?:[^"\\]|\\.)*")')


def _name_in(raw: bytes) -> str | None:
    """The input name a damaged log line still shows, if any."""
    try:
        data = json.loads(raw.decode("utf-8"))
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            return data["name"]
    except ValueError:
        pass
    match = _NAME_FIELD.search(raw)
    try:
        name = json.loads(match.group(1).decode("utf-8", "replace")) if match else None
    except ValueError:
        return None
    return name if isinstance(name, str) else None


def _read_log(path: Path, log: Callable[[str], None] = print) -> dict[str, dict]:
    """The last record per input name. A torn last line (a killed run) is dropped; each other damaged line is
    reported (one line each, the first 20) and the input it names, where it still shows one and no later record of
    that input follows, is redone."""
    records, problems = read_jsonl(path, "restore.log")
    if not problems:
        return {rec["name"]: rec for rec in records if isinstance(rec.get("name"), str)}
    lines = path.read_bytes().split(b"\n")
    damaged = {}
    for problem in problems:
        match = re.match(r"line (\d+):", problem)
        damaged[int(match.group(1)) if match else 0] = problem
    # read_jsonl keeps the good lines in order: the non-blank lines that are not damaged (a dropped torn tail last)
    numbers = [n for n, line in enumerate(lines, 1) if line.strip() and n not in damaged]
    latest: dict[str, tuple[int, dict]] = {}
    for number, rec in zip(numbers, records):
        if isinstance(rec.get("name"), str):
            latest[rec["name"]] = (number, rec)
    for n, (number, problem) in enumerate(sorted(damaged.items())):
        name = _name_in(lines[number - 1]) if 0 < number <= len(lines) else None
        if name is None:
            what = "its input is unknown (inputs without a good record are redone)"
        elif name in latest and latest[name][0] > number:
            what = f"a later record of {name!r} stands"
        else:
            latest.pop(name, None)
            what = f"{name!r} is redone"
        if n < 20:
            log(f"restore: {path} {problem}; {what}")
    if len(damaged) > 20:
        log(f"restore: {path}: {len(damaged) - 20} more damaged line(s)")
    return {name: rec for name, (_, rec) in latest.items()}


def _check_settings(out_dir: Path, settings: dict, overwrite: bool) -> str:
    """Refuse a folder holding results of other settings (unless ``overwrite``), then record ``settings``; returns
    their fingerprint (each log record carries it)."""
    from training.engine import flatten_tree, json_normal

    path, log_path = output_path(out_dir, SETTINGS_FILE), output_path(out_dir, LOG_FILE)
    for p, what in ((path, "settings"), (log_path, "log")):
        if p.is_dir():
            raise ArtifactError(p, f"a folder where the restore {what} file belongs",
                                "remove it or choose another output folder (-o)")
    now = json_normal(finite_json(settings))
    if path.exists() and not overwrite:
        old = read_settings(path)
        if old != now:
            before, after = flatten_tree(old), flatten_tree(now)
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            why = ", ".join(changed)
            if WEIGHTS_KEY in changed and "weights" not in changed:
                why += (f"; the weights at {now.get('weights')} changed: same path, other content than these "
                        f"results were made with")
            raise ValueError(f"{out_dir} holds results made with other settings (changed: {why}); {RESTORE_REMEDY}")
    if overwrite:
        log_path.unlink(missing_ok=True)
    write_settings(path, now)
    return settings_fingerprint(now)


def _names(name: str, index: int, suffix: str | None) -> tuple[str, str, str]:
    stem = Path(name).with_suffix("").as_posix()
    tail = f"_{suffix}" if suffix else ""
    face = f"{stem}_{index:02d}"
    return f"cropped_faces/{face}.png", f"restored_faces/{face}{tail}.png", f"cmp/{face}.png"


def _image_name(name: str, suffix: str | None, ext: str) -> str:
    path = Path(name)
    if ext == "auto":
        ext = path.suffix.lower().lstrip(".")
        ext = ext if ext in ("png", "jpg", "jpeg", "webp") else "png"
    return (path.parent / f"{path.stem}{f'_{suffix}' if suffix else ''}.{ext}").as_posix()


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left`` (resized to ``right``'s height) | ``right``."""
    h = right.shape[0]
    if left.shape[0] != h:
        left = _resize(left, max(1, round(left.shape[1] * h / left.shape[0])), h)
    return np.concatenate([left, right], axis=1)


def restore_one(src: Path, name: str, out_dir: Path, restore: RestoreFn, *, detector: FaceDetector,
                align_spec: AlignSpec, options: RestoreOptions, max_pixels: int) -> dict:
    """Restore one input into ``out_dir``'s layout; returns its record (raises on failure, ValueError for an output
    name that would lie outside ``out_dir``). ``input_sha256``: of the bytes restored; ``output_sha256``: of each
    file written."""
    rgb, input_sha256 = load_rgb(src, min_side=1, max_pixels=max_pixels)
    out, report = restore_photo(rgb, restore, detector=detector, align_spec=align_spec,
                                input_kind=options.input_kind, min_face=options.min_face,
                                only_center_face=options.only_center_face, upscale=options.upscale,
                                bg_upsampler=options.bg_upsampler)
    planned = []
    for i in range(len(report.crops)):
        planned.extend(_names(name, i, options.suffix))
    if not report.aligned_input:  # a whole photo: the faces pasted back (unchanged when none was found)
        planned.append(f"restored_imgs/{_image_name(name, options.suffix, options.ext)}")
    paths = [output_path(out_dir, rel) for rel in planned]  # every name checked before anything is written
    images = []
    for crop, face in zip(report.crops, report.restored):
        images += [crop, face, side_by_side(crop, face)]
    if not report.aligned_input:
        images.append(out)
    hashes = {}
    for rel, path, image in zip(planned, paths, images):
        data = encode_for_path(image, path)
        atomic_write_bytes(path, data)
        hashes[rel] = hashlib.sha256(data).hexdigest()
    return {"faces": report.faces, "aligned_input": report.aligned_input, "outputs": planned,
            "reason": "" if report.faces else "no face found; the photo was written unchanged",
            "input_sha256": input_sha256, "output_sha256": hashes}


def _still_done(record: dict | None, src: Path, out_dir: Path, fingerprint: str) -> bool:
    """True when ``record`` says ``src`` was restored with these settings, ``src`` holds the same bytes now, and
    every output it names is there with the content written."""
    if not record or record.get("status") != "ok" or record.get("settings") != fingerprint:
        return False
    outputs, hashes = record.get("outputs"), record.get("output_sha256")
    if not (isinstance(outputs, list) and isinstance(hashes, dict) and record.get("input_sha256")):
        return False
    try:
        if not Path(src).is_file() or file_sha256(src) != record["input_sha256"]:  # is_file: never open a FIFO
            return False
        for rel in outputs:
            path = output_path(out_dir, rel)
            if not path.is_file() or hashes.get(rel) != file_sha256(path):
                return False
    except (OSError, ValueError, TypeError):
        return False
    return True


def _stem(name: str) -> str:
    try:
        return Path(name).with_suffix("").as_posix()
    except ValueError:
        return name


def restore_folder(inputs: list[tuple[Path, str]], out_dir: Path, restore: RestoreFn, *, detector: FaceDetector,
                   align_spec: AlignSpec, settings: dict, options: RestoreOptions | None = None,
                   overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                   max_pixels: int | None = None) -> dict:
    """Restore every input (``list_inputs``) into ``out_dir``; returns the run's summary.

    ``settings`` (the model's and the run's, JSON-able) go to ``settings.json``, with ``weights_sha256``
    (:func:`weights_fingerprint`) added when ``settings["weights"]`` is a local file or folder; a folder holding
    results of other settings (other weights at the same path included) is refused unless ``overwrite``; a damaged
    ``settings.json`` is refused naming it. One checksummed record per input is appended to ``restore_log.jsonl``
    as soon as it is done: name, file, status (ok | failed), reason, faces, aligned_input, seconds, outputs,
    input_sha256, output_sha256, settings (their fingerprint). An input is skipped only when its last record is ok,
    was made with these settings, its file still has the recorded sha256 and its outputs the recorded content
    (``overwrite`` redoes all). A bad input (unreadable, too small for the detector, a failed write, a name whose
    outputs would collide with an earlier input's) is a failed record; the run goes on.
    """
    from tqdm.auto import tqdm

    options = options or RestoreOptions()
    check_suffix(options.suffix)
    max_pixels = max_pixels or IngestConfig().max_pixels
    out_dir = prepare_output_dir(out_dir)
    full = {**with_weights_fingerprint(settings), "options": asdict(options)}
    fingerprint = _check_settings(out_dir, full, overwrite)
    log_path = output_path(out_dir, LOG_FILE)
    previous = {} if overwrite else _read_log(log_path, log)
    owners: dict[str, str] = {}
    for _, name in inputs:
        owners.setdefault(_stem(name), name)
    summary = {"inputs": len(inputs), "restored": 0, "skipped": 0, "failed": 0, "faces": 0, "failures": [],
               "out_dir": str(out_dir)}
    t_run = time.perf_counter()
    bar = tqdm(inputs, desc="restore", unit="img", disable=not progress, dynamic_ncols=True)
    for src, name in bar:
        if _still_done(previous.get(name), src, out_dir, fingerprint):
            summary["skipped"] += 1
            continue
        t0 = time.perf_counter()
        record = {"name": name, "file": str(src), "status": "ok", "reason": "", "faces": 0,
                  "aligned_input": False, "outputs": [], "input_sha256": None, "output_sha256": {},
                  "settings": fingerprint}
        first = owners.get(_stem(name), name)
        try:
            if first != name:
                raise ValueError(f"its outputs would take the names of those of {first} (the same name but the "
                                 f"suffix); rename one of them")
            record.update(restore_one(src, name, out_dir, restore, detector=detector, align_spec=align_spec,
                                      options=options, max_pixels=max_pixels))
        except QuarantineError as err:
            record.update(status="failed", reason=f"unreadable: {err}")
        except Exception as err:  # noqa: BLE001 - one bad input never stops the others; the record says why
            record.update(status="failed", reason=f"{type(err).__name__}: {err}")
        record["seconds"] = round(time.perf_counter() - t0, 3)
        append_record(log_path, record)
        if record["status"] == "failed":
            summary["failed"] += 1
            summary["failures"].append((name, record["reason"]))
            log(f"restore: {name} failed: {record['reason']}")
        else:
            summary["restored"] += 1
            summary["faces"] += record["faces"]
            if record["reason"]:
                log(f"restore: {name}: {record['reason']}")
        bar.set_postfix(faces=summary["faces"], failed=summary["failed"])
    summary["seconds"] = round(time.perf_counter() - t_run, 2)
    return summary


def _example_settings(folder: Path) -> list[Path]:
    path = Path(folder) / SETTINGS_FILE
    write_settings(path, {"model": "example", "weights": "weights.safetensors", WEIGHTS_KEY: "0" * 64,
                          "options": asdict(RestoreOptions(suffix="v1"))})
    return [path]


def _example_log(folder: Path) -> list[Path]:
    path = Path(folder) / LOG_FILE
    for name in ("a.png", "sub/b.jpg"):
        append_record(path, {"name": name, "file": f"in/{name}", "status": "ok", "reason": "", "faces": 1,
                             "aligned_input": False, "outputs": [f"restored_imgs/{name}"],
                             "input_sha256": hashlib.sha256(name.encode()).hexdigest(),
                             "output_sha256": {f"restored_imgs/{name}": "0" * 64}, "settings": "0" * 16,
                             "seconds": 0.5})
    return [path]


register(ArtifactKind("restore.settings", 1, "restore settings", RESTORE_REMEDY, example=_example_settings,
                      read=read_settings))
register(ArtifactKind("restore.log", 1, "restore log", LOG_REMEDY, example=_example_log, read=read_log,
                      torn_tail_ok=True))
