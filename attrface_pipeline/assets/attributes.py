"""Dagster assets for attribute classification and prompt verbalization."""

import json
import os
import time
from collections import Counter

import dagster as dg

from attrface_pipeline.assets.common import counts_json, png_markdown, table_markdown
from attrface_pipeline.assets.ingest import faces
from attrface_pipeline.assets.partitions import PER_CHUNK, SOURCE_PARTITIONS
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.attributes import NEGATIVE, POSITIVE, UNKNOWN
from attrface_pipeline.config import PipelineConfig
from attrface_pipeline.images import read_rgb
from attrface_pipeline.models.device import resolve_device, resolve_dtype
from attrface_pipeline.models.farl import load_attribute_model
from attrface_pipeline.models.store import ModelStore, model_fingerprint
from attrface_pipeline.plots import stacked_bar_png
from attrface_pipeline.stages.attributes import ATTRIBUTE_SCHEMA, AttributeClassifier, classify_faces, state_counts
from attrface_pipeline.stages.verbalize import (PROMPT_SCHEMA, RequestCache, RetryPolicy, TemplateVerbalizer,
                                                TransformersVerbalizer, Verbalizer, VllmVerbalizer, build_requests,
                                                result_rows)
from attrface_pipeline.storage import PartitionStore


def load_classifier(cfg: PipelineConfig) -> AttributeClassifier:
    """The configured FaRL model on the configured device (bf16 on CUDA by default), batched."""
    acfg = cfg.attributes
    device = resolve_device(acfg.device)
    model = load_attribute_model(ModelStore.from_config(cfg).resolve(cfg.models.farl))
    return AttributeClassifier(model, device, resolve_dtype(acfg.dtype, device), acfg.batch_size)


@dg.asset(
    partitions_def=SOURCE_PARTITIONS,
    backfill_policy=PER_CHUNK,
    deps=[faces],
    pool="gpu",
    description="FaRL: 40 CelebA probabilities per aligned face, and positive/negative/unknown for the "
    "controllable attributes.",
    group_name="dataset",
    kinds={"pytorch", "parquet"},
)
def face_attributes(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    acfg = cfg.attributes
    classifier: list[AttributeClassifier] = []
    all_rows, seconds, computed = [], 0.0, 0
    for partition in context.partition_keys:
        face_store = PartitionStore(cfg.paths.data_root, "faces", partition)
        store = PartitionStore(cfg.paths.data_root, "face_attributes", partition)
        fingerprint = (cfg.fingerprint("attributes") + model_fingerprint(cfg.models.farl)
                       + face_store.fingerprint()[:8])
        if not store.is_complete(fingerprint):
            store.invalidate()
            if not classifier:  # loaded once per step, and only when a partition needs it
                classifier.append(load_classifier(cfg))
                context.log.info(f"attribute model {cfg.models.farl} on {classifier[0].device}")
            t0 = time.perf_counter()
            rows = classify_faces(
                face_store.read_manifest().to_pylist(), lambda rel: read_rgb(face_store.path(rel)), classifier[0],
                acfg.controllable, acfg.positive_threshold, acfg.negative_threshold, cfg.models.farl,
            )
            store.write_manifest(rows, ATTRIBUTE_SCHEMA)
            elapsed = time.perf_counter() - t0
            store.complete({"partition": partition, "faces": len(rows), "seconds": round(elapsed, 3)}, fingerprint)
            seconds += elapsed
            computed += len(rows)
        all_rows += store.read_manifest().to_pylist()
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


def make_verbalizer(cfg: PipelineConfig) -> Verbalizer:
    """The configured backend; LLM backends cache validated answers under ``<cache_dir>/verbalize``."""
    vcfg = cfg.verbalize
    if vcfg.backend == "template":
        return TemplateVerbalizer()
    cache = RequestCache(cfg.paths.cache_dir / "verbalize")
    retry = RetryPolicy(vcfg.vllm.max_retries, vcfg.vllm.backoff_s)
    common = dict(retry=retry, cache=cache, temperature=vcfg.temperature, max_tokens=vcfg.max_tokens, seed=vcfg.seed)
    if vcfg.backend == "vllm":
        v = vcfg.vllm
        return VllmVerbalizer(v.base_url, v.model, os.environ.get(v.api_key_env, "EMPTY"), v.concurrency,
                              v.timeout_s, v.structured_output, **common)
    path = ModelStore.from_config(cfg).resolve(cfg.models.qwen3)
    return TransformersVerbalizer(path, cfg.models.qwen3, device=str(resolve_device(cfg.attributes.device)), **common)


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
    vcfg, acfg = cfg.verbalize, cfg.attributes
    verbalizer: list[Verbalizer] = []
    counts: dict[str, int] = {}  # flips chosen so far in this step: balances sampled targets across attributes
    all_rows, seconds, computed = [], 0.0, 0
    for partition in context.partition_keys:
        attr_store = PartitionStore(cfg.paths.data_root, "face_attributes", partition)
        store = PartitionStore(cfg.paths.data_root, "edit_prompts", partition)
        fingerprint = (cfg.fingerprint("verbalize", "attributes") + model_fingerprint(cfg.models.qwen3)
                       + attr_store.fingerprint()[:8])
        attr_rows = attr_store.read_manifest().to_pylist()
        requests = build_requests(attr_rows, acfg.controllable, acfg.positive_threshold, acfg.negative_threshold,
                                  vcfg.targets, vcfg.k, vcfg.seed, counts)
        if not store.is_complete(fingerprint):
            store.invalidate()
            if not verbalizer:
                verbalizer.append(make_verbalizer(cfg))
            t0 = time.perf_counter()
            results = verbalizer[0].verbalize_many(requests)
            rows = result_rows(requests, results, {r["face_key"]: r["image_key"] for r in attr_rows})
            store.write_manifest(rows, PROMPT_SCHEMA)
            elapsed = time.perf_counter() - t0
            store.complete({"partition": partition, "faces": len(rows), "seconds": round(elapsed, 3)}, fingerprint)
            context.log.info(f"edit_prompts {partition}: {len(rows)} faces in {elapsed:.1f} s")
            seconds += elapsed
            computed += len(rows)
        all_rows += store.read_manifest().to_pylist()
    if verbalizer and hasattr(verbalizer[0], "close"):
        verbalizer[0].close()
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
