"""RoboFace restoration of aligned face crops: LQ -> Mapper -> Remover -> stage-I restoration -> caption ->
stage-II restoration with ControlNet(LQ) + decoupled cross-attention (REFERENCE.md, RoboFace).

* Stage I samples SD with the N implicit tokens as its only context (stock cross-attention), no guidance -- *design
  decision*: the paper gives no stage-I guidance; there is no text to guide with.
* The caption of the stage-I restoration (``captioner``) is the explicit text of stage II; a user ``prompt``
  replaces it (user-controlled restoration).
* Stage II samples with ``encoder_hidden_states = [caption ; tokens]`` and the ControlNet on the LQ image.
  Classifier-free guidance contrasts it with ``["" ; tokens]`` (the caption dropped, as in training); the pair runs
  as one batch of 2B through ControlNet and UNet per step.

Crops are HWC uint8 RGB (square: aligned faces); they are resized to ``config.resolution`` and the results back to each
crop's size. Noise is drawn per crop from its own generator (seed + index), so a crop's result does not depend on
the other crops of its batch. ``restore`` fits ``training.restore_faces.restore_photo``'s ``restore_fn``:
``functools.partial(restorer.restore, prompt=..., steps=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from training.roboface.captioner import Captioner, NoCaptioner
from training.roboface.model import RoboFace


@dataclass
class RoboFaceRestoration:
    images: list[np.ndarray]  # restored crops, each at its input's size
    stage1: list[np.ndarray]  # stage-I restorations at the model's resolution (what was captioned)
    captions: list[str]  # the stage-II text of each crop (the caption, or the user's prompt)


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    interp = cv2.INTER_AREA if rgb.shape[0] > height else cv2.INTER_CUBIC  # area: no aliasing when shrinking
    return cv2.resize(rgb, (width, height), interpolation=interp)


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] -> HWC uint8 RGB arrays."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [np.ascontiguousarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


class RoboFaceRestorer:
    """Restores aligned face crops with a :class:`RoboFace` bundle and a captioner (pipelines own no hidden state
    beyond their components)."""

    def __init__(self, model: RoboFace, captioner: Captioner | None = None):
        self.model = model
        self.captioner = captioner or NoCaptioner()

    def _scheduler(self, steps: int):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.model.scheduler_config)
        scheduler.set_timesteps(steps, device=self.model.device)
        return scheduler

    def _sample(self, shape: tuple[int, ...], generators: list[torch.Generator], steps: int,
                denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        scheduler = self._scheduler(steps)
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.model.device)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            pred = denoise(scheduler.scale_model_input(latents, t), t)
            latents = scheduler.step(pred.float(), t, latents).prev_sample
        return latents

    @torch.no_grad()
    def restore_detailed(self, lq_crops: Sequence[np.ndarray], prompt: str | Sequence[str] | None = None, *,
                         steps: int | None = None, stage1_steps: int | None = None, guidance: float | None = None,
                         controlnet_scale: float | None = None, seed: int | None = None) -> RoboFaceRestoration:
        """Both stages on a batch of crops; arguments left None take ``config.restore``'s values."""
        from training.data import to_tensor

        model, defaults = self.model, self.model.config.restore
        steps = steps or defaults.steps
        stage1_steps = stage1_steps or defaults.stage1_steps or steps
        guidance = defaults.guidance if guidance is None else guidance
        controlnet_scale = defaults.controlnet_scale if controlnet_scale is None else controlnet_scale
        seed = defaults.seed if seed is None else seed
        if not len(lq_crops):
            return RoboFaceRestoration([], [], [])
        for crop in lq_crops:
            if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
                raise ValueError(f"crops are HWC uint8 RGB, got {crop.dtype} {crop.shape}")
        res = model.config.resolution
        lq = torch.stack([to_tensor(_resize(c, res, res)) for c in lq_crops]).to(model.device)
        n = lq.shape[0]
        generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        shape = (model.unet.config.in_channels, res // factor, res // factor)

        tokens = model.implicit_tokens(lq)
        latents = self._sample(shape, generators, stage1_steps,
                               lambda x, t: model.predict(x, t.expand(n), tokens, implicit_only=True))
        stage1 = to_uint8(model.decode_latents(latents))

        if prompt is None and model.config.dca.explicit:  # the caption describes the stage-I restoration
            captions = self.captioner.caption(stage1)
        elif prompt is None or isinstance(prompt, str):
            captions = [prompt or ""] * n
        else:
            captions = [str(p) for p in prompt]
            if len(captions) != n:
                raise ValueError(f"{len(captions)} prompts for {n} crops")
        captions = model.stage2_captions(captions)
        if not model.config.dca.use_remover:
            tokens = model.mapper_tokens(lq)
        context = torch.cat([model.encode_text(captions).float(), tokens.float()], dim=1)
        control = (lq.float() + 1) / 2
        if guidance > 1:
            uncond = torch.cat([model.encode_text([""] * n).float(), tokens.float()], dim=1)
            context, control = torch.cat([uncond, context]), torch.cat([control, control])

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if guidance <= 1:
                return model.predict(x, t.expand(n), context, control=control, controlnet_scale=controlnet_scale)
            pred = model.predict(torch.cat([x, x]), t.expand(2 * n), context, control=control,
                                 controlnet_scale=controlnet_scale)
            uncond_pred, cond_pred = pred.float().chunk(2)
            return uncond_pred + guidance * (cond_pred - uncond_pred)

        latents = self._sample(shape, generators, steps, denoise)
        restored = to_uint8(model.decode_latents(latents))
        images = [_resize(r, *c.shape[:2]) for r, c in zip(restored, lq_crops)]
        return RoboFaceRestoration(images, stage1, captions)

    def restore(self, lq_crops: Sequence[np.ndarray], prompt: str | Sequence[str] | None = None, *,
                steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                **kwargs) -> list[np.ndarray]:
        """Restored crops (HWC uint8 RGB, each at its input's size); ``prompt`` replaces the caption."""
        return self.restore_detailed(lq_crops, prompt, steps=steps, guidance=guidance, seed=seed, **kwargs).images
