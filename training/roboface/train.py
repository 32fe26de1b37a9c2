"""Train RoboFace on AttrFace shards, in two stages, with the shared engine.

    python -m training.roboface.train --config run.json --stage stage1      # I-a (Mapper) then I-b (Remover)
    python -m training.roboface.train --config run.json --stage stage2      # ControlNet + DCA
    accelerate launch --num_processes 8 -m training.roboface.train --config run.json --stage stage2

``run.json`` is a :class:`RoboFaceTrainConfig` (model / data / run / captions / samples); ``--stage`` overrides its
``stage``. The Dagster assets ``roboface_stage1`` and ``roboface_model`` write it and launch this module through
Dagster Pipes; run by hand it prints. Every stage is one engine run in its own sub-folder of ``run.output_dir``,
resumable on its own (a finished stage returns at once):

    <output_dir>/stage1a/   Mapper autoencoder on HQ and LQ (frozen UNet, N tokens as its whole context)
    <output_dir>/stage1b/   Remover on LQ -> HQ, the stage-I-a Mapper loaded and frozen
    <output_dir>/stage2/    ControlNet(LQ) + decoupled cross-attention, Mapper/Remover from ``stage1_dir`` frozen,
                            text = the caption of the HQ image (``captions``, joined by sample key)

each with ``checkpoints/checkpoint-*``, ``final/`` (``RoboFace.save`` parts + ``config.json``), ``losses.jsonl``,
``loss_curve.png`` and ``samples.png`` (rows of LQ | stage-I restoration | stage-II restoration | GT, also written
into every checkpoint). ``<output_dir>/stage2/final`` is the restorable model (``attrface restore --model
roboface --weights``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from attrface_pipeline.images import encode_image
from attrface_pipeline.storage import atomic_write_bytes
from training.data import LoaderConfig
from training.engine import DATA_FINGERPRINT, FINAL_DIR, Trainer, TrainResult, TrainSettings
from training.roboface.config import RoboFaceConfig

SAMPLES_PNG = "samples.png"
RUN_STAGES: dict[str, tuple[str, ...]] = {"stage1": ("stage1a", "stage1b"), "stage2": ("stage2",)}
# Config keys (last dotted part) a stage run may change and still resume: a longer run, the paper's length, and where
# captions are cached / served (the captions themselves are pinned by the captions file's digest).
RESUMABLE = ("steps", "epochs", "cache_dir", "base_url", "api_key_env", "concurrency", "timeout_s", "max_retries",
             "backoff_s")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSettings(_Strict):
    """The engine settings all stages share; each stage adds its own steps, lr, batch and accumulation (Adam:
    the engine's AdamW with the stage's weight decay, 0 by default)."""

    output_dir: str
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0, description="diffusers' ControlNet script default (max_grad_norm)")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = True
    seed: int = 0
    resume: str | None = "latest"
    overwrite: bool = False
    attention_backend: Literal["auto", "math", "flash", "efficient", "cudnn"] = "auto"


class SampleSettings(_Strict):
    """The sample grid written at every checkpoint of every stage."""

    faces: int = Field(4, ge=0)
    steps: int = Field(20, ge=1, description="sampling steps of both stages")
    guidance: float = Field(7.5, ge=1, description="CFG on the caption (stage II)")
    split: Literal["train", "test"] = "test"


class RoboFaceTrainConfig(_Strict):
    model: RoboFaceConfig = Field(default_factory=RoboFaceConfig)
    data: LoaderConfig
    run: RunSettings
    stage: Literal["stage1", "stage2"] | None = Field(None, description="what `python -m` runs without --stage")
    captions: str | None = Field(None, description="captions.parquet (roboface_captions); None: the dataset prompt")
    empty_caption: Literal["prompt", "empty"] = Field(
        "prompt", description="an empty or failed caption becomes the dataset's source prompt (a description of the "
                              "same HQ image), or stays empty")
    stage1_dir: str | None = Field(None, description="stage 2: the stage-I deliverable (Mapper + Remover); "
                                                     "None: <output_dir>/stage1b/final")
    samples: SampleSettings = Field(default_factory=SampleSettings)
    cache_dir: str = Field("data/cache", description="model store root (hub cache, tiny zoo), as paths.cache_dir")
    allow_download: bool = False
    text_cache: str | None = Field(None, description="a text-embedding cache of the base's text encoder "
                                   "(training/text_cache.py): the encoder is not loaded; None: it encodes every batch")

    @model_validator(mode="after")
    def _check(self) -> RoboFaceTrainConfig:
        if self.data.resolution not in (None, self.model.resolution):
            raise ValueError(f"data.resolution {self.data.resolution} differs from model.resolution "
                             f"{self.model.resolution}; leave data.resolution unset")
        if self.captions and self.data.mode == "single" and self.data.lq_from != "src":
            raise ValueError("captions describe the source (HQ) image: set data.lq_from to 'src' so the GT is the "
                             "captioned image")
        for name in ("stage1a", "stage1b", "stage2"):
            if tuple(self.model.stage(name).adam_betas) != (0.9, 0.999):
                raise ValueError(f"model.{name}.adam_betas: the shared engine's Adam(W) uses (0.9, 0.999)")
        return self

    def stage_dir(self, stage: str) -> Path:
        return Path(self.run.output_dir) / stage

    def stage1_weights(self) -> Path:
        return Path(self.stage1_dir) if self.stage1_dir else self.stage_dir("stage1b") / FINAL_DIR


def stage_settings(cfg: RoboFaceTrainConfig, stage: str) -> TrainSettings:
    """The engine's settings for one stage: the shared run settings + the stage's steps, lr and accumulation."""
    s = cfg.model.stage(stage)
    return TrainSettings(**cfg.run.model_dump(exclude={"output_dir"}), output_dir=str(cfg.stage_dir(stage)),
                         max_steps=s.steps, optimizer="adamw", lr=s.lr, weight_decay=s.weight_decay,
                         gradient_accumulation_steps=s.gradient_accumulation_steps)


def stage_data(cfg: RoboFaceTrainConfig, stage: str) -> LoaderConfig:
    return cfg.data.model_copy(update={"resolution": cfg.model.resolution,
                                       "batch_size": cfg.model.stage(stage).batch_size})


def _file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def stage_record(cfg: RoboFaceTrainConfig, stage: str) -> dict:
    """What a stage's result depends on (the engine refuses to resume when it changed; ``final/config.json``):
    a stage-I run does not depend on stage-II settings, so changing those does not block resuming stage I."""
    model = cfg.model.model_dump(mode="json", exclude={"device", "restore"})
    if stage != "stage2":
        for key in ("stage2", "caption", "dca") + (("stage1b",) if stage == "stage1a" else ()):
            model.pop(key)
    record = {"stage": stage, "model": model,
              "data": stage_data(cfg, stage).model_dump(mode="json", exclude={"num_workers", "pin_memory"})}
    if stage == "stage2":
        record.update(stage1=str(cfg.stage1_weights()), empty_caption=cfg.empty_caption, captions=cfg.captions,
                      captions_sha256=_file_digest(cfg.captions) if cfg.captions else None)
    return record


# --- captions ---------------------------------------------------------------------------------------------------------
def caption_lookup(cfg: RoboFaceTrainConfig) -> Callable[[list[str], list[str]], list[str]] | None:
    """(keys, dataset prompts) -> stage-II captions, from ``cfg.captions``; None without a captions file."""
    if not cfg.captions:
        return None
    from training.roboface.captions import read_captions

    table = read_captions(cfg.captions)

    def lookup(keys: list[str], prompts: list[str]) -> list[str]:
        missing = [k for k in keys if k not in table]
        if missing:
            raise KeyError(f"{len(missing)} sample(s) have no caption in {cfg.captions} (e.g. {missing[0]!r}): the "
                           f"shards changed since it was written; re-materialize roboface_captions")
        out = []
        for key, prompt in zip(keys, prompts):
            text = table[key]["caption"]
            out.append(text or (prompt if cfg.empty_caption == "prompt" else ""))
        return out

    return lookup


def _sample_captions(lookup, batch: dict, cfg: RoboFaceTrainConfig) -> list[str]:
    """Captions of sample rows: the captions file where it has the key (train split), else the dataset prompt."""
    prompts = [str(p) for p in batch.get("prompt") or [""] * len(batch["key"])]
    if lookup is None:
        return prompts
    out = []
    for key, prompt in zip(batch["key"], prompts):
        try:
            out.append(lookup([key], [prompt])[0])
        except KeyError:
            out.append(prompt if cfg.empty_caption == "prompt" else "")
    return out


# --- samples --------------------------------------------------------------------------------------------------------
def sample_grid(model, batch: dict, captions: list[str], cfg: RoboFaceTrainConfig, *, seed: int = 0) -> np.ndarray:
    """Rows of LQ | stage-I restoration | stage-II restoration (with the row's caption) | GT, HWC uint8."""
    from training.roboface.model import HQ_KEYS
    from training.roboface.pipeline import RoboFaceRestorer, to_uint8

    was_training = model.training
    model.eval()
    try:
        lq = to_uint8(batch["lq"])
        out = RoboFaceRestorer(model).restore_detailed(lq, captions, steps=cfg.samples.steps,
                                                       guidance=cfg.samples.guidance, seed=seed)
    finally:
        model.train(was_training)
    gt = to_uint8(next(batch[k] for k in HQ_KEYS if k in batch))
    rows = [np.concatenate(row, axis=1) for row in zip(lq, out.stage1, out.images, gt)]
    return np.concatenate(rows, axis=0)


# --- training -------------------------------------------------------------------------------------------------------
def weight_dtype(mixed_precision: str) -> str:
    """Frozen parts in the mixed-precision dtype (diffusers' training scripts); trained parts stay float32."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, "float32")


def load_model(cfg: RoboFaceTrainConfig, device: torch.device):
    """The RoboFace bundle the config names, on ``device`` (this process's accelerator), through the ModelStore."""
    from attrface_pipeline.models.store import ModelStore
    from training.roboface.model import build_roboface

    store = ModelStore(cfg.cache_dir, allow_download=cfg.allow_download)
    model_cfg = cfg.model.model_copy(update={"device": str(device), "dtype": weight_dtype(cfg.run.mixed_precision)})
    model = build_roboface(model_cfg, store, text_encoder=not cfg.text_cache)
    if cfg.text_cache:
        from training.text_cache import TextEmbeddingCache

        model.text_cache = TextEmbeddingCache(cfg.text_cache)
    return model


def _fit_stage(cfg: RoboFaceTrainConfig, model, stage: str, *, captions, samples: dict | None, main: bool,
               log: Callable[[str], None]) -> TrainResult:
    from training.data import data_fingerprint, make_loader
    from training.roboface.model import save_fn, step_fn

    model.freeze_for(stage)
    data = stage_data(cfg, stage)
    out = cfg.stage_dir(stage)
    sample_captions = _sample_captions(captions, samples, cfg) if samples is not None else []
    inner = step_fn(stage)

    def step(m: torch.nn.Module, batch: dict) -> dict:
        if stage == "stage2" and captions is not None:
            batch = {**batch, "caption": captions(list(batch["key"]), [str(p) for p in batch["prompt"]])}
        return inner(m, batch)

    def render(folder: Path) -> None:
        if samples is not None and main:
            grid = sample_grid(model, samples, sample_captions, cfg)
            atomic_write_bytes(folder / SAMPLES_PNG, encode_image(grid, "png"))

    log(f"roboface {stage}: {cfg.model.stage(stage).steps} steps into {out}")
    trainer = Trainer(stage_settings(cfg, stage), model=model, loader_factory=lambda epoch: make_loader(data,
                                                                                                        epoch=epoch),
                      step_fn=step, save_fn=save_fn(stage),
                      config={**stage_record(cfg, stage), DATA_FINGERPRINT: data_fingerprint(data)},
                      on_checkpoint=lambda _, folder: render(folder), log=log, allow_changes=RESUMABLE)
    result = trainer.fit()
    render(out)
    return result


def train(cfg: RoboFaceTrainConfig, *, stage: str, log: Callable[[str], None] = print
          ) -> tuple[dict[str, TrainResult], dict]:
    """Train (or resume) ``stage`` ("stage1": I-a then I-b; "stage2"); returns the engine's result per sub-stage and
    the paths the assets report (final weights, loss curves, sample grid)."""
    from accelerate import PartialState

    from training.data import preview_batch
    from training.engine import set_attention_backend

    if stage not in RUN_STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(RUN_STAGES)}")
    set_attention_backend(cfg.run.attention_backend)
    state = PartialState()
    torch.manual_seed(cfg.run.seed)
    if stage == "stage2" and not (cfg.stage1_weights() / "remover").is_dir():
        raise FileNotFoundError(f"stage 2 needs the stage-I Mapper and Remover at {cfg.stage1_weights()}: run "
                                f"--stage stage1 first (or set stage1_dir to a stage1b/final folder)")
    model = load_model(cfg, state.device)
    if cfg.run.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    captions = caption_lookup(cfg)
    samples = (preview_batch(cfg.data, size=cfg.samples.faces, split=cfg.samples.split,
                             resolution=cfg.model.resolution) if state.is_main_process else None)
    results: dict[str, TrainResult] = {}
    for sub in RUN_STAGES[stage]:
        if sub == "stage1b":
            model.load(results["stage1a"].final_dir)  # the Mapper of I-a's final (also when I-a was already done)
        elif sub == "stage2":
            loaded = model.load(cfg.stage1_weights())
            log(f"roboface stage2: {', '.join(loaded)} from {cfg.stage1_weights()} (frozen)")
        results[sub] = _fit_stage(cfg, model, sub, captions=captions, samples=samples,
                                  main=state.is_main_process, log=log)
    last = results[RUN_STAGES[stage][-1]]
    grid = last.output_dir / SAMPLES_PNG
    paths = {"final": last.final_dir, "samples": grid if grid.exists() else None,
             "loss_curves": {sub: r.loss_curve_path for sub, r in results.items()},
             "losses": {sub: r.losses_path for sub, r in results.items()}}
    return results, paths


def load_config(path: str | Path) -> RoboFaceTrainConfig:
    import yaml

    text = Path(path).read_text()
    raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return RoboFaceTrainConfig.model_validate(raw)


def report(results: dict[str, TrainResult], paths: dict) -> dict:
    """The assets' materialization metadata (``Path``s to PNGs become images in the Dagster UI)."""
    meta: dict = {"checkpoint": Path(paths["final"]), "samples": paths["samples"]}
    for sub, r in results.items():
        meta[f"{sub}_steps"] = r.step
        meta[f"{sub}_seconds_per_step"] = round(r.seconds_per_step, 4)
        meta[f"{sub}_resumed_from"] = r.resumed_from
        meta[f"{sub}_loss_curve"] = paths["loss_curves"][sub]
        last = _last_loss(r.losses_path)
        if last is not None:
            meta[f"{sub}_final_loss"] = last
    return meta


def _last_loss(path: Path) -> float | None:
    from training.engine import read_losses

    rows = read_losses(path) if path.exists() else []
    return float(rows[-1]["loss"]) if rows and rows[-1].get("loss") is not None else None


def main(argv: list[str] | None = None) -> None:
    from training.pipes import pipes_session

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="RoboFaceTrainConfig as JSON or YAML")
    parser.add_argument("--stage", choices=sorted(RUN_STAGES), help="default: the config's `stage`")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    stage = args.stage or cfg.stage
    if stage is None:
        parser.error("no stage: pass --stage stage1|stage2 or set `stage` in the config")
    with pipes_session() as pipes:
        results, paths = train(cfg, stage=stage, log=pipes.log)
        pipes.report(report(results, paths))


if __name__ == "__main__":
    from training.child import run_main

    run_main(main)
