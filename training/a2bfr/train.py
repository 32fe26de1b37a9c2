"""Train an A²BFR LoRA on AttrFace shards.

    python -m training.a2bfr.train --config run.json                      # one process
    accelerate launch --num_processes 8 -m training.a2bfr.train --config run.json

``run.json`` is an :class:`~training.a2bfr.config.A2BFRTrainConfig` (model / loss / data / train / samples). The
Dagster asset ``a2bfr_lora`` writes it and launches this module through Dagster Pipes; run by hand it prints.
Outputs in ``train.output_dir``: ``checkpoints/checkpoint-*`` (each one a loadable LoRA + optimizer state),
``final/`` (the LoRA in diffusers format + ``a2bfr_config.json``), ``losses.jsonl``, ``loss_curve.png``,
``samples.png`` (LQ | restored with the source prompt | with the target prompt | GT).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from attrface_pipeline.images import encode_image
from attrface_pipeline.storage import atomic_write_bytes
from training.a2bfr.config import A2BFRTrainConfig
from training.a2bfr.losses import Objective
from training.a2bfr.model import ConditionedFlux, add_condition_lora, freeze_unused_lora, set_lora_scale
from training.a2bfr.pipeline import A2BFRPipeline, save_a2bfr_lora, to_uint8
from training.engine import DATA_FINGERPRINT, Trainer, TrainResult, set_attention_backend

SAMPLES_PNG = "samples.png"


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """Frozen weights in the mixed-precision dtype (diffusers' training scripts); trained LoRA weights stay fp32
    unless ``model.lora.dtype`` is bf16 (OminiControl's whole-model bf16)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def load_models(cfg: A2BFRTrainConfig, device: torch.device) -> tuple[A2BFRPipeline, torch.nn.Module]:
    """The Flux pipeline (frozen, LoRA added) and the frozen FaRL model, through the same store/loader code for
    real and tiny checkpoints."""
    from attrface_pipeline.models.farl import load_attribute_model
    from attrface_pipeline.models.store import ModelStore

    from training.quantize import check_base_dtype, check_optimizer, load_quantized_transformer

    check_base_dtype(cfg.model.base_dtype, device)  # before any weight is read
    check_optimizer(cfg.train.optimizer, device)
    store = ModelStore(cfg.cache_dir, allow_download=cfg.allow_download)
    dtype = weight_dtype(cfg.train.mixed_precision)
    cache = None
    without = {}
    if cfg.text_cache:  # the prompts' embeddings come from the cache: no text encoder is loaded
        from training.text_cache import TextEmbeddingCache

        cache = TextEmbeddingCache(cfg.text_cache)
        without = {"text_encoder": None, "text_encoder_2": None, "tokenizer": None, "tokenizer_2": None}
    base = store.resolve(cfg.model.base)
    if cfg.model.base_dtype != "bf16":  # QLoRA: the frozen weights quantized on load, the LoRA in fp32 above them
        without["transformer"] = load_quantized_transformer(base, cfg.model.base_dtype, torch.bfloat16)
    pipe = A2BFRPipeline.from_pretrained(base, dtype=dtype, **without)
    pipe.text_cache = cache
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        if part is not None:
            part.requires_grad_(False)
    lora = cfg.model.lora
    add_condition_lora(pipe.transformer, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                       adapter_name=lora.adapter_name, init=lora.init)
    set_lora_scale(pipe.transformer, lora.adapter_name, lora.scale)
    freeze_unused_lora(pipe.transformer)
    lora_dtype = torch.bfloat16 if lora.dtype == "bf16" else torch.float32
    for param in pipe.transformer.parameters():  # the adapter trains in fp32 (master weights) or bf16
        if param.requires_grad:
            param.data = param.data.to(lora_dtype)
    pipe.adapter_name, pipe.condition_attends = lora.adapter_name, cfg.model.condition_attends
    if cfg.train.gradient_checkpointing:
        pipe.vae.enable_gradient_checkpointing()  # the attribute loss decodes with gradients
    pipe.to(device)
    farl = load_attribute_model(store.resolve(cfg.model.farl))
    farl = (farl.to(device) if farl.dtype == dtype else farl.to(device, dtype)).eval().requires_grad_(False)
    return pipe, farl


# Settings added after runs were made, at the value those runs trained with: recorded by omission, so they resume.
HISTORICAL = {("model", "base_dtype"): "bf16", ("model", "condition_latent"): "mean",
              ("model", "lora", "init"): "kaiming", ("model", "lora", "dtype"): "fp32"}


def run_record(cfg: A2BFRTrainConfig) -> dict:
    """The config a checkpoint records and a resume is checked against. A setting at the value runs made before it
    existed trained with (:data:`HISTORICAL`: the unquantized base, the condition's posterior mean, peft's
    kaiming init, fp32 LoRA weights) is recorded by omission, so those runs resume."""
    record = cfg.model_dump(mode="json")
    for path, value in HISTORICAL.items():
        *parents, key = path
        section = record
        for name in parents:
            section = section[name]
        if section.get(key) == value:
            del section[key]
    return record


def lora_record(cfg: A2BFRTrainConfig) -> dict:
    """What ``a2bfr_config.json`` records beside the weights: restore reads ``lora_scale``, ``condition_attends``
    and ``condition_latent`` (the condition latent the LoRA was trained on, the restore default)."""
    lora = cfg.model.lora
    return {"lora_scale": lora.scale, "condition_attends": cfg.model.condition_attends,
            "condition_latent": cfg.model.condition_latent, "base": cfg.model.base, "rank": lora.rank,
            "alpha": lora.alpha, "lora_init": lora.init, "lora_dropout": lora.dropout, "lora_dtype": lora.dtype,
            "training": cfg.model_dump(mode="json")}


def sample_grid(pipe: A2BFRPipeline, batch: dict, cfg: A2BFRTrainConfig, *, seed: int = 0) -> np.ndarray:
    """Rows of LQ | restored (source prompt) | restored (target prompt) | GT; single batches repeat the prompt."""
    res = cfg.model.resolution
    lq = batch["lq"]
    dual = "gt_src" in batch
    prompts_src = list(batch["prompt_src"] if dual else batch["prompt"])
    prompts_tar = list(batch["prompt_tar"]) if dual else prompts_src
    kwargs = {"height": res, "width": res, "num_inference_steps": cfg.samples.steps, "output_type": "pt",
              "guidance_scale": cfg.samples.guidance_scale, "max_sequence_length": cfg.model.max_sequence_length,
              "condition_latent": cfg.model.condition_latent, "progress": False}
    src = pipe(lq, prompts_src, generator=torch.Generator().manual_seed(seed), **kwargs).images
    tar = pipe(lq, prompts_tar, generator=torch.Generator().manual_seed(seed), **kwargs).images
    gt = batch["gt_src"] if dual else batch["gt"]
    rows = [np.concatenate(row, axis=1) for row in zip(to_uint8(lq), to_uint8(src), to_uint8(tar), to_uint8(gt))]
    return np.concatenate(rows, axis=0)


def train(cfg: A2BFRTrainConfig, *, log: Callable[[str], None] = print) -> tuple[TrainResult, dict]:
    """Train (or resume) and return the engine's result + the paths the asset reports."""
    from accelerate import PartialState

    from training.data import data_fingerprint, make_loader, preview_batch

    set_attention_backend(cfg.train.attention_backend)
    state = PartialState()
    if cfg.memory_check and state.device.type == "cuda":
        from training.plan import check_fits, train_config_plan

        check_fits(lambda **kw: train_config_plan(cfg, **kw), torch.cuda.get_device_properties(state.device))
    torch.manual_seed(cfg.train.seed)
    pipe, farl = load_models(cfg, state.device)
    model = ConditionedFlux(pipe.transformer, condition_attends=cfg.model.condition_attends,
                            gradient_checkpointing=cfg.train.gradient_checkpointing)
    latents = None
    if cfg.latent_cache:
        from training.latent_cache import LatentCache

        latents = LatentCache(cfg.latent_cache, resolution=cfg.model.resolution)
    objective = Objective(pipe=pipe, farl=farl, loss=cfg.loss, resolution=cfg.model.resolution,
                          max_sequence_length=cfg.model.max_sequence_length, latents=latents,
                          condition_latent=cfg.model.condition_latent, lora_dtype=cfg.model.lora.dtype)
    data = cfg.data.model_copy(update={"resolution": cfg.model.resolution})
    out = Path(cfg.train.output_dir)
    samples = (preview_batch(cfg.data, size=cfg.samples.faces, split=cfg.samples.split,
                             resolution=cfg.model.resolution) if state.is_main_process else None)

    def render(folder: Path) -> None:
        if samples is not None and state.is_main_process:
            grid = sample_grid(pipe, samples, cfg)
            atomic_write_bytes(folder / SAMPLES_PNG, encode_image(grid, "png"))

    def step_fn(m: torch.nn.Module, batch: dict) -> dict:
        batch = {k: v.to(state.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return objective(m, batch)

    def save_fn(m: torch.nn.Module, folder: Path) -> None:
        save_a2bfr_lora(pipe.transformer, folder, adapter_name=cfg.model.lora.adapter_name, record=lora_record(cfg))

    # A bf16 LoRA trains the whole model in bf16 without autocast, as OminiControl (Lightning's default precision
    # over a bf16 model): the frozen weights are bf16 already (weight_dtype), so accelerate adds no autocast.
    settings = cfg.train if cfg.model.lora.dtype == "fp32" else cfg.train.model_copy(update={"mixed_precision": "no"})
    trainer = Trainer(settings, model=model, loader_factory=lambda epoch: make_loader(data, epoch=epoch),
                      step_fn=step_fn, save_fn=save_fn,
                      config={**run_record(cfg), DATA_FINGERPRINT: data_fingerprint(data)},
                      on_checkpoint=lambda step, folder: render(folder), log=log)
    result = trainer.fit()
    render(out)
    paths = {"final": result.final_dir, "losses": result.losses_path, "loss_curve": result.loss_curve_path,
             "samples": out / SAMPLES_PNG if (out / SAMPLES_PNG).exists() else None}
    return result, paths


def load_config(path: str | Path) -> A2BFRTrainConfig:
    import yaml

    text = Path(path).read_text()
    raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return A2BFRTrainConfig.model_validate(raw)


def main(argv: list[str] | None = None) -> None:
    from training.pipes import pipes_session

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="A2BFRTrainConfig as JSON or YAML")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    with pipes_session() as pipes:
        result, paths = train(cfg, log=pipes.log)
        pipes.report({
            "steps": result.step, "seconds_per_step": round(result.seconds_per_step, 4),
            "resumed_from": result.resumed_from, "checkpoint": Path(paths["final"]),
            "loss_curve": paths["loss_curve"], "samples": paths["samples"],
        })


if __name__ == "__main__":
    from training.child import run_main

    run_main(main)
