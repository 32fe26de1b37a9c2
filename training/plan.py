"""Memory plans: parameters, trainable parameters and estimated peak GPU memory per component, before anything loads.

The architectures are the real ones, built on PyTorch's ``meta`` device (no memory, no weights): from the model
folder's ``config.json`` files when the model is on this machine (the tiny zoo, a downloaded checkpoint), else from
the published configs below for the hub ids the profiles name. Parameter counts are therefore exact; the memory
figures are an estimate:

- weights: parameters x bytes per parameter of their dtype (bf16 2; fp8 1, plus a scale per row; nf4 0.5, plus
  bitsandbytes' absmax per 64 weights and its double quantisation: 0.53);
- trained parameters: fp32 weights + fp32 gradients + optimizer states (AdamW 2, Prodigy 4 fp32 tensors per
  parameter; 8-bit AdamW 2 bytes);
- activations, A²BFR: with gradient checkpointing every block keeps its input (blocks x rows x tokens x width x
  2 bytes) plus one block's working set recomputed in the backward (8 x rows x tokens x width x 2 bytes); rows
  double in dual mode (source and target branch in one call); the attribute loss decodes x0_hat through the VAE
  decoder with gradients at ``aal_scale`` (8 x rows x pixels x 128 channels x 2 bytes: an uncalibrated guess);
- activations, RoboFace stage II: 0.47 GiB per sample at 512² (scaled by the pixel count), the measured slope;
- a fixed 1.0 GiB for the CUDA context and the allocator's slack.

Calibration: FLUX.1-dev, plain token concatenation, LoRA r64, checkpointing, bf16, batch 8, 512², T5 not on the
GPU, single mode without the attribute loss (what the benchmark ran): 34.7 GiB measured on one H100; this
plan gives 36.2 GiB (4 % above). RoboFace stage II, batch 32 at 512², bf16: 22 GiB
measured.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

GIB = 1024**3
BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "nf4": 0.53}
OPTIMIZER_STATES = {"prodigy": 16.0, "adamw": 8.0, "adamw8bit": 2.0}  # bytes per trained parameter
OVERHEAD_GIB = 1.0
ROBOFACE_GIB_PER_SAMPLE_512 = 0.47

# Published configs of the hub checkpoints the profiles name (their config.json values that differ from the
# classes' defaults), for plans on machines without the weights.
FLUX_DEV_TRANSFORMER = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")
T5_XXL_ENCODER = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
SD21_BASE_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                      cross_attention_dim=1024, use_linear_projection=True, layers_per_block=2)
SD2_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=768)
OPENCLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                       max_position_embeddings=77, vocab_size=49408, projection_dim=512, hidden_act="gelu")
OPENCLIP_H_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                         patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
PUBLISHED = {
    "black-forest-labs/FLUX.1-dev": {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_VAE,
                                     "text_encoder": CLIP_L_TEXT, "text_encoder_2": T5_XXL_ENCODER},
    "stabilityai/stable-diffusion-2-1-base": {"unet": SD21_BASE_UNET, "vae": SD2_VAE, "text_encoder": OPENCLIP_H_TEXT},
    "h94/IP-Adapter": {"models/image_encoder": OPENCLIP_H_VISION},
}


@dataclass
class Component:
    name: str
    params: int
    trainable: int = 0
    dtype: str = "bf16"  # the frozen weights' storage
    on_gpu: bool = True
    note: str = ""
    optimizer: str = "adamw"

    @property
    def weights_gib(self) -> float:
        frozen = self.params - self.trainable
        return (frozen * BYTES[self.dtype] + self.trainable * 4) / GIB if self.on_gpu else 0.0

    @property
    def training_gib(self) -> float:
        """Gradients + optimizer states of the trained parameters."""
        return self.trainable * (4 + OPTIMIZER_STATES[self.optimizer]) / GIB if self.on_gpu else 0.0


@dataclass
class Plan:
    model: str
    settings: dict
    components: list[Component]
    activations: dict[str, float] = field(default_factory=dict)  # name -> GiB
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.components)

    @property
    def trainable(self) -> int:
        return sum(c.trainable for c in self.components)

    @property
    def peak_gib(self) -> float:
        return (sum(c.weights_gib + c.training_gib for c in self.components) + sum(self.activations.values())
                + OVERHEAD_GIB)

    def table(self) -> str:
        lines = [f"{self.model} memory plan ({', '.join(f'{k}={v}' for k, v in self.settings.items())})", "",
                 f"{'component':<28}{'params':>14}{'trainable':>14}{'dtype':>7}{'weights GiB':>13}"
                 f"{'grads+optim GiB':>17}"]
        for c in self.components:
            where = "" if c.on_gpu else "  (not on the GPU: " + c.note + ")"
            lines.append(f"{c.name:<28}{c.params:>14,}{c.trainable:>14,}{c.dtype:>7}{c.weights_gib:>13.2f}"
                         f"{c.training_gib:>17.2f}{where}")
        for name, gib in self.activations.items():
            lines.append(f"{'activations: ' + name:<63}{gib:>13.2f}")
        lines.append(f"{'CUDA context and allocator slack':<63}{OVERHEAD_GIB:>13.2f}")
        lines.append("")
        lines.append(f"parameters {self.params:,} · trainable {self.trainable:,} · estimated peak "
                     f"{self.peak_gib:.1f} GiB ({self.peak_gib * GIB / 1e9:.1f} GB)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- architectures on the meta device ---------------------------------------------------------------------------------
def _config_source(spec: str, store, subfolder: str) -> Path | dict:
    """The folder holding ``subfolder``'s config (the model on this machine), else its published config."""
    from attrface_pipeline.models.store import ModelNotAvailableError

    with contextlib.suppress(ModelNotAvailableError, FileNotFoundError, OSError, ValueError):
        folder = Path(store.resolve(spec))
        if (folder / subfolder / "config.json").is_file() or (folder / "config.json").is_file() and not subfolder:
            return folder / subfolder if subfolder else folder
    base = spec.split("@")[0]
    if base in PUBLISHED and subfolder in PUBLISHED[base]:
        return PUBLISHED[base][subfolder]
    raise FileNotFoundError(f"{spec}: {subfolder or 'its'} config is neither on this machine nor a published config "
                            f"this plan knows ({', '.join(PUBLISHED)}); download the model's config files "
                            f"(`hf download {base} --include '*.json'`)")


def _meta(build):
    with torch.device("meta"), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return build()


def _diffusers(cls, source):
    config = dict(cls.load_config(source)) if isinstance(source, Path) else dict(source)
    return _meta(lambda: cls.from_config(config))


def _transformers(model_cls, config_cls, source):
    config = config_cls.from_pretrained(source) if isinstance(source, Path) else config_cls(**source)
    return _meta(lambda: model_cls(config))


def _count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def flux_parts(base: str, store) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    return {"transformer": _diffusers(FluxTransformer2DModel, _config_source(base, store, "transformer")),
            "vae": _diffusers(AutoencoderKL, _config_source(base, store, "vae")),
            "text_encoder": _transformers(CLIPTextModel, CLIPTextConfig, _config_source(base, store, "text_encoder")),
            "text_encoder_2": _transformers(T5EncoderModel, T5Config, _config_source(base, store, "text_encoder_2"))}


def farl_params(spec: str, store) -> int:
    from attrface_pipeline.models.farl import FaRLAttributeModel

    with contextlib.suppress(Exception):
        folder = Path(store.resolve(spec))
        if (folder / "config.json").is_file():
            return _count(_diffusers(FaRLAttributeModel, folder))
    return _count(_meta(FaRLAttributeModel))  # the constructor's defaults are FaRL ViT-B/16's


def a2bfr_plan(cfg, *, batch_size: int | None = None, base_dtype: str | None = None, text_cache: bool | None = None,
               optimizer: str | None = None) -> Plan:
    """A²BFR training's plan for ``cfg`` (a PipelineConfig: its ``a2bfr`` section and model specs); arguments
    left None take the section's values."""
    from attrface_pipeline.models.store import ModelStore
    from training.a2bfr.model import add_condition_lora, freeze_unused_lora

    a = cfg.a2bfr
    batch = batch_size or a.batch_size
    base_dtype = base_dtype or getattr(a, "base_dtype", "bf16")
    text_cache = getattr(a, "text_cache", False) if text_cache is None else text_cache
    store = ModelStore(cfg.paths.cache_dir, allow_download=False)
    parts = flux_parts(cfg.models.flux, store)
    transformer = parts["transformer"]
    base_params = _count(transformer)
    transformer.requires_grad_(False)
    _meta(lambda: add_condition_lora(transformer, rank=a.lora_rank, alpha=a.lora_alpha))
    freeze_unused_lora(transformer)
    lora_params = _count(transformer) - base_params
    trained = _count(transformer, trainable=True)
    opt = optimizer or a.optimizer
    frozen_dtype = base_dtype if base_dtype != "bf16" or a.mixed_precision == "bf16" else (
        "fp32" if a.mixed_precision == "no" else "bf16")
    aux_dtype = "bf16" if a.mixed_precision != "no" else "fp32"
    text_note = "cached embeddings (text_embeddings asset)"
    components = [
        Component("transformer (frozen)", base_params, 0, frozen_dtype),
        Component(f"LoRA r{a.lora_rank} (trained)", lora_params, trained, "fp32", optimizer=opt),
        Component("VAE", _count(parts["vae"]), 0, aux_dtype),
        Component("CLIP-L text encoder", _count(parts["text_encoder"]), 0, aux_dtype, on_gpu=not text_cache,
                  note=text_note),
        Component("T5 text encoder", _count(parts["text_encoder_2"]), 0, aux_dtype, on_gpu=not text_cache,
                  note=text_note),
        Component("FaRL (attribute loss)", farl_params(cfg.models.farl, store), 0, "bf16"),
    ]
    c = transformer.config
    width = c.num_attention_heads * c.attention_head_dim
    blocks = c.num_layers + c.num_single_layers
    rows = batch * (2 if a.mode == "dual" else 1)
    image = (a.resolution // 16) ** 2
    tokens = a.max_sequence_length + 2 * image  # text + noisy image + condition tokens
    per_block = rows * tokens * width * 2
    activations = {"transformer blocks": (blocks * per_block if a.gradient_checkpointing else
                                          blocks * per_block * 12) / GIB,
                   "one block recomputed": 8 * per_block / GIB}
    if a.aal_weight > 0 or (a.mode == "dual" and a.sdt_weight > 0):
        side = int(a.resolution * 0.5)
        activations["VAE decode for the attribute loss"] = rows * side * side * 128 * 2 * 8 / GIB
    notes = []
    if base_dtype in ("fp8", "nf4"):
        notes.append(f"{base_dtype} base: the frozen transformer's weights are stored in {base_dtype}, the LoRA "
                     f"trains in fp32 above them")
    plan = Plan("A²BFR", {"profile": cfg.profile, "batch": batch, "resolution": a.resolution, "mode": a.mode,
                          "base_dtype": base_dtype, "optimizer": opt, "text_cache": text_cache}, components,
                activations, notes)
    return plan


def roboface_plan(cfg, *, batch_size: int | None = None, text_cache: bool = False) -> Plan:
    """RoboFace stage II's plan (the largest stage: ControlNet + decoupled cross-attention trained)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from attrface_pipeline.models.store import ModelStore
    from training.roboface.attention import install_dca
    from training.roboface.modules import Mapper, Remover

    r = cfg.roboface
    batch = batch_size or r.stage2_batch_size
    store = ModelStore(cfg.paths.cache_dir, allow_download=False)
    base = cfg.models.sd2_controlnet
    unet = _diffusers(UNet2DConditionModel, _config_source(base, store, "unet"))
    vae = _diffusers(AutoencoderKL, _config_source(base, store, "vae"))
    text = _transformers(CLIPTextModel, CLIPTextConfig, _config_source(base, store, "text_encoder"))
    image_spec, image_sub = (r.image_encoder, r.image_encoder_subfolder or "") if r.image_encoder else (
        base, r.image_encoder_subfolder or "image_encoder")
    image = _transformers(CLIPVisionModelWithProjection, CLIPVisionConfig, _config_source(image_spec, store,
                                                                                          image_sub))
    controlnet = _meta(lambda: ControlNetModel.from_unet(unet))
    cross = unet.config.cross_attention_dim
    dca = _meta(lambda: torch.nn.ModuleList([install_dca(unet, r.num_tokens), install_dca(controlnet, r.num_tokens)]))
    mapper = _meta(lambda: Mapper(image_dim=image.config.hidden_size, cross_attention_dim=cross,
                                  num_tokens=r.num_tokens))
    remover = _meta(lambda: Remover(dim=cross, num_tokens=r.num_tokens))
    dtype = "bf16" if r.mixed_precision != "no" else "fp32"
    components = [
        Component("UNet (frozen)", _count(unet), 0, dtype),
        Component("ControlNet (trained)", _count(controlnet), _count(controlnet), "fp32"),
        Component("decoupled cross-attention (trained)", _count(dca), _count(dca), "fp32"),
        Component("Mapper + Remover (frozen)", _count(mapper) + _count(remover), 0, "fp32"),
        Component("CLIP image encoder", _count(image), 0, dtype),
        Component("text encoder", _count(text), 0, dtype, on_gpu=not text_cache,
                  note="cached embeddings (text_embeddings asset)"),
        Component("VAE", _count(vae), 0, dtype),
    ]
    activations = {"UNet + ControlNet": batch * ROBOFACE_GIB_PER_SAMPLE_512 * (r.resolution / 512) ** 2}
    return Plan("RoboFace stage II", {"profile": cfg.profile, "batch": batch, "resolution": r.resolution,
                                      "N": r.num_tokens, "text_cache": text_cache}, components, activations)


def train_config_plan(cfg, *, batch_size: int | None = None, base_dtype: str | None = None,
                      text_cache: bool | None = None, gradient_checkpointing: bool | None = None) -> Plan:
    """:func:`a2bfr_plan` of an A2BFRTrainConfig (what the trainer runs), with optional changes."""
    from types import SimpleNamespace

    m, d, t = cfg.model, cfg.data, cfg.train
    section = SimpleNamespace(
        batch_size=d.batch_size, lora_rank=m.lora.rank, lora_alpha=m.lora.alpha, optimizer=t.optimizer,
        mixed_precision=t.mixed_precision, mode=d.mode, resolution=m.resolution,
        max_sequence_length=m.max_sequence_length, aal_weight=cfg.loss.aal_weight, sdt_weight=cfg.loss.sdt_weight,
        gradient_checkpointing=t.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing)
    run = SimpleNamespace(a2bfr=section, profile="run", models=SimpleNamespace(flux=m.base, farl=m.farl),
                          paths=SimpleNamespace(cache_dir=Path(cfg.cache_dir)))
    return a2bfr_plan(run, batch_size=batch_size, base_dtype=base_dtype or m.base_dtype,
                      text_cache=bool(cfg.text_cache) if text_cache is None else text_cache)


class PlanDoesNotFit(RuntimeError):
    """The run's estimated peak exceeds the GPU (the message names what would fit)."""


def check_fits(plan_with, device_properties, *, margin: float = 0.95) -> Plan:
    """Refuse a run whose estimated peak exceeds ``margin`` of the device's memory; ``plan_with(**changes)``
    makes the run's plan with changes. The message names the first change (text cache, nf4 base, batch 1,
    checkpointing) that fits, or says none does."""
    plan = plan_with()
    budget = device_properties.total_memory / GIB * margin
    if plan.peak_gib <= budget:
        return plan
    tried = [({"text_cache": True}, "a2bfr.text_cache: true (materialize text_embeddings)"),
             ({"text_cache": True, "base_dtype": "nf4"}, "a2bfr.text_cache: true and a2bfr.base_dtype: nf4"),
             ({"text_cache": True, "base_dtype": "nf4", "batch_size": 1},
              "a2bfr.text_cache: true, a2bfr.base_dtype: nf4 and a2bfr.batch_size: 1"),
             ({"text_cache": True, "base_dtype": "nf4", "batch_size": 1, "gradient_checkpointing": True},
              "the above with gradient checkpointing")]
    fits = next(((what, p) for change, what in tried if (p := plan_with(**change)).peak_gib <= budget), None)
    name = getattr(device_properties, "name", "this GPU")
    advice = (f"{fits[0]} would fit (est. {fits[1].peak_gib:.1f} GiB)" if fits else
              "no combination of the text cache, an nf4 base, batch 1 and checkpointing fits: use a larger GPU")
    raise PlanDoesNotFit(f"this run's estimated peak, {plan.peak_gib:.1f} GiB, exceeds {name}'s "
                         f"{device_properties.total_memory / GIB:.1f} GiB: {advice}. `attrface train-a2bfr --plan` "
                         f"prints the plan; memory_check: false runs anyway")
