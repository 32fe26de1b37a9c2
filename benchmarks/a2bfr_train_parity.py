"""A²BFR's training step against OminiControl's, side by side: loss and LoRA-gradient differences per cause.

The reference is not part of this project: pass a checkout of OminiControl (Apache-2.0),

    git clone https://github.com/Yuanshi9815/OminiControl
    .venv/bin/python benchmarks/a2bfr_train_parity.py --official OminiControl [--bf16] [--out table.md]

Its ``omini/train_flux/trainer.py`` (``OminiModel``) and ``omini/pipeline/flux_omini.py`` are imported unmodified
from the checkout and configured with its own ``train/config/spatial_alignment.yaml`` (LoRA r 4, alpha 4,
``init_lora_weights: gaussian``, its target regex, Prodigy); ``OminiModel.configure_optimizers`` marks the trained
parameters as its trainer does. The trainer imports ``lightning`` (``.venv/bin/pip install lightning``) and
``wandb``; where wandb is not installed an empty module stands in for it (the training step never calls it), and
the script says so. Its dataset's ``T.ToTensor()`` (torchvision) is written out: uint8 / 255.

Both sides train the tiny Flux (generated offline, or ``--base``) on the same two real faces
(``data/samples/aligned_hq``), the same LQ images (the loader's ``train`` degradation, seeded), the same prompts,
from the same global RNG state, on the CPU: the official ``training_step(batch)`` + ``backward``; ours
``training.a2bfr.train.load_models`` + ``Objective`` (flow matching only: no attribute or dual loss, no text or
condition dropout — OminiControl decides its dropout in the dataset) + ``backward``, under the autocast the trainer
runs it in. Rows, each ours before / after a fix, or a deliberate option:

- condition latent: the posterior mean (before) vs a draw right after the noise (after, ``condition_latent:
  sample``);
- LoRA init: each side initialises its own adapter from the same seed: peft's kaiming-uniform (before) vs gaussian
  (after, ``lora.init: gaussian``); B = 0 at init, so the loss is equal and the B gradients differ;
- LoRA dropout 0.01 (before) vs 0 (after);
- ``--bf16``: the whole model in bf16 as OminiControl; ours with fp32 master LoRA weights and fp32 loss under bf16
  autocast (the default, an option) vs ``lora.dtype: bf16`` (bf16 weights, bf16 loss, no autocast).

The other rows set the same random adapter weights (A ~ N(0, 1/r), B ~ N(0, 0.05²)) on both sides. Printed: the
loss relative difference |ours - official| / |official| and, over the LoRA tensors, the largest
max |g_ours - g_official| / max |g_official| (the tensor's largest official gradient). The rows marked "after"
must stay within --loss-tol (1e-5) and --grad-tol (1e-4), in bf16 within --bf16-grad-tol (2^-5: four bf16 units
in the last place of the tensor's largest gradient; the two implementations run the same forward, bit-identical
loss, but accumulate partial gradients in a different order, which bf16 rounds at about one unit): otherwise the
exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import io
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FACES = [ROOT / "data" / "samples" / "aligned_hq" / f"ffhq_0000{i}.png" for i in (0, 1)]
PROMPTS = ["a photo of a young woman", "a photo of a smiling child"]
TOKENS = 32
B_STD = 0.05


def import_official(checkout: Path):
    """OminiControl's trainer module, imported from ``checkout`` as it is."""
    if not (checkout / "omini" / "train_flux" / "trainer.py").is_file():
        sys.exit(f"{checkout} is not a checkout of Yuanshi9815/OminiControl (no omini/train_flux/trainer.py); "
                 f"git clone https://github.com/Yuanshi9815/OminiControl")
    try:
        import lightning  # noqa: F401
    except ImportError:
        sys.exit("OminiControl's trainer imports lightning: .venv/bin/pip install lightning")
    try:
        import wandb  # noqa: F401
    except ImportError:
        print("note: wandb is not installed; an empty module stands in (the training step never calls it)")
        stub = types.ModuleType("wandb")
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"] = stub
    sys.path.insert(0, str(checkout))
    return importlib.import_module("omini.train_flux.trainer")


def official_config(checkout: Path) -> dict:
    import yaml

    return yaml.safe_load((checkout / "train" / "config" / "spatial_alignment.yaml").read_text())


def faces(size: int):
    """(GT, LQ) uint8 HWC arrays of the two faces at ``size``: the loader's crop/resize and train degradation."""
    from attrface_pipeline.images import read_rgb
    from training.data import _fit, sample_rng
    from training.degradation import degrade, get_preset

    gts = [_fit(read_rgb(p), size) for p in FACES]
    lqs = [degrade(gt, get_preset("train"), sample_rng(seed=0, epoch=0, key=p.stem))[0] for gt, p in zip(gts, FACES)]
    return gts, lqs


def official_batch(gts, lqs) -> dict:
    """What OminiControl's dataset yields (``T.ToTensor()``: uint8 / 255), collated."""
    def unit(images):
        return torch.stack([torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float().div(255)
                            for a in images])
    return {"image": unit(gts), "condition_0": unit(lqs), "description": list(PROMPTS)}


def our_batch(gts, lqs) -> dict:
    """What our loader yields in single mode (``training.data.to_tensor``: [-1, 1])."""
    from training.data import to_tensor

    return {"gt": torch.stack([to_tensor(a) for a in gts]), "lq": torch.stack([to_tensor(a) for a in lqs]),
            "prompt": list(PROMPTS)}


@dataclass
class Case:
    label: str
    kind: str  # before | after | option
    dtype: str  # fp32 | bf16
    condition_latent: str = "sample"
    init: str = "gaussian"
    dropout: float = 0.0
    lora_dtype: str = "fp32"
    own_init: bool = False  # each side initialises its adapter (from the same seed) instead of the shared weights


def lora_values(names_shapes: list[tuple[str, torch.Size]], rank: int, seed: int, bf16: bool) -> dict:
    """The shared adapter weights: A ~ N(0, 1/r), B ~ N(0, B_STD²), rounded to bf16 for a bf16 run."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(names_shapes):
        std = 1 / rank if ".lora_A." in name else B_STD
        value = torch.randn(shape, generator=g) * std
        out[name] = value.to(torch.bfloat16).float() if bf16 else value
    return out


def set_lora(transformer, values: dict) -> None:
    params = dict(transformer.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def lora_grads(transformer) -> dict[str, torch.Tensor]:
    return {n: (p.grad.float() if p.grad is not None else torch.zeros(p.shape)) for n, p in
            transformer.named_parameters() if "lora_" in n}


def build_official(trainer_mod, cfg: dict, base: Path, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    model = trainer_mod.OminiModel(flux_pipe_id=str(base), lora_config=cfg["train"]["lora_config"], device="cpu",
                                   dtype=dtype, model_config={**(cfg.get("model") or {}),
                                                              "max_sequence_length": TOKENS},
                                   optimizer_config=cfg["train"]["optimizer"], gradient_checkpointing=False)
    with contextlib.redirect_stdout(io.StringIO()):  # Prodigy prints "Using decoupled weight decay"
        model.configure_optimizers()  # the trainer's own call: the transformer frozen, the LoRA trainable
    return model


def build_ours(case: Case, base: Path, farl: Path, size: int, rank: int, alpha: float, tmp: Path, seed: int):
    from training.a2bfr.config import A2BFRTrainConfig
    from training.a2bfr.losses import Objective
    from training.a2bfr.model import ConditionedFlux
    from training.a2bfr.train import load_models

    cfg = A2BFRTrainConfig.model_validate({
        "model": {"base": str(base), "farl": str(farl), "resolution": size, "max_sequence_length": TOKENS,
                  "condition_latent": case.condition_latent,
                  "lora": {"rank": rank, "alpha": alpha, "init": case.init, "dropout": case.dropout,
                           "dtype": case.lora_dtype}},
        "loss": {"aal_weight": 0.0, "sdt_weight": 0.0, "text_dropout": 0.0, "condition_dropout": 0.0},
        "data": {"shards": str(tmp), "mode": "single", "batch_size": len(FACES)},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 1, "gradient_checkpointing": False,
                  "mixed_precision": "bf16" if case.dtype == "bf16" else "no"},
        "memory_check": False})
    torch.manual_seed(seed)
    pipe, farl_model = load_models(cfg, torch.device("cpu"))
    model = ConditionedFlux(pipe.transformer, condition_attends=cfg.model.condition_attends).train()
    objective = Objective(pipe=pipe, farl=farl_model, loss=cfg.loss, resolution=size, max_sequence_length=TOKENS,
                          condition_latent=cfg.model.condition_latent, lora_dtype=cfg.model.lora.dtype)
    # the trainer's autocast: accelerate's mixed precision, except for a bf16 LoRA (no autocast, as OminiControl)
    autocast = case.dtype == "bf16" and case.lora_dtype == "fp32"
    return pipe, model, objective, autocast


def compare(off_loss: float, off_grads: dict, our_loss: float, our_grads: dict) -> tuple[float, float, str]:
    missing = sorted(set(off_grads) ^ set(our_grads))
    if missing:
        raise SystemExit(f"the two sides' LoRA parameters differ: {missing[:5]}")
    loss_rel = abs(our_loss - off_loss) / abs(off_loss)
    worst, where = 0.0, ""
    for name, g in off_grads.items():
        diff = float((our_grads[name] - g).abs().max())
        scale = float(g.abs().max())
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        if rel > worst:
            worst, where = rel, name
    return loss_rel, worst, where


def run_case(case: Case, omini, ocfg: dict, base: Path, farl: Path, size: int, gts, lqs, tmp: Path,
             step_seed: int, init_seed: int):
    dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    lora = ocfg["train"]["lora_config"]
    rank, alpha = int(lora["r"]), float(lora["lora_alpha"])
    official = build_official(omini, ocfg, base, dtype, init_seed)
    pipe, model, objective, autocast = build_ours(case, base, farl, size, rank, alpha, tmp, init_seed)
    if not case.own_init:
        shapes = [(n, p.shape) for n, p in official.transformer.named_parameters() if "lora_" in n]
        values = lora_values(shapes, rank, seed=7, bf16=case.dtype == "bf16")
        set_lora(official.transformer, values)
        set_lora(pipe.transformer, values)

    torch.manual_seed(step_seed)
    off_loss = official.training_step(official_batch(gts, lqs), 0)
    off_loss.backward()
    off_loss = off_loss.detach()
    off_grads = lora_grads(official.transformer)

    torch.manual_seed(step_seed)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        out = objective(model, our_batch(gts, lqs))
    out["loss"].backward()
    our_grads = lora_grads(pipe.transformer)
    return compare(float(off_loss), off_grads, float(out["loss"].detach()), our_grads)


def cases(bf16: bool) -> list[Case]:
    rows = [
        Case("condition latent: posterior mean", "before", "fp32", condition_latent="mean"),
        Case("condition latent: draw after the noise", "after", "fp32"),
        Case("LoRA init: kaiming-uniform (peft default)", "before", "fp32", init="kaiming", own_init=True),
        Case("LoRA init: gaussian", "after", "fp32", own_init=True),
        Case("LoRA dropout 0.01", "before", "fp32", dropout=0.01),
    ]
    if bf16:
        rows += [
            Case("bf16: condition latent posterior mean, fp32 LoRA", "before", "bf16", condition_latent="mean"),
            Case("bf16: fp32 master LoRA + fp32 loss (default)", "option", "bf16"),
            Case("bf16: bf16 LoRA + bf16 loss (lora.dtype bf16)", "after", "bf16", lora_dtype="bf16"),
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="reference: git clone https://github.com/Yuanshi9815/OminiControl")
    parser.add_argument("--official", type=Path, required=True, help="checkout of Yuanshi9815/OminiControl")
    parser.add_argument("--base", type=Path, help="Flux pipeline folder (default: the tiny zoo model)")
    parser.add_argument("--bf16", action="store_true", help="also the bf16 rows (the official dtype)")
    parser.add_argument("--size", type=int, default=64, help="square training size (multiple of 16)")
    parser.add_argument("--seed", type=int, default=0, help="the step's global RNG seed")
    parser.add_argument("--loss-tol", type=float, default=1e-5)
    parser.add_argument("--grad-tol", type=float, default=1e-4)
    parser.add_argument("--bf16-grad-tol", type=float, default=2 ** -5)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    checkout = args.official.resolve()
    omini = import_official(checkout)
    ocfg = official_config(checkout)
    tmp = Path(tempfile.mkdtemp(prefix="a2bfr-train-parity-"))
    from attrface_pipeline.models import tiny

    if args.base is None:
        args.base = tmp / "flux"
        tiny.generate("flux", args.base)
    farl = tmp / "farl"
    tiny.generate("farl", farl)  # our Objective holds a FaRL model (unused: no attribute loss)
    gts, lqs = faces(args.size)
    rows, failed = [], []
    for case in cases(args.bf16):
        loss_rel, grad_rel, where = run_case(case, omini, ocfg, args.base, farl, args.size, gts, lqs, tmp,
                                             step_seed=args.seed, init_seed=args.seed + 1)
        grad_tol = args.bf16_grad_tol if case.dtype == "bf16" else args.grad_tol
        bad = case.kind == "after" and not (loss_rel <= args.loss_tol and grad_rel <= grad_tol)
        if bad:
            failed.append(case.label)
        rows.append((case, loss_rel, grad_rel, where))
        print(f"{case.kind:<6} {case.label:<48} loss rel {loss_rel:.2e}  grad rel {grad_rel:.2e}"
              f"{'  FAIL' if bad else ''}  ({where})", flush=True)
    table = ["| ours | vs OminiControl | dtype | loss rel. diff | max LoRA grad rel. diff |", "|---|---|---|---|---|"]
    table += [f"| {c.label} | {c.kind} | {c.dtype} | {lr:.1e} | {gr:.1e} |" for c, lr, gr, _ in rows]
    text = "\n".join(table)
    print(f"\n{text}\n\nCPU, tiny Flux, {args.size}px, 2 faces, LoRA r{ocfg['train']['lora_config']['r']}, seed "
          f"{args.seed}, torch {torch.__version__}; thresholds for 'after': loss {args.loss_tol:g}, grads "
          f"{args.grad_tol:g} (bf16: {args.bf16_grad_tol:g})")
    if args.out:
        args.out.write_text(text + "\n")
    if failed:
        print(f"past the thresholds: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
