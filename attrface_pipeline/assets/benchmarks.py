"""Dagster assets for the fixed evaluation sets (logic in training/eval/benchmark_sets.py)."""

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import numpy as np

from attrface_pipeline.assets.common import png_markdown, table_markdown
from attrface_pipeline.assets.publish import PUBLISH_DIR, attrface_shards
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.config import PipelineConfig
from attrface_pipeline.remote import pull_dirs, synced
from attrface_pipeline.images import encode_image, preview_grid, read_rgb
from attrface_pipeline.builders import build_detector
from attrface_pipeline.stages.detect import face_rejection
from attrface_pipeline.stages.ingest import decode_image
from attrface_pipeline.storage import PartitionStore, atomic_write_bytes
from training.degradation import get_preset, load_presets
from training.eval import benchmark_sets as bs

BENCH_DIR = "benchmarks"


def _files_digest(files: list[Path]) -> str:
    """Changes when a file is added, removed, renamed or rewritten."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:8]


def _build_set(context: dg.AssetExecutionContext, cfg: PipelineConfig, name: str, source_digest: str,
               make_rows: Callable[[Path], tuple[list[dict], list[dict]]]) -> dg.MaterializeResult:
    """Reuse the set if built from the same config and sources; else rebuild it from scratch. Metadata + preview."""
    with synced(cfg.paths, pull=[f"{BENCH_DIR}/{name}"], push=[f"{BENCH_DIR}/{name}"]):
        return _build_set_here(context, cfg, name, source_digest, make_rows)


def _build_set_here(context: dg.AssetExecutionContext, cfg: PipelineConfig, name: str, source_digest: str,
                    make_rows: Callable[[Path], tuple[list[dict], list[dict]]]) -> dg.MaterializeResult:
    store = PartitionStore(cfg.paths.data_root, BENCH_DIR, name)
    fingerprint = cfg.fingerprint("benchmarks") + source_digest
    failures: list[dict] = []
    if not store.is_complete(fingerprint):
        store.invalidate()
        for sub in ("gt", "tar", "lq"):  # images of a previous build that this one may not rewrite
            shutil.rmtree(store.path(sub), ignore_errors=True)
        t0 = time.perf_counter()
        rows, failures = make_rows(store.dir)
        store.write_manifest(rows, bs.SCHEMA)
        store.complete({"set": name, "rows": len(rows), "failures": failures,
                        "seconds": round(time.perf_counter() - t0, 3)}, fingerprint)
    else:
        context.log.info(f"{name}: complete, reusing {store.dir}")
        failures = store.read_stats().get("failures", [])
    rows = store.read_manifest().to_pylist()
    levels = list(dict.fromkeys(r["level"] for r in rows))
    grid = bs.preview_rows(rows, store.dir, limit=cfg.benchmarks.preview_faces, read=read_rgb, levels=levels)
    mean_psnr = bs.level_psnr(rows)
    metadata = {
        "faces": len({r["key"] for r in rows}),
        "rows": len(rows),
        "levels": dg.MetadataValue.json(levels),
        "mean_psnr_db": dg.MetadataValue.json(mean_psnr),
        **{f"psnr_{level}": value for level, value in mean_psnr.items()},
        "failures": table_markdown(failures, ["origin", "key", "reason"]),
        "seconds": store.read_stats()["seconds"],
        "path": dg.MetadataValue.path(str(store.dir)),
    }
    if grid:
        tiles = [t for row in grid for t in row]
        columns = len(grid[0])
        caption = " | ".join((["GT"] if rows[0]["gt_path"] else []) + levels)
        metadata["preview"] = png_markdown(encode_image(preview_grid(tiles, tile=96, columns=columns), "png"), caption)
    return dg.MaterializeResult(metadata=metadata)


def _presets(cfg: PipelineConfig) -> dict:
    b = cfg.benchmarks
    extra = load_presets(b.presets_file) if b.presets_file else None
    return {level: get_preset(level, extra) for level in b.levels}


def _decode(cfg: PipelineConfig) -> Callable[[bytes], np.ndarray]:
    return lambda data: decode_image(data, min_side=16, max_pixels=cfg.ingest.max_pixels)[0]


@dg.asset(
    deps=[attrface_shards],
    description="The AttrFace test split as (LQ, source GT, target GT, prompts) at each degradation level "
    "(fixed seeds per key and level).",
    group_name="benchmarks",
    kinds={"python", "parquet"},
)
def attrface_test(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    split_dir = cfg.paths.data_root / PUBLISH_DIR / "test"
    pull_dirs(cfg.paths, PUBLISH_DIR)
    stats = json.loads((cfg.paths.data_root / PUBLISH_DIR / "_stats.json").read_text())
    digest = hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()[:8]

    def make_rows(out: Path):
        items = bs.attrface_items(split_dir, lq_from=cfg.benchmarks.attrface_lq_from)
        return bs.write_degraded_set(items, out, name="attrface_test", presets=_presets(cfg),
                                     seed=cfg.benchmarks.seed, resolution=None, write=atomic_write_bytes), []

    return _build_set(context, cfg, "attrface_test", digest, make_rows)


@dg.asset(
    description="A folder of aligned HQ faces (CelebA-Test; offline: the shipped FFHQ samples) degraded at each "
    "level with fixed seeds, so every user gets byte-identical LQ.",
    group_name="benchmarks",
    kinds={"python", "parquet"},
)
def celeba_test_levels(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    src = cfg.benchmarks.celeba_test
    files = bs.list_images(src.paths, src.extensions)

    def make_rows(out: Path):
        failures: list[dict] = []
        items = bs.folder_items(files, decode=_decode(cfg), failures=failures)
        return bs.write_degraded_set(items, out, name="celeba_test_levels", presets=_presets(cfg),
                                     seed=cfg.benchmarks.seed, resolution=cfg.benchmarks.resolution,
                                     write=atomic_write_bytes), failures

    return _build_set(context, cfg, "celeba_test_levels", _files_digest(files), make_rows)


@dg.asset(
    description="Folders of real low-quality faces (LFW / WIDER / WebPhoto / SCface; offline: the shipped real LQ "
    "crops), aligned by the project's detector. No GT.",
    group_name="benchmarks",
    kinds={"python", "parquet"},
)
def real_lq(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    b, det = cfg.benchmarks, cfg.detect
    files = bs.list_images(b.real_lq.paths, b.real_lq.extensions)

    def make_rows(out: Path):
        detector = build_detector(cfg) if b.real_lq_align == "detect" else None
        faces, failures = bs.align_real_faces(
            files, detector=detector, decode=_decode(cfg), size=b.resolution, align=b.real_lq_align,
            reject=lambda f: face_rejection(f, min_score=det.min_score, min_face_size=det.min_face_size,
                                            min_eye_distance=det.min_eye_distance))
        rows = bs.write_real_set(faces, out, name="real_lq", resolution=b.resolution, write=atomic_write_bytes)
        return rows, failures

    return _build_set(context, cfg, "real_lq", _files_digest(files) + cfg.fingerprint("detect")[:8], make_rows)
