"""The RoboFace bundle: SD2.1-family components + Mapper + Remover + ControlNet + decoupled cross-attention, and the
loss of each training stage as a function of (bundle, batch).

Loading is the diffusers/transformers one for real and tiny weights alike: every component comes from
``from_pretrained`` on a pipeline folder's subfolders (``vae``, ``unet``, ``text_encoder``, ``tokenizer``,
``scheduler``, ``controlnet``, ``image_encoder``, ``feature_extractor``). A base without ``controlnet/`` (SD2.1
itself) gets ``ControlNetModel.from_unet``; an image encoder elsewhere (``h94/IP-Adapter``'s
``models/image_encoder``) is named separately.

Stages (REFERENCE.md, RoboFace), epsilon- or v-prediction as the scheduler says, uniform timesteps, MSE:

* ``stage1a`` -- Mapper as an autoencoder: tokens = Mapper(CLIP(x)) are the UNet's whole ``encoder_hidden_states``
  (no text), loss on x's own latents; x = HQ, LQ or both (``stage1a.inputs``). Trains the Mapper only.
* ``stage1b`` -- tokens = Remover(Mapper(CLIP(LQ))), loss on the HQ latents. Trains the Remover only.
* ``stage2`` -- ControlNet on the LQ image (in [0, 1], the diffusers convention for control images), and DCA in every
  cross-attention layer of UNet and ControlNet; ``encoder_hidden_states = [caption tokens ; Remover(Mapper(LQ))]``;
  loss on the HQ latents. Trains the ControlNet and the DCA branches (UNet's and ControlNet's). With ``dca.implicit``
  off it trains the ControlNet alone and computes no implicit tokens (CLIP, Mapper and Remover do not run; the
  unused branches keep their initial weights and are still saved, so the deliverable's layout is the same).

Stage I gives the UNet the N tokens alone as its context, which the DCA processors run as stock cross-attention (the
text's K/V, the branches unused), so one bundle with DCA installed serves every stage.

Batches are ``training.data`` batches: images CHW in [-1, 1]; the HQ image is ``gt`` (single / folder mode) or
``gt_src`` (dual mode); the stage-II caption is the first of ``caption``, ``prompt``, ``prompt_src`` present (the
captions asset adds ``caption``: captions of the HQ image).

For ``training.engine.Trainer``: ``freeze_for(stage)`` once, then ``step_fn(stage)`` as the step function (it calls
``model(batch, stage=...)``, so a DDP-wrapped bundle synchronises gradients) and ``save_fn(stage)`` for the
deliverable. Frozen parts are cast to ``dtype``; trained parts stay float32.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.roboface.attention import DCA_FILE, install_dca, load_dca, read_dca_metadata, save_dca
from training.roboface.config import STAGES, RoboFaceConfig
from training.roboface.modules import Mapper, Remover

PARTS = ("mapper", "remover", "controlnet", "dca")
# What each stage's deliverable holds: everything needed downstream of it, so a stage-II folder restores alone.
STAGE_PARTS: dict[str, tuple[str, ...]] = {
    "stage1a": ("mapper",),
    "stage1b": ("mapper", "remover"),
    "stage2": PARTS,
}
MANIFEST = "roboface.json"
CAPTION_KEYS = ("caption", "prompt", "prompt_src")
HQ_KEYS = ("gt", "gt_src")


class RoboFace(nn.Module):
    """All of RoboFace's networks in one module (so ``.to``, ``.parameters`` and DDP see them together)."""

    def __init__(self, *, config: RoboFaceConfig, vae, unet, text_encoder, tokenizer, controlnet, image_encoder,
                 scheduler_config: dict, feature_extractor=None, mapper: Mapper | None = None,
                 remover: Remover | None = None):
        from diffusers import DDPMScheduler

        super().__init__()
        self.config = config
        self.vae, self.unet, self.text_encoder, self.controlnet = vae, unet, text_encoder, controlnet
        self.image_encoder = image_encoder
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.scheduler_config = dict(scheduler_config)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        n, cross_dim = config.num_tokens, unet.config.cross_attention_dim
        self.mapper = mapper if mapper is not None else Mapper(
            image_dim=image_encoder.config.hidden_size, cross_attention_dim=cross_dim, num_tokens=n,
            **config.mapper.model_dump())
        self.remover = remover if remover is not None else Remover(dim=cross_dim, num_tokens=n,
                                                                   **config.remover.model_dump())
        for name, module in (("mapper", self.mapper), ("remover", self.remover)):
            if module.config.num_tokens != n:
                raise ValueError(f"{name} makes {module.config.num_tokens} tokens; the config says num_tokens={n}")
        dca = dict(order=config.dca.order, use_implicit=config.dca.implicit)
        self.dca = nn.ModuleDict({"unet": install_dca(unet, n, config.dca.mode, **dca),
                                  "controlnet": install_dca(controlnet, n, config.dca.mode, **dca)})
        for module in (self.mapper, self.remover, self.controlnet, self.dca):
            module.float()  # trained parts in float32 whatever the frozen parts' dtype
        mean, std = _clip_normalisation(feature_extractor)
        self.register_buffer("clip_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.clip_size = int(image_encoder.config.image_size)

    # --- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, base: str | Path, *, config: RoboFaceConfig | None = None,
                        trained: str | Path | None = None, controlnet: str | Path | None = None,
                        image_encoder: str | Path | None = None, dtype: torch.dtype | None = None,
                        text_encoder: bool = True) -> RoboFace:
        """Components from the pipeline folder ``base``; Mapper/Remover/ControlNet/DCA from ``trained`` (a folder
        written by :meth:`save`) where it has them, else fresh (ControlNet: ``controlnet``, base's, or from_unet).
        ``text_encoder=False``: no text encoder or tokenizer (the prompts' states come from :attr:`text_cache`)."""
        from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPVisionModelWithProjection

        config = config or RoboFaceConfig()
        base = Path(base)
        trained = Path(trained) if trained is not None else None
        kw = {"torch_dtype": dtype} if dtype is not None else {}
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kw)
        with_text = text_encoder
        text_encoder = (CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **_hf_dtype(dtype))
                        if with_text else None)
        tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer") if with_text else None
        enc_root = Path(image_encoder) if image_encoder is not None else base
        sub = config.image_encoder_subfolder
        if not (enc_root / sub if sub else enc_root).is_dir():
            raise FileNotFoundError(f"no CLIP image encoder at {enc_root / (sub or '')}: set image_encoder (and "
                                    f"image_encoder_subfolder) to a CLIPVisionModelWithProjection folder")
        vision = CLIPVisionModelWithProjection.from_pretrained(enc_root, subfolder=sub, **_hf_dtype(dtype)) \
            if sub else CLIPVisionModelWithProjection.from_pretrained(enc_root, **_hf_dtype(dtype))
        feature_extractor = _load_feature_extractor(base / "feature_extractor")
        if trained is not None and (trained / "controlnet").is_dir():
            net = ControlNetModel.from_pretrained(trained / "controlnet")
        elif controlnet is not None:
            net = ControlNetModel.from_pretrained(controlnet)
        elif (base / "controlnet").is_dir():
            net = ControlNetModel.from_pretrained(base, subfolder="controlnet")
        else:
            net = ControlNetModel.from_unet(unet)
        scheduler_config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
        mapper = Mapper.from_pretrained(trained / "mapper") if trained and (trained / "mapper").is_dir() else None
        remover = Remover.from_pretrained(trained / "remover") if trained and (trained / "remover").is_dir() else None
        model = cls(config=config, vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                    controlnet=net, image_encoder=vision, scheduler_config=scheduler_config,
                    feature_extractor=feature_extractor, mapper=mapper, remover=remover)
        if trained is not None and (trained / DCA_FILE).is_file():
            model._load_dca(trained / DCA_FILE)
        return model

    # --- building blocks -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> CLIP hidden states (B, P, C) of ``image_feature_layer``. Resized to the
        encoder's size and normalised in torch (square face crops: the processor's resize + centre crop is a resize)."""
        x = (images.float() + 1) / 2
        x = F.interpolate(x, size=(self.clip_size, self.clip_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        x = (x - self.clip_mean) / self.clip_std
        out = self.image_encoder(pixel_values=x.to(self.image_encoder.dtype), output_hidden_states=True)
        return out.hidden_states[self.config.image_feature_layer]

    def mapper_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Mapper(CLIP(images)): (B, N, cross_attention_dim); the frozen CLIP runs without gradients."""
        with torch.no_grad():
            features = self.image_features(images)
        return self.mapper(features)

    def implicit_tokens(self, lq_images: torch.Tensor) -> torch.Tensor:
        """Remover(Mapper(CLIP(LQ))): the N implicit tokens (B, N, cross_attention_dim), float32."""
        return self.remover(self.mapper_tokens(lq_images))

    def stage2_tokens(self, lq_images: torch.Tensor) -> torch.Tensor:
        """The implicit tokens stage II attends to: Remover(Mapper(CLIP(LQ))), or the Mapper's tokens alone with
        ``dca.use_remover`` off. With ``dca.implicit`` off nothing runs (no CLIP, Mapper or Remover): the N tokens
        are zeros that keep the context's ``[text ; N]`` layout, and the DCA layers attend to the text alone."""
        if not self.config.dca.implicit:
            return torch.zeros(lq_images.shape[0], self.config.num_tokens, self.unet.config.cross_attention_dim,
                               device=lq_images.device)
        return self.implicit_tokens(lq_images) if self.config.dca.use_remover else self.mapper_tokens(lq_images)

    def stage2_captions(self, captions: Sequence[str]) -> list[str]:
        """The explicit text stage II sees: the captions, or empty ones with ``dca.explicit`` off."""
        return [str(c) for c in captions] if self.config.dca.explicit else [""] * len(captions)

    text_cache = None  # a training.text_cache.TextEmbeddingCache: the prompts' states are looked up

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder states (B, 77, D) of the prompts, padded to the tokenizer's max length as SD does (or the
        same states from :attr:`text_cache`)."""
        if self.text_cache is not None:
            return self.text_cache.states(list(prompts)).to(self.device)
        if self.text_encoder is None:
            raise RuntimeError("this RoboFace bundle has no text encoder and no text cache")
        return clip_text_states(self.tokenizer, self.text_encoder, prompts)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled VAE latents (a posterior sample, as diffusers' training examples do)."""
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        latents = dist.sample(generator=generator)
        if getattr(self.vae.config, "shift_factor", None):
            latents = latents - self.vae.config.shift_factor
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None):
            latents = latents + self.vae.config.shift_factor
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor, *,
                control: torch.Tensor | None = None, controlnet_scale: float = 1.0,
                implicit_only: bool = False) -> torch.Tensor:
        """The UNet's output (noise or velocity) for one batch.

        ``implicit_only`` (stage I): ``encoder_hidden_states`` is the N tokens alone (stock cross-attention over
        them, no ControlNet). Otherwise it is ``[text ; N tokens]``; ``control`` (B, 3, H, W) in [0, 1] adds the
        ControlNet's residuals.
        """
        unet_dtype = self.unet.dtype
        if implicit_only:
            if encoder_hidden_states.shape[1] != self.config.num_tokens or control is not None:
                raise ValueError(f"implicit_only takes the {self.config.num_tokens} tokens alone and no control")
            return self.unet(noisy.to(unet_dtype), timesteps, encoder_hidden_states.to(unet_dtype)).sample
        down = mid = None
        if control is not None:
            cn_dtype = self.controlnet.dtype
            down, mid = self.controlnet(noisy.to(cn_dtype), timesteps, encoder_hidden_states=encoder_hidden_states
                                        .to(cn_dtype), controlnet_cond=control.to(cn_dtype),
                                        conditioning_scale=controlnet_scale, return_dict=False)
            down = [d.to(unet_dtype) for d in down]
            mid = mid.to(unet_dtype)
        return self.unet(noisy.to(unet_dtype), timesteps, encoder_hidden_states.to(unet_dtype),
                         down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    def diffusion_loss(self, latents: torch.Tensor, encoder_hidden_states: torch.Tensor, *,
                       control: torch.Tensor | None = None, implicit_only: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE between the UNet's prediction and its target (noise, or velocity for v-prediction) at uniformly
        drawn timesteps; ``generator`` (CPU) fixes noise and timesteps, else the global RNG is used."""
        sched = self.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        t = t.to(latents.device)
        latents = latents.float()
        noisy = sched.add_noise(latents, noise, t)
        kind = sched.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
        pred = self.predict(noisy, t, encoder_hidden_states, control=control, implicit_only=implicit_only)
        return F.mse_loss(pred.float(), target)

    # --- training --------------------------------------------------------------------------------------------------
    def trainable_modules(self, stage: str) -> list[nn.Module]:
        if stage == "stage1a":
            return [self.mapper]
        if stage == "stage1b":
            return [self.remover]
        if stage == "stage2":  # the DCA branches only where they are used (not with ``dca.implicit`` off)
            return [self.controlnet, self.dca] if self.config.dca.implicit else [self.controlnet]
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")

    def trainable_parameters(self, stage: str) -> Iterator[nn.Parameter]:
        for module in self.trainable_modules(stage):
            yield from module.parameters()

    def freeze_for(self, stage: str) -> RoboFace:
        """requires_grad on the stage's parameters only; trained modules in train mode, the rest in eval mode."""
        modules = self.trainable_modules(stage)
        self.requires_grad_(False)
        for module in modules:
            module.requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> RoboFace:
        """Frozen components stay in eval mode whatever the trainer asks (no dropout/statistics in frozen parts)."""
        super().train(mode)
        if mode:
            for module in (self.vae, self.unet, self.text_encoder, self.image_encoder, self.controlnet, self.mapper,
                           self.remover):
                if module is not None and not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        self.controlnet.enable_gradient_checkpointing()

    def forward(self, batch: dict, stage: str, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The stage's loss on one batch: ``{"loss": scalar}``."""
        try:
            loss_fn = STAGE_LOSSES[stage]
        except KeyError:
            raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}") from None
        return loss_fn(self, batch, generator=generator)

    # --- saving ----------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, parts: Sequence[str] = PARTS) -> Path:
        """Write ``parts`` in their own formats: mapper/ remover/ controlnet/ (diffusers save_pretrained),
        dca.safetensors, and roboface.json (N, DCA mode, base model, parts)."""
        folder = Path(folder)
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
        folder.mkdir(parents=True, exist_ok=True)
        if "mapper" in parts:
            self.mapper.save_pretrained(folder / "mapper")
        if "remover" in parts:
            self.remover.save_pretrained(folder / "remover")
        if "controlnet" in parts:
            self.controlnet.save_pretrained(folder / "controlnet")
        if "dca" in parts:
            save_dca(folder / DCA_FILE, self.dca, num_tokens=self.config.num_tokens, mode=self.config.dca.mode)
        from attrface_pipeline.storage import atomic_write_json

        atomic_write_json(folder / MANIFEST, {"num_tokens": self.config.num_tokens, "dca_mode": self.config.dca.mode,
                                              "base_model": self.config.base_model, "parts": list(parts)})
        return folder

    def load(self, folder: str | Path) -> list[str]:
        """Load whichever parts ``folder`` (from :meth:`save`) holds into this bundle; returns their names."""
        from diffusers import ControlNetModel

        folder = Path(folder)
        loaded = []
        for name, cls in (("mapper", Mapper), ("remover", Remover)):
            if (folder / name).is_dir():
                module = cls.from_pretrained(folder / name)
                if module.config.num_tokens != self.config.num_tokens:
                    raise ValueError(f"{folder / name} makes {module.config.num_tokens} tokens; this bundle uses "
                                     f"num_tokens={self.config.num_tokens}")
                setattr(self, name, module.to(self.device).float())  # .to(dtype) warns spuriously
                loaded.append(name)
        if (folder / "controlnet").is_dir():
            # copy into the existing ControlNet: its DCA processors (and their branches) stay attached
            state = ControlNetModel.from_pretrained(folder / "controlnet").state_dict()
            self.controlnet.load_state_dict(state, strict=True)
            loaded.append("controlnet")
        if (folder / DCA_FILE).is_file():
            self._load_dca(folder / DCA_FILE)
            loaded.append("dca")
        if not loaded:
            raise FileNotFoundError(f"{folder} holds none of {PARTS} (write it with RoboFace.save)")
        return loaded

    def _load_dca(self, path: Path) -> None:
        meta = read_dca_metadata(path)
        if meta.get("num_tokens") != self.config.num_tokens or meta.get("mode") != self.config.dca.mode:
            raise ValueError(f"{path} was trained with num_tokens={meta.get('num_tokens')}, dca mode "
                             f"{meta.get('mode')!r}; set num_tokens and dca.mode to match (this bundle: "
                             f"{self.config.num_tokens}, {self.config.dca.mode!r})")
        load_dca(path, self.dca)


def clip_text_states(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """The text encoder's states (B, 77, D), the prompts padded to the tokenizer's max length as SD does (the
    training/restore path and the text-embedding cache both call this)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def _hf_dtype(dtype: torch.dtype | None) -> dict[str, Any]:
    return {"dtype": dtype} if dtype is not None else {}


def _load_feature_extractor(path: Path):
    if not path.is_dir():
        return None
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(path)


def _clip_normalisation(feature_extractor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if feature_extractor is not None:
        return tuple(feature_extractor.image_mean), tuple(feature_extractor.image_std)
    from attrface_pipeline.models.farl import CLIP_MEAN, CLIP_STD

    return tuple(CLIP_MEAN), tuple(CLIP_STD)


# --- batches ---------------------------------------------------------------------------------------------------------
def _first(batch: dict, keys: Sequence[str], what: str):
    for key in keys:
        if key in batch:
            return batch[key]
    raise KeyError(f"batch has no {what} (looked for {', '.join(keys)}; it has {sorted(batch)})")


def batch_images(model: RoboFace, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(HQ, LQ) image tensors of a training.data batch, on the model's device."""
    hq = _first(batch, HQ_KEYS, "HQ image")
    return hq.to(model.device), batch["lq"].to(model.device)


def batch_captions(batch: dict, size: int) -> list[str]:
    """The stage-II captions: ``caption`` (captions asset), else the dataset prompt, else empty."""
    try:
        captions = _first(batch, CAPTION_KEYS, "caption")
    except KeyError:
        return [""] * size
    if isinstance(captions, str):
        return [captions] * size
    return [str(c) for c in captions]


def _drop(captions: list[str], p: float, generator: torch.Generator | None) -> list[str]:
    if p <= 0:
        return captions
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


# --- stage losses: (bundle, batch) -> {"loss": ...} -------------------------------------------------------------------
def stage1a_loss(model: RoboFace, batch: dict, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Stage I-a: Mapper(CLIP(x)) as the UNet's only context, diffusion loss on x itself (x = HQ and/or LQ)."""
    hq, lq = batch_images(model, batch)
    inputs = model.config.stage1a.inputs
    images = torch.cat([hq, lq]) if inputs == "both" else (hq if inputs == "hq" else lq)
    with torch.no_grad():
        latents = model.encode_images(images, generator)
    tokens = model.mapper_tokens(images)
    return {"loss": model.diffusion_loss(latents, tokens, implicit_only=True, generator=generator)}


def stage1b_loss(model: RoboFace, batch: dict, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Stage I-b: Remover(Mapper(CLIP(LQ))) as the UNet's only context, diffusion loss on the HQ image."""
    hq, lq = batch_images(model, batch)
    with torch.no_grad():
        latents = model.encode_images(hq, generator)
        mapped = model.mapper_tokens(lq)
    tokens = model.remover(mapped)
    return {"loss": model.diffusion_loss(latents, tokens, implicit_only=True, generator=generator)}


def stage2_loss(model: RoboFace, batch: dict, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Stage II: ControlNet(LQ) + DCA over [caption ; Remover(Mapper(LQ))], diffusion loss on the HQ image."""
    hq, lq = batch_images(model, batch)
    captions = _drop(batch_captions(batch, hq.shape[0]), model.config.stage2.caption_dropout, generator)
    captions = model.stage2_captions(captions)
    with torch.no_grad():
        latents = model.encode_images(hq, generator)
        tokens = model.stage2_tokens(lq)
        text = model.encode_text(captions)
    context = torch.cat([text.float(), tokens.float()], dim=1)
    control = (lq.float() + 1) / 2
    return {"loss": model.diffusion_loss(latents, context, control=control, generator=generator)}


STAGE_LOSSES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "stage1a": stage1a_loss,
    "stage1b": stage1b_loss,
    "stage2": stage2_loss,
}


def step_fn(stage: str) -> Callable[[nn.Module, dict], dict[str, torch.Tensor]]:
    """``training.engine.Trainer``'s step function for a stage: ``model(batch, stage=stage)``."""
    if stage not in STAGE_LOSSES:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")

    def step(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return model(batch, stage=stage)

    return step


def save_fn(stage: str) -> Callable[[nn.Module, Path], None]:
    """``training.engine.Trainer``'s save function: the stage's deliverable parts (:data:`STAGE_PARTS`)."""
    parts = STAGE_PARTS[stage]

    def save(model: nn.Module, folder: Path) -> None:
        model.save(folder, parts=parts)

    return save


def build_roboface(cfg: RoboFaceConfig, store, *, trained: str | Path | None = None,
                   text_encoder: bool = True) -> RoboFace:
    """The bundle the config names, its weights resolved by ``store`` (a ModelStore), on cfg's device and dtype."""
    from attrface_pipeline.models.device import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = RoboFace.from_pretrained(
        store.resolve(cfg.base_model), config=cfg, trained=trained,
        controlnet=store.resolve(cfg.controlnet) if cfg.controlnet else None,
        image_encoder=store.resolve(cfg.image_encoder) if cfg.image_encoder else None,
        dtype=None if dtype == torch.float32 else dtype, text_encoder=text_encoder)
    return model.to(device)
