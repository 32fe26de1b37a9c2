"""Dagster assets for ingest and face extraction: read inputs, call a stage, write outputs, report metadata."""

import hashlib
import json
from collections import Counter

import dagster as dg

from attrface_pipeline.assets.common import (chunk_paths, chunk_plan, chunk_registry, counts_json, preview_markdown,
                                             table_markdown)
from attrface_pipeline.remote import remote_root
from attrface_pipeline.assets.partition_loop import CachedBuilder, run_partitions
from attrface_pipeline.assets.partitions import PER_CHUNK, SOURCE_PARTITIONS
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.builders import align_spec, build_detector, face_thresholds
from attrface_pipeline.config import PipelineConfig
from attrface_pipeline.images import read_rgb
from attrface_pipeline.stages.chunks import ChunkConflict, ChunkPlan
from attrface_pipeline.stages.faces import FACE_SCHEMA, extract_faces
from attrface_pipeline.stages.ingest import (SOURCE_SCHEMA, ContentIndex, HashCache, ingest_chunk, keys_digest,
                                            records_to_rows)
from attrface_pipeline.storage import PartitionStore

HASH_CACHE_DIR = "_hash_cache"  # under <data_root>/raw_images/, beside the chunk folders
# v2: duplicates across chunks, odd files quarantined; v3: source ids (a moved build is the same build). Older
# partitions re-run once.
INGEST_VERSION = "ingest-v3"


def _raw_images_manifest(cfg: PipelineConfig, chunk: str) -> list[dict] | None:
    """(key, source_id) rows of a chunk's complete raw_images manifest, or None (then its files are hashed)."""
    store = PartitionStore(cfg.paths.data_root, "raw_images", chunk)
    if store.read_stats() is None or not store.manifest_path.exists():
        return None
    try:
        return store.read_manifest().select(["key", "source_id"]).to_pylist()
    except (OSError, ValueError, KeyError):  # unreadable or foreign manifest: hashing gives the same keys
        return None


def content_index(cfg: PipelineConfig, plan: ChunkPlan) -> ContentIndex:
    cache = HashCache(cfg.paths.data_root / "raw_images" / HASH_CACHE_DIR)
    return ContentIndex(plan.chunks, manifest=lambda chunk: _raw_images_manifest(cfg, chunk), cache=cache,
                        resolve=plan.path)


def _raw_images_fingerprint(cfg: PipelineConfig, ids: list[str], earlier: dict[str, str]) -> str:
    # One hash over config, members and the earlier chunks' keys: downstream fingerprints keep only a prefix of it,
    # so each of the three must change the whole string (a new duplicate upstream re-runs this chunk and its faces).
    # Source ids, not paths: the same photos mounted elsewhere are the same chunk.
    parts = [INGEST_VERSION, cfg.fingerprint("ingest"), hashlib.sha256("\n".join(ids).encode()).hexdigest(),
             keys_digest(earlier)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


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
    registry = chunk_registry(cfg)
    try:
        plan = chunk_plan(cfg)  # one directory scan per step, not one per partition
        # Fix the members of every new chunk before anything is built from one: all of them at once, so numbering
        # is the same whichever chunk a run builds first (concurrent runs register the same members; first wins).
        for chunk in plan.new:
            if registry.commit(chunk, plan.chunks[chunk], listed=plan.paths):
                context.log.info(f"registered {chunk}: {len(plan.chunks[chunk])} source files")
    except ChunkConflict as err:
        raise dg.Failure(str(err)) from None
    chunks = plan.chunks
    missing = [{"chunk": c, "source_id": p} for c in context.partition_keys for p in plan.missing.get(c, [])]
    if missing:
        context.log.warning(f"{len(missing)} registered source files are no longer listed (kept in their chunks, "
                            f"not re-chunked): {', '.join(m['source_id'] for m in missing[:5])}")
    if (remote := remote_root(cfg.paths)) is not None:  # earlier chunks' keys come from their manifests, not hashing
        for chunk in chunks:
            remote.pull(f"raw_images/{chunk}")
    index = content_index(cfg, plan)
    # In source order, so the index of earlier chunks' keys grows once over the run (an unknown partition sorts
    # first and fails at once in chunk_paths).
    position = {chunk: i for i, chunk in enumerate(chunks)}
    partitions = sorted(context.partition_keys, key=lambda p: position.get(p, -1))

    def compute(partition: str, store: PartitionStore) -> tuple[list[dict], dict]:
        ids = chunk_paths(chunks, partition)
        records = ingest_chunk([plan.path(i) for i in ids], ids=ids, min_side=cfg.ingest.min_side,
                               max_pixels=cfg.ingest.max_pixels, earlier=index.earlier(partition))
        rows = records_to_rows(records)
        quarantined = [r for r in rows if r["status"] != "ok"]
        return rows, {
            "sources": len(rows), "ok": len(rows) - len(quarantined), "quarantined": len(quarantined),
            "quarantine_reasons": dict(Counter(r["reason"] for r in quarantined)),
            "quarantine_table": [{k: r[k] for k in ("key", "source_id", "reason", "detail")} for r in quarantined],
        }

    results = run_partitions(
        "raw_images", partitions, data_root=cfg.paths.data_root, remote=remote_root(cfg.paths), schema=SOURCE_SCHEMA,
        compute=compute,
        fingerprint=lambda p: _raw_images_fingerprint(cfg, chunk_paths(chunks, p), index.earlier(p)),
        log=context.log.info,
    )
    all_stats = [r.stats for r in results]
    quarantine_rows = [row for s in all_stats for row in s["quarantine_table"]]
    return dg.MaterializeResult(
        metadata={
            "partitions": len(all_stats),
            "sources": sum(s["sources"] for s in all_stats),
            "ok": sum(s["ok"] for s in all_stats),
            "quarantined": sum(s["quarantined"] for s in all_stats),
            "quarantine_reasons": counts_json(_merge_counts(s["quarantine_reasons"] for s in all_stats)),
            "quarantine": table_markdown(quarantine_rows, ["key", "source_id", "reason", "detail"]),
            "missing_sources": len(missing),
            "missing": table_markdown(missing, ["chunk", "source_id"]),
            "new_chunks": dg.MetadataValue.json(sorted(set(plan.new) & set(context.partition_keys))),
            "computed_partitions": sum(r.computed for r in results),
            "seconds": sum(s["seconds"] for s in all_stats),
        }
    )


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
    detector = CachedBuilder(lambda: build_detector(cfg), lambda d: f"detector {d.name}")

    plan = None  # source id -> this machine's path, listed once per step when a partition needs it

    def compute(partition: str, store: PartitionStore) -> tuple[list[dict], dict]:
        nonlocal plan
        sources = PartitionStore(cfg.paths.data_root, "raw_images", partition).read_manifest().to_pylist()
        plan = plan or chunk_plan(cfg)
        for src in sources:  # read the photos where this machine has them (the build may have moved)
            src["source_path"] = plan.paths.get(src.get("source_id"), src["source_path"])
        rows, stats = extract_faces(sources, detector(), face_thresholds(cfg), align_spec(cfg), store,
                                    min_side=cfg.ingest.min_side, max_pixels=cfg.ingest.max_pixels,
                                    log=context.log.info)
        return rows, {**stats, "detector": detector().name}

    # resume: an interrupted partition keeps the crops and records of the images it finished
    results = run_partitions("faces", context.partition_keys, data_root=cfg.paths.data_root,
                             remote=remote_root(cfg.paths),
                             fingerprint=cfg.fingerprint("detect", "align"), upstream="raw_images",
                             schema=FACE_SCHEMA, compute=compute, resume=["aligned"], model=detector,
                             log=context.log.info)
    all_stats = [r.stats for r in results]
    previews = []
    for result in results:
        for row in result.rows():
            if row["status"] == "ok" and len(previews) < 24:
                previews.append(read_rgb(result.store.path(row["aligned_path"])))
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
