"""A²BFR as a :data:`training.restore_faces.RestoreFn`: aligned crops in, restored crops out, in batches.

Every crop is restored as the official ``infer.py`` restores one image: resized to (width, height) with PIL's
bicubic filter, noise and condition latent drawn from a generator on the model's device seeded with ``seed`` (the
official code calls ``seed_everything(seed)`` before every image, so every crop gets the same seed), 28 steps,
guidance 3.0. ``batch_size`` > 1 stacks crops in one call with one generator per crop, so each still gets the noise
it would get alone. The deliberate departures from the official path are options, off by default and listed in
:meth:`A2BFRRestorer.settings`: ``condition_latent="mean"``, ``condition_cache``, ``batch_guidance``. The condition
latent defaults to the one the LoRA records it was trained with (``a2bfr_config.json``); a LoRA without a record
(the official release, ours from before the record) restores with the official draw, "sample".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.a2bfr.pipeline import DEFAULT_PROMPT, A2BFRPipeline, device_generator


@dataclass
class A2BFRRestorer:
    pipe: A2BFRPipeline
    prompt: str = DEFAULT_PROMPT
    width: int = 512
    height: int = 512
    steps: int = 28
    guidance_scale: float = 3.0
    image_guidance_scale: float = 1.0
    max_sequence_length: int = 512
    batch_size: int = 1
    seed: int = 0
    condition_latent: str = "sample"
    condition_latent_from: str = "default"  # option | the LoRA's record | default (the LoRA records none)
    condition_cache: bool = False
    batch_guidance: bool = False
    record: dict = field(default_factory=dict)

    @classmethod
    def load(cls, base: str | Path, lora: str | Path, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, lora_scale: float | None = None,
             resolution: int | None = None, **settings) -> A2BFRRestorer:
        """Base Flux pipeline folder + an A²BFR LoRA (ours or the official file). The size and T5 length default to
        what the LoRA was trained with (``a2bfr_config.json``), else the official 512 x 512 / 512 tokens;
        ``resolution`` sets a square size. ``lora_scale`` overrides the recorded scale, ``condition_latent`` the
        recorded condition latent (else "sample")."""
        pipe = A2BFRPipeline.from_pretrained(base, dtype=dtype).to(device)
        record = pipe.load_a2bfr_lora(lora, lora_scale=lora_scale)
        if settings.get("condition_latent") is not None:
            settings["condition_latent_from"] = "option"
        elif pipe.condition_latent is not None:
            settings["condition_latent"], settings["condition_latent_from"] = pipe.condition_latent, "the LoRA's record"
        else:
            settings["condition_latent_from"] = "default (the LoRA records none)"
        trained = (record.get("training") or {}).get("model") or {}
        side = resolution or trained.get("resolution")
        for key in ("width", "height"):
            if settings.get(key) is None and side:
                settings[key] = side
        if settings.get("max_sequence_length") is None and "max_sequence_length" in trained:
            settings["max_sequence_length"] = trained["max_sequence_length"]
        return cls(pipe=pipe, record=record, **{k: v for k, v in settings.items() if v is not None})

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of what :meth:`restore_native` returns."""
        return self.height, self.width

    def settings(self) -> dict:
        """Everything that decides the output, for the settings file written beside the results."""
        pipe = self.pipe
        return {"prompt": self.prompt, "width": self.width, "height": self.height, "steps": self.steps,
                "guidance": self.guidance_scale, "image_guidance": self.image_guidance_scale,
                "max_sequence_length": self.max_sequence_length, "seed": self.seed, "batch_size": self.batch_size,
                "condition_latent": self.condition_latent, "condition_latent_from": self.condition_latent_from,
                "condition_cache": self.condition_cache,
                "batch_guidance": self.batch_guidance, "adapter": pipe.adapter_name, "lora_scale": pipe.lora_scale,
                "condition_attends": pipe.condition_attends, "device": str(pipe._execution_device),
                "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
                "official_path": self.condition_latent == "sample" and not self.condition_cache
                and not (self.batch_guidance and self.image_guidance_scale != 1.0)}

    def restore_native(self, crops: list[np.ndarray], prompts: list[str] | None = None) -> list[np.ndarray]:
        """Restore RGB uint8 crops of any size; each comes back at (height, width), the model's output."""
        if prompts is not None and len(prompts) != len(crops):
            raise ValueError(f"{len(prompts)} prompts for {len(crops)} crops")
        device = self.pipe._execution_device
        out: list[np.ndarray] = []
        for start in range(0, len(crops), self.batch_size):
            chunk = list(crops[start:start + self.batch_size])
            texts = prompts[start:start + self.batch_size] if prompts is not None else [self.prompt] * len(chunk)
            images = self.pipe(chunk, texts, height=self.height, width=self.width, num_inference_steps=self.steps,
                               guidance_scale=self.guidance_scale, image_guidance_scale=self.image_guidance_scale,
                               max_sequence_length=self.max_sequence_length,
                               generator=[device_generator(self.seed, device) for _ in chunk],
                               condition_latent=self.condition_latent, condition_cache=self.condition_cache,
                               batch_guidance=self.batch_guidance, output_type="pil", progress=False).images
            out += [np.asarray(im) for im in images]
        return out

    def __call__(self, crops: list[np.ndarray], prompts: list[str] | None = None) -> list[np.ndarray]:
        """Restore aligned crops, each returned at its own size (PIL bicubic back from the model's size);
        ``prompts`` (one per crop) replace the restorer's prompt, e.g. an attribute target."""
        restored = self.restore_native(crops, prompts)
        return [resize_to(r, c.shape[:2]) for r, c in zip(restored, crops)]


def resize_to(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``rgb`` at (height, width) with PIL's bicubic filter (unchanged when already that size)."""
    if rgb.shape[:2] == tuple(hw):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), Image.Resampling.BICUBIC))


def build_restorer(base: str | Path, weights: str | Path, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, prompt: str | None = None, steps: int | None = None,
                   guidance_scale: float | None = None, image_guidance_scale: float | None = None,
                   seed: int = 0, **options) -> A2BFRRestorer:
    """The ``attrface restore --model a2bfr`` entry point (None: the official default). ``options``: width,
    height, resolution, lora_scale, batch_size, max_sequence_length, condition_latent (None: the LoRA's recorded
    one), condition_cache, batch_guidance."""
    return A2BFRRestorer.load(base, weights, device=device, dtype=dtype, prompt=prompt, steps=steps,
                              guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, seed=seed,
                              **options)
