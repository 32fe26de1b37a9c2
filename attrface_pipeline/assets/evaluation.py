"""Dagster asset ``eval_report``: every configured method on every benchmark set (logic in training/eval/report.py).

The trained models are the ones ``a2bfr_lora`` and ``roboface_model`` last materialized (their ``checkpoint``
metadata); one that is not materialized yet is a column of n/a cells saying so, not a failed report.
"""

import hashlib
import json
from pathlib import Path
from typing import Optional

import dagster as dg

from attrface_pipeline.assets.a2bfr import a2bfr_lora
from attrface_pipeline.assets.benchmarks import BENCH_DIR, attrface_test, celeba_test_levels, real_lq
from attrface_pipeline.assets.common import gpu_op_tags, png_markdown
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.assets.roboface import roboface_model
from attrface_pipeline.builders import build_eval_methods, build_eval_scorers
from attrface_pipeline.images import encode_image
from attrface_pipeline.models.store import model_fingerprint
from attrface_pipeline.remote import pull_dirs, push_dirs
from attrface_pipeline.storage import atomic_write_bytes
from training.eval.report import load_set, run_report, write_report

EVAL_DIR = "eval"
TRAINED = {"a2bfr": a2bfr_lora, "roboface": roboface_model}


class EvalRun(dg.Config):
    """Per-run overrides of the config's ``eval`` section (unset: the section's value)."""

    max_faces: Optional[int] = None
    methods: Optional[list[str]] = None


def _trained_weights(context: dg.AssetExecutionContext, methods: list[str]) -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {}
    for name, asset in TRAINED.items():
        if name not in methods:
            continue
        event = context.instance.get_latest_materialization_event(asset.key)
        checkpoint = event.asset_materialization.metadata.get("checkpoint") if (
            event is not None and event.asset_materialization is not None) else None
        out[name] = getattr(checkpoint, "path", None) or getattr(checkpoint, "value", None)
    return out


@dg.asset(
    deps=[attrface_test, celeba_test_levels, real_lq, a2bfr_lora, roboface_model],
    description="A²BFR, RoboFace, the bicubic/identity baselines and any external output folders on every benchmark "
    "set: PSNR, SSIM, LPIPS, IDS, FID, no-reference IQA (pyiqa extra), SC/AA (VLM judge), CP-IDS; markdown + HTML "
    "tables beside the papers' published numbers, sample grids, the exact config and model ids.",
    group_name="evaluation",
    kinds={"python", "pytorch"},
    pool="gpu",
    op_tags=gpu_op_tags(),
)
def eval_report(context: dg.AssetExecutionContext, attrface: AttrFaceConfig, config: EvalRun) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    overrides = {k: v for k, v in config.model_dump().items() if v is not None}
    if overrides:
        cfg = cfg.model_copy(update={"eval": type(cfg.eval).model_validate({**cfg.eval.model_dump(), **overrides})})
    e = cfg.eval
    pull_dirs(cfg.paths, *(f"{BENCH_DIR}/{name}" for name in e.sets))
    sets = [load_set(cfg.paths.data_root / BENCH_DIR / name, name, max_faces=e.max_faces) for name in e.sets]
    hq = next((s for s in sets if s.name == "celeba_test_levels"), None)
    weights = _trained_weights(context, e.methods)
    pull_dirs(cfg.paths, *(Path(w) for w in weights.values() if w))  # trained on another machine: its run folder
    methods = build_eval_methods(cfg, weights)
    scorers = build_eval_scorers(cfg)
    out_dir = cfg.paths.data_root / EVAL_DIR
    report = run_report(sets, methods, scorers, out_dir, metrics=e.metrics, batch_size=e.batch_size,
                        grid_faces=e.grid_faces, write=atomic_write_bytes, hq_reference=hq, log=context.log.info)
    manifests = {s.name: hashlib.sha256((s.root / "manifest.parquet").read_bytes()).hexdigest()[:16] for s in sets}
    specs = {"lpips": e.lpips_weights, "fid": e.fid_weights}
    record = {"config": cfg.eval.model_dump(mode="json"), "profile": cfg.profile,
              "identity_backend": cfg.qc.identity_backend, "set_manifests": manifests,
              "weights": {k: {"spec": v, "fingerprint": model_fingerprint(v) if v else None} for k, v in specs.items()},
              "judge_model": getattr(scorers.judge, "model_id", None), "run_id": context.run_id}
    paths = write_report(report, out_dir, record=record, write=atomic_write_bytes)
    push_dirs(cfg.paths, EVAL_DIR)
    metadata = {
        "report": dg.MetadataValue.md(report.markdown),
        "methods": dg.MetadataValue.json(report.methods),
        "cells": len(report.results),
        "n_a_cells": sum(1 for r in report.results if r["note"]),
        "seconds": round(report.seconds, 2),
        "restore_seconds": round(report.restore_seconds, 2),
        "html": dg.MetadataValue.path(str(paths["html"])),
        "results": dg.MetadataValue.path(str(paths["results"])),
        "record": dg.MetadataValue.json(json.loads(paths["record"].read_text())),
    }
    for name, grid in report.grids.items():
        metadata[f"grid_{name.replace('/', '_')}"] = png_markdown(encode_image(grid, "png"),
                                                                 report.grid_captions[name])
    return dg.MaterializeResult(metadata=metadata)
