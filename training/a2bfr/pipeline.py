"""A2BFRPipeline: FluxPipeline + an A²BFR LoRA; LQ face in, restored face out (optionally steered by a prompt).

Loads from any Flux pipeline folder (``A2BFRPipeline.from_pretrained(path)``: FLUX.1-dev or the tiny zoo model),
then :meth:`A2BFRPipeline.load_a2bfr_lora` reads either layout:

- ours: ``pytorch_lora_weights.safetensors`` (diffusers' ``save_lora_weights``; ``load_lora_weights`` works on a
  stock FluxPipeline too) + ``a2bfr_config.json`` (condition attention, LoRA scale, the training config);
- the official release (MediaX-SJTU/A2BFR, OminiControl's save format, Hugging Face ``thetrigger/A2BFR``
  ``default.safetensors``): one ``*.safetensors`` with the same ``transformer.<module>.lora_A/B.weight`` keys
  (alpha keys optional), loaded under adapter name ``deblurring``, condition attending every token.

**The official inference, step for step.** Same weights, LQ image, prompt, seed and device give the official
``infer.py`` + ``omini/pipeline/flux_omini.py`` output (tested against hand-computed expectations; measured side by
side with ``benchmarks/a2bfr_parity.py``):

- the LQ image is resized to (width, height) with PIL's default filter (bicubic) and preprocessed by the
  pipeline's ``image_processor`` (the same float32, channels-last tensor the VAE sees there);
- the condition latent is a **draw** of the VAE posterior, ``latent_dist.sample(generator)``, from the same random
  stream as the initial noise, right after it (``condition_latent="mean"`` takes the posterior mean instead:
  deterministic, an option);
- the timestep goes to the transformer as ``t.to(dtype) / 1000`` (diffusers' FluxPipeline order), so bf16 rounds
  as the official pipeline does;
- the adapter runs at ``lora_scale`` on the condition tokens only: 1.0 for the release file (OminiControl's
  ``specify_lora`` sets every adapted layer's scaling to 1, whatever alpha the file stores), the recorded
  ``lora_scale`` for ours. It is set *after* ``set_adapters``, which resets every layer to alpha/rank;
- the output goes through ``image_processor.postprocess`` (the official rounding);
- ``seed`` semantics: the official code seeds the global RNG and draws on the model's device; a generator on the
  execution device seeded the same way draws the same numbers (:func:`device_generator`).

Defaults follow the official inference: 512², 28 steps, guidance 3.0 (Flux-dev's embedded guidance), image
guidance 1.0 (no unconditional pass), prompt "A photo of a human face". Any width x height that are multiples of 16.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import FluxPipelineOutput, calculate_shift, retrieve_timesteps

from attrface_pipeline.models.weights import WeightsError, safetensors_shapes
from training.a2bfr.model import ConditionedFlux, set_lora_scale

DEFAULT_PROMPT = "A photo of a human face"
OUR_WEIGHTS = "pytorch_lora_weights.safetensors"
RELEASE_WEIGHTS = "default.safetensors"  # the file name of the official release (thetrigger/A2BFR)
CONFIG_NAME = "a2bfr_config.json"
OFFICIAL_ADAPTER = "deblurring"
ConditionLatent = Literal["sample", "mean"]


class LoraFileError(WeightsError):
    """A LoRA file that cannot be used with this base: one line naming the path, what was expected and found."""


def find_lora_file(path: str | Path) -> tuple[Path, str]:
    """(folder, weight file name) of an A²BFR LoRA given a folder or a .safetensors file; clear errors otherwise.

    A folder holds ours (``pytorch_lora_weights.safetensors``), the release's ``default.safetensors`` (a hub
    snapshot may hold other files beside it), or exactly one ``.safetensors`` file.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LoraFileError(f"{path}: an A²BFR LoRA is a .safetensors file (or a folder holding one)")
        return path.parent, path.name
    if not path.is_dir():
        raise FileNotFoundError(f"no A²BFR LoRA at {path} (expected a folder or a .safetensors file)")
    if (path / "roboface.json").is_file():
        raise LoraFileError(f"{path} is a RoboFace run (it holds roboface.json), not an A²BFR LoRA: restore it with "
                            f"--model roboface")
    for name in (OUR_WEIGHTS, RELEASE_WEIGHTS):
        if (path / name).is_file():
            return path, name
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path}: expected {OUR_WEIGHTS}, {RELEASE_WEIGHTS} or exactly one .safetensors "
                                f"file, found {files or 'none'}")
    return path, files[0]


def check_lora_file(path: str | Path, transformer: torch.nn.Module) -> dict[str, int]:
    """Check an A²BFR LoRA file against the base ``transformer`` before loading it; returns {module: rank}.

    Reads the safetensors header only (no weights): a truncated or foreign file, a LoRA of another model (a
    RoboFace or UNet file) or of another base (FLUX.1-dev's LoRA on the tiny Flux, or the reverse) each give one
    :class:`LoraFileError` line naming the path, what was expected and what was found.
    """
    path = Path(path)
    try:
        shapes = safetensors_shapes(path, what="LoRA")
    except WeightsError as err:
        raise LoraFileError(str(err)) from None
    pairs: dict[str, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        name = key.removeprefix("transformer.")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                pairs.setdefault(name.split(marker)[0], {})[part] = shape
    if not pairs:
        sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
        raise LoraFileError(f"{path}: not a Flux LoRA (expected transformer.<module>.lora_A/lora_B.weight keys, "
                            f"found {sample}); pass an A²BFR LoRA (a RoboFace run is used with --model roboface)")
    modules = dict(transformer.named_modules())
    ranks = {}
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise LoraFileError(f"{path}: {module} has {sorted(parts)} but not both lora_A and lora_B: the file is "
                                f"incomplete")
        target = modules.get(module)
        base = getattr(target, "base_layer", target)
        if not isinstance(base, torch.nn.Linear):
            raise LoraFileError(f"{path}: its LoRA adapts {module!r}, which the base transformer "
                                f"{'does not have' if target is None else 'has as a ' + type(base).__name__}: "
                                f"this LoRA was made for another base model than models.flux")
        (rank, fan_in), (fan_out, rank_b) = parts["lora_A"], parts["lora_B"]
        if rank != rank_b or fan_in != base.in_features or fan_out != base.out_features:
            raise LoraFileError(f"{path}: {module} expects a {base.in_features}->{base.out_features} layer, the "
                                f"file holds {fan_in}->{fan_out} (rank {rank}/{rank_b}): this LoRA was made for "
                                f"another base model than models.flux (FLUX.1-dev for the release)")
        ranks[module] = rank
    return ranks


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def device_generator(seed: int, device: str | torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: the numbers the official code draws after
    ``seed_everything(seed)`` (``torch.manual_seed``) from the default generator of that device."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def to_unit_tensor(images: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """A (B,3,H,W) or (3,H,W) tensor in [-1, 1] as a batch at ``size`` (side or (height, width)), resized with
    antialiased bicubic interpolation where it differs. Images (PIL, uint8 arrays) go through
    :meth:`A2BFRPipeline.prepare_condition`, which resizes them as the official inference does."""
    hw = (size, size) if isinstance(size, int) else size
    x = images if images.ndim == 4 else images[None]
    if hw is not None and tuple(x.shape[-2:]) != tuple(hw):
        x = torch.nn.functional.interpolate(x, size=hw, mode="bicubic", antialias=True).clamp(-1, 1)
    return x


def to_pil_list(images, hw: tuple[int, int] | None = None) -> list:
    """PIL images / HWC uint8 RGB arrays -> RGB PIL images, resized to ``hw`` = (height, width) with PIL's default
    (bicubic) filter where the size differs, as the official ``prepare_condition`` does."""
    from PIL import Image

    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            im = im.convert("RGB")
        else:
            a = np.asarray(im)
            if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
                raise ValueError(f"expected HxWx3 uint8 RGB images, got {a.shape} {a.dtype}")
            im = Image.fromarray(np.ascontiguousarray(a), "RGB")
        if hw is not None and im.size != (hw[1], hw[0]):
            im = im.resize((hw[1], hw[0]))
        out.append(im)
    return out


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """(B,3,H,W) in [-1, 1] -> HWC uint8 arrays, rounded as diffusers' ``image_processor.postprocess``."""
    x = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [a.permute(1, 2, 0).cpu().numpy() for a in x]


class A2BFRPipeline(FluxPipeline):
    """A FluxPipeline whose transformer runs with condition tokens (see ``training/a2bfr/model.py``)."""

    adapter_name: str | None = None
    condition_attends: str = "all"
    lora_scale: float | None = None
    condition_latent: str | None = None  # the loaded LoRA's recorded training choice (None: no record)
    text_cache = None  # a training.text_cache.TextEmbeddingCache: prompts are looked up, no text encoder runs

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt: int = 1, prompt_embeds=None,
                      pooled_prompt_embeds=None, max_sequence_length: int = 512, lora_scale=None):
        """FluxPipeline's, or the same three tensors from :attr:`text_cache` (training without text encoders)."""
        if self.text_cache is None or prompt_embeds is not None:
            return super().encode_prompt(prompt, prompt_2, device, num_images_per_prompt, prompt_embeds,
                                         pooled_prompt_embeds, max_sequence_length, lora_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        embeds, pooled, text_ids = self.text_cache.encode_prompt(prompts, device or self._execution_device,
                                                                 max_sequence_length)
        return embeds, pooled, text_ids.to(self.transformer.dtype)

    # -- components shared with training -----------------------------------------------------------------------
    def encode_packed(self, images: torch.Tensor, *, sample: bool = True,
                      generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """(B,3,H,W) images in [-1, 1] -> packed, shifted and scaled latents (B, H/16 * W/16, 64).

        ``sample``: a draw of the posterior from ``generator`` (None: the global RNG of the VAE's device, as the
        official code); else its mean.
        """
        vae = self.vae
        if images.device != vae.device or images.dtype != vae.dtype:
            images = images.to(vae.device).to(vae.dtype)  # two steps, as the official: strides are preserved
        return self.pack_posterior(vae.encode(images).latent_dist, sample=sample, generator=generator)

    def pack_posterior(self, dist, *, sample: bool = True,
                       generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """A VAE posterior (``latent_dist``, or its ``parameters`` tensor from a latent cache) -> packed latents,
        drawn as :meth:`encode_packed` draws (the same random numbers for the same generator state)."""
        if isinstance(dist, torch.Tensor):
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            dist = DiagonalGaussianDistribution(dist.to(self.vae.device, self.vae.dtype))
        vae = self.vae
        z = dist.sample(generator) if sample else dist.mode()
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        return self._pack_latents(z, *z.shape)

    def prepare_condition(self, images, height: int, width: int) -> torch.Tensor:
        """The LQ image(s) as the VAE's input: PIL / uint8 arrays are resized to (width, height) with PIL's default
        (bicubic) filter and preprocessed by ``image_processor`` exactly as the official inference; a [-1, 1]
        tensor batch (training) is resized only if its size differs."""
        if isinstance(images, torch.Tensor):
            return to_unit_tensor(images, (height, width))
        return self.image_processor.preprocess(to_pil_list(images, (height, width)))

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
    def load_a2bfr_lora(self, path: str | Path, *, adapter_name: str | None = None,
                        lora_scale: float | None = None) -> dict:
        """Load our LoRA folder or the official release file; returns the recorded config (empty if none).

        The file is checked against the base transformer first (:func:`check_lora_file`). The adapter then runs at
        ``lora_scale`` on the condition tokens: the argument if given, else ours' recorded ``lora_scale``, else 1.0
        (the release, as OminiControl's ``specify_lora`` applies it). The recorded ``condition_latent`` (how the
        LoRA's training encoded the LQ) becomes the restore default; a LoRA without one restores with "sample".
        """
        folder, weight_name = find_lora_file(path)
        check_lora_file(folder / weight_name, self.transformer)
        config_path = folder / CONFIG_NAME
        config = {}
        if config_path.is_file() and weight_name == OUR_WEIGHTS:
            try:
                config = json.loads(config_path.read_text())
            except (OSError, ValueError) as err:
                raise LoraFileError(f"{config_path}: unreadable A²BFR record ({err}); train or copy it again") from None
        name = adapter_name or config.get("adapter_name") or (OFFICIAL_ADAPTER if not config else "default")
        with _quiet_diffusers():  # "no LoRA keys for CLIPTextModel": an A²BFR LoRA adapts the transformer only
            self.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=name)
        self.set_adapters(name)  # activates the adapter and resets every layer's scaling to alpha / rank ...
        scale = float(config.get("lora_scale", 1.0) if lora_scale is None else lora_scale)
        set_lora_scale(self.transformer, name, scale)  # ... so the condition stream's scale is set after it
        self.adapter_name, self.lora_scale = name, scale
        self.condition_attends = config.get("condition_attends", "all")
        recorded = config.get("condition_latent")
        if recorded not in (None, "sample", "mean"):
            raise LoraFileError(f"{config_path}: condition_latent {recorded!r} is not 'sample' or 'mean'")
        self.condition_latent = recorded
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
                 generator: torch.Generator | list[torch.Generator] | None = None, max_sequence_length: int = 512,
                 condition_latent: ConditionLatent | None = None, condition_cache: bool = False,
                 batch_guidance: bool = False, output_type: str = "pil", return_dict: bool = True,
                 progress: bool = True):
        """Restore ``lq_image`` (one or a list: PIL, uint8 arrays or a [-1, 1] tensor batch) under ``prompt``.

        ``generator``: one, or one per image (each image then gets the noise it would get alone); None draws from
        the global RNG like the official code. Draw order per generator: initial noise, condition latent, then the
        black image's latent when ``image_guidance_scale`` != 1 (which adds that unconditional pass: a second
        transformer call per step as the official code, or ``batch_guidance=True``: both rows in one call, faster
        on a GPU; in bf16 the batched kernels round differently, up to 10 grey levels on the tiny model).
        ``condition_latent="mean"``: the posterior mean instead of a draw (deterministic; not the official path);
        None: the loaded LoRA's recorded choice, else "sample".
        ``condition_cache``: compute the condition tokens' keys/values once per image instead of once per step
        (only for a LoRA trained with ``condition_attends="self"``; equal to recomputing within float rounding).
        ``output_type``: pil | np (float [0, 1], as diffusers) | pt ([-1, 1] tensor) | latent.
        """
        if height % 16 or width % 16 or height <= 0 or width <= 0:
            raise ValueError(f"A²BFR restores at multiples of 16 (VAE 8x + 2x2 packing), got {width}x{height}")
        condition_latent = condition_latent or self.condition_latent or "sample"
        if condition_latent not in ("sample", "mean"):
            raise ValueError(f"condition_latent must be 'sample' or 'mean', not {condition_latent!r}")
        if condition_cache and self.condition_attends != "self":
            raise ValueError("condition_cache needs a LoRA trained with condition_attends='self'")
        device = self._execution_device
        lq = self.prepare_condition(lq_image, height, width)
        batch = lq.shape[0]
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} images")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images")
        model = self.conditioned
        embeds, pooled, txt_ids = self.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                     max_sequence_length=max_sequence_length)
        latents, img_ids = self.prepare_latents(batch, self.transformer.config.in_channels // 4, height, width,
                                                embeds.dtype, device, generator)
        sample = condition_latent == "sample"
        cond = self.encode_packed(lq, sample=sample, generator=generator)
        guided = image_guidance_scale != 1.0
        black = self.encode_packed(torch.full_like(lq, -1.0), sample=sample, generator=generator) if guided else None
        if guided and batch_guidance:  # one call: [conditional; unconditional (black image)]
            cond, black = torch.cat([cond, black]), None
            embeds, pooled = torch.cat([embeds, embeds]), torch.cat([pooled, pooled])
        rows = cond.shape[0]
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(latents.shape[1], self.scheduler.config.get("base_image_seq_len", 256),
                             self.scheduler.config.get("max_image_seq_len", 4096),
                             self.scheduler.config.get("base_shift", 0.5), self.scheduler.config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        guidance = (torch.full((rows,), guidance_scale, device=device, dtype=embeds.dtype)
                    if self.transformer.config.guidance_embeds else None)
        caches = [model.condition_cache(c, img_ids, pooled=pooled, guidance=guidance) if condition_cache else None
                  for c in (cond, black) if c is not None]

        def velocity(x, timestep, tokens, cache):
            kwargs = {"cond_cache": cache} if condition_cache else {"cond_tokens": tokens}
            return model(x, prompt_embeds=embeds, pooled=pooled, timestep=timestep, img_ids=img_ids,
                         txt_ids=txt_ids, guidance=guidance, **kwargs)

        self._num_timesteps = len(timesteps)
        self.set_progress_bar_config(disable=not progress)
        with self.progress_bar(total=len(timesteps)) as bar:
            for t in timesteps:
                x = torch.cat([latents, latents]) if guided and batch_guidance else latents
                # t.to(dtype) / 1000, in this order (diffusers' FluxPipeline and the official generate)
                timestep = t.expand(rows).to(x.dtype) / 1000
                v = velocity(x, timestep, cond, caches[0])
                if guided:
                    v_cond, v_uncond = v.chunk(2) if batch_guidance else (v, velocity(x, timestep, black, caches[1]))
                    v = v_uncond + image_guidance_scale * (v_cond - v_uncond)
                latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
                bar.update()
        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_packed(latents, height, width)
            images = decoded if output_type == "pt" else self.image_processor.postprocess(decoded, output_type)
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
