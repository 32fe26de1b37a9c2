"""RoboFace's stage-II training step with its additions off against diffusers' ControlNet training step.

RoboFace's additions off: ``dca.implicit`` and ``dca.use_remover`` false, caption dropout 0, the caption = the
dataset prompt. Both sides start from the same base (the tiny zoo SD2 + ControlNet by default, ``--base`` for any
SD2-family folder with ``controlnet/``), the same ControlNet weights (moved off the zero initialisation of its
output convolutions so that every layer gets a gradient), the same two real faces with synthetic LQs, and the same
seed; per prediction type (epsilon, v_prediction, and epsilon with RoboFace's gradient checkpointing on) the
script prints the loss of each side, their relative difference and the largest ControlNet-gradient difference,
and exits 1 past ``--loss-tol`` / ``--grad-tol`` or when CLIP, the Mapper or the Remover ran. A second table
compares one optimizer step from the same clipped gradients: the reference's AdamW settings, and RoboFace's
defaults (the paper's).

    .venv/bin/python benchmarks/roboface_train_parity.py [--official PATH] [--base DIR] [--cache-dir data/cache]

The reference, ``--official`` given (``examples/controlnet/train_controlnet.py`` of diffusers, or a checkout holding
it): the script is a top-level program whose module imports ``datasets``, ``torchvision`` and the Hub client, so
it is not imported. Its source (the file, a checkout's copy, or HEAD's in a git directory such as a bare mirror)
is parsed and these parts run *unmodified* (exec of the file's own statements):

- ``parse_args``: the reference's optimizer defaults (learning rate, Adam betas/epsilon/weight decay, max grad
  norm, learning-rate schedule) come from it;
- ``collate_fn``: builds the batch;
- the body of its training loop's ``with accelerator.accumulate(controlnet):`` block, every statement up to
  ``accelerator.backward(loss)`` (latents, noise, timesteps, add_noise, text states, ControlNet, UNet, target,
  loss), in float32 (``weight_dtype`` as with ``--mixed_precision no``).

One substitution: the ``torch`` those statements see draws ``randn_like`` in the contiguous layout
(``torch.randn(x.shape)``). The VAE's CPU output is not contiguous (strides of a channels-last layout), and
``randn_like`` keeps that layout, so the same random stream lands on other elements than ours does (RoboFace draws
``torch.randn(latents.shape)``): the same distribution, other numbers. The table's last row runs the script's
statements with the real ``torch`` (informational, not checked) to show the size of that effect.

Re-stated from the script (not run from it): loading the components (``from_pretrained`` of each subfolder; the
frozen VAE and text encoder are shared with our bundle, where they are stock modules; the UNet and the ControlNet
are separate stock instances, without our attention processors; ``DDPMScheduler`` from ``scheduler/``'s config),
``tokenize_captions`` (max-length padding, truncation), the image
transforms (GT in [-1, 1], the control image in [0, 1]), ``accelerator.backward`` (``loss.backward()``),
``clip_grad_norm_`` over the ControlNet's parameters and the AdamW construction. Its random draws come from torch's
global generator; ours from a CPU generator seeded the same, which gives the same numbers on CPU -- so the script
runs on CPU.

Without ``--official``, the reference is :func:`reference_step` below: the same step written out by hand from the
script's documented loop (optimizer defaults re-stated: :data:`REFERENCE_DEFAULTS`).
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRIPT = Path("examples") / "controlnet" / "train_controlnet.py"
PREDICTIONS = ("epsilon", "v_prediction")
# train_controlnet.py's argparse defaults, re-stated (used without --official)
REFERENCE_DEFAULTS = {"learning_rate": 5e-6, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 1e-2,
                      "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "lr_scheduler": "constant",
                      "train_batch_size": 4, "proportion_empty_prompts": 0.0}


# --- the reference ----------------------------------------------------------------------------------------------------
class Official:
    """What runs from train_controlnet.py unmodified: parse_args, collate_fn, and its training step's statements."""

    def __init__(self, path: Path):
        self.path, source = _read_script(path)
        path = self.path
        tree = ast.parse(source, filename=str(path))
        functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        missing = {"parse_args", "collate_fn", "main"} - set(functions)
        if missing:
            sys.exit(f"{path}: no top-level {sorted(missing)}: not diffusers' train_controlnet.py?")
        self.functions = {}
        for name in ("parse_args", "collate_fn"):
            ns = {"argparse": argparse, "os": os, "torch": torch}
            exec(compile(ast.Module(body=[functions[name]], type_ignores=[]), str(path), "exec"), ns)
            self.functions[name] = ns[name]
        self.step_code = compile(ast.Module(body=_step_statements(functions["main"], path), type_ignores=[]),
                                 str(path), "exec")

    def defaults(self, base: Path) -> dict:
        args = self.functions["parse_args"](["--pretrained_model_name_or_path", str(base),
                                             "--train_data_dir", str(base)])
        return {k: getattr(args, k) for k in REFERENCE_DEFAULTS}

    def step(self, parts: dict, batch: dict, seed: int, *, contiguous_draws: bool = True) -> torch.Tensor:
        tok = parts["tokenizer"]
        ids = tok(list(batch["prompt"]), max_length=tok.model_max_length, padding="max_length", truncation=True,
                  return_tensors="pt").input_ids
        examples = [{"pixel_values": gt, "conditioning_pixel_values": (lq + 1) / 2, "input_ids": i}
                    for gt, lq, i in zip(batch["gt"], batch["lq"], ids)]
        ns = {"torch": _ContiguousDraws("torch") if contiguous_draws else torch, "F": F,
              "weight_dtype": torch.float32, "batch": self.functions["collate_fn"](examples),
              "vae": parts["vae"], "unet": parts["unet"], "text_encoder": parts["text_encoder"],
              "controlnet": parts["controlnet"], "noise_scheduler": parts["scheduler"]}
        torch.manual_seed(seed)
        exec(self.step_code, ns)
        return ns["loss"]


class _ContiguousDraws(types.ModuleType):
    """``torch`` for the script's statements, ``randn_like`` drawing in the contiguous layout (as RoboFace does)."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def randn_like(x: torch.Tensor, *, dtype=None, device=None) -> torch.Tensor:
        return torch.randn(x.shape, dtype=dtype or x.dtype, device=device or x.device)


def _read_script(path: Path) -> tuple[Path, str]:
    """(where, source) of train_controlnet.py: the file, a checkout's copy, or HEAD's in a (bare) git directory."""
    if path.is_file():
        return path, path.read_text()
    if (path / SCRIPT).is_file():
        return path / SCRIPT, (path / SCRIPT).read_text()
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        out = subprocess.run(["git", "--git-dir", str(path), "show", f"HEAD:{SCRIPT.as_posix()}"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            commit = subprocess.run(["git", "--git-dir", str(path), "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            return Path(f"{path}@{commit[:12]}:{SCRIPT.as_posix()}"), out.stdout
    sys.exit(f"--official: no {SCRIPT} at {path} (a file, a checkout, or a git directory)")


def _step_statements(main: ast.FunctionDef, path: Path) -> list[ast.stmt]:
    """The statements of ``with accelerator.accumulate(controlnet):`` before ``accelerator.backward(loss)``."""
    for node in ast.walk(main):
        if isinstance(node, ast.With) and "accelerator.accumulate" in ast.unparse(node.items[0].context_expr):
            body = []
            for stmt in node.body:
                if "accelerator.backward" in ast.unparse(stmt):
                    return body
                body.append(stmt)
    sys.exit(f"{path}: no `with accelerator.accumulate(...)` step ending in accelerator.backward(loss)")


def reference_step(parts: dict, batch: dict, seed: int) -> torch.Tensor:
    """train_controlnet.py's step, written out: latents = VAE posterior sample x scaling factor; noise ~ N(0, I);
    timesteps uniform in [0, num_train_timesteps); noisy = add_noise; text states of the padded prompt;
    ControlNet(noisy, t, text, control in [0, 1]) residuals into the UNet; MSE (mean) to the noise or velocity.
    Draws from torch's global generator in that order, as the script does (the noise in the contiguous layout, as
    RoboFace draws it; the script's ``randn_like`` keeps the latents' layout)."""
    vae, unet, tok, scheduler = parts["vae"], parts["unet"], parts["tokenizer"], parts["scheduler"]
    torch.manual_seed(seed)
    latents = vae.encode(batch["gt"]).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn(latents.shape)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    ids = tok(list(batch["prompt"]), max_length=tok.model_max_length, padding="max_length", truncation=True,
              return_tensors="pt").input_ids
    states = parts["text_encoder"](ids, return_dict=False)[0]
    down, mid = parts["controlnet"](noisy, timesteps, encoder_hidden_states=states,
                                    controlnet_cond=(batch["lq"] + 1) / 2, return_dict=False)
    pred = unet(noisy, timesteps, encoder_hidden_states=states, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(scheduler.config.prediction_type)
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


# --- both sides -------------------------------------------------------------------------------------------------------
def face_batch(resolution: int) -> dict:
    """Two real aligned faces and their LQs from RoboFace's train degradation (a training.data batch)."""
    import cv2
    import numpy as np

    from attrface_pipeline.images import read_rgb
    from training.data import to_tensor
    from training.degradation import degrade

    folder = ROOT / "data" / "samples" / "aligned_hq"
    hq = [cv2.resize(read_rgb(folder / f"ffhq_0000{i}.png"), (resolution, resolution), interpolation=cv2.INTER_AREA)
          for i in (0, 1)]
    lq = [degrade(h, "train", np.random.default_rng(7 + i))[0] for i, h in enumerate(hq)]
    return {"gt": torch.stack([to_tensor(h) for h in hq]), "lq": torch.stack([to_tensor(x) for x in lq]),
            "prompt": ["a close-up portrait photo of a young woman .", "a portrait of an old man with gray hair ."],
            "key": ["ffhq_00000", "ffhq_00001"]}


def build(base: Path, resolution: int):
    """(our bundle with the additions off, the reference's components): same weights, stock attention processors
    on the reference side, a ControlNet moved off its zero initialisation."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from training.roboface.config import RoboFaceConfig
    from training.roboface.model import RoboFace

    cfg = RoboFaceConfig(resolution=resolution, device="cpu")
    cfg = cfg.model_copy(update={"dca": cfg.dca.model_copy(update={"implicit": False, "use_remover": False}),
                                 "stage2": cfg.stage2.model_copy(update={"caption_dropout": 0.0})})
    model = RoboFace.from_pretrained(base, config=cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.freeze_for("stage2").train()
    controlnet = ControlNetModel.from_pretrained(base, subfolder="controlnet")
    controlnet.load_state_dict(model.controlnet.state_dict(), strict=True)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").requires_grad_(False)
    parts = {"vae": model.vae, "unet": unet, "text_encoder": model.text_encoder, "tokenizer": model.tokenizer,
             "controlnet": controlnet.train()}
    return model, parts


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def compare_step(model, parts: dict, batch: dict, prediction: str, reference, seed: int) -> dict:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config({**model.scheduler_config, "prediction_type": prediction})
    model.noise_scheduler, parts["scheduler"] = scheduler, scheduler
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append(type(mod).__name__))
             for m in (model.image_encoder, model.mapper, model.remover)]
    model.zero_grad(set_to_none=True)
    ours = model(batch, "stage2", generator=torch.Generator().manual_seed(seed))["loss"]
    ours.backward()
    for h in hooks:
        h.remove()
    parts["controlnet"].zero_grad(set_to_none=True)
    ref = reference(parts, batch, seed)
    ref.backward()
    a, b = grads(model.controlnet), grads(parts["controlnet"])
    if set(a) != set(b):
        raise RuntimeError(f"gradients on different ControlNet parameters: {sorted(set(a) ^ set(b))[:3]}")
    return {"prediction": prediction, "loss_ours": ours.item(), "loss_ref": ref.item(),
            "loss_rel_diff": abs(ours.item() - ref.item()) / abs(ref.item()),
            "grad_max_diff": max((a[n] - b[n]).abs().max().item() for n in a),
            "grad_max": max(g.abs().max().item() for g in b.values()), "implicit_calls": len(calls), "grads": b}


def optimizer_effect(controlnet, ref_grads: dict, ref: dict) -> list[dict]:
    """One AdamW step from the same (clipped) gradients: the reference's settings (torch AdamW as the script builds
    it), the engine's optimizer with those settings, and the engine's with RoboFace's stage-II defaults."""
    from training.engine import TrainSettings, build_optimizer
    from training.roboface.config import Stage2Config

    def step(make) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in controlnet.named_parameters()}
        for n, p in params.items():
            p.grad = ref_grads[n].clone()
        torch.nn.utils.clip_grad_norm_(list(params.values()), ref["max_grad_norm"])
        make(list(params.values())).step()
        return params, {n: (params[n].detach() - p.detach()) for n, p in controlnet.named_parameters()}

    def engine(lr, wd):
        return lambda ps: build_optimizer(ps, TrainSettings(output_dir="-", max_steps=1, optimizer="adamw", lr=lr,
                                                            weight_decay=wd))

    s2 = Stage2Config()
    rows = []
    _, d_ref = step(lambda ps: torch.optim.AdamW(ps, lr=ref["learning_rate"], betas=(ref["adam_beta1"],
                                                                                     ref["adam_beta2"]),
                                                 weight_decay=ref["adam_weight_decay"], eps=ref["adam_epsilon"]))
    norm = lambda d: torch.cat([v.flatten() for v in d.values()]).norm().item()  # noqa: E731
    theta = torch.cat([p.detach().flatten() for p in controlnet.parameters()]).norm().item()
    for name, (lr, wd) in (("engine, reference settings", (ref["learning_rate"], ref["adam_weight_decay"])),
                           ("engine, RoboFace defaults", (s2.lr, s2.weight_decay))):
        _, d = step(engine(lr, wd))
        rows.append({"optimizer": name, "lr": lr, "weight_decay": wd, "update_norm": norm(d),
                     "update_ratio": norm(d) / norm(d_ref),
                     "max_diff_to_reference": max((d[n] - d_ref[n]).abs().max().item() for n in d),
                     "decay_share": lr * wd * theta / norm(d)})
    rows.insert(0, {"optimizer": "reference (torch AdamW)", "lr": ref["learning_rate"],
                    "weight_decay": ref["adam_weight_decay"], "update_norm": norm(d_ref), "update_ratio": 1.0,
                    "max_diff_to_reference": 0.0, "decay_share": ref["learning_rate"] * ref["adam_weight_decay"]
                    * theta / norm(d_ref)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, help="diffusers' examples/controlnet/train_controlnet.py, or a "
                                                      "diffusers checkout; default: the hand-written reference")
    parser.add_argument("--base", type=Path, help="SD2-family folder with controlnet/ (default: the tiny zoo's)")
    parser.add_argument("--cache-dir", default="data/cache", help="model store root (for tiny/sd2-controlnet)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loss-tol", type=float, default=1e-5, help="largest relative loss difference")
    parser.add_argument("--grad-tol", type=float, default=1e-4, help="largest ControlNet-gradient difference")
    args = parser.parse_args(argv)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.base is None:
        from attrface_pipeline.models.store import ModelStore

        args.base = ModelStore(args.cache_dir).resolve("tiny/sd2-controlnet")
    if args.official is not None:
        official = Official(args.official.resolve())
        reference, ref_defaults, what = official.step, official.defaults(args.base), f"official ({official.path})"
    else:
        reference, ref_defaults, what = reference_step, dict(REFERENCE_DEFAULTS), "hand-written reference_step"
    print(f"reference: {what}; base: {args.base}; CPU, float32, {args.resolution} px, seed {args.seed}")
    batch = face_batch(args.resolution)
    model, parts = build(args.base, args.resolution)
    failed = False
    print("\n| prediction | loss ours | loss reference | rel. diff | max abs grad diff | max abs grad | "
          "implicit-token calls |\n|---|---|---|---|---|---|---|")
    rows = []
    for prediction, checkpointing in [(p, False) for p in PREDICTIONS] + [("epsilon", True)]:
        if checkpointing:  # RoboFace's default (run.gradient_checkpointing); the reference runs without
            model.enable_gradient_checkpointing()
        r = compare_step(model, parts, batch, prediction, reference, args.seed)
        rows.append(r)
        label = f"{prediction}, our gradient checkpointing on" if checkpointing else prediction
        print(f"| {label} | {r['loss_ours']:.8f} | {r['loss_ref']:.8f} | {r['loss_rel_diff']:.2e} | "
              f"{r['grad_max_diff']:.2e} | {r['grad_max']:.2e} | {r['implicit_calls']} |")
        failed |= (r["loss_rel_diff"] > args.loss_tol or r["grad_max_diff"] > args.grad_tol
                   or r["implicit_calls"] > 0)
    if args.official is not None:  # informational: the script's own randn_like (the latents' memory layout)
        r = compare_step(model, parts, batch, "epsilon", lambda *a: official.step(*a, contiguous_draws=False),
                         args.seed)
        print(f"| epsilon, the script's randn_like as is (not checked) | {r['loss_ours']:.8f} | "
              f"{r['loss_ref']:.8f} | {r['loss_rel_diff']:.2e} | {r['grad_max_diff']:.2e} | {r['grad_max']:.2e} | "
              f"{r['implicit_calls']} |")
    print("\nreference defaults:", ", ".join(f"{k}={v}" for k, v in ref_defaults.items()))
    print("\none optimizer step from the same clipped epsilon gradients (max_grad_norm "
          f"{ref_defaults['max_grad_norm']}):\n\n| optimizer | lr | weight decay | update norm | vs reference | "
          "max abs diff to reference | weight-decay share of the update |\n|---|---|---|---|---|---|---|")
    for o in optimizer_effect(parts["controlnet"], rows[0]["grads"], ref_defaults):
        print(f"| {o['optimizer']} | {o['lr']:g} | {o['weight_decay']:g} | {o['update_norm']:.3e} | "
              f"{o['update_ratio']:.2f}x | {o['max_diff_to_reference']:.2e} | {o['decay_share']:.2e} |")
    print(f"\n{'FAIL' if failed else 'ok'}: thresholds loss rel. diff {args.loss_tol:g}, grad diff {args.grad_tol:g}, "
          "no implicit-token calls")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
