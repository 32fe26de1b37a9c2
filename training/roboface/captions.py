"""Captions of a training split's HQ (source) images, computed once: ``captions.parquet`` keyed by sample key.

Stage II trains on the caption of the HQ image (REFERENCE.md, RoboFace). :func:`caption_split` reads the split's
shards, decodes each sample's source image (``src.*``, the HQ side of an AttrFace pair and the one single-mode
loaders degrade with ``lq_from="src"``), captions every distinct image once through any :class:`Captioner`
(usually ``build_captioner``'s :class:`CachedCaptioner`) and writes one row per sample:

    key, face_key, caption, source_prompt, error, cached

``source_prompt`` is the dataset's own description of the same image (``src.txt``), kept beside the caption so the
trainer can fall back to it where a caption is empty. A caption that failed is a row with ``error`` set and no text,
never a crash; it is not cached, so the next run asks again. Resumable: the captioner's cache holds every caption
already computed, so an interrupted run loses at most one batch; the parquet is written atomically at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from training.roboface.captioner import Captioner, image_digest

CAPTIONS_FILE = "captions.parquet"
STATS_FILE = "_stats.json"


@dataclass
class CaptionSummary:
    path: Path
    samples: int
    images: int  # distinct source images captioned (pairs of one face share theirs)
    failed: int
    cached: int
    seconds: float
    backend: str
    model_id: str


def _source_member(raw: dict) -> str:
    from training.data import IMAGE_EXTENSIONS

    for name in raw:
        if name.startswith("src.") and name.split(".", 1)[1] in IMAGE_EXTENSIONS:
            return name
    raise ValueError(f"sample {raw.get('__key__')!r} has no source image member (src.{{jpg,png,webp}}); "
                     f"its members: {sorted(k for k in raw if not k.startswith('__'))}")


def source_images(shards: str | Path | list[str], *, split: str = "train"
                  ) -> Iterator[tuple[str, str, np.ndarray, str]]:
    """(key, face_key, HQ source image HWC uint8 RGB, source prompt) of every sample of a split, in shard order."""
    import json

    from attrface_pipeline.stages.shards import read_back
    from training.data import resolve_shards

    if isinstance(shards, Path):
        shards = str(shards)
    for url in resolve_shards(shards, split=split):
        for raw in read_back(Path(url)):
            member = _source_member(raw)
            bgr = cv2.imdecode(np.frombuffer(raw[member], np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"{url}: sample {raw['__key__']!r}: {member} is not a decodable image")
            meta = json.loads(raw["json"]) if "json" in raw else {}
            prompt = raw["src.txt"].decode() if "src.txt" in raw else ""
            yield raw["__key__"], str(meta.get("face_key", "")), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), prompt


def caption_split(shards: str | Path | list[str], out_dir: str | Path, captioner: Captioner, *, split: str = "train",
                  batch_size: int = 16, log: Callable[[str], None] = print) -> CaptionSummary:
    """Caption the HQ image of every sample of ``split`` and write ``out_dir/captions.parquet`` (module docstring)."""
    import pyarrow as pa

    from attrface_pipeline.storage import atomic_write_json, atomic_write_parquet

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    rows: list[dict] = []
    done: dict[str, tuple[str, str | None, bool]] = {}  # image digest -> (caption, error, cached)
    pending: list[tuple[dict, str, np.ndarray]] = []

    def flush() -> None:
        todo: dict[str, np.ndarray] = {}
        for _, digest, rgb in pending:
            if digest not in done:
                todo.setdefault(digest, rgb)
        if todo:
            results = captioner.caption_results(list(todo.values()))
            for digest, res in zip(todo, results):
                done[digest] = (res.text, res.error, res.cached)
        for row, digest, _ in pending:
            text, error, cached = done[digest]
            rows.append({**row, "caption": text, "error": error, "cached": cached})
        pending.clear()
        log(f"roboface captions: {len(rows)} samples, {len(done)} images")

    for key, face_key, rgb, prompt in source_images(shards, split=split):
        pending.append(({"key": key, "face_key": face_key, "source_prompt": prompt}, image_digest(rgb), rgb))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    if not rows:
        raise ValueError(f"the {split} split of {shards} holds no samples to caption")
    columns = ("key", "face_key", "caption", "source_prompt", "error", "cached")
    table = pa.table({c: [r[c] for r in rows] for c in columns},
                     schema=pa.schema([("key", pa.string()), ("face_key", pa.string()), ("caption", pa.string()),
                                       ("source_prompt", pa.string()), ("error", pa.string()),
                                       ("cached", pa.bool_())]))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CAPTIONS_FILE
    atomic_write_parquet(path, table)
    summary = CaptionSummary(path=path, samples=len(rows), images=len(done),
                             failed=sum(1 for v in done.values() if v[1] is not None),
                             cached=sum(1 for v in done.values() if v[2]), seconds=time.perf_counter() - t0,
                             backend=captioner.name, model_id=captioner.model_id)
    atomic_write_json(out_dir / STATS_FILE, {k: str(v) if isinstance(v, Path) else v
                                             for k, v in summary.__dict__.items()} | {"prompt": captioner.prompt})
    return summary


def read_captions(path: str | Path) -> dict[str, dict]:
    """``captions.parquet`` -> {sample key: {"caption", "source_prompt", "error"}}."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no captions at {path}: materialize roboface_captions (or run "
                                f"training.roboface.captions.caption_split) first")
    return {r["key"]: {"caption": r["caption"] or "", "source_prompt": r["source_prompt"] or "", "error": r["error"]}
            for r in pq.read_table(path).to_pylist()}
