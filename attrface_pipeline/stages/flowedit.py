"""FlowEdit (Kulikov et al., inversion-free editing with a rectified-flow model) for the SD3/SD3.5 family.

Runs on the components of a diffusers ``StableDiffusion3Pipeline`` (VAE, transformer, three text encoders,
FlowMatchEuler scheduler), batched across pairs. Per step, one transformer call evaluates both guided velocities
of every pair in the batch: ``[uncond(z_src), cond_src(z_src), uncond(z_tar), cond_tar(z_tar)]``. The ODE state is
accumulated in fp32 whatever the model dtype.

Noise blending (a design decision, REFERENCE.md): the target velocity is evaluated at
``(1 - beta) * z_tar + beta * z_src`` -- ``beta`` a scalar, a per-step schedule, and optionally a spatial map
multiplying it. ``beta = 0`` is plain FlowEdit. An optional ``edit_mask`` (soft, in [0, 1]) confines the
accumulated edit to a region.

With ``n_min > 0`` the last ``n_min`` steps are ordinary sampling from the edited state with the target prompt
(only ``[uncond, cond_tar]`` are evaluated there). The official SD3 code reads an undefined variable on that path;
here the dtype comes from the state itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from attrface_pipeline.config import check_flowedit_schedule

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowEditParams:
    """FlowEdit's knobs. Defaults: the official SD3-medium settings (T=50, n_max=33, CFG 3.5 / 13.5)."""

    steps: int = 50
    n_max: int = 33
    n_min: int = 0
    n_avg: int = 1
    src_guidance: float = 3.5
    tar_guidance: float = 13.5
    negative_prompt: str = ""
    beta: float = 0.0
    beta_schedule: tuple[float, ...] | None = None  # one value per step (length == steps); overrides beta
    max_sequence_length: int = 256  # T5 tokens

    def __post_init__(self):
        if self.beta_schedule is not None:  # any sequence in (a config list), a hashable tuple stored
            object.__setattr__(self, "beta_schedule", tuple(self.beta_schedule))
        check_flowedit_schedule(steps=self.steps, n_max=self.n_max, n_min=self.n_min, n_avg=self.n_avg,
                                beta=self.beta, beta_schedule=self.beta_schedule)

    def beta_at(self, step: int) -> float:
        return float(self.beta_schedule[step]) if self.beta_schedule is not None else float(self.beta)

    def transformer_calls(self) -> int:
        """Batched transformer calls per batch of pairs: n_avg per FlowEdit step, one per sampling step."""
        active = min(self.n_max, self.steps)
        sampling = min(self.n_min, active)
        return (active - sampling) * self.n_avg + sampling

    def sample_evaluations(self) -> int:
        """Per pair, transformer forward passes on one latent (4 per FlowEdit draw, 2 per sampling step)."""
        active = min(self.n_max, self.steps)
        sampling = min(self.n_min, active)
        return 4 * (active - sampling) * self.n_avg + 2 * sampling

    def record(self) -> dict:
        out = asdict(self)
        out["beta_schedule"] = list(self.beta_schedule) if self.beta_schedule is not None else None
        return out


def _maps_tensor(maps: np.ndarray | None) -> torch.Tensor | None:
    """(B, h, w) maps as a (B, 1, h, w) float32 tensor, or None."""
    return None if maps is None else torch.as_tensor(np.asarray(maps), dtype=torch.float32)[:, None]


def guided(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def flowedit_latents(
    velocity: Velocity,
    x_src: torch.Tensor,
    src_embeds: tuple[torch.Tensor, torch.Tensor],
    tar_embeds: tuple[torch.Tensor, torch.Tensor],
    neg_embeds: tuple[torch.Tensor, torch.Tensor],
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    params: FlowEditParams,
    generators: Sequence[torch.Generator],
    beta_map: torch.Tensor | None = None,
    edit_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FlowEdit ODE on a batch of B source latents (B, C, h, w); returns the edited latents in fp32.

    ``velocity(latents, timestep, prompt_embeds, pooled)`` is the model's raw (unguided) velocity. ``*_embeds`` are
    (prompt_embeds (B, L, D), pooled (B, P)); ``neg_embeds`` broadcast from batch 1. ``sigmas`` has steps + 1
    entries (the last 0), ``timesteps`` steps entries, both from the scheduler. ``generators``: one per pair, so a
    pair's noise does not depend on its batch neighbours. ``beta_map``/``edit_mask``: (B, 1, h, w) or None.
    """
    if edit_mask is not None and params.n_min > 0:
        raise ValueError("an edit mask confines FlowEdit steps only; with n_min > 0 the sampling steps would "
                         "repaint outside it. Use n_min = 0 with region masks.")
    x_src = x_src.float()
    batch = x_src.shape[0]
    steps = len(timesteps)
    neg = tuple(e.expand(batch, *e.shape[1:]) for e in neg_embeds)
    embeds_fe = torch.cat([neg[0], src_embeds[0], neg[0], tar_embeds[0]])
    pooled_fe = torch.cat([neg[1], src_embeds[1], neg[1], tar_embeds[1]])
    embeds_tar = torch.cat([neg[0], tar_embeds[0]])
    pooled_tar = torch.cat([neg[1], tar_embeds[1]])

    def noise() -> torch.Tensor:  # drawn on CPU per pair: identical across devices and batch compositions
        return torch.stack([torch.randn(x_src.shape[1:], generator=g) for g in generators]).to(x_src.device)

    z = x_src.clone()
    x_tar: torch.Tensor | None = None
    for i in range(steps):
        if steps - i > params.n_max:
            continue
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        t = timesteps[i]
        if steps - i > params.n_min:
            delta = torch.zeros_like(x_src)
            for _ in range(params.n_avg):
                z_src = (1.0 - s) * x_src + s * noise()
                z_tar = z + z_src - x_src
                beta = params.beta_at(i)
                if beta_map is not None:
                    beta = beta * beta_map
                if not isinstance(beta, float) or beta != 0.0:
                    z_tar = (1.0 - beta) * z_tar + beta * z_src
                v = velocity(torch.cat([z_src, z_src, z_tar, z_tar]), t, embeds_fe, pooled_fe).float()
                u_s, c_s, u_t, c_t = v.chunk(4)
                delta += (guided(u_t, c_t, params.tar_guidance) - guided(u_s, c_s, params.src_guidance)) / params.n_avg
            if edit_mask is not None:
                delta = delta * edit_mask
            z = z + (s_next - s) * delta
        else:
            if x_tar is None:  # enter the sampling phase from the edited state at this noise level
                x_t_src = (1.0 - s) * x_src + s * noise()
                x_tar = z + x_t_src - x_src
            v = velocity(torch.cat([x_tar, x_tar]), t, embeds_tar, pooled_tar).float()
            u_t, c_t = v.chunk(2)
            x_tar = x_tar + (s_next - s) * guided(u_t, c_t, params.tar_guidance)
    return z if x_tar is None else x_tar


# --- the SD3 pipeline wrapper -------------------------------------------------------------------------------------
@dataclass
class EditTiming:
    encode_s: float = 0.0
    edit_s: float = 0.0
    decode_s: float = 0.0
    transformer_calls: int = 0
    extra: dict = field(default_factory=dict)


QUANTIZE_MODES = ("none", "fp8")


def _pad_to(items: Sequence, n: int) -> list:
    """``items`` repeated at the end up to length ``n``."""
    return [*items, *[items[-1]] * (n - len(items))]


def float8_problem(device: torch.device) -> str | None:
    """Why float8 matmuls cannot run on ``device`` (None when they can): they need an NVIDIA GPU of compute
    capability 8.9 or newer (Ada, Hopper, Blackwell) and torchao (the ``gpu`` extra)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"float8 needs an NVIDIA GPU of compute capability >= 8.9 (H100, L40S, RTX 4090); the device is {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"float8 needs compute capability >= 8.9 (H100, L40S, RTX 4090); {torch.cuda.get_device_name(device)} "
                f"has {major}.{minor}")
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "float8 needs torchao: pip install -e '.[gpu]'"
    return None


def check_quantize(mode: str, device: torch.device) -> None:
    """A clear error when ``edit.quantize`` names an unknown mode or one ``device`` cannot run."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"edit.quantize={mode!r}: expected one of {QUANTIZE_MODES}")
    if mode == "fp8" and (problem := float8_problem(device)) is not None:
        raise RuntimeError(f"edit.quantize: fp8 is not available: {problem}. Use edit.quantize: none.")


def quantize_transformer(transformer: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """``mode`` "fp8": float8 weights and dynamic float8 activations, per row, on every linear layer (torchao);
    "none": unchanged. Unsupported hardware is a clear error, never a silent fallback."""
    check_quantize(mode, device)
    if mode == "none":
        return transformer
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return transformer


class FlowEditor:
    """FlowEdit over a loaded ``StableDiffusion3Pipeline``: prompt embeddings cached, pairs batched.

    ``batch_size``: with a compiled transformer, every batch is padded to this many pairs (the padding's outputs
    are dropped), so ``torch.compile`` sees one shape and compiles once."""

    def __init__(self, pipe, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 max_cached_prompts: int = 128, fixed_batch: int | None = None):
        self.pipe = pipe
        self.device = torch.device(device) if device is not None else pipe.device
        self.dtype = dtype or pipe.transformer.dtype
        self.fixed_batch = fixed_batch
        # Bounded LRU: a run sees thousands of distinct captions, each ~2.7 MB of embeddings for SD3.5 on the GPU.
        self._embeds: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.max_cached_prompts = max_cached_prompts
        self.transformer_calls = 0

    @classmethod
    def from_pretrained(cls, path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        cpu_offload: bool = False, vae_slicing: bool = False, vae_tiling: bool = False,
                        compile: bool = False, quantize: str = "none", batch_size: int | None = None) -> FlowEditor:
        """Load the SD3/SD3.5 pipeline once; memory options as in diffusers (offload needs CUDA)."""
        from diffusers import StableDiffusion3Pipeline

        device = torch.device(device)
        check_quantize(quantize, device)  # before loading 16 GB of weights
        pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
        return cls.from_pipeline(pipe, device, dtype, cpu_offload=cpu_offload, vae_slicing=vae_slicing,
                                 vae_tiling=vae_tiling, compile=compile, quantize=quantize, batch_size=batch_size)

    @classmethod
    def from_pipeline(cls, pipe, device: torch.device | str, dtype: torch.dtype, cpu_offload: bool = False,
                      vae_slicing: bool = False, vae_tiling: bool = False, compile: bool = False,
                      quantize: str = "none", batch_size: int | None = None) -> FlowEditor:
        """An editor over a built pipeline (loaded weights, or an architecture with random weights to time it)."""
        device = torch.device(device)
        if cpu_offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        if vae_slicing:
            pipe.vae.enable_slicing()
        if vae_tiling:
            pipe.vae.enable_tiling()
        pipe.transformer = quantize_transformer(pipe.transformer, quantize, device)
        if compile:
            pipe.transformer = torch.compile(pipe.transformer)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, device, dtype, fixed_batch=batch_size if compile else None)

    # -- text ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, prompt: str, max_sequence_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (1, L, D), pooled (1, P)) for one prompt, computed once per editor."""
        key = (prompt, max_sequence_length)
        if key in self._embeds:
            self._embeds.move_to_end(key)
            return self._embeds[key]
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        self._embeds[key] = (embeds.to(self.dtype), pooled.to(self.dtype))
        while len(self._embeds) > self.max_cached_prompts:
            self._embeds.popitem(last=False)
        return self._embeds[key]

    def prime_embedding(self, prompt: str, max_sequence_length: int, embeds: torch.Tensor,
                        pooled: torch.Tensor) -> None:
        """Use these embeddings for ``prompt`` (computed elsewhere, or random ones to time a bare transformer)."""
        self._embeds[(prompt, max_sequence_length)] = (embeds.to(self.device, self.dtype),
                                                      pooled.to(self.device, self.dtype))

    def _embed_batch(self, prompts: Sequence[str], msl: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.embed(p, msl) for p in prompts]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    # -- pixels <-> latents --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """HWC uint8 RGB images (same size, multiple of 16) -> scaled, shifted latents (B, C, h, w) in fp32."""
        vae = self.pipe.vae
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = vae.encode(x.to(self.device, vae.dtype)).latent_dist.mode()
        return ((latents.float() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor)

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> list[np.ndarray]:
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        x = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
        x = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(x)

    # -- the model's velocity ------------------------------------------------------------------------------------------
    def velocity(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
        self.transformer_calls += 1
        return self.pipe.transformer(
            hidden_states=latents.to(self.dtype), timestep=t.expand(latents.shape[0]).to(self.device),
            encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False,
        )[0]

    def schedule(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas (steps + 1), timesteps (steps)) from the pipeline's scheduler, public API only."""
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler.sigmas.float(), scheduler.timesteps

    @torch.inference_mode()
    def edit_latents(self, x_src: torch.Tensor, src_prompts: Sequence[str], tar_prompts: Sequence[str],
                     params: FlowEditParams, seeds: Sequence[int], beta_maps: torch.Tensor | None = None,
                     edit_masks: torch.Tensor | None = None) -> torch.Tensor:
        msl = params.max_sequence_length
        sigmas, timesteps = self.schedule(params.steps)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        return flowedit_latents(
            self.velocity, x_src, self._embed_batch(src_prompts, msl), self._embed_batch(tar_prompts, msl),
            self.embed(params.negative_prompt, msl), sigmas, timesteps, params, generators,
            beta_map=None if beta_maps is None else beta_maps.to(x_src.device),
            edit_mask=None if edit_masks is None else edit_masks.to(x_src.device),
        )

    def edit(self, images: Sequence[np.ndarray], src_prompts: Sequence[str], tar_prompts: Sequence[str],
             params: FlowEditParams, seeds: Sequence[int], beta_maps: np.ndarray | None = None,
             edit_masks: np.ndarray | None = None) -> tuple[list[np.ndarray], EditTiming]:
        """Edit a batch of pairs. Maps are (B, h, w) at latent resolution, or None."""
        if not (len(images) == len(src_prompts) == len(tar_prompts) == len(seeds)):
            raise ValueError("images, prompts and seeds must have the same length")
        real = len(images)
        if self.fixed_batch and 0 < real < self.fixed_batch:  # one compiled shape: pad with the last pair
            n = self.fixed_batch
            images, src_prompts, tar_prompts, seeds = (_pad_to(x, n) for x in (images, src_prompts, tar_prompts,
                                                                                seeds))
            beta_maps, edit_masks = (None if m is None else np.asarray(_pad_to(list(m), n)) for m in (beta_maps,
                                                                                                  edit_masks))
        timing = EditTiming()
        calls0 = self.transformer_calls
        t0 = time.perf_counter()
        x_src = self.encode_images(images)
        t1 = time.perf_counter()
        z = self.edit_latents(x_src, src_prompts, tar_prompts, params, seeds, _maps_tensor(beta_maps),
                              _maps_tensor(edit_masks))
        t2 = time.perf_counter()
        out = self.decode_latents(z)
        timing.encode_s, timing.edit_s, timing.decode_s = t1 - t0, t2 - t1, time.perf_counter() - t2
        timing.transformer_calls = self.transformer_calls - calls0
        return out[:real], timing


def flowedit(pipe, image: np.ndarray, src_prompt: str, tar_prompt: str, params: FlowEditParams,
             generator: torch.Generator | int = 0) -> np.ndarray:
    """One pair through a loaded ``StableDiffusion3Pipeline`` (the stable single-pair interface)."""
    seed = generator if isinstance(generator, int) else int(generator.initial_seed())
    out, _ = FlowEditor(pipe).edit([image], [src_prompt], [tar_prompt], params, [seed])
    return out[0]
