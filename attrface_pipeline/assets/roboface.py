"""Dagster assets of RoboFace (logic in training/roboface/, no Dagster there):

- ``roboface_captions``: the caption of every train sample's HQ image, computed once (per-image cache) into
  ``<data_root>/roboface_captions/<captioner hash>/captions.parquet`` (experiments with one captioner share it);
- ``roboface_stage1``: stage I-a (Mapper) then I-b (Remover) -- ``training.roboface.train --stage stage1``;
- ``roboface_model``: stage II (ControlNet + decoupled cross-attention) from stage I's weights and the captions.

The training assets write their config and run the trainer as an ``accelerate launch`` subprocess through Dagster
Pipes (``roboface.num_processes`` GPUs); the trainer reports loss curves, the sample grid and the weights' path.
Re-materializing with the same settings resumes the run folder's latest checkpoint (a finished run returns at once).

All three have one partition per RoboFace experiment (assets/experiments.py): its overrides apply to the
``roboface`` section. Stage I's run folder hashes only what stage I depends on, so the stage-II ablations (explicit
or implicit text, order, Remover, captioner) share one stage I and train it once.
"""

from pathlib import Path
from typing import Optional

import dagster as dg

from attrface_pipeline.assets.common import gpu_op_tags, materialize_cache, training_gpus
from attrface_pipeline.assets.experiments import (ONE_PER_RUN, ROBOFACE_EXPERIMENTS, checkpoint_of, experiment_for,
                                                  experiment_metadata, latest_partition_metadata)
from attrface_pipeline.assets.publish import PUBLISH_DIR, attrface_shards
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.assets.training import run_training_subprocess
from attrface_pipeline.remote import synced
from attrface_pipeline.builders import (build_roboface_captioner, build_roboface_text_embeddings, captions_folder,
                                        experiment_config, roboface_text_cache_dir, roboface_train_config)

CAPTIONS_DIR = "roboface_captions"


class RoboFaceRun(dg.Config):
    """Per-run overrides of the config's ``roboface`` section (unset: the section's value)."""

    stage1a_steps: Optional[int] = None
    stage1b_steps: Optional[int] = None
    stage1_lr: Optional[float] = None
    stage1_batch_size: Optional[int] = None
    stage2_steps: Optional[int] = None
    stage2_lr: Optional[float] = None
    stage2_batch_size: Optional[int] = None
    num_processes: Optional[int] = None
    output_dir: Optional[str] = None


@dg.asset(
    deps=[attrface_shards],
    description="Captions of the HQ (source) image of every train sample for RoboFace's explicit text (LLaVA "
    "through a vLLM server in the full profile, none offline); captions.parquet keyed by sample key.",
    group_name="models",
    kinds={"parquet"},
    partitions_def=ROBOFACE_EXPERIMENTS,
    backfill_policy=ONE_PER_RUN,
)
def roboface_captions(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    import pyarrow.parquet as pq

    from training.roboface.captions import caption_split

    cfg = _experiment_cfg(context, attrface)
    captioner = build_roboface_captioner(cfg)
    folder = f"{CAPTIONS_DIR}/{captions_folder(cfg)}"
    with synced(cfg.paths, pull=[PUBLISH_DIR, folder], push=[folder]):
        summary = caption_split(cfg.paths.data_root / PUBLISH_DIR, cfg.paths.data_root / folder, captioner,
                                batch_size=cfg.roboface.caption_batch_size, log=context.log.info)
    examples = [r for r in pq.read_table(summary.path).to_pylist() if r["caption"]][:3]
    return dg.MaterializeResult(metadata={
        "samples": summary.samples, "images": summary.images, "failed": summary.failed, "cached": summary.cached,
        "backend": summary.backend, "model": summary.model_id, "seconds": round(summary.seconds, 2),
        "path": dg.MetadataValue.path(str(summary.path)),
        "examples": dg.MetadataValue.md("\n".join(f"- **{r['key']}**: {r['caption']}" for r in examples)
                                        or "(no captions: backend none; stage II uses the source prompts)"),
    })


def _experiment_cfg(context: dg.AssetExecutionContext, attrface: AttrFaceConfig):
    cfg = attrface.pipeline_config()
    return experiment_config(cfg, experiment_for(context, cfg, "roboface"))


def _launch(context: dg.AssetExecutionContext, cfg, train_cfg, processes: int, inputs=()) -> dg.MaterializeResult:
    run_dir = Path(train_cfg.run.output_dir)
    context.log.info(f"RoboFace {train_cfg.stage} run folder {run_dir} ({processes} process(es))")
    with synced(cfg.paths, pull=[PUBLISH_DIR, *inputs, run_dir], push=[run_dir]):  # a URL data root
        results = run_training_subprocess(context, module="training.roboface.train",
                                          config=train_cfg.model_dump(mode="json"), output_dir=run_dir,
                                          num_processes=processes)
    result = results.get_materialize_result()
    experiment = experiment_for(context, cfg, "roboface")
    return result._replace(metadata={**(result.metadata or {}), **experiment_metadata(experiment, run_dir)})


@dg.asset(
    deps=[attrface_shards],
    description="RoboFace stage I on the published shards: the Mapper (CLIP -> N tokens, an autoencoder through the "
    "frozen SD2.1 UNet on HQ and LQ), then the Remover (LQ tokens -> HQ tokens); loss curves and a sample grid.",
    group_name="models",
    kinds={"pytorch"},
    pool="gpu",
    op_tags=gpu_op_tags(training_gpus("roboface")),
    partitions_def=ROBOFACE_EXPERIMENTS,
    backfill_policy=ONE_PER_RUN,
)
def roboface_stage1(context: dg.AssetExecutionContext, attrface: AttrFaceConfig,
                    config: RoboFaceRun) -> dg.MaterializeResult:
    cfg = _experiment_cfg(context, attrface)
    overrides = config.model_dump(exclude={"output_dir"})
    train_cfg = roboface_train_config(cfg, shards=str(cfg.paths.data_root / PUBLISH_DIR), stage="stage1",
                                      output_dir=config.output_dir, **overrides)
    return _launch(context, cfg, train_cfg, overrides["num_processes"] or cfg.roboface.num_processes)


@dg.asset(
    deps=[roboface_captions],
    description="The text-encoder states of the published prompts, this experiment's captions and the empty prompt, "
    "once: RoboFace's stage II reads them and never loads the text encoder.",
    group_name="models",
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    op_tags=gpu_op_tags(),
    partitions_def=ROBOFACE_EXPERIMENTS,
    backfill_policy=ONE_PER_RUN,
)
def roboface_text_embeddings(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    from training.roboface.captions import CAPTIONS_FILE

    cfg = _experiment_cfg(context, attrface)
    captions = f"{CAPTIONS_DIR}/{captions_folder(cfg)}"
    return materialize_cache(cfg, roboface_text_cache_dir(cfg), lambda: build_roboface_text_embeddings(
        cfg, str(cfg.paths.data_root / captions / CAPTIONS_FILE), log=context.log.info), pull=[captions])


@dg.asset(
    deps=[roboface_stage1, roboface_captions, roboface_text_embeddings],
    description="RoboFace (stage II): ControlNet on the LQ image + decoupled cross-attention over [caption ; N "
    "implicit tokens] in every cross-attention layer, stage-I Mapper/Remover frozen; the restorable model folder "
    "(attrface restore --model roboface), loss curve and sample grid in the metadata.",
    group_name="models",
    kinds={"pytorch"},
    pool="gpu",
    op_tags=gpu_op_tags(training_gpus("roboface")),
    partitions_def=ROBOFACE_EXPERIMENTS,
    backfill_policy=ONE_PER_RUN,
)
def roboface_model(context: dg.AssetExecutionContext, attrface: AttrFaceConfig,
                   config: RoboFaceRun) -> dg.MaterializeResult:
    from training.roboface.captions import CAPTIONS_FILE

    cfg = _experiment_cfg(context, attrface)
    overrides = config.model_dump(exclude={"output_dir"})
    # stage I's weights: what roboface_stage1 last materialized for this experiment (its run config may differ)
    stage1_dir = checkpoint_of(latest_partition_metadata(context.instance, roboface_stage1.key,
                                                         context.partition_key))
    captions = f"{CAPTIONS_DIR}/{captions_folder(cfg)}"
    train_cfg = roboface_train_config(cfg, shards=str(cfg.paths.data_root / PUBLISH_DIR), stage="stage2",
                                      captions=str(cfg.paths.data_root / captions / CAPTIONS_FILE),
                                      stage1_dir=stage1_dir, output_dir=config.output_dir, **overrides)
    text = [Path(train_cfg.text_cache).relative_to(cfg.paths.data_root)] if train_cfg.text_cache else []
    return _launch(context, cfg, train_cfg, overrides["num_processes"] or cfg.roboface.num_processes,
                   inputs=[captions, *text, *([Path(stage1_dir)] if stage1_dir else [])])
