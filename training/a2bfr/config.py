"""A²BFR training config: one validated object, recorded with every checkpoint and the final LoRA."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.data import LoaderConfig
from training.engine import TrainSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(_Strict):
    """REFERENCE.md: rank 64, alpha 4; applied at ``scale`` on condition tokens (OminiControl: 1). Init, dropout
    and the weights' dtype default to OminiControl's training (``init_lora_weights: gaussian``, peft's dropout 0);
    ``dtype: bf16`` is its whole-model bf16 step, fp32 master weights ours."""

    rank: int = Field(64, ge=1)
    alpha: float = 4.0
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (OminiControl: peft's default 0)")
    init: Literal["gaussian", "kaiming"] = Field(
        "gaussian", description="gaussian: A ~ N(0, 1/rank) (OminiControl's init_lora_weights: gaussian); kaiming: "
        "peft's default (kaiming-uniform A); B = 0 either way")
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="the trained LoRA weights: fp32 master weights, or bf16 with the loss in bf16 and no "
        "autocast (OminiControl's step; needs train.mixed_precision bf16)")
    scale: float = 1.0
    adapter_name: str = "default"


class ModelSettings(_Strict):
    base: str = Field("tiny/flux", description="Flux pipeline: hub id, local folder or tiny/flux")
    farl: str = Field("tiny/farl", description="frozen FaRL attribute model for the attribute-aware loss")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    condition_attends: Literal["all", "self"] = Field(
        "all", description="all: condition tokens attend every token (paper); self: only themselves (KV cache)")
    condition_latent: Literal["sample", "mean"] = Field(
        "sample", description="the LQ condition's VAE latent in training: sample (a posterior draw, after the "
        "noise, as OminiControl's training and the official inference) or mean (the posterior mean)")
    base_dtype: Literal["bf16", "fp8", "nf4"] = Field(
        "bf16", description="the frozen transformer's storage: bf16 (unquantized, the mixed-precision dtype), fp8 "
        "(torchao weight-only) or nf4 (bitsandbytes); the LoRA trains in fp32 above it (training/quantize.py)")
    resolution: int = Field(512, ge=16, description="square training and restore size (multiple of 16)")
    max_sequence_length: int = Field(512, ge=8, description="T5 tokens (FLUX.1-dev: 512)")

    @model_validator(mode="after")
    def _multiple_of_16(self) -> ModelSettings:
        if self.resolution % 16:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 16 (VAE 8x + 2x2 packing)")
        return self


class LossSettings(_Strict):
    """L = L_AAL(src) [+ L_AAL(tar) + alpha * L_dual in dual mode]; L_AAL = L_diff + lambda * L_attr.

    lambda, m, alpha are not published (REFERENCE.md): these defaults are a design decision, recorded with every
    checkpoint.
    """

    aal_weight: float = Field(0.1, ge=0, description="lambda: BCE of FaRL(x0_hat) against the GT probabilities")
    aal_scale: float = Field(0.5, gt=0, le=1, description="decode x0_hat at this fraction of the latent size")
    sdt_margin: float = Field(0.3, ge=0, le=1, description="m: hinge on |A_tar - A_src|")
    sdt_weight: float = Field(0.1, ge=0, description="alpha: weight of the dual loss")
    text_dropout: float = Field(0.1, ge=0, le=1)
    condition_dropout: float = Field(0.1, ge=0, le=1)
    train_guidance: float = Field(1.0, description="Flux-dev guidance embedding value during training")


class SampleSettings(_Strict):
    """The sample grid (LQ | restored, source prompt | restored, target prompt | GT) written at each checkpoint."""

    faces: int = Field(4, ge=0)
    steps: int = Field(28, ge=1)
    guidance_scale: float = 3.0
    split: Literal["train", "test"] = "test"


class A2BFRTrainConfig(_Strict):
    model: ModelSettings = Field(default_factory=ModelSettings)
    loss: LossSettings = Field(default_factory=LossSettings)
    data: LoaderConfig
    train: TrainSettings
    samples: SampleSettings = Field(default_factory=SampleSettings)
    cache_dir: str = Field("data/cache", description="model store root (hub cache, tiny zoo), as paths.cache_dir")
    allow_download: bool = False
    text_cache: str | None = Field(None, description="a text-embedding cache folder (training/text_cache.py): the "
                                   "text encoders are not loaded; None: they encode every batch's prompts")
    latent_cache: str | None = Field(None, description="a GT latent cache folder (training/latent_cache.py): the "
                                     "GT images' VAE posteriors are read, not encoded every step")
    memory_check: bool = Field(True, description="on a GPU, refuse a run whose memory plan exceeds the device "
                               "(training/plan.py), naming the option that would fit")

    @model_validator(mode="after")
    def _data_fits(self) -> A2BFRTrainConfig:
        if self.data.resolution not in (None, self.model.resolution):
            raise ValueError(f"data.resolution {self.data.resolution} differs from model.resolution "
                             f"{self.model.resolution}; leave data.resolution unset")
        return self

    @model_validator(mode="after")
    def _bf16_lora(self) -> A2BFRTrainConfig:
        if self.model.lora.dtype == "bf16" and self.train.mixed_precision != "bf16":
            raise ValueError(f"model.lora.dtype bf16 trains the whole model in bf16 (OminiControl's step): it needs "
                             f"train.mixed_precision bf16, not {self.train.mixed_precision!r}")
        return self
