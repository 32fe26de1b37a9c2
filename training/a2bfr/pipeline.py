"""A2BFRPipeline: FluxPipeline + an A²BFR LoRA; LQ face in, restored face out (optionally steered by a prompt).

Loads from any Flux pipeline folder (``A2BFRPipeline.from_pretrained(path)``: FLUX.1-dev or the tiny zoo model),
then :meth:`A2BFRPipeline.load_a2bfr_lora` reads either layout:

- ours: ``pytorch_lora_weights.safetensors`` (diffusers' ``save_lora_weights``; ``load_lora_weights`` works on a
  stock FluxPipeline too) + ``a2bfr_config.json`` (condition attention, LoRA scale, the training config);
- the official release (MediaX-SJTU/A2BFR, OminiControl's save format): one ``*.safetensors`` with the same
  ``transformer.<module>.lora_A/B.weight`` keys, loaded under adapter name ``deblurring``, condition attending
  every token, LoRA at scale 1 on condition tokens.

Defaults follow the official inference: 512², 28 steps, guidance 3.0 (Flux-dev's embedded guidance), image
guidance 1.0 (no unconditional pass), prompt "A photo of a human face".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import FluxPipelineOutput, calculate_shift, retrieve_timesteps

from training.a2bfr.model import ConditionedFlux, set_lora_scale

DEFAULT_PROMPT = "A photo of a human face"
OUR_WEIGHTS = "pytorch_lora_weights.safetensors"
CONFIG_NAME = "a2bfr_config.json"
OFFICIAL_ADAPTER = "deblurring"


def find_lora_file(path: str | Path) -> tuple[Path, str]:
    """(folder, weight file name) of an A²BFR LoRA given a folder or a .safetensors file; clear errors otherwise."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: an A²BFR LoRA is a .safetensors file (or a folder holding one)")
        return path.parent, path.name
    if not path.is_dir():
        raise FileNotFoundError(f"no A²BFR LoRA at {path} (expected a folder or a .safetensors file)")
    if (path / OUR_WEIGHTS).is_file():
        return path, OUR_WEIGHTS
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path}: expected {OUR_WEIGHTS} or exactly one .safetensors file, found {files}")
    return path, files[0]


def to_unit_tensor(images, size: int | None = None) -> torch.Tensor:
    """PIL / HWC uint8 arrays / (B,3,H,W) tensors in [-1, 1] -> (B,3,H,W) float tensor in [-1, 1]."""
    import cv2
    from PIL import Image

    if isinstance(images, torch.Tensor):
        x = images if images.ndim == 4 else images[None]
        if size is not None and x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)
        return x
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    arrays = []
    for im in images:
        a = np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"expected HxWx3 uint8 RGB images, got {a.shape} {a.dtype}")
        if size is not None and a.shape[:2] != (size, size):
            a = cv2.resize(a, (size, size), interpolation=cv2.INTER_CUBIC if a.shape[0] < size else cv2.INTER_AREA)
        arrays.append(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(arrays)


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """(B,3,H,W) in [-1, 1] -> HWC uint8 arrays."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [a.permute(1, 2, 0).cpu().numpy() for a in x]


class A2BFRPipeline(FluxPipeline):
    """A FluxPipeline whose transformer runs with condition tokens (see ``training/a2bfr/model.py``)."""

    adapter_name: str | None = None
    condition_attends: str = "all"

    # -- components shared with training -----------------------------------------------------------------------
    def encode_packed(self, images: torch.Tensor, *, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,3,H,W) images in [-1, 1] -> packed, shifted and scaled latents (B, H/16 * W/16, 64)."""
        vae = self.vae
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        return self._pack_latents(z, *z.shape)

    def decode_packed(self, packed: torch.Tensor, height: int, width: int, scale: float = 1.0) -> torch.Tensor:
        """Packed latents -> images in [-1, 1] (differentiable); ``scale`` < 1 decodes a resized latent (cheaper)."""
        vae = self.vae
        z = self._unpack_latents(packed, height, width, self.vae_scale_factor)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        if scale != 1.0:
            z = torch.nn.functional.interpolate(z, scale_factor=scale, mode="bilinear", antialias=True)
        return vae.decode(z.to(vae.dtype)).sample

    def latent_ids(self, batch: int, height: int, width: int) -> torch.Tensor:
        side = 2 * (height // (self.vae_scale_factor * 2)), 2 * (width // (self.vae_scale_factor * 2))
        return self._prepare_latent_image_ids(batch, side[0] // 2, side[1] // 2, self._execution_device,
                                              self.transformer.dtype)

    @property
    def conditioned(self) -> ConditionedFlux:
        model = getattr(self, "_conditioned", None)
        if model is None or model.transformer is not self.transformer:
            model = ConditionedFlux(self.transformer, condition_attends=self.condition_attends)
            self._conditioned = model
        model.condition_attends = self.condition_attends
        return model

    # -- adapters ---------------------------------------------------------------------------------------------
    def load_a2bfr_lora(self, path: str | Path, *, adapter_name: str | None = None) -> dict:
        """Load our LoRA folder or the official release file; returns the recorded config (empty if none)."""
        folder, weight_name = find_lora_file(path)
        config_path = folder / CONFIG_NAME
        config = json.loads(config_path.read_text()) if config_path.is_file() and weight_name == OUR_WEIGHTS else {}
        name = adapter_name or config.get("adapter_name") or (OFFICIAL_ADAPTER if not config else "default")
        self.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=name)
        set_lora_scale(self.transformer, name, float(config.get("lora_scale", 1.0)))
        self.set_adapters(name)
        self.adapter_name = name
        self.condition_attends = config.get("condition_attends", "all")
        return config

    # -- inference --------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """Restore in eval mode (LoRA dropout off), whatever mode training left the modules in."""
        modules = [m for m in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            return self.restore(*args, **kwargs)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    @torch.no_grad()
    def restore(self, lq_image, prompt: str | list[str] = DEFAULT_PROMPT, *, height: int = 512, width: int = 512,
                 num_inference_steps: int = 28, guidance_scale: float = 3.0, image_guidance_scale: float = 1.0,
                 generator: torch.Generator | None = None, max_sequence_length: int = 512,
                 condition_cache: bool | None = None, output_type: str = "pil", return_dict: bool = True,
                 progress: bool = True):
        """Restore ``lq_image`` (one or a list: PIL, uint8 arrays or a [-1, 1] tensor batch) under ``prompt``.

        ``condition_cache`` (default: on when the LoRA's condition attends only to itself) computes the condition
        tokens' keys/values once per image instead of once per step. ``image_guidance_scale`` != 1 adds the
        unconditional (black-image) pass, batched with the conditional one in the same transformer call.
        """
        if height != width:
            raise ValueError("A²BFR restores square aligned faces: height must equal width")
        device = self._execution_device
        lq = to_unit_tensor(lq_image, height).to(device, self.vae.dtype)
        batch = lq.shape[0]
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} images")
        model = self.conditioned
        use_cache = (self.condition_attends == "self") if condition_cache is None else condition_cache
        if use_cache and self.condition_attends != "self":
            raise ValueError("condition_cache needs a LoRA trained with condition_attends='self'")
        embeds, pooled, txt_ids = self.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                     max_sequence_length=max_sequence_length)
        cond = self.encode_packed(lq, sample=False)
        img_ids = self.latent_ids(batch, height, width)
        guided = image_guidance_scale != 1.0
        if guided:  # one call: [conditional; unconditional (black image)]
            cond = torch.cat([cond, self.encode_packed(torch.full_like(lq, -1.0), sample=False)])
            embeds, pooled = torch.cat([embeds, embeds]), torch.cat([pooled, pooled])
        rows = cond.shape[0]
        latents, _ = self.prepare_latents(batch, self.transformer.config.in_channels // 4, height, width,
                                          embeds.dtype, device, generator)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(latents.shape[1], self.scheduler.config.get("base_image_seq_len", 256),
                             self.scheduler.config.get("max_image_seq_len", 4096),
                             self.scheduler.config.get("base_shift", 0.5), self.scheduler.config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        guidance = (torch.full((rows,), guidance_scale, device=device, dtype=embeds.dtype)
                    if self.transformer.config.guidance_embeds else None)
        cache = model.condition_cache(cond, img_ids, pooled=pooled, guidance=guidance) if use_cache else None
        self._num_timesteps = len(timesteps)
        self.set_progress_bar_config(disable=not progress)
        with self.progress_bar(total=len(timesteps)) as bar:
            for t in timesteps:
                x = torch.cat([latents, latents]) if guided else latents
                kwargs = {"cond_cache": cache} if use_cache else {"cond_tokens": cond}
                v = model(x, prompt_embeds=embeds, pooled=pooled, timestep=(t / 1000).expand(rows).to(x.dtype),
                          img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, **kwargs)
                if guided:
                    v_cond, v_uncond = v.chunk(2)
                    v = v_uncond + image_guidance_scale * (v_cond - v_uncond)
                latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
                bar.update()
        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_packed(latents, height, width)
            images = decoded if output_type == "pt" else to_uint8(decoded)
            if output_type == "pil":
                from PIL import Image

                images = [Image.fromarray(a) for a in images]
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=images) if return_dict else (images,)


def save_a2bfr_lora(transformer, folder: str | Path, *, adapter_name: str, record: dict) -> Path:
    """Write the adapter in diffusers' LoRA format (``load_lora_weights`` reads it) + ``a2bfr_config.json``.

    ``record`` must hold what restoring needs (``lora_scale``, ``condition_attends``) and should hold the training
    config (loss weights, steps): it travels with the weights.
    """
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers, weight_name=OUR_WEIGHTS,
                                   safe_serialization=True)
    missing = {"lora_scale", "condition_attends"} - set(record)
    if missing:
        raise ValueError(f"the A²BFR record lacks {sorted(missing)}")
    (folder / CONFIG_NAME).write_text(json.dumps({"adapter_name": adapter_name, **record}, indent=2, default=str))
    return folder
