"""Dagster evaluation assets (logic in training/eval/report.py):

- ``eval_report``: every configured method on every benchmark set. The trained models are the default experiment's
  (``experiments.default``: what ``a2bfr_lora`` / ``roboface_model`` last materialized for that partition); one that
  is not materialized yet is a column of n/a cells saying so, not a failed report.
- ``a2bfr_eval`` / ``roboface_eval``: one partition per experiment, that experiment's model alone.
- ``baseline_eval``: bicubic, identity, restore-then-edit and external folders.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import dagster as dg

from attrface_pipeline.assets.a2bfr import a2bfr_lora
from attrface_pipeline.assets.benchmarks import BENCH_DIR, attrface_test, celeba_test_levels, real_lq
from attrface_pipeline.assets.common import gpu_op_tags, png_markdown
from attrface_pipeline.assets.experiments import (A2BFR_EXPERIMENTS, ONE_PER_RUN, ROBOFACE_EXPERIMENTS,
                                                  checkpoint_of, experiment_for, latest_partition_metadata)
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.assets.roboface import roboface_model
from attrface_pipeline.builders import build_baseline_methods, build_eval_methods, build_eval_scorers
from attrface_pipeline.images import encode_image
from attrface_pipeline.models.store import model_fingerprint
from attrface_pipeline.remote import pull_dirs, push_dirs
from attrface_pipeline.storage import atomic_write_bytes
from training.eval.report import load_set, run_report, write_report

EVAL_DIR = "eval"
EXPERIMENTS_DIR = "experiments"  # <eval>/experiments/<model>/<experiment>/: one experiment's evaluation
BASELINES_DIR = "baselines"
TRAINED = {"a2bfr": a2bfr_lora, "roboface": roboface_model}


class EvalRun(dg.Config):
    """Per-run overrides of the config's ``eval`` section (unset: the section's value)."""

    max_faces: Optional[int] = None
    methods: Optional[list[str]] = None


def _trained_weights(context: dg.AssetExecutionContext, cfg, methods: list[str]) -> dict[str, Optional[str]]:
    """Each model method's weights: the trained folder of its default experiment (``experiments.default``)."""
    return {name: checkpoint_of(latest_partition_metadata(context.instance, asset.key,
                                                          cfg.experiments.default[name]))
            for name, asset in TRAINED.items() if name in methods}


def _with_eval_overrides(cfg, config: EvalRun):
    overrides = {k: v for k, v in config.model_dump().items() if v is not None}
    if overrides:
        cfg = cfg.model_copy(update={"eval": type(cfg.eval).model_validate({**cfg.eval.model_dump(), **overrides})})
    return cfg


def run_evaluation(context: dg.AssetExecutionContext, cfg, methods, report_dir: Path, *, preds_dir: Path,
                   extra_record: dict | None = None) -> tuple:
    """Restore and score ``methods`` on the configured sets; the report's files in ``report_dir``, predictions
    under ``preds_dir`` (shared, keyed by each method's settings). Returns (report, paths, metadata)."""
    e = cfg.eval
    pull_dirs(cfg.paths, *(f"{BENCH_DIR}/{name}" for name in e.sets))
    sets = [load_set(cfg.paths.data_root / BENCH_DIR / name, name, max_faces=e.max_faces) for name in e.sets]
    hq = next((s for s in sets if s.name == "celeba_test_levels"), None)
    scorers = build_eval_scorers(cfg)
    report = run_report(sets, methods, scorers, preds_dir, metrics=e.metrics, batch_size=e.batch_size,
                        grid_faces=e.grid_faces, write=atomic_write_bytes, hq_reference=hq, log=context.log.info)
    manifests = {s.name: hashlib.sha256((s.root / "manifest.parquet").read_bytes()).hexdigest()[:16] for s in sets}
    specs = {"lpips": e.lpips_weights, "fid": e.fid_weights}
    record = {"config": cfg.eval.model_dump(mode="json"), "profile": cfg.profile,
              "identity_backend": cfg.qc.identity_backend, "set_manifests": manifests,
              "weights": {k: {"spec": v, "fingerprint": model_fingerprint(v) if v else None} for k, v in specs.items()},
              "judge_model": getattr(scorers.judge, "model_id", None), "run_id": context.run_id,
              **(extra_record or {})}
    paths = write_report(report, report_dir, record=record, write=atomic_write_bytes)
    metadata = {
        "report": dg.MetadataValue.md(report.markdown),
        "methods": dg.MetadataValue.json(report.methods),
        "cells": len(report.results),
        "n_a_cells": sum(1 for r in report.results if r["note"] and not math.isfinite(r["value"])),
        "seconds": round(report.seconds, 2),
        "restore_seconds": round(report.restore_seconds, 2),
        "html": dg.MetadataValue.path(str(paths["html"])),
        "results": dg.MetadataValue.path(str(paths["results"])),
        "record": dg.MetadataValue.json(json.loads(paths["record"].read_text())),
    }
    for name, grid in report.grids.items():
        metadata[f"grid_{name.replace('/', '_')}"] = png_markdown(encode_image(grid, "png"),
                                                                 report.grid_captions[name])
    return report, paths, metadata


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
    cfg = _with_eval_overrides(attrface.pipeline_config(), config)
    weights = _trained_weights(context, cfg, cfg.eval.methods)
    pull_dirs(cfg.paths, *(Path(w) for w in weights.values() if w))  # trained on another machine: its run folder
    methods = build_eval_methods(cfg, weights)
    out_dir = cfg.paths.data_root / EVAL_DIR
    _, _, metadata = run_evaluation(context, cfg, methods, out_dir, preds_dir=out_dir)
    push_dirs(cfg.paths, EVAL_DIR)
    return dg.MaterializeResult(metadata=metadata)


def _experiment_eval(context: dg.AssetExecutionContext, attrface: AttrFaceConfig, config: EvalRun,
                     model: str) -> dg.MaterializeResult:
    cfg = _with_eval_overrides(attrface.pipeline_config(), config)
    experiment = experiment_for(context, cfg, model)
    trained = latest_partition_metadata(context.instance, TRAINED[model].key, experiment.name)
    weights = checkpoint_of(trained)
    if weights:
        pull_dirs(cfg.paths, Path(weights))
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"methods": [model], "external": {}})})
    methods = build_eval_methods(cfg, {model: weights})
    report_dir = cfg.paths.data_root / EVAL_DIR / EXPERIMENTS_DIR / model / experiment.name
    fingerprint = getattr(trained.get("fingerprint"), "value", None) if trained else None
    losses = Path(weights).parent / "losses.jsonl" if weights else None
    losses = losses if losses is not None and losses.is_file() else None
    extra = {"experiment": experiment.model_dump(mode="json"), "fingerprint": fingerprint, "weights": weights,
             "losses": str(losses) if losses else None, "caveat": methods[0].caveat,
             "trained_steps": getattr(trained.get("steps") or trained.get("stage2_steps"), "value", None)
             if trained else None}
    _, _, metadata = run_evaluation(context, cfg, methods, report_dir,
                                    preds_dir=cfg.paths.data_root / EVAL_DIR / EXPERIMENTS_DIR, extra_record=extra)
    push_dirs(cfg.paths, EVAL_DIR)
    metadata["experiment"] = experiment.key
    metadata["fingerprint"] = fingerprint or "-"
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    deps=[attrface_test, celeba_test_levels, real_lq, a2bfr_lora],
    partitions_def=A2BFR_EXPERIMENTS,
    backfill_policy=ONE_PER_RUN,
    description="One A²BFR experiment's trained LoRA on every benchmark set (the evaluation report's metrics); its "
    "results feed the papers' tables (paper_report).",
    group_name="evaluation",
    kinds={"python", "pytorch"},
    pool="gpu",
    op_tags=gpu_op_tags(),
)
def a2bfr_eval(context: dg.AssetExecutionContext, attrface: AttrFaceConfig, config: EvalRun) -> dg.MaterializeResult:
    return _experiment_eval(context, attrface, config, "a2bfr")


@dg.asset(
    deps=[attrface_test, celeba_test_levels, real_lq, roboface_model],
    partitions_def=ROBOFACE_EXPERIMENTS,
    backfill_policy=ONE_PER_RUN,
    description="One RoboFace experiment's trained model on every benchmark set; its results feed the papers' "
    "tables (paper_report).",
    group_name="evaluation",
    kinds={"python", "pytorch"},
    pool="gpu",
    op_tags=gpu_op_tags(),
)
def roboface_eval(context: dg.AssetExecutionContext, attrface: AttrFaceConfig,
                  config: EvalRun) -> dg.MaterializeResult:
    return _experiment_eval(context, attrface, config, "roboface")


@dg.asset(
    deps=[attrface_test, celeba_test_levels, real_lq],
    description="The baselines that need no one else's weights on every benchmark set: bicubic, identity and "
    "restore-then-edit (A²BFR's prompt-agnostic restoration of the default experiment, then the project's FlowEdit "
    "to the target prompt), plus eval.external's output folders.",
    group_name="evaluation",
    kinds={"python", "pytorch"},
    pool="gpu",
    op_tags=gpu_op_tags(),
)
def baseline_eval(context: dg.AssetExecutionContext, attrface: AttrFaceConfig,
                  config: EvalRun) -> dg.MaterializeResult:
    cfg = _with_eval_overrides(attrface.pipeline_config(), config)
    weights = _trained_weights(context, cfg, ["a2bfr"])["a2bfr"]
    if weights:
        pull_dirs(cfg.paths, Path(weights))
    methods = build_baseline_methods(cfg, weights)
    out_dir = cfg.paths.data_root / EVAL_DIR / BASELINES_DIR
    _, _, metadata = run_evaluation(context, cfg, methods, out_dir, preds_dir=out_dir)
    push_dirs(cfg.paths, EVAL_DIR)
    return dg.MaterializeResult(metadata=metadata)
