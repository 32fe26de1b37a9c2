"""A²BFR restore against the official inference code, side by side: max abs difference in grey levels (of 255).

The official code is not part of this project: pass a checkout of MediaX-SJTU/A2BFR (``infer.py`` +
``omini/pipeline/flux_omini.py``, Apache-2.0). Both sides load the same base (the tiny zoo Flux by default, or any
Flux folder with ``--base``), the same LoRA file, the same real LQ face, prompt and seed, on the same device, and
restore it: the official ``generate`` after ``seed_everything(seed)`` with the LQ image resized by PIL as
``infer.py``'s ``prepare_condition`` does; ours through ``A2BFRPipeline`` with a generator on the device seeded the
same way (what ``attrface restore`` runs). Rows:

- ``release``: a LoRA in the release layout (one ``default.safetensors``, alpha stored, adapter ``deblurring``);
- ``ours, lora_scale 0.5``: our folder (``pytorch_lora_weights.safetensors`` + ``a2bfr_config.json`` recording
  ``lora_scale: 0.5``); the official side loads the same adapter with lora_B pre-multiplied by 0.5, the same
  effective weights under OminiControl's scale 1;
- a non-square size; image guidance 2 (ours batches the black-image pass with the conditional one);
- the deliberate options: ``condition_latent="mean"`` against the official path, and ``condition_cache`` against
  recomputing the condition at every step, for a LoRA whose condition attends only to itself (the official
  ``kv_cache=True`` looks for diffusers' ``Attention`` class, which Flux no longer uses in diffusers 0.3x+: it
  fails there, so it cannot be the reference).

    .venv/bin/python benchmarks/a2bfr_parity.py --official /path/to/A2BFR [--base DIR] [--device cpu]
        [--dtype float32 bfloat16] [--steps 28] [--size 64] [--out table.md]

The official module imports ``imgaug`` at the top for a preprocessing mode these rows never use (``--preprocess
none``); where imgaug is not installed an empty module stands in for it, and the script says so.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LQ_FACE = ROOT / "data" / "samples" / "lq_real" / "0240.png"
RANK, ALPHA = 8, 4.0
LORA_STD = 1.0  # random adapter weights strong enough that every cause shows in the tiny model's output


def import_official(checkout: Path):
    if not (checkout / "omini" / "pipeline" / "flux_omini.py").is_file():
        sys.exit(f"{checkout} is not a checkout of MediaX-SJTU/A2BFR (no omini/pipeline/flux_omini.py)")
    try:
        import imgaug  # noqa: F401
    except ImportError:
        print("note: imgaug is not installed; an empty module stands in (only its 'deblurring' preprocess uses it)")
        stub = types.ModuleType("imgaug")
        stub.augmenters = types.ModuleType("imgaug.augmenters")
        sys.modules.update({"imgaug": stub, "imgaug.augmenters": stub.augmenters})
    sys.path.insert(0, str(checkout))
    return importlib.import_module("omini.pipeline.flux_omini")


def random_lora(base: Path, folder: Path, *, seed: int) -> dict[str, torch.Tensor]:
    """Random adapter weights on the published targets (B nonzero), in diffusers' key layout."""
    from diffusers import FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    from training.a2bfr.model import add_condition_lora

    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
    add_condition_lora(transformer, rank=RANK, alpha=ALPHA, adapter_name="default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * LORA_STD)
    return {f"transformer.{k}": v.contiguous() for k, v in
            get_peft_model_state_dict(transformer, adapter_name="default").items()}


def write_release(state: dict, path: Path, *, alpha: float | None = ALPHA, b_scale: float = 1.0) -> Path:
    from safetensors.torch import save_file

    out = {k: (v * b_scale if ".lora_B." in k else v) for k, v in state.items()}
    if alpha is not None:
        for key in [k for k in state if ".lora_A." in k]:
            out[key.split(".lora_A.")[0] + ".alpha"] = torch.tensor(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path


def write_ours(state: dict, folder: Path, *, scale: float, attends: str = "all") -> Path:
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    (folder / "a2bfr_config.json").write_text(json.dumps({"adapter_name": "default", "lora_scale": scale,
                                                          "condition_attends": attends}))
    return folder


def official(omini, base, lora: Path, adapter: str, image: Image.Image, *, size, dtype, device, steps, seed,
             image_guidance=1.0) -> np.ndarray:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(base, torch_dtype=dtype).to(device)
    if lora.is_dir():
        pipe.load_lora_weights(str(lora), weight_name="pytorch_lora_weights.safetensors", adapter_name=adapter)
    else:
        pipe.load_lora_weights(str(lora), adapter_name=adapter)
    pipe.set_adapters(adapter)
    pipe.set_progress_bar_config(disable=True)
    condition = omini.Condition(image.convert("RGB").resize(size), adapter)  # infer.py's prepare_condition
    omini.seed_everything(seed)
    out = omini.generate(pipe, prompt="A photo of a human face", conditions=[condition], height=size[1],
                         width=size[0], num_inference_steps=steps, guidance_scale=3.0,
                         image_guidance_scale=image_guidance).images[0]
    return np.asarray(out)


def ours(base, lora: Path, image: Image.Image, *, size, dtype, device, steps, seed, **options) -> np.ndarray:
    from training.a2bfr.pipeline import A2BFRPipeline, device_generator

    pipe = A2BFRPipeline.from_pretrained(base, dtype=dtype).to(device)
    pipe.load_a2bfr_lora(lora)
    out = pipe(image, "A photo of a human face", height=size[1], width=size[0], num_inference_steps=steps,
               generator=device_generator(seed, device), output_type="pil", progress=False, **options).images[0]
    return np.asarray(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of MediaX-SJTU/A2BFR")
    parser.add_argument("--base", type=Path, help="Flux pipeline folder (default: the tiny zoo model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=64, help="square side (the non-square row uses 3/4 width)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    omini = import_official(args.official.resolve())
    tmp = Path(tempfile.mkdtemp(prefix="a2bfr-parity-"))
    if args.base is None:
        from attrface_pipeline.models import tiny

        args.base = tmp / "flux"
        tiny.generate("flux", args.base)
    state = random_lora(args.base, tmp, seed=1)
    release = write_release(state, tmp / "release" / "default.safetensors")
    ours_half = write_ours(state, tmp / "ours", scale=0.5)
    half_as_release = write_release(state, tmp / "half" / "default.safetensors", alpha=None, b_scale=0.5)
    self_lora = write_ours(state, tmp / "self", scale=1.0, attends="self")
    image = Image.open(LQ_FACE)
    square, wide = (args.size, args.size), (args.size * 3 // 4 // 16 * 16, args.size)
    common = {"device": args.device, "steps": args.steps, "seed": args.seed}
    rows = []
    for name in args.dtype:
        dtype = getattr(torch, name)
        kw = {**common, "dtype": dtype}
        ref = official(omini, args.base, release, "deblurring", image, size=square, **kw)
        cases = [
            ("release (alpha stored)", ref, ours(args.base, release, image, size=square, **kw)),
            ("ours, lora_scale 0.5", official(omini, args.base, half_as_release, "deblurring", image, size=square,
                                              **kw), ours(args.base, ours_half, image, size=square, **kw)),
            (f"release, {wide[0]}x{wide[1]}", official(omini, args.base, release, "deblurring", image, size=wide,
                                                       **kw), ours(args.base, release, image, size=wide, **kw)),
            ("release, image guidance 2", official(omini, args.base, release, "deblurring", image, size=square,
                                                   image_guidance=2.0, **kw),
             ours(args.base, release, image, size=square, image_guidance_scale=2.0, **kw)),
            ("option batch_guidance, image guidance 2", official(omini, args.base, release, "deblurring", image,
                                                                 size=square, image_guidance=2.0, **kw),
             ours(args.base, release, image, size=square, image_guidance_scale=2.0, batch_guidance=True, **kw)),
            ("option condition_latent=mean", ref,
             ours(args.base, release, image, size=square, condition_latent="mean", **kw)),
            ("option condition_cache vs recomputing (self LoRA)",
             ours(args.base, self_lora, image, size=square, **kw),
             ours(args.base, self_lora, image, size=square, condition_cache=True, **kw)),
        ]
        for label, a, b in cases:
            diff = np.abs(a.astype(int) - b.astype(int))
            rows.append((label, name, int(diff.max()), float(diff.mean())))
            print(f"{label:<48} {name:<9} max {rows[-1][2]:>3}  mean {rows[-1][3]:.3f}", flush=True)
    table = ["| case | dtype | max abs diff (grey levels) | mean abs diff |", "|---|---|---|---|"]
    table += [f"| {label} | {dtype} | {mx} | {mean:.3f} |" for label, dtype, mx, mean in rows]
    text = "\n".join(table)
    print(f"\n{text}\n\n{args.device}, {args.steps} steps, {args.size}px, seed {args.seed}, {LQ_FACE.name}, "
          f"torch {torch.__version__}")
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
