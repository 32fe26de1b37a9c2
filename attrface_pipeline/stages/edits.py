"""Per-partition editing: one FlowEdit pair per face x target prompt, batched, resumable pair by pair.

Each finished pair writes its image, then a small JSON record (``records/<pair_key>.json``) atomically; a re-run
skips pairs whose record exists, so a crash loses at most the batch in flight. The manifest is built from the
records at the end.

Images are encoded once, here, in the published format (``publish.image_format``): the edit
(``images/<pair_key>.jpg``) and, once per face, the source at the edit's resolution (``sources/<face_key>.jpg``).
QC scores those very files and publishing copies their bytes into the shards without decoding them. A PNG master
of each edit (``masters/``) is optional (``edit.lossless_master``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa

from attrface_pipeline.images import EXTENSIONS, encode_image
from attrface_pipeline.stages.flowedit import FlowEditor, FlowEditParams
from attrface_pipeline.stages.regions import ATTRIBUTE_REGIONS, region_mask
from attrface_pipeline.storage import PartitionStore, atomic_write_bytes, atomic_write_json

EDIT_SCHEMA = pa.schema(
    [
        ("pair_key", pa.string()),  # <face_key>_<attribute>_<direction>, no dots
        ("face_key", pa.string()),
        ("image_key", pa.string()),
        ("attribute", pa.string()),
        ("direction", pa.string()),
        ("source_prompt", pa.string()),
        ("target_prompt", pa.string()),
        ("source_path", pa.string()),  # the aligned crop, relative to the data root
        ("edit_path", pa.string()),  # relative to this partition's directory, in the published format
        ("source_image", pa.string()),  # the source at the edit's resolution, published format, same directory
        ("master_path", pa.string()),  # the edit as PNG (edit.lossless_master), else null
        ("resolution", pa.int32()),
        ("seed", pa.int64()),
        ("params", pa.string()),  # JSON: FlowEdit parameters incl. beta / beta_schedule, map and mask choices
        ("model_id", pa.string()),
        ("prompt_backend", pa.string()),
        ("seconds", pa.float32()),  # this pair's share of its batch's wall time
    ]
)


@dataclass(frozen=True)
class EditPair:
    pair_key: str
    face_key: str
    image_key: str
    attribute: str
    direction: str
    source_prompt: str
    target_prompt: str
    source_path: str  # relative to the data root
    landmarks5: tuple[float, ...]  # in the aligned crop's pixels
    prompt_backend: str


@dataclass(frozen=True)
class EditSpec:
    resolution: int
    params: FlowEditParams
    seed: int = 0
    region_masks: bool = False
    beta_map: str = "uniform"  # uniform | outside_region
    mask_softness: float = 0.08
    batch_size: int = 4
    model_id: str = ""
    image_format: str = "png"  # the published format: edits and sources are encoded once, in it
    jpeg_quality: int = 95
    lossless_master: bool = False

    def encode(self, rgb: np.ndarray) -> bytes:
        return encode_image(np.ascontiguousarray(rgb), self.image_format, self.jpeg_quality)


def pair_seed(seed: int, pair_key: str) -> int:
    """A stable 63-bit seed per pair: the same pair gets the same noise in any batch, on any run."""
    return int(hashlib.sha256(f"{seed}:{pair_key}".encode()).hexdigest()[:15], 16)


def build_pairs(prompt_rows: Sequence[dict], face_rows: Sequence[dict], faces_dir: str) -> list[EditPair]:
    """Face x target pairs from an edit_prompts manifest joined with the faces manifest (for crop + landmarks)."""
    faces = {r["face_key"]: r for r in face_rows if r["status"] == "ok"}
    pairs = []
    for row in prompt_rows:
        face = faces.get(row["face_key"])
        if face is None:
            raise KeyError(f"edit_prompts names face {row['face_key']!r}, which the faces manifest lacks: "
                           "re-materialize the upstream assets for this partition")
        for t in row["targets"]:
            pairs.append(EditPair(
                pair_key=f"{row['face_key']}_{t['attribute']}_{t['direction']}", face_key=row["face_key"],
                image_key=row["image_key"], attribute=t["attribute"], direction=t["direction"],
                source_prompt=row["source_prompt"], target_prompt=t["prompt"],
                source_path=f"{faces_dir}/{face['aligned_path']}", landmarks5=tuple(face["aligned_landmarks5"]),
                prompt_backend=row["backend"],
            ))
    return pairs


def _maps(batch: Sequence[EditPair], spec: EditSpec, crops: Sequence[np.ndarray],
          latent: int) -> tuple[np.ndarray | None, ...]:
    if not spec.region_masks and spec.beta_map == "uniform":
        return None, None
    masks = np.stack([
        region_mask(np.asarray(p.landmarks5).reshape(5, 2), c.shape[0], ATTRIBUTE_REGIONS.get(p.attribute), latent,
                    spec.mask_softness)
        for p, c in zip(batch, crops)
    ])
    beta_maps = 1.0 - masks if spec.beta_map == "outside_region" else None
    return beta_maps, (masks if spec.region_masks else None)


def _record_path(store: PartitionStore, pair_key: str):
    return store.path("records", f"{pair_key}.json")


def run_edits(pairs: Sequence[EditPair], editor: FlowEditor, spec: EditSpec, store: PartitionStore,
              read_crop: Callable[[str], np.ndarray], log: Callable[[str], None] = print,
              log_every: int = 16) -> tuple[list[dict], dict]:
    """Edit every pair without a record; returns (manifest rows in pair order, stats)."""
    todo = [p for p in pairs if not _record_path(store, p.pair_key).exists()]
    record = {**spec.params.record(), "region_masks": spec.region_masks, "beta_map": spec.beta_map,
              "mask_softness": spec.mask_softness}
    params_json = json.dumps(record, sort_keys=True)
    edit_seconds, calls, done = 0.0, 0, 0
    for start in range(0, len(todo), spec.batch_size):
        batch = todo[start:start + spec.batch_size]
        t0 = time.perf_counter()
        crops = [read_crop(p.source_path) for p in batch]
        small = [cv2.resize(c, (spec.resolution, spec.resolution), interpolation=cv2.INTER_AREA)
                 if c.shape[0] != spec.resolution else c for c in crops]
        beta_maps, masks = _maps(batch, spec, crops, spec.resolution // editor.pipe.vae_scale_factor)
        seeds = [pair_seed(spec.seed, p.pair_key) for p in batch]
        edited, timing = editor.edit(small, [p.source_prompt for p in batch], [p.target_prompt for p in batch],
                                     spec.params, seeds, beta_maps, masks)
        elapsed = time.perf_counter() - t0
        ext = EXTENSIONS[spec.image_format]
        for p, image, source, seed in zip(batch, edited, small, seeds):
            rel, source_rel = f"images/{p.pair_key}{ext}", f"sources/{p.face_key}{ext}"
            atomic_write_bytes(store.path(rel), spec.encode(image))
            if not store.path(source_rel).exists():  # once per face, whichever of its pairs comes first
                atomic_write_bytes(store.path(source_rel), spec.encode(source))
            master = f"masters/{p.pair_key}.png" if spec.lossless_master else None
            if master:
                atomic_write_bytes(store.path(master), encode_image(image, "png"))
            atomic_write_json(_record_path(store, p.pair_key), {
                "pair_key": p.pair_key, "face_key": p.face_key, "image_key": p.image_key, "attribute": p.attribute,
                "direction": p.direction, "source_prompt": p.source_prompt, "target_prompt": p.target_prompt,
                "source_path": p.source_path, "edit_path": rel, "source_image": source_rel, "master_path": master,
                "resolution": spec.resolution, "seed": seed,
                "params": params_json, "model_id": spec.model_id, "prompt_backend": p.prompt_backend,
                "seconds": elapsed / len(batch),
            })
        edit_seconds += elapsed
        calls += timing.transformer_calls
        done += len(batch)
        if done % log_every < len(batch) or done == len(todo):
            log(f"edits: {done}/{len(todo)} pairs, {edit_seconds / done:.2f} s/pair")
    rows = [json.loads(_record_path(store, p.pair_key).read_text()) for p in pairs]
    stats = {
        "pairs": len(pairs), "pairs_resumed": len(pairs) - len(todo), "pairs_edited": len(todo),
        "edit_seconds": round(edit_seconds, 3), "transformer_calls": calls,
        "transformer_calls_per_batch": spec.params.transformer_calls(),
        "sample_evaluations_per_pair": spec.params.sample_evaluations(),
    }
    return rows, stats
