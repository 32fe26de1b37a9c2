"""A²BFR as a :data:`training.restore_faces.RestoreFn`: aligned crops in, restored crops out, in batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from training.a2bfr.pipeline import DEFAULT_PROMPT, A2BFRPipeline, to_uint8


@dataclass
class A2BFRRestorer:
    pipe: A2BFRPipeline
    prompt: str = DEFAULT_PROMPT
    resolution: int = 512
    steps: int = 28
    guidance_scale: float = 3.0
    image_guidance_scale: float = 1.0
    max_sequence_length: int = 512
    batch_size: int = 4
    seed: int = 0
    record: dict = field(default_factory=dict)

    @classmethod
    def load(cls, base: str | Path, lora: str | Path, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, **settings) -> A2BFRRestorer:
        """Base Flux pipeline folder + an A²BFR LoRA (ours or the official file). Resolution and T5 length default
        to what the LoRA was trained with (``a2bfr_config.json``), else the official 512 / 512."""
        pipe = A2BFRPipeline.from_pretrained(base, dtype=dtype).to(device)
        record = pipe.load_a2bfr_lora(lora)
        trained = (record.get("training") or {}).get("model") or {}
        for key in ("resolution", "max_sequence_length"):
            if settings.get(key) is None and key in trained:
                settings[key] = trained[key]
        return cls(pipe=pipe, record=record, **{k: v for k, v in settings.items() if v is not None})

    def __call__(self, crops: list[np.ndarray], prompts: list[str] | None = None) -> list[np.ndarray]:
        """Restore aligned crops; ``prompts`` (one per crop) replace the restorer's prompt, e.g. an attribute
        target."""
        if prompts is not None and len(prompts) != len(crops):
            raise ValueError(f"{len(prompts)} prompts for {len(crops)} crops")
        out: list[np.ndarray] = []
        size = self.resolution
        for start in range(0, len(crops), self.batch_size):
            chunk = crops[start:start + self.batch_size]
            texts = prompts[start:start + self.batch_size] if prompts is not None else [self.prompt] * len(chunk)
            images = self.pipe([c for c in chunk], texts, height=size, width=size,
                               num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                               image_guidance_scale=self.image_guidance_scale,
                               max_sequence_length=self.max_sequence_length,
                               generator=torch.Generator().manual_seed(self.seed + start), output_type="pt",
                               progress=False).images
            for crop, restored in zip(chunk, to_uint8(images)):
                h, w = crop.shape[:2]
                out.append(restored if (h, w) == (size, size) else cv2.resize(
                    restored, (w, h), interpolation=cv2.INTER_CUBIC if w > size else cv2.INTER_AREA))
        return out


def build_restorer(base: str | Path, weights: str | Path, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, prompt: str | None = None, steps: int | None = None,
                   guidance_scale: float | None = None, image_guidance_scale: float | None = None,
                   seed: int = 0) -> A2BFRRestorer:
    """The ``attrface restore --model a2bfr`` entry point (None: the official default)."""
    return A2BFRRestorer.load(base, weights, device=device, dtype=dtype, prompt=prompt, steps=steps,
                              guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, seed=seed)
