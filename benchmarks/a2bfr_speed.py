"""A²BFR cost: the project's own training step and restore loop, against baselines measured in the same run.

On CUDA it builds the FLUX.1-dev transformer from its published config with random weights (no download; cost does
not depend on weight values), bf16, at 512²; on CPU it loads the tiny zoo Flux (``tiny/flux``) at 64². Rows:

- training step: ``ConditionedFlux`` forward (flow-matching loss, ``training.a2bfr.losses.flow_sample``) + backward +
  gradient clipping + Prodigy step (``training.engine.build_optimizer``), LoRA r64/α4 on the condition targets,
  gradient checkpointing, bf16 autocast on CUDA; random packed latents + condition tokens (1024 + 1024 at 512²) and
  512 random text tokens. Baseline: the same step without condition tokens (the stock Flux forward with the same
  LoRA, diffusers' checkpointing): the ratio is the condition's overhead. AAL's VAE decode + FaRL are not included.
- restore: the 28-step denoising loop through ``ConditionedFlux`` (the scheduler loop ``A2BFRPipeline.restore``
  runs) with random text embeddings: ``condition_attends="all"`` without a cache (baseline) against ``"self"`` with
  ``condition_cache``, and the condition-free forward as the floor. VAE and text encoders are excluded; with the tiny
  model one more row times ``A2BFRPipeline.__call__`` end to end (tiny VAE + text encoders included).

    .venv/bin/python benchmarks/a2bfr_speed.py [--device auto|cpu|cuda] [--model tiny|flux-dev] [--batch 1 8]
        [--resolution 512] [--steps 28] [--repeats 3] [--threads 1] [--out table.md] [--dry-run]

``--dry-run`` builds the FLUX.1-dev architecture on the meta device (no memory, no weights), adds the LoRA, counts
parameters and runs one meta forward + backward of the conditioned training step at the requested shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _timing import peak_gib, reset_peak, timed  # benchmarks/_timing.py
from training.a2bfr.losses import flow_sample
from training.a2bfr.model import ConditionedFlux, add_condition_lora, freeze_unused_lora, set_lora_scale
from training.engine import TrainSettings, build_optimizer, set_attention_backend

# black-forest-labs/FLUX.1-dev transformer/config.json (patch_size 1, out_channels None: the defaults).
FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (the tiny zoo model ships the same).
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 64, 4.0, 0.0  # training.a2bfr.config.LoraSettings (OminiControl: dropout 0)
GRAD_CLIP = 0.5  # TrainSettings.grad_clip default, applied by the engine before every optimizer step
TRAIN_GUIDANCE, RESTORE_GUIDANCE = 1.0, 3.0  # LossSettings.train_guidance; the restore default

# Issue 12, measured on one H100 with FLUX.1-dev at 512² (plain token concatenation) and the goals for this code.
ANCHORS = {("train", "all", 1): "0.64 s/step", ("train", "all", 8): "0.40 s/sample (34.7 GiB)",
           ("restore", "all", 1): "2.9 s/face"}
GOALS = {("train", "all", 8): "≤ 0.35 s/sample", ("train", "self", 8): "≤ 0.35 s/sample",
         ("restore", "cache", 1): "≤ 1.9 s/face"}


@dataclass
class Row:
    part: str  # train | restore
    variant: str  # plain | all | self | cache | pipeline
    label: str
    batch: int
    seconds: float  # median per call (one optimizer step / one restore of the batch)
    peak_gib: float | None
    ratio: float = 1.0  # time against the part's baseline at the same batch

    @property
    def per_sample(self) -> float:
        return self.seconds / self.batch


# -- models -------------------------------------------------------------------------------------------------------
def build_flux_dev(device: torch.device | str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        transformer = FluxTransformer2DModel(**FLUX_DEV)
    return transformer.to(dtype)


def prepare_lora(transformer: torch.nn.Module, *, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """What ``training.a2bfr.train.load_models`` does to the transformer: frozen base, LoRA added at scale 1, the
    unread last-block adapters frozen, trained weights in fp32. Returns the trainable parameters."""
    transformer.requires_grad_(False)
    add_condition_lora(transformer, rank=rank, alpha=alpha, dropout=LORA_DROPOUT)
    set_lora_scale(transformer, "default", 1.0)
    freeze_unused_lora(transformer)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def count(params) -> int:
    return sum(p.numel() for p in params)


def _millions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.3g} M"


@dataclass
class Inputs:
    """Random stand-ins for what the VAE and the text encoders would give (packed latents, T5/CLIP embeddings)."""

    x0: torch.Tensor  # (B, L, 64) packed target latents
    cond: torch.Tensor  # (B, L, 64) packed condition (LQ) latents
    noise: torch.Tensor  # (B, L, 64) the restore's starting latents
    embeds: torch.Tensor  # (B, T, joint_attention_dim)
    pooled: torch.Tensor  # (B, pooled_projection_dim)
    img_ids: torch.Tensor  # (L, 3)
    txt_ids: torch.Tensor  # (T, 3)


def make_inputs(config, batch: int, resolution: int, text_tokens: int, device, dtype) -> Inputs:
    from diffusers import FluxPipeline

    side = resolution // 16  # VAE ×8, then 2×2 packing
    g = torch.Generator().manual_seed(batch)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    tokens = side * side
    return Inputs(x0=randn(batch, tokens, config.in_channels), cond=randn(batch, tokens, config.in_channels),
                  noise=randn(batch, tokens, config.in_channels),
                  embeds=randn(batch, text_tokens, config.joint_attention_dim),
                  pooled=randn(batch, config.pooled_projection_dim),
                  img_ids=FluxPipeline._prepare_latent_image_ids(batch, side, side, device, dtype),
                  txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype))


def _guidance(transformer, batch: int, value: float, like: torch.Tensor) -> torch.Tensor | None:
    if not transformer.config.guidance_embeds:
        return None
    return torch.full((batch,), value, device=like.device, dtype=like.dtype)


# -- training step ------------------------------------------------------------------------------------------------
def training_step_fn(model: ConditionedFlux, params, inp: Inputs, *, variant: str, autocast):
    """One optimizer step as ``Trainer.fit`` runs it with ``Objective``'s flow-matching term (AAL excluded)."""
    transformer = model.transformer
    settings = TrainSettings(output_dir=tempfile.gettempdir(), max_steps=1)
    optimizer = build_optimizer(params, settings)
    batch = inp.x0.shape[0]
    guidance = _guidance(transformer, batch, TRAIN_GUIDANCE, inp.x0)
    if variant != "plain":
        model.condition_attends = variant

    def step() -> None:
        with autocast():
            t, x_t, target = flow_sample(inp.x0)
            if variant == "plain":  # the stock Flux forward with the same LoRA: a plain Flux LoRA step
                v = transformer(hidden_states=x_t, encoder_hidden_states=inp.embeds, pooled_projections=inp.pooled,
                                timestep=t, img_ids=inp.img_ids, txt_ids=inp.txt_ids, guidance=guidance,
                                return_dict=False)[0]
            else:
                v = model(x_t, prompt_embeds=inp.embeds, pooled=inp.pooled, timestep=t, img_ids=inp.img_ids,
                          txt_ids=inp.txt_ids, guidance=guidance, cond_tokens=inp.cond)
            loss = F.mse_loss(v.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


# -- restore ------------------------------------------------------------------------------------------------------
def restore_fn(model: ConditionedFlux, scheduler, inp: Inputs, *, variant: str, steps: int):
    """``A2BFRPipeline.restore``'s denoising loop (image guidance 1: one transformer call per step) without the
    VAE and the text encoders. variant: all (no cache) | cache (condition_attends="self" + condition_cache) |
    plain (no condition tokens)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    transformer = model.transformer
    device = inp.noise.device
    batch, tokens = inp.noise.shape[:2]
    guidance = _guidance(transformer, batch, RESTORE_GUIDANCE, inp.noise)
    model.condition_attends = "self" if variant == "cache" else "all"
    cfg = scheduler.config

    @torch.no_grad()
    def run(n_steps: int = steps) -> torch.Tensor:
        sigmas = np.linspace(1.0, 1 / n_steps, n_steps)
        mu = calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        timesteps, _ = retrieve_timesteps(scheduler, n_steps, device, sigmas=sigmas, mu=mu)
        cache = (model.condition_cache(inp.cond, inp.img_ids, pooled=inp.pooled, guidance=guidance)
                 if variant == "cache" else None)
        kwargs = {"cond_cache": cache} if variant == "cache" else {"cond_tokens": inp.cond} if variant == "all" else {}
        latents = inp.noise
        for t in timesteps:
            v = model(latents, prompt_embeds=inp.embeds, pooled=inp.pooled,
                      timestep=(t / 1000).expand(batch).to(latents.dtype), img_ids=inp.img_ids,
                      txt_ids=inp.txt_ids, guidance=guidance, **kwargs)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        return latents

    return run


# -- dry run ------------------------------------------------------------------------------------------------------
def dry_run(args) -> None:
    """FLUX.1-dev on the meta device: parameter counts and one conditioned training forward + backward's shapes."""
    transformer = build_flux_dev("meta", torch.bfloat16)
    base = count(transformer.parameters())
    params = prepare_lora(transformer, rank=args.rank, alpha=args.alpha)
    lora = count(p for n, p in transformer.named_parameters() if "lora_" in n)
    print(f"FLUX.1-dev transformer (meta): {base / 1e9:.2f} B parameters "
          f"({len(transformer.transformer_blocks)} double + {len(transformer.single_transformer_blocks)} single "
          f"blocks); LoRA r{args.rank}: {lora / 1e6:.1f} M parameters, {count(params) / 1e6:.1f} M trained "
          f"({len(params)} tensors; the last block's unread q/mlp/out adapters frozen)")
    model = ConditionedFlux(transformer, condition_attends="all", gradient_checkpointing=True).train()
    batch = min(args.batch)
    inp = make_inputs(transformer.config, batch, args.resolution, args.text_tokens, "meta", torch.bfloat16)
    with torch.device("meta"):
        t, x_t, _ = flow_sample(inp.x0)
    v = model(x_t, prompt_embeds=inp.embeds, pooled=inp.pooled, timestep=t, img_ids=inp.img_ids,
              txt_ids=inp.txt_ids, guidance=_guidance(transformer, batch, 1.0, inp.x0), cond_tokens=inp.cond)
    v.float().square().mean().backward()
    grads = sum(p.grad is not None for p in params)
    print(f"meta forward at {args.resolution}² batch {batch}: {inp.x0.shape[1]} image + {inp.cond.shape[1]} "
          f"condition + {args.text_tokens} text tokens -> velocity {tuple(v.shape)}; backward reached "
          f"{grads}/{len(params)} trained tensors")
    if grads != len(params):
        raise SystemExit("some trained LoRA tensors got no gradient")
    build_optimizer(params, TrainSettings(output_dir=tempfile.gettempdir(), max_steps=1))  # prodigyopt importable
    transformer.enable_gradient_checkpointing()
    plain = transformer(hidden_states=x_t, encoder_hidden_states=inp.embeds, pooled_projections=inp.pooled,
                        timestep=t, img_ids=inp.img_ids, txt_ids=inp.txt_ids,
                        guidance=_guidance(transformer, batch, 1.0, inp.x0), return_dict=False)[0]
    model.eval()
    model.condition_attends = "self"
    with torch.no_grad():
        guidance = _guidance(transformer, batch, RESTORE_GUIDANCE, inp.x0)
        cache = model.condition_cache(inp.cond, inp.img_ids, pooled=inp.pooled, guidance=guidance)
        cached = model(x_t, prompt_embeds=inp.embeds, pooled=inp.pooled, timestep=t, img_ids=inp.img_ids,
                       txt_ids=inp.txt_ids, guidance=guidance, cond_cache=cache)
    print(f"meta stock forward (baseline) -> {tuple(plain.shape)}; condition cache: {len(cache)} blocks of keys "
          f"{tuple(cache[0][0].shape)}; cached forward -> {tuple(cached.shape)}")


# -- table --------------------------------------------------------------------------------------------------------
def table(rows: list[Row]) -> list[str]:
    lines = ["| measurement | batch | s/step · s/restore | s/sample · s/face | time vs baseline | peak GPU GiB "
             "| H100 anchor (issue 12) | H100 goal |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r.part, r.variant, r.batch)
        peak = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "—"
        baseline = (r.part, r.variant) in (("train", "plain"), ("restore", "all"))
        ratio = "1.00× (baseline)" if baseline else f"{r.ratio:.2f}×"
        lines.append(f"| {r.label} | {r.batch} | {r.seconds:.4g} | {r.per_sample:.4g} | {ratio} | {peak} "
                     f"| {ANCHORS.get(key, '—')} | {GOALS.get(key, '—')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model", choices=["tiny", "flux-dev"], help="default: flux-dev on CUDA, tiny on CPU")
    parser.add_argument("--resolution", type=int, help="default: 512 on CUDA, 64 on CPU")
    parser.add_argument("--batch", type=int, nargs="+", help="default: 1 8 on CUDA, 1 2 on CPU")
    parser.add_argument("--restore-batch", type=int, nargs="+", help="default: the --batch sizes")
    parser.add_argument("--steps", type=int, default=28, help="restore denoising steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps / short restores per row")
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (FLUX.1-dev: 512)")
    parser.add_argument("--rank", type=int, default=LORA_RANK)
    parser.add_argument("--alpha", type=float, default=LORA_ALPHA)
    parser.add_argument("--train-attends", nargs="+", choices=["all", "self"], default=["all", "self"],
                        help="condition_attends of the conditioned training rows")
    parser.add_argument("--parts", nargs="+", choices=["train", "restore"], default=["train", "restore"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU, torch's own on CUDA)")
    parser.add_argument("--cache-dir", default="data/cache", help="model store root (for tiny/flux)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--json", type=Path, help="also write the rows and the setup as JSON here")
    parser.add_argument("--base-dtype", choices=["bf16", "fp8", "nf4"], default="bf16",
                        help="the frozen transformer's storage (fp8: torchao, nf4: bitsandbytes; CUDA only)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build FLUX.1-dev on the meta device, count parameters, check a forward/backward")
    args = parser.parse_args()
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" after .to(bf16)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" of the tiny text encoders
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    device = torch.device("cuda" if want_cuda else "cpu")
    cuda = device.type == "cuda"
    args.model = args.model or ("flux-dev" if cuda else "tiny")
    args.resolution = args.resolution or (512 if cuda or args.dry_run else 64)
    args.batch = args.batch or ([1, 8] if cuda else [1, 2])
    args.restore_batch = args.restore_batch or args.batch
    if args.resolution % 16:
        raise SystemExit(f"--resolution {args.resolution} must be a multiple of 16")
    if args.dry_run:
        dry_run(args)
        return
    if args.model == "flux-dev" and not cuda:
        raise SystemExit("FLUX.1-dev on CPU needs ~48 GB and hours per step; use --model tiny or --dry-run")
    threads = args.threads or (1 if not cuda else torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    set_attention_backend("auto")  # cuDNN attention off (docs ENVIRONMENT.md: illegal memory access in backward)
    load_before = os.getloadavg()[0]
    dtype = torch.bfloat16 if cuda else torch.float32

    if args.base_dtype != "bf16":
        from training.quantize import QuantizationUnavailable, check_base_dtype

        try:
            check_base_dtype(args.base_dtype, device)
        except QuantizationUnavailable as err:
            print(f"n/a: {err}")
            if args.json:
                args.json.write_text(json.dumps({"base_dtype": args.base_dtype, "rows": [], "note": f"n/a: {err}"}))
            return
    pipe = None
    t0 = time.perf_counter()
    if args.model == "flux-dev":
        transformer = build_flux_dev(device, dtype)
        if args.base_dtype != "bf16":
            from training.quantize import quantize_in_place

            transformer = quantize_in_place(transformer, args.base_dtype)
    else:
        from attrface_pipeline.models.store import ModelStore
        from training.a2bfr.pipeline import A2BFRPipeline

        path = ModelStore(args.cache_dir).resolve("tiny/flux")
        pipe = A2BFRPipeline.from_pretrained(path, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            part.requires_grad_(False)
        pipe.to(device)
        transformer = pipe.transformer
    build_s = time.perf_counter() - t0
    base_params = count(transformer.parameters())
    params = prepare_lora(transformer, rank=args.rank, alpha=args.alpha)
    transformer.to(device)
    transformer.enable_gradient_checkpointing()  # the stock forward's (baseline); ConditionedFlux has its own
    model = ConditionedFlux(transformer, gradient_checkpointing=True)
    if pipe is not None:
        pipe.adapter_name = "default"
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = pipe.scheduler if pipe is not None else FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext)
    tokens = (args.resolution // 16) ** 2
    rows: list[Row] = []

    def log(row: Row) -> None:
        peak = f", peak {row.peak_gib:.1f} GiB" if row.peak_gib is not None else ""
        print(f"  {row.label}, batch {row.batch}: {row.seconds:.4g} s ({row.per_sample:.4g} s/sample{peak})",
              flush=True)

    if "train" in args.parts:
        model.train()
        for batch in args.batch:
            inp = make_inputs(transformer.config, batch, args.resolution, args.text_tokens, device, dtype)
            base = None
            for variant in ["plain", *args.train_attends]:
                reset_peak(device)
                step, optimizer = training_step_fn(model, params, inp, variant=variant, autocast=autocast)
                seconds = timed(step, device, warmup=args.warmup, repeats=args.repeats)
                label = ("training: plain Flux LoRA step, no condition" if variant == "plain" else
                         f"training: ConditionedFlux + {tokens} condition tokens, condition_attends={variant!r}")
                row = Row("train", variant, label, batch, seconds, peak_gib(device))
                base = base or seconds
                row.ratio = seconds / base
                rows.append(row)
                log(row)
                del step, optimizer
                for p in params:
                    p.grad = None
            del inp
    if "restore" in args.parts:
        model.eval()
        transformer.to(dtype)  # as restored: the LoRA loaded into the pipeline's dtype
        for batch in args.restore_batch:
            inp = make_inputs(transformer.config, batch, args.resolution, args.text_tokens, device, dtype)
            base = None
            variants = [("all", 'restore: condition_attends="all", no cache'),
                        ("cache", 'restore: condition_attends="self" + condition_cache'),
                        ("plain", "restore: no condition tokens (plain Flux, the floor)")]
            for variant, label in variants:
                reset_peak(device)
                run = restore_fn(model, scheduler, inp, variant=variant, steps=args.steps)
                for _ in range(args.warmup):
                    run(2)
                seconds = timed(run, device, warmup=0, repeats=args.repeats)
                row = Row("restore", variant, label, batch, seconds, peak_gib(device))
                base = base or seconds
                row.ratio = seconds / base
                rows.append(row)
                log(row)
            if pipe is not None:  # end to end, tiny VAE and text encoders included
                pipe.condition_attends = "all"
                lq = torch.rand(batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))
                lq = (lq * 2 - 1).to(device, dtype)

                def call(lq: torch.Tensor = lq) -> None:
                    pipe(lq, height=args.resolution, width=args.resolution, num_inference_steps=args.steps,
                         output_type="pt", progress=False, generator=torch.Generator().manual_seed(0))

                reset_peak(device)
                seconds = timed(call, device, warmup=1, repeats=args.repeats)
                row = Row("restore", "pipeline", 'restore: A2BFRPipeline.__call__ end to end ("all", VAE + text '
                          "encoders)", batch, seconds, peak_gib(device), seconds / base)
                rows.append(row)
                log(row)
            del inp

    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    model_desc = ("FLUX.1-dev architecture, random weights, bf16" if args.model == "flux-dev" else
                  f"tiny zoo Flux (tiny/flux), {'bf16' if cuda else 'fp32'}")

    header = [
        f"A²BFR speed: {model_desc}, {_millions(base_params)} parameters (built in {build_s:.0f} s); LoRA "
        f"r{args.rank}/α{args.alpha:g}, {_millions(count(params))} trained.",
        f"{name} ({device.type}), torch {torch.__version__}, diffusers {diffusers.__version__}, {threads} CPU "
        f"threads; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
        f"{args.resolution}²: {tokens} image + {tokens} condition + {args.text_tokens} text tokens; restore "
        f"{args.steps} steps; median of {args.repeats} after {args.warmup} warm-up; time vs baseline = row / "
        "baseline at the same batch.",
        "Training: flow-matching loss only (AAL's VAE decode + FaRL excluded), Prodigy, grad clip, checkpointing"
        + (", bf16 autocast." if cuda else "."),
        "Restore: transformer + scheduler with random text embeddings; VAE and text encoders excluded"
        + (" except in the A2BFRPipeline row." if pipe is not None else "."),
    ]
    if args.model == "tiny":
        header.append("The tiny model's times say nothing about FLUX.1-dev's; the anchors/goals are H100 figures.")
    if not cuda:
        header.append("No GPU: peak GPU memory not measured.")
    lines = [*header, "", *table(rows)]
    speedups = [f"{1 / r.ratio:.2f}× at batch {r.batch}" for r in rows if r.part == "restore" and r.variant == "cache"]
    if speedups:
        lines += ["", f"Condition cache speed-up (\"all\" without cache / \"self\" with it): {', '.join(speedups)}."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "model": args.model, "base_dtype": args.base_dtype, "resolution": args.resolution,
            "steps": args.steps, "rank": args.rank, "parameters": base_params, "trained": count(params),
            "rows": [{**asdict(r), "per_sample": r.per_sample} for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
