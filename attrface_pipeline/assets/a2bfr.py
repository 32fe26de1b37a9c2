"""Dagster asset ``a2bfr_lora``: train A²BFR on the published shards (logic in training/a2bfr/, no Dagster there).

The asset writes the training config and runs ``training.a2bfr.train`` as an ``accelerate launch`` subprocess
through Dagster Pipes, so the same asset trains on 1 or 8 GPUs (``a2bfr.num_processes``); the trainer reports the
loss curve, the sample grid and the checkpoint path back as materialization metadata. Re-materializing with the
same settings resumes the run folder's latest checkpoint (a finished run returns at once).

One partition per A²BFR experiment (assets/experiments.py): the experiment's overrides are applied to the ``a2bfr``
section, and the run folder is named by the resolved config, so two experiments with one config train once.
"""

from pathlib import Path
from typing import Optional

import dagster as dg

from attrface_pipeline.assets.common import gpu_op_tags, materialize_cache, training_gpus
from attrface_pipeline.assets.experiments import A2BFR_EXPERIMENTS, ONE_PER_RUN, experiment_for, experiment_metadata
from attrface_pipeline.assets.publish import PUBLISH_DIR, attrface_shards
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.assets.training import run_training_subprocess
from attrface_pipeline.builders import (a2bfr_train_config, build_gt_latents, build_text_embeddings,
                                        experiment_config, latent_cache_dir, text_cache_dir)
from attrface_pipeline.remote import synced


class A2BFRRun(dg.Config):
    """Per-run overrides of the config's ``a2bfr`` section (unset: the section's value)."""

    max_steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    aal_weight: Optional[float] = None
    sdt_margin: Optional[float] = None
    sdt_weight: Optional[float] = None
    mode: Optional[str] = None
    num_processes: Optional[int] = None
    output_dir: Optional[str] = None


@dg.asset(
    deps=[attrface_shards],
    description="Every prompt of the published shards (source and target, and the empty prompt) through models.flux's "
    "CLIP and T5 encoders once, stored beside the shards by prompt text and encoder fingerprint: A²BFR training "
    "reads them and never loads a text encoder.",
    group_name="models",
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    op_tags=gpu_op_tags(),
)
def text_embeddings(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    return materialize_cache(cfg, text_cache_dir(cfg), lambda: build_text_embeddings(cfg, log=context.log.info))


@dg.asset(
    deps=[attrface_shards],
    description="The train split's GT faces through models.flux's VAE once, at the training resolution: their "
    "posteriors stored beside the shards, so A²BFR training draws GT latents from them instead of encoding fixed "
    "images every step (the LQ stays online).",
    group_name="models",
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    op_tags=gpu_op_tags(),
)
def gt_latents(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    return materialize_cache(cfg, latent_cache_dir(cfg), lambda: build_gt_latents(cfg, log=context.log.info))


@dg.asset(
    deps=[attrface_shards, text_embeddings, gt_latents],
    partitions_def=A2BFR_EXPERIMENTS,
    backfill_policy=ONE_PER_RUN,
    description="A²BFR LoRA (Flux + condition tokens, attribute-aware loss, semantic dual-training) trained on the "
    "published shards; diffusers-format LoRA + a2bfr_config.json, loss curve and sample grid in the metadata.",
    group_name="models",
    kinds={"pytorch"},
    pool="gpu",
    op_tags=gpu_op_tags(training_gpus("a2bfr")),
)
def a2bfr_lora(context: dg.AssetExecutionContext, attrface: AttrFaceConfig, config: A2BFRRun) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    experiment = experiment_for(context, cfg, "a2bfr")
    cfg = experiment_config(cfg, experiment)
    overrides = config.model_dump(exclude={"output_dir"})
    train_cfg = a2bfr_train_config(cfg, shards=str(cfg.paths.data_root / PUBLISH_DIR), output_dir=config.output_dir,
                                   **overrides)
    processes = overrides["num_processes"] or cfg.a2bfr.num_processes
    context.log.info(f"A²BFR run folder {train_cfg.train.output_dir} ({processes} process(es))")
    run_dir = Path(train_cfg.train.output_dir)
    cache = [Path(c).relative_to(cfg.paths.data_root) for c in (train_cfg.text_cache, train_cfg.latent_cache) if c]
    with synced(cfg.paths, pull=[PUBLISH_DIR, *cache, run_dir], push=[run_dir]):  # a URL data root: shards in, run out
        results = run_training_subprocess(context, module="training.a2bfr.train",
                                          config=train_cfg.model_dump(mode="json"), output_dir=run_dir,
                                          num_processes=processes)
    result = results.get_materialize_result()
    return result._replace(metadata={**(result.metadata or {}), **experiment_metadata(experiment, run_dir)})
