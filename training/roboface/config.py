"""RoboFace's configuration: one strict pydantic tree (REFERENCE.md, RoboFace), validated at the edge.

Paper facts are the defaults (N = 30 tokens, Adam 1e-6 at batch 4 for stage I, 5e-5 at batch 192 for stage II,
LLaVA's face-description prompt, sequential decoupled cross-attention). Where the paper is silent the choice is
marked *design decision* and kept configurable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# REFERENCE.md (RoboFace, explicit text): the paper's LLaVA captioning prompt, verbatim.
CAPTION_PROMPT = (
    "Provide a detailed yet concise description of this person's face. Include their face shape, eyes, nose, mouth, "
    "eyebrows, skin texture and tone, expression, and any notable features like moles, freckles, or wrinkles."
)

Stage = Literal["stage1a", "stage1b", "stage2"]
STAGES: tuple[str, ...] = ("stage1a", "stage1b", "stage2")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MapperConfig(_Strict):
    """CLIP patch features -> N tokens: a small perceiver (learned queries cross-attending to the patches)."""

    width: int | None = Field(None, ge=8, description="internal width; None: the UNet's cross-attention dim")
    depth: int = Field(2, ge=1, description="perceiver layers")
    head_dim: int = Field(64, ge=4, description="heads = max(1, width // head_dim)")
    mlp_ratio: float = Field(4.0, gt=0)


class RemoverConfig(_Strict):
    """A pre-norm transformer encoder over the N tokens, residual around it (starts as the identity)."""

    width: int | None = Field(None, ge=8, description="internal width; None: the UNet's cross-attention dim")
    depth: int = Field(4, ge=1)
    head_dim: int = Field(64, ge=4)
    mlp_ratio: float = Field(4.0, gt=0)


class DCAConfig(_Strict):
    """What stage II's cross-attention layers attend to, and how: the paper's form by default; the other values are
    the papers' ablations (RoboFace Tab. 5, 6, 8)."""

    mode: Literal["sequential", "parallel"] = Field(
        "sequential", description="sequential: the paper's form (implicit query from the text-attended features); "
                                  "parallel: IP-Adapter's (one query, two K/V sets, outputs summed), for ablation")
    order: Literal["text_first", "implicit_first"] = Field(
        "text_first", description="sequential mode: which context is attended first (the second one's query is "
                                  "built from the first one's output)")
    explicit: bool = Field(True, description="false: no explicit text; captions are empty in training and restoring")
    implicit: bool = Field(True, description="false: the implicit branch is not used (text cross-attention only)")
    use_remover: bool = Field(True, description="false: the implicit tokens are the Mapper's LQ tokens, no Remover")


class VLMCaptionConfig(_Strict):
    """An OpenAI-compatible server with image input (``vllm serve llava-hf/llava-1.5-13b-hf``); the same client,
    retries and status handling as the verbalizer's. The API key is read from an env var, never stored."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = Field(None, description="served model name; None: the first model the server lists")
    api_key_env: str = "ATTRFACE_VLLM_API_KEY"
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    image_format: Literal["png", "jpeg"] = "png"


class TransformersCaptionConfig(_Strict):
    """A local image-text-to-text model (LLaVA-1.5 ``llava-hf/...``, Qwen-VL) loaded with ``from_pretrained``."""

    model: str = Field("llava-hf/llava-1.5-13b-hf", description="ModelStore spec: hub id, local dir")
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = Field(8, ge=1)


class CaptionConfig(_Strict):
    backend: Literal["vlm", "transformers", "none"] = "none"
    prompt: str = Field(CAPTION_PROMPT, min_length=1)
    max_tokens: int = Field(160, ge=8)
    temperature: float = Field(0.0, ge=0, description="0: greedy (captions of a training set are reproducible)")
    seed: int = 0
    cache_dir: str | None = Field(None, description="caption cache (one JSON per image); None: no cache")
    vlm: VLMCaptionConfig = Field(default_factory=VLMCaptionConfig)
    transformers: TransformersCaptionConfig = Field(default_factory=TransformersCaptionConfig)


class StageConfig(_Strict):
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    steps: int = Field(1000, ge=0, description="optimizer steps")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step (batch_size "
                                                                   "is per micro-batch and process)")


class Stage1aConfig(StageConfig):
    lr: float = Field(1e-6, gt=0)
    batch_size: int = Field(4, ge=1)
    # The paper trains the mapper "as an autoencoder on LQ and HQ images": both, every step (design decision).
    inputs: Literal["both", "hq", "lq"] = "both"


class Stage1bConfig(StageConfig):
    lr: float = Field(1e-6, gt=0)
    batch_size: int = Field(4, ge=1)


class Stage2Config(StageConfig):
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(192, ge=1)
    epochs: int = Field(15, ge=1, description="the paper's length; ``steps`` is what a run actually does")
    # Design decision: the paper does not say; 0.1 (SD/ControlNet practice) so classifier-free guidance on the
    # caption has an unconditional branch to contrast with.
    caption_dropout: float = Field(0.1, ge=0, le=1)


class RestoreConfig(_Strict):
    steps: int = Field(50, ge=1, description="stage-II sampling steps")
    stage1_steps: int | None = Field(None, ge=1, description="stage-I sampling steps; None: same as steps")
    guidance: float = Field(7.5, ge=1, description="CFG on the caption (stage II); 1 turns it off")
    controlnet_scale: float = Field(1.0, ge=0)
    seed: int = 0


class RoboFaceConfig(_Strict):
    """Everything RoboFace's components, losses and restorer need; ModelStore specs name the weights."""

    base_model: str = Field("tiny/sd2-controlnet", description="SD2.1-family pipeline folder (ModelStore spec), "
                                                               "e.g. stabilityai/stable-diffusion-2-1-base")
    controlnet: str | None = Field(None, description="ControlNet to start from; None: the base folder's controlnet/ "
                                                     "if it has one, else ControlNetModel.from_unet")
    image_encoder: str | None = Field(None, description="CLIP vision model spec; None: the base folder")
    image_encoder_subfolder: str | None = Field("image_encoder", description="e.g. models/image_encoder for "
                                                                             "h94/IP-Adapter")
    image_feature_layer: int = Field(-2, description="CLIP hidden state fed to the mapper (-2: penultimate)")
    num_tokens: int = Field(30, ge=1, description="N implicit tokens")
    mapper: MapperConfig = Field(default_factory=MapperConfig)
    remover: RemoverConfig = Field(default_factory=RemoverConfig)
    dca: DCAConfig = Field(default_factory=DCAConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    stage1a: Stage1aConfig = Field(default_factory=Stage1aConfig)
    stage1b: Stage1bConfig = Field(default_factory=Stage1bConfig)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    restore: RestoreConfig = Field(default_factory=RestoreConfig)
    resolution: int = Field(512, ge=16, description="square training/restoration size (pixels)")
    device: str = "auto"
    dtype: str = Field("auto", description="frozen parts' dtype; trained parts stay float32")

    @model_validator(mode="after")
    def _check_resolution(self) -> RoboFaceConfig:
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE's factor), got {self.resolution}")
        return self

    def stage(self, name: str) -> StageConfig:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; choose from {STAGES}")
        return getattr(self, name)
