"""Dagster assets for attribute classification and prompt verbalization."""

from collections import Counter

import dagster as dg

from attrface_pipeline.assets.common import counts_json, gpu_op_tags, png_markdown, table_markdown
from attrface_pipeline.assets.ingest import faces
from attrface_pipeline.remote import pull_chunks, remote_root
from attrface_pipeline.assets.partition_loop import CachedBuilder, run_partitions
from attrface_pipeline.assets.partitions import PER_CHUNK, SOURCE_PARTITIONS
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.attributes import NEGATIVE, POSITIVE, UNKNOWN
from attrface_pipeline.builders import build_classifier, build_verbalizer
from attrface_pipeline.config import PipelineConfig
from attrface_pipeline.images import read_rgb
from attrface_pipeline.models.store import model_fingerprint
from attrface_pipeline.plots import stacked_bar_png
from attrface_pipeline.stages.attributes import ATTRIBUTE_SCHEMA, classify_faces, state_counts
from attrface_pipeline.stages.verbalize import PROMPT_SCHEMA, build_requests, result_rows
from attrface_pipeline.storage import PartitionStore


@dg.asset(
    partitions_def=SOURCE_PARTITIONS,
    backfill_policy=PER_CHUNK,
    deps=[faces],
    pool="gpu",
    op_tags=gpu_op_tags(),
    description="FaRL: 40 CelebA probabilities per aligned face, and positive/negative/unknown for the "
    "controllable attributes.",
    group_name="dataset",
    kinds={"pytorch", "parquet"},
)
def face_attributes(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    acfg = cfg.attributes
    classifier = CachedBuilder(lambda: build_classifier(cfg),
                               lambda c: f"attribute model {cfg.models.farl} on {c.device}")

    def compute(partition: str, store: PartitionStore) -> tuple[list[dict], dict]:
        face_store = PartitionStore(cfg.paths.data_root, "faces", partition)
        rows = classify_faces(
            face_store.read_manifest().to_pylist(), lambda rel: read_rgb(face_store.path(rel)), classifier(),
            acfg.controllable, acfg.positive_threshold, acfg.negative_threshold, cfg.models.farl,
        )
        return rows, {"faces": len(rows)}

    results = run_partitions("face_attributes", context.partition_keys, data_root=cfg.paths.data_root,
                             remote=remote_root(cfg.paths),
                             fingerprint=cfg.fingerprint("attributes") + model_fingerprint(cfg.models.farl),
                             upstream="faces", schema=ATTRIBUTE_SCHEMA, compute=compute, model=classifier,
                             log=context.log.info)
    all_rows = [row for r in results for row in r.rows()]
    seconds, computed = sum(r.seconds for r in results), sum(r.rows_computed for r in results)
    table = state_counts(all_rows, acfg.controllable)
    chart = stacked_bar_png(table, "attribute", [POSITIVE, NEGATIVE, UNKNOWN],
                            f"controllable attributes over {len(all_rows)} faces")
    return dg.MaterializeResult(
        metadata={
            "faces": len(all_rows),
            "faces_computed": computed,
            "known_per_face": round(sum(r["known"] for r in all_rows) / len(all_rows), 2) if all_rows else 0.0,
            "distribution": table_markdown(table, ["attribute", POSITIVE, NEGATIVE, UNKNOWN, "mean_p"], limit=40),
            "distribution_chart": png_markdown(chart, "attribute distribution"),
            "thresholds": dg.MetadataValue.json({"positive": acfg.positive_threshold,
                                                 "negative": acfg.negative_threshold}),
            "model": cfg.models.farl,
            "seconds": round(seconds, 3),
            "seconds_per_face": round(seconds / computed, 4) if computed else 0.0,
        }
    )


@dg.asset(
    partitions_def=SOURCE_PARTITIONS,
    backfill_policy=PER_CHUNK,
    deps=[face_attributes],
    description="Per face: a source caption and one target caption per attribute flip (template, vLLM or a "
    "local LM), with the backend, model, latency and any fallback recorded.",
    group_name="dataset",
    kinds={"python", "parquet"},
)
def edit_prompts(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    vcfg, acfg, root = cfg.verbalize, cfg.attributes, cfg.paths.data_root
    verbalizer = CachedBuilder(lambda: build_verbalizer(cfg))
    # Requests for every partition first, complete or not, in partition order: the flips chosen so far in this step
    # balance the sampled targets across attributes (``counts``), so a reused partition must still count its own.
    counts: dict[str, int] = {}
    attr_rows, requests = {}, {}
    pull_chunks(cfg.paths, context.partition_keys)
    for partition in context.partition_keys:
        attr_rows[partition] = PartitionStore(root, "face_attributes", partition).read_manifest().to_pylist()
        requests[partition] = build_requests(attr_rows[partition], acfg.controllable, acfg.positive_threshold,
                                             acfg.negative_threshold, vcfg.targets, vcfg.k, vcfg.seed, counts)

    def compute(partition: str, store: PartitionStore) -> tuple[list[dict], dict]:
        answers = verbalizer().verbalize_many(requests[partition])
        image_keys = {r["face_key"]: r["image_key"] for r in attr_rows[partition]}
        rows = result_rows(requests[partition], answers, image_keys)
        return rows, {"faces": len(rows)}

    results = run_partitions(
        "edit_prompts", context.partition_keys, data_root=root, upstream="face_attributes", schema=PROMPT_SCHEMA,
        remote=remote_root(cfg.paths),
        fingerprint=cfg.fingerprint("verbalize", "attributes") + model_fingerprint(cfg.models.qwen3),
        compute=compute, model=verbalizer, log=context.log.info,
    )
    verbalizer.close()
    all_rows = [row for r in results for row in r.rows()]
    seconds, computed = sum(r.seconds for r in results), sum(r.rows_computed for r in results)
    return dg.MaterializeResult(metadata=prompt_metadata(all_rows, cfg, seconds, computed))


def prompt_metadata(rows: list[dict], cfg: PipelineConfig, seconds: float, computed: int) -> dict:
    targets = sum(len(r["targets"]) for r in rows)
    fallbacks = [r for r in rows if r["fallback_reason"]]
    llm_rows = [r for r in rows if r["attempts"] > 0 and not r["cached"]]
    examples = [
        {"face_key": r["face_key"], "backend": r["backend"], "source_prompt": r["source_prompt"],
         "flip": f"{t['attribute']} ({t['direction']})", "target_prompt": t["prompt"]}
        for r in rows for t in r["targets"][:1]
    ]
    return {
        "faces": len(rows),
        "faces_computed": computed,
        "targets": targets,
        "flips": counts_json(Counter(t["attribute"] for r in rows for t in r["targets"])),
        "configured_backend": cfg.verbalize.backend,
        "backends_used": counts_json(Counter(r["backend"] for r in rows)),
        "fallbacks": len(fallbacks),
        "fallback_reasons": counts_json(Counter(r["fallback_reason"].split(":")[0] for r in fallbacks)),
        "cached": sum(r["cached"] for r in rows),
        "attempts": sum(r["attempts"] for r in rows),
        "mean_latency_s": round(sum(r["latency_s"] for r in llm_rows) / len(llm_rows), 4) if llm_rows else 0.0,
        "faces_per_s": round(computed / seconds, 2) if seconds else 0.0,
        "seconds": round(seconds, 3),
        "examples": table_markdown(examples, ["face_key", "backend", "source_prompt", "flip", "target_prompt"], 8),
        "fallback_detail": dg.MetadataValue.json(
            [{"face_key": r["face_key"], "reason": r["fallback_reason"]} for r in fallbacks[:20]]
        ),
    }
