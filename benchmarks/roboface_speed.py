"""RoboFace cost: the stage-II training step and the restore loop, decoupled cross-attention (DCA) on vs off.

On CUDA it builds the SD2.1-base UNet from its published config with random weights (no download; cost does not
depend on weight values) and ``ControlNetModel.from_unet``, at 512²; on CPU it loads the tiny zoo's SD2 UNet
(``tiny/sd2-controlnet``) at 64². Both networks run through ``RoboFace.predict`` (the bundle's own forward).
"DCA on" installs ``training.roboface.attention.install_dca`` on every cross-attention layer of both networks and
feeds ``[77 text tokens ; N implicit tokens]``; "off" is the stock networks with the 77 text tokens -- the ratio is
DCA's overhead (issue 13 goal: ≤ 1.15×). Text states and tokens are random (no CLIP text/vision encoders).

- training step (stage II as ``training.roboface.train`` runs it): ControlNet(LQ) + UNet forward, MSE, backward, the
  engine's gradient clipping and AdamW step (``training.engine.build_optimizer``); UNet frozen in bf16, ControlNet
  and DCA branches trained in fp32 under bf16 autocast on CUDA, gradient checkpointing on both networks.
- restore (``RoboFaceRestorer``'s loops, VAE / CLIP / captioner excluded): stage I = ``--steps`` UNet calls on the N
  tokens alone (batch 1); stage II = ``--steps`` calls of ControlNet + UNet on the CFG pair batched as one batch of
  2 -- also timed as two batch-1 calls, the unbatched alternative. All weights in the restore dtype (bf16 on CUDA).

    .venv/bin/python benchmarks/roboface_speed.py [--device auto|cpu|cuda] [--batch 32] [--steps 50]
        [--repeats 5] [--no-checkpointing] [--threads 1] [--out table.md]
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

import torch
import torch.nn.functional as F

from _timing import peak_gib, reset_peak, timed  # benchmarks/_timing.py
from training.engine import TrainSettings, build_optimizer, set_attention_backend
from training.roboface.attention import install_dca
from training.roboface.config import RoboFaceConfig
from training.roboface.model import RoboFace
from training.roboface.train import RunSettings

# stabilityai/stable-diffusion-2-1-base unet/config.json: the values that differ from UNet2DConditionModel's defaults
# (down/up block types, layers_per_block 2, norm groups 32, in/out channels 4 are the defaults).
SD21_BASE_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                      cross_attention_dim=1024, use_linear_projection=True, layers_per_block=2)
TEXT_TOKENS = 77  # CLIP's padded prompt length, as RoboFace.encode_text gives
GRAD_CLIP = RunSettings.model_fields["grad_clip"].default  # the engine clips before every optimizer step
LR = 5e-5  # stage II (REFERENCE.md)

# Issue 13, one H100, SD2.1-base + ControlNet at 512², bf16, checkpointing, UNet frozen, no DCA yet; and the goals.
ANCHORS = {("train", "off"): "9.6 ms/sample at batch 32 (22 GiB)", ("two_calls", "off"): "43 ms per batch-1 call",
           ("restore", "off"): "≈ 2.1 s/face: 50 batch-1 calls (no CFG, no stage I)"}
GOALS = {("train", "on"): "≤ 1.15× off", ("pair", "on"): "≤ 1.15× off", ("restore", "on"): "≤ 1.15× off"}


@dataclass
class Row:
    part: str  # train | stage1 | pair | two_calls | restore
    dca: str  # off | on
    label: str
    batch: int
    seconds: float  # median per call (one optimizer step / one denoising step / one face's loops)
    peak_gib: float | None
    per: str  # what `seconds / batch` is per
    ratio: float | None = None  # on / off

    @property
    def per_item(self) -> float:
        return self.seconds / self.batch


# -- networks -----------------------------------------------------------------------------------------------------
class Nets(torch.nn.Module):
    """What ``RoboFace.predict`` reads: ``unet``, ``controlnet``, ``config`` (N) -- without VAE and encoders."""

    def __init__(self, unet, controlnet, num_tokens: int):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.config = RoboFaceConfig(num_tokens=num_tokens)
        self.dca = None

    def predict(self, *args, **kwargs) -> torch.Tensor:
        return RoboFace.predict(self, *args, **kwargs)

    def install_dca(self) -> list[torch.nn.Parameter]:
        """DCA on both networks (fp32 branches, as the bundle trains them); returns the new parameters."""
        self.dca = torch.nn.ModuleDict({"unet": install_dca(self.unet, self.config.num_tokens),
                                        "controlnet": install_dca(self.controlnet, self.config.num_tokens)}).float()
        return list(self.dca.parameters())


def build_nets(model: str, device: torch.device, dtype: torch.dtype, num_tokens: int, cache_dir: str) -> Nets:
    """UNet in ``dtype`` (frozen), ControlNet from it in fp32 (trained), random weights from the config."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    if model == "sd21-base":
        with torch.device(device):
            unet = UNet2DConditionModel(**SD21_BASE_UNET)
    else:
        from attrface_pipeline.models.store import ModelStore

        path = ModelStore(cache_dir).resolve("tiny/sd2-controlnet")
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path, subfolder="unet"))
    controlnet = ControlNetModel.from_unet(unet).to(device, torch.float32)
    unet = unet.to(dtype).requires_grad_(False)
    return Nets(unet, controlnet, num_tokens)


def count(params) -> int:
    return sum(p.numel() for p in params)


@dataclass
class Inputs:
    latents: torch.Tensor  # (B, 4, h, w) noisy latents
    target: torch.Tensor  # (B, 4, h, w)
    timesteps: torch.Tensor  # (B,)
    text: torch.Tensor  # (B, 77, D)
    tokens: torch.Tensor  # (B, N, D) Remover output
    control: torch.Tensor  # (B, 3, H, W) LQ in [0, 1]


def make_inputs(nets: Nets, batch: int, resolution: int, device: torch.device) -> Inputs:
    g = torch.Generator().manual_seed(batch)
    side = resolution // 8
    dim = nets.unet.config.cross_attention_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    return Inputs(latents=randn(batch, 4, side, side), target=randn(batch, 4, side, side),
                  timesteps=torch.randint(0, 1000, (batch,), generator=g).to(device),
                  text=randn(batch, TEXT_TOKENS, dim), tokens=randn(batch, nets.config.num_tokens, dim),
                  control=torch.rand(batch, 3, resolution, resolution, generator=g).to(device))


def _context(inp: Inputs, dca: bool) -> torch.Tensor:
    return torch.cat([inp.text, inp.tokens], dim=1) if dca else inp.text


# -- training step ------------------------------------------------------------------------------------------------
def training_step_fn(nets: Nets, params, inp: Inputs, *, dca: bool, autocast):
    optimizer = build_optimizer(params, TrainSettings(output_dir=tempfile.gettempdir(), max_steps=1,
                                                      optimizer="adamw", lr=LR, weight_decay=0.0))
    context = _context(inp, dca)

    def step() -> None:
        with autocast():
            pred = nets.predict(inp.latents, inp.timesteps, context, control=inp.control)
            loss = F.mse_loss(pred.float(), inp.target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


# -- restore --------------------------------------------------------------------------------------------------------
def restore_fns(nets: Nets, inp: Inputs, *, dca: bool, dtype: torch.dtype):
    """One denoising call of each loop: stage I (tokens alone, batch 1), stage II's CFG pair (one batch of 2, and
    two batch-1 calls). ``inp`` has batch 2: row 0 the unconditional context, row 1 the conditional one."""
    context = _context(inp, dca).to(dtype)
    x, t, control = inp.latents.to(dtype), inp.timesteps, inp.control.to(dtype)

    @torch.no_grad()
    def stage1() -> torch.Tensor:
        return nets.predict(x[:1], t[:1], inp.tokens[:1].to(dtype), implicit_only=True)

    @torch.no_grad()
    def pair() -> torch.Tensor:
        return nets.predict(x, t, context, control=control)

    @torch.no_grad()
    def two_calls() -> torch.Tensor:
        return torch.cat([nets.predict(x[i:i + 1], t[i:i + 1], context[i:i + 1], control=control[i:i + 1])
                          for i in range(2)])

    return stage1, pair, two_calls


# -- table ----------------------------------------------------------------------------------------------------------
def table(rows: list[Row]) -> list[str]:
    lines = ["| measurement | DCA | batch | s/call | per item | DCA on / off | peak GPU GiB | H100 anchor (issue 13) "
             "| goal |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "—"
        ratio = f"{r.ratio:.3f}×" if r.ratio is not None else "—"
        per = f"{r.per_item * 1e3:.4g} ms/{r.per}" if r.per_item < 1 else f"{r.per_item:.4g} s/{r.per}"
        lines.append(f"| {r.label} | {r.dca} | {r.batch} | {r.seconds:.4g} | {per} | {ratio} | {peak} "
                     f"| {ANCHORS.get((r.part, r.dca), '—')} | {GOALS.get((r.part, r.dca), '—')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model", choices=["tiny", "sd21-base"], help="default: sd21-base on CUDA, tiny on CPU")
    parser.add_argument("--resolution", type=int, help="default: 512 on CUDA, 64 on CPU")
    parser.add_argument("--batch", type=int, help="training batch (default: 32 on CUDA, 4 on CPU)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of each restore stage")
    parser.add_argument("--num-tokens", type=int, default=30, help="N implicit tokens")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-checkpointing", action="store_true", help="training without gradient checkpointing")
    parser.add_argument("--parts", nargs="+", choices=["train", "restore"], default=["train", "restore"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU, torch's own on CUDA)")
    parser.add_argument("--cache-dir", default="data/cache", help="model store root (for tiny/sd2-controlnet)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--json", type=Path, help="also write the rows and the setup as JSON here")
    args = parser.parse_args()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    device = torch.device("cuda" if want_cuda else "cpu")
    cuda = device.type == "cuda"
    args.model = args.model or ("sd21-base" if cuda else "tiny")
    args.resolution = args.resolution or (512 if cuda else 64)
    args.batch = args.batch or (32 if cuda else 4)
    if args.resolution % 8:
        raise SystemExit(f"--resolution {args.resolution} must be a multiple of 8")
    threads = args.threads or (1 if not cuda else torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    set_attention_backend("auto")
    load_before = os.getloadavg()[0]
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    rows: list[Row] = []

    def log(row: Row) -> None:
        peak = f", peak {row.peak_gib:.1f} GiB" if row.peak_gib is not None else ""
        print(f"  {row.label} (DCA {row.dca}), batch {row.batch}: {row.seconds:.4g} s{peak}", flush=True)

    def add(row: Row) -> None:
        if row.dca == "on":
            off = next(r for r in rows if (r.part, r.dca, r.batch) == (row.part, "off", row.batch))
            row.ratio = row.seconds / off.seconds
        rows.append(row)
        log(row)

    t0 = time.perf_counter()
    nets = build_nets(args.model, device, dtype, args.num_tokens, args.cache_dir)
    build_s = time.perf_counter() - t0
    unet_params, cn_params = count(nets.unet.parameters()), count(nets.controlnet.parameters())
    if not args.no_checkpointing:
        nets.unet.enable_gradient_checkpointing()
        nets.controlnet.enable_gradient_checkpointing()
    dca_params = 0
    for dca in ("off", "on"):
        trained = list(nets.controlnet.parameters())
        if dca == "on":
            branches = nets.install_dca()
            dca_params = count(branches)
            trained += branches
        if "train" in args.parts:
            nets.controlnet.float().train()
            if nets.dca is not None:
                nets.dca.float()
            inp = make_inputs(nets, args.batch, args.resolution, device)
            reset_peak(device)
            step, optimizer = training_step_fn(nets, trained, inp, dca=dca == "on", autocast=autocast)
            seconds = timed(step, device, warmup=args.warmup, repeats=args.repeats)
            add(Row("train", dca, "stage-II training step", args.batch, seconds, peak_gib(device), "sample"))
            del step, optimizer, inp
            for p in trained:
                p.grad = None
        if "restore" in args.parts:
            nets.controlnet.to(dtype).eval()  # restored: every part in the restore dtype
            if nets.dca is not None:
                nets.dca.to(dtype)
            inp = make_inputs(nets, 2, args.resolution, device)
            stage1, pair, two_calls = restore_fns(nets, inp, dca=dca == "on", dtype=dtype)
            reset_peak(device)
            t1 = timed(stage1, device, warmup=args.warmup, repeats=args.repeats)
            add(Row("stage1", dca, "restore stage I: UNet on N tokens", 1, t1, peak_gib(device), "step"))
            t2 = timed(pair, device, warmup=args.warmup, repeats=args.repeats)
            add(Row("pair", dca, "restore stage II: UNet + ControlNet, CFG pair batched", 2, t2, peak_gib(device),
                    "image"))
            t3 = timed(two_calls, device, warmup=args.warmup, repeats=args.repeats)
            add(Row("two_calls", dca, "restore stage II: CFG pair as two batch-1 calls", 2, t3, peak_gib(device),
                    "image"))
            add(Row("restore", dca, f"restore: {args.steps} + {args.steps} steps per face (from the rows above)",
                    1, args.steps * (t1 + t2), None, "face"))
            del inp

    name = ("SD2.1-base UNet + ControlNet (random weights)" if args.model == "sd21-base"
            else "tiny SD2 UNet + ControlNet")
    where = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    print(f"\n{name} at {args.resolution}², {where}, {threads} threads, load average {load_before:.2f} → "
          f"{os.getloadavg()[0]:.2f}; UNet {unet_params / 1e6:.1f} M (frozen, {str(dtype).split('.')[-1]}), "
          f"ControlNet {cn_params / 1e6:.1f} M, DCA branches {dca_params / 1e6:.2f} M (trained, fp32"
          f"{' + bf16 autocast' if cuda else ''}); N = {args.num_tokens}; gradient checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}; built in {build_s:.1f} s\n")
    lines = table(rows)
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps({
            "device": where, "model": args.model, "resolution": args.resolution, "steps": args.steps,
            "num_tokens": args.num_tokens, "rows": [{**asdict(r), "per_item": r.per_item} for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
