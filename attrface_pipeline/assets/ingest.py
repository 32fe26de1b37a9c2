"""Dagster assets for ingest and face extraction: read inputs, call a stage, write outputs, report metadata."""

import hashlib
import json
import time
from collections import Counter
from typing import Callable

import dagster as dg

from attrface_pipeline.assets.common import (chunk_paths, counts_json, preview_markdown, source_chunks,
                                             table_markdown)
from attrface_pipeline.assets.partitions import PER_CHUNK, SOURCE_PARTITIONS
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.config import PipelineConfig
from attrface_pipeline.images import read_rgb
from attrface_pipeline.models.store import ModelStore
from attrface_pipeline.stages.detect import FaceDetector, make_detector
from attrface_pipeline.stages.faces import FACE_SCHEMA, AlignSpec, FaceThresholds, extract_faces
from attrface_pipeline.stages.ingest import (SOURCE_SCHEMA, ContentIndex, HashCache, ingest_chunk, keys_digest,
                                            records_to_rows)
from attrface_pipeline.storage import PartitionStore

HASH_CACHE_DIR = "_hash_cache"  # under <data_root>/raw_images/, beside the chunk folders
INGEST_VERSION = "ingest-v2"  # v2: duplicates across chunks, odd files quarantined; older partitions re-run


def _raw_images_manifest(cfg: PipelineConfig, chunk: str) -> list[dict] | None:
    """(key, source_path) rows of a chunk's complete raw_images manifest, or None (then its files are hashed)."""
    store = PartitionStore(cfg.paths.data_root, "raw_images", chunk)
    if store.read_stats() is None or not store.manifest_path.exists():
        return None
    try:
        return store.read_manifest().select(["key", "source_path"]).to_pylist()
    except (OSError, ValueError, KeyError):  # unreadable or foreign manifest: hashing gives the same keys
        return None


def content_index(cfg: PipelineConfig, chunks: dict[str, list[str]]) -> ContentIndex:
    cache = HashCache(cfg.paths.data_root / "raw_images" / HASH_CACHE_DIR)
    return ContentIndex(chunks, manifest=lambda chunk: _raw_images_manifest(cfg, chunk), cache=cache)


def _raw_images_partition(context: dg.AssetExecutionContext, cfg: PipelineConfig, paths: list[str],
                          partition: str, index: ContentIndex) -> dict:
    store = PartitionStore(cfg.paths.data_root, "raw_images", partition)
    earlier = index.earlier(partition)
    # One hash over config, listing and the earlier chunks' keys: downstream fingerprints keep only a prefix of it,
    # so each of the three must change the whole string (a new duplicate upstream re-runs this chunk and its faces).
    parts = [INGEST_VERSION, cfg.fingerprint("ingest"), hashlib.sha256("\n".join(paths).encode()).hexdigest(),
             keys_digest(earlier)]
    fingerprint = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    if store.is_complete(fingerprint):
        context.log.info(f"raw_images {partition}: complete, reusing {store.dir}")
        return store.read_stats()
    store.invalidate()
    t0 = time.perf_counter()
    records = ingest_chunk(paths, min_side=cfg.ingest.min_side, max_pixels=cfg.ingest.max_pixels, earlier=earlier)
    rows = records_to_rows(records)
    store.write_manifest(rows, SOURCE_SCHEMA)
    quarantined = [r for r in rows if r["status"] != "ok"]
    reasons = dict(Counter(r["reason"] for r in quarantined))
    stats = {
        "partition": partition, "sources": len(rows), "ok": len(rows) - len(quarantined),
        "quarantined": len(quarantined), "quarantine_reasons": reasons, "seconds": round(time.perf_counter() - t0, 3),
        "quarantine_table": [{k: r[k] for k in ("key", "source_path", "reason", "detail")} for r in quarantined],
    }
    store.complete(stats, fingerprint)
    return stats


@dg.asset(
    partitions_def=SOURCE_PARTITIONS,
    backfill_policy=PER_CHUNK,
    description="Source photos of one chunk: validated, hashed, quarantined with a reason when unusable "
    "(a photo already present in an earlier chunk is a duplicate).",
    group_name="dataset",
    kinds={"python", "parquet"},
)
def raw_images(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    chunks = source_chunks(cfg)  # one directory scan per step, not one per partition
    index = content_index(cfg, chunks)
    # In source order, so the index of earlier chunks' keys grows once over the run (an unknown partition sorts
    # first and fails at once in chunk_paths).
    position = {chunk: i for i, chunk in enumerate(chunks)}
    partitions = sorted(context.partition_keys, key=lambda p: position.get(p, -1))
    all_stats = [_raw_images_partition(context, cfg, chunk_paths(chunks, p), p, index) for p in partitions]
    quarantine_rows = [row for s in all_stats for row in s["quarantine_table"]]
    return dg.MaterializeResult(
        metadata={
            "partitions": len(all_stats),
            "sources": sum(s["sources"] for s in all_stats),
            "ok": sum(s["ok"] for s in all_stats),
            "quarantined": sum(s["quarantined"] for s in all_stats),
            "quarantine_reasons": counts_json(_merge_counts(s["quarantine_reasons"] for s in all_stats)),
            "quarantine": table_markdown(quarantine_rows, ["key", "source_path", "reason", "detail"]),
            "seconds": sum(s["seconds"] for s in all_stats),
        }
    )


def _faces_partition(context: dg.AssetExecutionContext, cfg: PipelineConfig, partition: str,
                     get_detector: Callable[[], FaceDetector]) -> dict:
    source_store = PartitionStore(cfg.paths.data_root, "raw_images", partition)
    sources = source_store.read_manifest().to_pylist()
    upstream = source_store.fingerprint()
    store = PartitionStore(cfg.paths.data_root, "faces", partition)
    fingerprint = cfg.fingerprint("detect", "align") + upstream[:8]
    if store.is_complete(fingerprint):
        context.log.info(f"faces {partition}: complete, reusing {store.dir}")
        return store.read_stats()
    store.invalidate()
    # Per-image records made under other detector/alignment settings (or another upstream) must not be resumed.
    store.guard_resume(fingerprint, "aligned")
    det = cfg.detect
    detector = get_detector()
    t0 = time.perf_counter()
    rows, stats = extract_faces(
        sources, detector, FaceThresholds(det.min_score, det.min_face_size, det.min_eye_distance),
        AlignSpec(cfg.align.size, cfg.align.image_format, cfg.align.jpeg_quality), store,
        min_side=cfg.ingest.min_side, max_pixels=cfg.ingest.max_pixels, log=context.log.info,
    )
    store.write_manifest(rows, FACE_SCHEMA)
    stats.update(partition=partition, detector=detector.name, seconds=round(time.perf_counter() - t0, 3))
    store.complete(stats, fingerprint)
    return stats


def _merge_counts(dicts) -> dict[str, int]:
    return dict(sum((Counter(d) for d in dicts), Counter()))


@dg.asset(
    partitions_def=SOURCE_PARTITIONS,
    backfill_policy=PER_CHUNK,
    deps=[raw_images],
    description="Detected faces (score/size filtered) aligned to the FFHQ 5-point template; crops + manifest.",
    group_name="dataset",
    kinds={"python", "parquet"},
)
def faces(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    loaded: list[FaceDetector] = []

    def get_detector() -> FaceDetector:  # loaded once per step, and only if some partition needs work
        if not loaded:
            det = cfg.detect
            pack = ModelStore.from_config(cfg).resolve(cfg.models.insightface_pack) if det.backend == "insightface" else None
            loaded.append(make_detector(det.backend, max_side=det.max_side, max_upscale=det.max_upscale,
                                        dlib_upsample=det.dlib_upsample, insightface_pack=pack,
                                        det_size=det.insightface_det_size, min_score=det.min_score))
        return loaded[0]

    all_stats = [_faces_partition(context, cfg, p, get_detector) for p in context.partition_keys]
    previews = []
    for p in context.partition_keys:
        store = PartitionStore(cfg.paths.data_root, "faces", p)
        for row in store.read_manifest().to_pylist():
            if row["status"] == "ok" and len(previews) < 24:
                previews.append(read_rgb(store.path(row["aligned_path"])))
    detect_seconds = sum(s["detect_seconds"] for s in all_stats)
    images = sum(s["images"] - s["images_resumed"] - s["images_failed"] for s in all_stats)
    return dg.MaterializeResult(
        metadata={
            "partitions": len(all_stats),
            "images": sum(s["images"] for s in all_stats),
            "images_without_faces": sum(s["images_without_faces"] for s in all_stats),
            "detections": sum(s["detections"] for s in all_stats),
            "faces_ok": sum(s["faces_ok"] for s in all_stats),
            "rejections": counts_json(_merge_counts(s["rejections"] for s in all_stats)),
            "failures": counts_json(_merge_counts(s["failures"] for s in all_stats)),
            "detector": all_stats[0]["detector"] if all_stats else "",
            "seconds": sum(s["seconds"] for s in all_stats),
            "seconds_per_image": round(detect_seconds / images, 3) if images else 0.0,
            "preview": preview_markdown(previews),
            "stats": dg.MetadataValue.json(json.loads(json.dumps(all_stats))),
        }
    )
