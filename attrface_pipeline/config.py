"""Pipeline configuration: one pydantic tree, two profiles, YAML/Dagster overrides.

Every threshold, path and model id lives here. Functions below the Dagster layer take plain typed arguments
picked out of this tree; nothing else reads environment variables or hard-codes a model id.

Resolution order (later wins): profile defaults -> YAML file(s) -> explicit overrides (e.g. Dagster run config).
A YAML file may be a plain settings mapping or Dagster run config (``resources.attrface.config.{profile,settings}``),
so the same ``configs/full.yaml`` works for ``dagster job execute -c`` and for ``ATTRFACE_CONFIG``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from attrface_pipeline.attributes import CELEBA_ATTRIBUTES, DEFAULT_CONTROLLABLE

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Run from a checkout (editable install, `make`), the project root holds the data, configs and instance. Installed
# from a wheel anywhere else, the package ships configs, sample photos and dagster.yaml (attrface_pipeline/_shipped,
# links into the checkout that the wheel turns into files), and a working folder takes the checkout's place:
# $ATTRFACE_HOME, else the current directory -- never the installed package.
IN_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "data" / "samples").is_dir()
SHIPPED = Path(__file__).resolve().parent / "_shipped"
ENV_HOME = "ATTRFACE_HOME"
HOME = Path(os.environ.get(ENV_HOME) or (PROJECT_ROOT if IN_CHECKOUT else Path.cwd())).resolve()
SAMPLES_DIR = PROJECT_ROOT / "data" / "samples" if IN_CHECKOUT else SHIPPED / "samples"
CONFIGS_DIR = PROJECT_ROOT / "configs" if IN_CHECKOUT else SHIPPED / "configs"
DAGSTER_YAML = PROJECT_ROOT / "dagster_home" / "dagster.yaml" if IN_CHECKOUT else SHIPPED / "dagster.yaml"
PROFILES = ("offline", "full")
ENV_CONFIG = "ATTRFACE_CONFIG"
ENV_PROFILE = "ATTRFACE_PROFILE"


class _Strict(BaseModel):
    # allow_inf_nan=False: every float setting is a finite number (YAML's .inf / .nan are refused where they load)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PathsConfig(_Strict):
    """Where outputs go. ``data_root`` is a local path, or an fsspec URL (``s3://bucket/attrface``, ``gs://...``,
    ``file:///shared/attrface``): then ``data_url`` holds the URL and ``data_root`` becomes this machine's working
    copy (``work_dir``), which steps read and write while finished partitions are committed to the URL
    (attrface_pipeline/remote.py)."""

    data_root: Path = Field(HOME / "data" / "build", description="asset outputs: <root>/<asset>/<partition>/")
    cache_dir: Path = Field(HOME / "data" / "cache", description="model cache (hub downloads, tiny zoo)")
    data_url: str | None = Field(None, description="fsspec URL of the shared data root (set by giving data_root "
                                 "a URL); None for a local data root")
    work_dir: Path | None = Field(None, description="local working copy of a URL data root (default "
                                  "data/work/<hash of the URL>)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options of the URL "
                                            "(endpoint, profile; credentials belong in the environment)")

    @model_validator(mode="before")
    @classmethod
    def _url_data_root(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("data_root"), str) and "://" in data["data_root"]:
            url = data["data_root"].rstrip("/")
            if data.get("data_url") not in (None, url):
                raise ValueError(f"data_root {url!r} and data_url {data['data_url']!r} disagree; give one")
            digest = hashlib.sha256(url.encode()).hexdigest()[:12]
            data = {**data, "data_url": url,
                    "data_root": data.get("work_dir") or HOME / "data" / "work" / digest}
        return data


class SourceConfig(_Strict):
    """Where source photos come from: folders (scanned recursively), glob patterns, or ``.txt`` list files."""

    paths: list[str] = Field(default_factory=lambda: [str(SAMPLES_DIR / "faces")])
    extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"]
    )
    chunk_size: int = Field(8, ge=1, description="source images per partition (chunk)")
    dataset_name: str = "samples"


class IngestConfig(_Strict):
    min_side: int = Field(64, ge=1, description="images with a shorter side are quarantined (px)")
    # Ours alone: ingest turns Pillow's own bomb check off while it decodes, so any value works (above Pillow's
    # 89.5 MP too), and the quarantine reason quotes max_pixels.
    max_pixels: int = Field(80_000_000, ge=1, description="decompression-bomb bound on width*height, checked on the "
                            "header before any pixel is decoded")


class DetectConfig(_Strict):
    backend: Literal["dlib", "insightface"] = "dlib"
    min_score: float = Field(0.5, description="detector confidence threshold (dlib mmod score | insightface prob)")
    min_face_size: int = Field(48, ge=1, description="minimum bbox side in source pixels")
    min_eye_distance: float = Field(12.0, ge=0, description="minimum inter-ocular distance in source pixels")
    max_side: int = Field(1024, ge=64, description="detect on a copy whose long side is at most this")
    max_upscale: float = Field(1.0, ge=1.0, description="small images are enlarged at most this much for detection")
    dlib_upsample: int = Field(0, ge=0, le=2, description="extra dlib pyramid upsampling (x4 cost each)")
    insightface_det_size: int = Field(640, ge=32)


class AlignConfig(_Strict):
    size: int = Field(512, ge=32)
    image_format: Literal["png", "jpg", "webp"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)


class AttributesConfig(_Strict):
    """FaRL attribute classification; which attributes may be flipped and where 'unknown' begins."""

    controllable: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CONTROLLABLE),
        description="CelebA attribute names the dataset may flip (REFERENCE.md: a design decision)",
    )
    positive_threshold: float = Field(0.6, gt=0, lt=1, description="p above this: attribute present")
    negative_threshold: float = Field(0.4, gt=0, lt=1, description="p below this: attribute absent")
    batch_size: int = Field(32, ge=1)
    device: str = Field("auto", description="'auto' (cuda if available, else cpu) or a torch device string")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU")

    @field_validator("controllable")
    @classmethod
    def _known_attributes(cls, v: list[str]) -> list[str]:
        unknown = [a for a in v if a not in CELEBA_ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown CelebA attribute(s) {unknown}; names are case-sensitive, e.g. 'Eyeglasses'")
        if len(set(v)) != len(v):
            raise ValueError(f"controllable attributes repeat: {v}")
        return v

    @model_validator(mode="after")
    def _band(self) -> AttributesConfig:
        if self.negative_threshold > self.positive_threshold:
            raise ValueError(
                f"negative_threshold {self.negative_threshold} must not exceed positive_threshold "
                f"{self.positive_threshold}"
            )
        return self


class VllmConfig(_Strict):
    """An OpenAI-compatible server (``vllm serve <model>``). The API key is read from an env var, never stored."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = Field(None, description="served model name; default: the models.qwen3 spec as served")
    api_key_env: str = Field("ATTRFACE_VLLM_API_KEY", description="env var holding the key ('EMPTY' if unset)")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, description="extra attempts per face after an error or an invalid answer")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each attempt (plus jitter)")
    structured_output: bool = Field(True, description="ask the server to constrain decoding to the JSON schema")


class VerbalizeConfig(_Strict):
    backend: Literal["template", "transformers", "vllm"] = "template"
    targets: Literal["all", "sample"] = Field("all", description="all flippable attributes, or k sampled per face")
    k: int = Field(2, ge=1, description="targets per face when targets == 'sample'")
    seed: int = 0
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(512, ge=16)
    vllm: VllmConfig = Field(default_factory=VllmConfig)


def check_flowedit_schedule(*, steps: int, n_max: int, n_min: int, n_avg: int, beta: float,
                            beta_schedule: Sequence[float] | None, prefix: str = "") -> None:
    """FlowEdit's step schedule, checked in this one place: by :class:`EditConfig` when a config loads (``prefix``
    ``edit.``) and by ``stages.flowedit.FlowEditParams`` for direct callers. Raises ValueError naming the keys."""
    if steps < 1:
        raise ValueError(f"{prefix}steps must be at least 1, got {steps}")
    if n_max < 0 or n_min < 0:
        raise ValueError(f"{prefix}n_max and {prefix}n_min must be at least 0, got {n_max} and {n_min}")
    if n_max > steps:
        raise ValueError(f"{prefix}n_max {n_max} exceeds {prefix}steps {steps}")
    if n_avg < 1:
        raise ValueError(f"{prefix}n_avg must be at least 1, got {n_avg}")
    if beta_schedule is not None and len(beta_schedule) != steps:
        raise ValueError(f"{prefix}beta_schedule has {len(beta_schedule)} values for {steps} steps")
    betas = tuple(beta_schedule) if beta_schedule is not None else (beta,)
    if not all(0.0 <= b <= 1.0 for b in betas):
        raise ValueError(f"{prefix}beta values must lie in [0, 1], got {betas if beta_schedule is not None else beta}")


class EditConfig(_Strict):
    """FlowEdit on SD3/SD3.5 (``models.sd3``). Defaults here are the offline profile's (tiny model, small and fast);
    the full profile uses the official SD3-medium values (see FULL_PROFILE)."""

    resolution: int = Field(128, ge=16, description="edit resolution (px, multiple of 16); crops are resized to it")
    # steps .. beta_schedule are FlowEditParams' fields (built from this section by builders.flowedit_params) and
    # are checked once, by check_flowedit_schedule.
    steps: int = Field(10, ge=1, description="T: scheduler steps (at least 1)")
    n_max: int = Field(7, ge=0, description="FlowEdit runs on the last n_max steps (skips the noisiest); 0..steps")
    n_min: int = Field(0, ge=0, description="the last n_min steps are plain sampling with the target prompt")
    n_avg: int = Field(1, ge=1, description="noise draws averaged per step (at least 1)")
    src_guidance: float = Field(3.5, ge=0, description="classifier-free guidance scale of the source prompt")
    tar_guidance: float = Field(13.5, ge=0, description="classifier-free guidance scale of the target prompt")
    negative_prompt: str = ""
    beta: float = Field(0.0, description="noise blending: target velocity at (1-b) z_tar + b z_src; in [0, 1]")
    beta_schedule: list[float] | None = Field(None, description="per-step beta (length == steps); overrides beta")
    beta_map: Literal["uniform", "outside_region"] = Field(
        "uniform", description="spatial beta: everywhere, or only outside the flipped attribute's landmark region"
    )
    region_masks: bool = Field(False, description="confine each edit to its attribute's landmark region (soft)")
    mask_softness: float = Field(0.08, ge=0, description="Gaussian feather of region masks, fraction of the size")
    max_sequence_length: int = Field(128, ge=8, le=512, description="T5 tokens for the prompts")
    batch_size: int = Field(4, ge=1, description="pairs per transformer batch (x4 latents per call)")
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cpu_offload: bool = Field(False, description="model CPU offload (small GPUs; slower)")
    vae_slicing: bool = False
    vae_tiling: bool = False
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile the transformer (auto: on CUDA); "
                                            "batches are then padded to batch_size, so it compiles once")
    quantize: Literal["none", "fp8"] = Field("none", description="fp8: float8 weights and activations, per row "
                                             "(torchao, the gpu extra; compute capability >= 8.9, e.g. H100)")
    log_every: int = Field(16, ge=1, description="log progress every N pairs")
    lossless_master: bool = Field(False, description="also keep each edit as PNG (masters/); the published file "
                                  "(publish.image_format) is written either way, encoded once, where it is made")

    @model_validator(mode="after")
    def _shape(self) -> EditConfig:
        if self.resolution % 16:
            raise ValueError(f"edit.resolution {self.resolution} must be a multiple of 16 (VAE x8, patch 2)")
        check_flowedit_schedule(steps=self.steps, n_max=self.n_max, n_min=self.n_min, n_avg=self.n_avg,
                                beta=self.beta, beta_schedule=self.beta_schedule, prefix="edit.")
        if self.region_masks and self.n_min > 0:
            raise ValueError("edit.region_masks needs edit.n_min = 0 (sampling steps would repaint outside the mask)")
        return self


class QCConfig(_Strict):
    """Automatic quality control of each edit pair. Every score is kept; these decide pass/fail."""

    gate: list[Literal["attribute", "identity", "similarity"]] = Field(
        default_factory=lambda: ["identity", "similarity"],
        description="checks a pair must pass to be published (all are scored and reported). Offline the attribute "
        "model is random, so its verdict is noise and does not gate; the full profile gates on all three.",
    )
    identity_backend: Literal["dlib", "arcface"] = Field("dlib", description="arcface needs models.insightface_pack")
    arcface_min_similarity: float = Field(0.4, ge=-1, le=1, description="ArcFace cosine(source, edit) at least")
    dlib_max_distance: float = Field(0.6, ge=0, description="dlib descriptor distance at most (its same-person rule)")
    attribute_tolerance: float = Field(0.3, ge=0, le=1, description="other controllable attributes may move this much")
    min_ssim: float = Field(0.5, ge=-1, le=1, description="SSIM of the luma, source vs edit, at least")
    max_landmark_displacement: float = Field(16.0, ge=0, description="mean 5-point shift in px at 512, at most")
    min_pass_rate: float = Field(
        0.5, ge=0, le=1, description="blocking floor on the overall pass rate (the run stops before publishing)"
    )
    batch_size: int = Field(16, ge=1)


class PublishConfig(_Strict):
    """WebDataset shards and the dataset card."""

    shard_size: int = Field(1000, ge=1, description="samples per shard")
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(95, ge=1, le=100)
    test_fraction: float = Field(0.1, ge=0, le=1, description="share of source photos in the test split")
    workers: int = Field(2, ge=1, description="threads writing shards in parallel (each shard is independent)")
    split_salt: str = Field("attrface-v1", description="changing it reshuffles the (stable) split")
    split_by: Literal["identity", "photo"] = Field(
        "identity", description="identity: one person never on both sides (face_identities + union-find); photo: "
        "by source photo only")
    review: Literal["required", "optional", "off"] = Field(
        "optional", description="required: only accepted pairs; optional: all but rejected; off: ignore reviews"
    )
    review_db: Path | None = Field(
        None, description="SQLite file of review decisions (default <data_root>/review.sqlite)")


class BenchmarkSourceConfig(_Strict):
    paths: list[str] = Field(default_factory=list, description="folders (recursive) or files of images")
    extensions: list[str] = Field(default_factory=lambda: [".png", ".jpg", ".jpeg", ".webp", ".bmp"])


class BenchmarksConfig(_Strict):
    """Fixed evaluation sets (``build_benchmarks`` job): the same seeds give every user byte-identical LQ images."""

    levels: list[str] = Field(default_factory=lambda: ["train", "partial_ood", "ood"],
                              description="degradation presets, one LQ per level (training.degradation.PRESETS "
                                          "or presets_file)")
    presets_file: Path | None = Field(None, description="YAML of extra degradation presets (name -> fields)")
    seed: int = 0
    resolution: int = Field(512, ge=16, description="GT/LQ size of the folder sets (AttrFace pairs keep theirs)")
    attrface_lq_from: Literal["src", "tar"] = Field("src", description="which GT of a pair the LQ is degraded from")
    celeba_test: BenchmarkSourceConfig = Field(default_factory=lambda: BenchmarkSourceConfig(
        paths=[str(SAMPLES_DIR / "aligned_hq")]))
    real_lq: BenchmarkSourceConfig = Field(default_factory=lambda: BenchmarkSourceConfig(
        paths=[str(SAMPLES_DIR / "lq_real")]))
    real_lq_align: Literal["detect", "as_is"] = Field(
        "detect", description="detect + FFHQ-align every face (detect settings), or take pre-aligned crops as they are")
    preview_faces: int = Field(6, ge=0)

    @model_validator(mode="after")
    def _known_levels(self) -> BenchmarksConfig:
        from training.degradation import PRESETS, load_presets

        known = {**PRESETS, **(load_presets(self.presets_file) if self.presets_file else {})}
        unknown = [lv for lv in self.levels if lv not in known]
        if unknown:
            raise ValueError(f"unknown degradation level(s) {unknown}; known: {sorted(known)}")
        if len(set(self.levels)) != len(self.levels) or "real" in self.levels:
            raise ValueError(f"levels must be distinct and not 'real' (the real-LQ set's level): {self.levels}")
        return self


class A2BFRConfig(_Strict):
    """The ``a2bfr_lora`` asset: training settings on top of training.a2bfr.config's defaults (REFERENCE.md).

    Offline defaults train the tiny Flux 150 steps on the sample shards (Prodigy's step size ramps up from 1e-6 over
    the first ~100: fewer leave every LoRA where it started, so the ablations could not differ); ``full`` trains
    FLUX.1-dev at 512.
    Loss weights (lambda, m, alpha) are unpublished: defaults, recorded with every checkpoint.
    """

    mode: Literal["single", "dual"] = Field("dual", description="dual: semantic dual-training on src/tar pairs")
    lq_from: Literal["src", "tar", "random"] = Field(
        "src", description="which face of a pair is trained on in single mode and degraded into the LQ (src: the "
        "real photos only; random: both faces of every pair)")
    resolution: int = Field(64, ge=16, multiple_of=16, description="square training size (multiple of 16)")
    max_steps: int = Field(150, ge=1)
    batch_size: int = Field(2, ge=1, description="per process")
    lr: float = Field(1.0, gt=0, description="Prodigy's multiplier (1.0 = its own estimate)")
    optimizer: Literal["prodigy", "adamw", "adamw8bit"] = Field(
        "prodigy", description="adamw8bit: bitsandbytes' 8-bit AdamW states (CUDA)")
    base_dtype: Literal["bf16", "fp8", "nf4"] = Field(
        "bf16", description="the frozen transformer's storage: bf16 (unquantized), fp8 (torchao) or nf4 "
        "(bitsandbytes); the LoRA trains in fp32 above it")
    aal_weight: float = Field(0.1, ge=0, description="lambda: attribute-aware loss weight")
    sdt_margin: float = Field(0.3, ge=0, le=1, description="m: dual-training hinge margin")
    sdt_weight: float = Field(0.1, ge=0, description="alpha: dual-training loss weight")
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = Field(4.0, gt=0, description="LoRA scale numerator (the update is scaled by alpha / rank)")
    lora_init: Literal["gaussian", "kaiming"] = Field(
        "gaussian", description="LoRA A init: gaussian N(0, 1/rank) (OminiControl) | kaiming (peft's default); "
        "B starts at 0")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (OminiControl: 0)")
    lora_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="trained LoRA weights: fp32 master weights | bf16 with the loss in bf16 and no autocast "
        "(OminiControl's step; needs mixed_precision bf16)")
    condition_attends: Literal["all", "self"] = "all"
    condition_latent: Literal["sample", "mean"] = Field(
        "sample", description="the LQ condition's VAE latent in training: sample (a posterior draw after the noise, "
        "as OminiControl and the official inference) | mean (the posterior mean); recorded with the LoRA, the "
        "restore default")
    max_sequence_length: int = Field(32, ge=8, le=512, description="T5 tokens")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = True
    checkpoint_every: int = Field(50, ge=1)
    num_processes: int = Field(1, ge=1, description="accelerate processes (GPUs) the asset launches")
    degradation: str = Field("train", description="training.degradation preset of the LQ images")
    sample_faces: int = Field(2, ge=0, description="rows of the sample grid")
    sample_steps: int = Field(4, ge=1)
    text_cache: bool = Field(True, description="train on the text_embeddings asset's cached prompt embeddings, "
                             "without loading the text encoders; false: encode every batch's prompts")
    latent_cache: bool = Field(True, description="read the GT images' VAE posteriors from the gt_latents asset "
                               "instead of encoding them every step (the LQ stays online)")
    output_dir: Path | None = Field(None, description="run folder; default <data_root>/models/a2bfr/<config hash>")

    @model_validator(mode="after")
    def _bf16_lora(self) -> A2BFRConfig:
        if self.lora_dtype == "bf16" and self.mixed_precision != "bf16":
            raise ValueError(f"lora_dtype bf16 trains the whole model in bf16 (OminiControl's step): it needs "
                             f"mixed_precision bf16, not {self.mixed_precision!r}")
        return self


class RoboFaceSection(_Strict):
    """The ``roboface_captions`` / ``roboface_stage1`` / ``roboface_model`` assets on top of training.roboface's
    defaults (REFERENCE.md, RoboFace). The base is ``models.sd2_controlnet``.

    Offline: the tiny SD2 + ControlNet + CLIP, a few steps at 64 px, no captioner (stage II then trains on the
    dataset's source prompts: ``empty_caption``). ``full``: SD2.1-base at 512 with the paper's optimiser settings,
    IP-Adapter's CLIP ViT-H/14 image encoder and LLaVA-1.5-13B captions from a vLLM server. Stage-I lengths are not
    published: defaults, recorded with every checkpoint.
    """

    resolution: int = Field(64, ge=16, multiple_of=8, description="square training size (multiple of 8)")
    num_tokens: int = Field(30, ge=1, description="N implicit tokens")
    dca_mode: Literal["sequential", "parallel"] = "sequential"
    dca_order: Literal["text_first", "implicit_first"] = Field(
        "text_first", description="which context a decoupled cross-attention layer attends first")
    explicit: bool = Field(True, description="false: no explicit text (empty captions in training and restoration)")
    implicit: bool = Field(True, description="false: no implicit tokens in stage II (the decoupled branch is unused)")
    use_remover: bool = Field(True, description="false: stage II takes the Mapper's LQ tokens without the Remover")
    image_encoder: str | None = Field(None, description="CLIP vision model spec; None: the base folder's")
    image_encoder_subfolder: str | None = "image_encoder"
    stage1a_steps: int = Field(4, ge=1)
    stage1b_steps: int = Field(4, ge=1)
    stage1_lr: float = Field(1e-3, gt=0, description="Adam, stages I-a and I-b (paper: 1e-6)")
    stage1_batch_size: int = Field(2, ge=1, description="per process (paper: 4)")
    stage2_steps: int | None = Field(6, ge=1, description="None: stage2_epochs over the published train split")
    stage2_epochs: int = Field(15, ge=1)
    stage2_lr: float = Field(1e-3, gt=0, description="Adam (paper: 5e-5)")
    stage2_batch_size: int = Field(2, ge=1, description="per process and micro-batch (paper: 192 in all)")
    stage2_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    caption_dropout: float = Field(0.1, ge=0, le=1)
    empty_caption: Literal["prompt", "empty"] = Field("prompt", description="an empty or failed caption becomes the "
                                                      "pair's source prompt, or stays empty")
    caption_backend: Literal["vlm", "transformers", "none"] = "none"
    caption_model: str | None = Field(None, description="vlm: the served model name (None: the first listed); "
                                                        "transformers: a ModelStore spec")
    caption_base_url: str = "http://127.0.0.1:8000/v1"
    caption_batch_size: int = Field(16, ge=1, description="images per captioner call")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = True
    checkpoint_every: int = Field(4, ge=1)
    num_processes: int = Field(1, ge=1, description="accelerate processes (GPUs) the training assets launch")
    degradation: str = Field("train", description="training.degradation preset of the LQ images")
    sample_faces: int = Field(2, ge=0, description="rows of the sample grid")
    sample_steps: int = Field(4, ge=1)
    text_cache: bool = Field(True, description="stage II reads the captions' and prompts' text-encoder states from "
                             "the roboface_text_embeddings asset instead of loading the text encoder")
    output_dir: Path | None = Field(None, description="run folders' root; default <data_root>/models/roboface")


class JudgeConfig(_Strict):
    """The VLM judge of SC and AA: an OpenAI-compatible server with image input (``vllm serve
    Qwen/Qwen3-VL-8B-Instruct --port 8002``). None: SC and AA are reported as not available."""

    base_url: str | None = None
    model: str | None = Field(None, description="served model name (None: the first the server lists)")
    api_key_env: str = Field("ATTRFACE_JUDGE_API_KEY", description="environment variable holding the API key")
    concurrency: int = Field(8, ge=1)
    max_retries: int = Field(2, ge=0, description="extra attempts after a malformed answer or a server error")
    timeout_s: float = Field(120.0, gt=0)


class EvalConfig(_Strict):
    """The ``eval_report`` asset and ``attrface evaluate``: methods x benchmark sets x metrics.

    Weight files with no hub repo (LPIPS, FID Inception) are local folders; see docs/evaluation.md for the
    standard files. Offline: the tiny random files in the same formats, so every code path runs.
    """

    methods: list[str] = Field(default_factory=lambda: ["a2bfr", "roboface", "bicubic", "identity"],
                               description="models (a2bfr, roboface: the trained assets' weights) and weight-free "
                                           "baselines (bicubic, identity)")
    external: dict[str, str] = Field(
        default_factory=dict, description="name -> folder of another method's outputs, laid out "
        "<folder>/<set>/<level>/<key>.png (CodeFormer, DiffBIR, GFPGAN run on the sets' lq/<level>/ folders)")
    sets: list[str] = Field(default_factory=lambda: ["attrface_test", "celeba_test_levels", "real_lq"])
    max_faces: int | None = Field(4, ge=1, description="first N keys of each set (None: all)")
    metrics: list[str] = Field(
        default_factory=lambda: ["psnr", "ssim", "lpips", "ids", "fid", "musiq", "maniqa", "clipiqa", "hyperiqa",
                                 "topiq", "sc", "aa", "cp_ids"])
    lpips_weights: str | None = Field("tiny/lpips", description="folder with alexnet-owt-7be5be79.pth + alex.pth")
    fid_extractor: Literal["inception", "hf"] = Field(
        "inception", description="inception: pytorch-fid's FID Inception-v3 (the papers' FID); hf: pooled features "
        "of a transformers vision model (CLIP, DINOv2)")
    fid_weights: str | None = Field("tiny/fid-inception", description="inception: folder or pt_inception-2015-12-05-"
                                    "6726825d.pth; hf: a model spec")
    bicubic_factor: int = Field(4, ge=1, description="bicubic baseline: LQ down by this factor (area), bicubic up")
    a2bfr_steps: int | None = Field(4, ge=1, description="None: the pipeline's default (28)")
    roboface_steps: int | None = Field(4, ge=1, description="None: the restorer's default (50)")
    batch_size: int = Field(4, ge=1)
    device: str = "auto"
    seed: int = 0
    grid_faces: int = Field(4, ge=0, description="rows of each set's sample grid")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)

    @model_validator(mode="after")
    def _known_names(self) -> EvalConfig:
        from training.eval.report import BASELINES, METRICS, MODELS, SETS

        problems = [f"{kind} {bad} unknown; known: {sorted(known)}" for kind, values, known in (
            ("method(s)", self.methods, {*MODELS, *BASELINES}), ("set(s)", self.sets, SETS),
            ("metric(s)", self.metrics, METRICS)) if (bad := [v for v in values if v not in known])]
        clash = sorted(set(self.external) & {*MODELS, *BASELINES})
        if clash:
            problems.append(f"external method name(s) {clash} clash with built-in methods")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ExperimentsConfig(_Strict):
    """Named experiments (training/experiments.py): the shipped papers' rows (configs/experiments.yaml) plus
    ``files``; ``a2bfr`` / ``roboface`` pick what the ``reproduce`` job trains and evaluates (``["all"]``: every
    defined one). Every defined experiment is a partition of the training and evaluation assets."""

    files: list[Path] = Field(default_factory=list, description="YAML files of more experiments (same shape as "
                              "configs/experiments.yaml); a name defined again replaces the shipped one")
    a2bfr: list[str] = Field(default_factory=lambda: ["full", "baseline"], description="A²BFR experiments to run")
    roboface: list[str] = Field(default_factory=lambda: ["full", "no_remover"],
                                description="RoboFace experiments to run")
    default: dict[str, str] = Field(default_factory=lambda: {"a2bfr": "full", "roboface": "full"},
                                    description="the experiment train_a2bfr / train_roboface train and "
                                    "evaluate and baseline_eval restore with when none is named")


class ModelsConfig(_Strict):
    """Model specs: a hub id (``org/name`` or ``org/name@revision``), a local directory, or ``tiny/<name>``."""

    sd3: str = "tiny/sd3"
    flux: str = "tiny/flux"
    sd2_controlnet: str = "tiny/sd2-controlnet"
    qwen3: str = "tiny/qwen3"
    farl: str = "tiny/farl"
    insightface_pack: str = "tiny/insightface"
    a2bfr_release: str = Field("thetrigger/A2BFR", description="the official A²BFR LoRA (default.safetensors, for "
                               "FLUX.1-dev): `attrface restore --model a2bfr` without --weights")
    allow_download: bool = Field(False, description="fetch hub ids into cache_dir (needs network + accepted licences)")


class PipelineConfig(_Strict):
    profile: Literal["offline", "full"] = "offline"
    paths: PathsConfig = Field(default_factory=PathsConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    attributes: AttributesConfig = Field(default_factory=AttributesConfig)
    verbalize: VerbalizeConfig = Field(default_factory=VerbalizeConfig)
    edit: EditConfig = Field(default_factory=EditConfig)
    qc: QCConfig = Field(default_factory=QCConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    benchmarks: BenchmarksConfig = Field(default_factory=BenchmarksConfig)
    a2bfr: A2BFRConfig = Field(default_factory=A2BFRConfig)
    roboface: RoboFaceSection = Field(default_factory=RoboFaceSection)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    experiments: ExperimentsConfig = Field(default_factory=ExperimentsConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: str) -> str:
        if v not in PROFILES:
            raise ValueError(f"unknown profile {v!r}; choose one of {PROFILES}")
        return v

    @property
    def review_db(self) -> Path:
        return self.publish.review_db or self.paths.data_root / "review.sqlite"

    def fingerprint(self, *sections: str) -> str:
        """Short hash of the named sections (all if none): a stage re-runs when its inputs' config changes."""
        dump = self.model_dump(mode="json")
        picked = {k: dump[k] for k in sections} if sections else dump
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# What `full` changes relative to the offline defaults. Model licences: see docs/dataset.md ("Full profile").
FULL_PROFILE: dict[str, Any] = {
    "profile": "full",
    "source": {"chunk_size": 1000, "dataset_name": "attrface"},
    "detect": {"backend": "insightface", "min_score": 0.97, "min_face_size": 64, "min_eye_distance": 5.0},
    # `vllm serve Qwen/Qwen3-8B` on the default port; Qwen3's non-thinking mode recommends temperature 0.7.
    "verbalize": {"backend": "vllm", "vllm": {"model": "Qwen/Qwen3-8B", "concurrency": 32}},
    # No SD3.5 FlowEdit values are published: start from the official SD3-medium ones (T=50, n_max=33, CFG 3.5 /
    # 13.5, n_min=0, n_avg=1) for Large and Medium alike, at the dataset's 512 px. beta=0.1 is an untuned default
    # that keeps a little more of the source's structure than plain FlowEdit (beta=0).
    # Batch 8, compiled on CUDA (edit.compile auto): issue 16's H100 figures for SD3.5 Large (3.23 s/pair eager at
    # batch 8, 2.17 compiled). T5 length stays 256 until the edit's change at 77 is measured with real weights.
    # The paper's published set averages ArcFace similarity 0.6387 after QC; 0.4 admits strong edits.
    "qc": {"identity_backend": "arcface", "arcface_min_similarity": 0.4, "min_pass_rate": 0.2,
           "gate": ["attribute", "identity", "similarity"]},
    "edit": {"resolution": 512, "steps": 50, "n_max": 33, "src_guidance": 3.5, "tar_guidance": 13.5, "beta": 0.1,
             "max_sequence_length": 256, "batch_size": 8},
    # REFERENCE.md: FLUX.1-dev, LoRA r64/alpha 4, Prodigy lr 1, batch 1, 60K iterations, 512 px, bf16.
    "a2bfr": {"resolution": 512, "max_steps": 60000, "batch_size": 1, "lora_rank": 64, "max_sequence_length": 512,
              "mixed_precision": "bf16", "checkpoint_every": 1000, "sample_faces": 4, "sample_steps": 28},
    # REFERENCE.md: N = 30, Adam 1e-6 at batch 4 (stage I), Adam 5e-5 at batch 192 for 15 epochs (stage II; here
    # 32 x 6 accumulated on one GPU), LLaVA-1.5-13B captions. SD2.1-base has no image encoder: IP-Adapter's
    # OpenCLIP ViT-H/14 (models/image_encoder). Stage-I lengths are ours (unpublished). Captions:
    # `vllm serve llava-hf/llava-1.5-13b-hf --port 8001` (the verbalizer's Qwen3 keeps 8000).
    "roboface": {"resolution": 512, "image_encoder": "h94/IP-Adapter",
                 "image_encoder_subfolder": "models/image_encoder", "stage1a_steps": 20000, "stage1b_steps": 20000,
                 "stage1_lr": 1e-6, "stage1_batch_size": 4,
                 "stage2_steps": None, "stage2_lr": 5e-5, "stage2_batch_size": 32, "stage2_accumulation": 6,
                 "caption_backend": "vlm", "caption_model": "llava-hf/llava-1.5-13b-hf",
                 "caption_base_url": "http://127.0.0.1:8001/v1", "mixed_precision": "bf16", "checkpoint_every": 1000,
                 "sample_faces": 4, "sample_steps": 50},
    # The papers evaluate every test face at the restorers' own step counts. LPIPS / FID Inception weights are
    # release files, not hub repos: download them to these folders (docs/evaluation.md).
    "eval": {"max_faces": None, "a2bfr_steps": None, "roboface_steps": None,
             "lpips_weights": "./data/cache/lpips", "fid_weights": "./data/cache/fid_inception",
             "judge": {"base_url": "http://127.0.0.1:8002/v1", "model": "Qwen/Qwen3-VL-8B-Instruct"}},
    # Every shipped experiment of both papers (training/experiments.py).
    "experiments": {"a2bfr": ["all"], "roboface": ["all"]},
    "models": {
        "sd3": "stabilityai/stable-diffusion-3.5-large",
        "flux": "black-forest-labs/FLUX.1-dev",
        "sd2_controlnet": "stabilityai/stable-diffusion-2-1-base",
        "qwen3": "Qwen/Qwen3-8B",
        # facer publishes this checkpoint as a release file, not a hub repo: download it to this path.
        "farl": "./data/cache/facer/face_attribute.farl.celeba.pt",
        "insightface_pack": "buffalo_l",
        "allow_download": True,
    },
}


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class ConfigError(ValueError):
    """Invalid configuration: one line per problem, each naming the file (or layer) and the key."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid AttrFace configuration:\n" + "\n".join(f"  {p}" for p in self.problems))


class YAMLFileError(ValueError):
    """A YAML file that cannot be read: one line naming the file (and the line, where there is one)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last one silently).
    Keys brought in by a merge (``<<: *anchor``) may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            if first != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first + 1}); each key may appear once",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    if isinstance(err, yaml.MarkedYAMLError) and mark is not None and err.problem:
        context = f" ({err.context})" if err.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}{context}"
    return " ".join(str(err).split())


def read_yaml(path: str | Path) -> Any:
    """The data of one UTF-8 YAML file (None when empty); duplicate keys are refused (:class:`UniqueKeyLoader`).
    Raises :class:`YAMLFileError` with one line naming the file and what is wrong: missing, a folder, unreadable,
    not UTF-8, not YAML."""
    path = Path(path)
    if path.is_dir():
        raise YAMLFileError(f"{path}: is a folder, not a YAML file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise YAMLFileError(f"{path}: does not exist") from None
    except OSError as err:
        raise YAMLFileError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise YAMLFileError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save the file "
                            f"as UTF-8") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise YAMLFileError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None


def _message(error: dict[str, Any]) -> str:
    msg = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return " ".join(msg.split())


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _has_value(error: dict[str, Any]) -> bool:
    """Whether the error is about one given value (not a whole section, nor a missing key)."""
    return error["type"] != "missing" and not isinstance(error.get("input"), dict)


def _fields_of(model: Any, loc: Sequence[str]) -> dict[str, Any]:
    """Field names of the (nested) pydantic model at ``loc`` below ``model`` (for 'did you mean' hints)."""
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        model = getattr(field, "annotation", None)
        if model is None:
            return {}
    return getattr(model, "model_fields", {})


def validation_lines(err: ValidationError, prefix: str = "", *, where: str = "", model: Any = None,
                     labels: dict[str, str] | None = None) -> list[str]:
    """One line per error of a pydantic ``ValidationError``: ``[<where>: ]<prefix><key> = <value!r>: <message>``.

    ``prefix`` goes before each dotted key (``"a2bfr."``, ``"overrides."``); ``labels`` renames a key (e.g.
    ``{"batch_size": "--batch-size"}`` for a command-line option; the prefix is then not added). ``model``: the
    validated class, for 'did you mean' hints on unknown keys. A whole-model error (a check across fields) is
    ``[<where>: ]<prefix without its dot>: <message>``."""
    labels = labels or {}
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc)
        label = labels.get(key) or (f"{prefix}{key}" if key else prefix.rstrip(".:"))
        if e["type"] == "extra_forbidden":
            known = sorted(_fields_of(model, loc[:-1])) if model is not None else []
            close = difflib.get_close_matches(loc[-1], known, n=1) if loc else []
            text = f"{label}: unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
        elif loc and _has_value(e):
            text = f"{label} = {_shown(e.get('input'))}: {_message(e)}"
        else:
            text = f"{label}: {_message(e)}" if label else _message(e)
        lines.append(f"{where}: {text}" if where else text)
    return lines


# Keys Dagster itself accepts at the top of run config; only ``resources.attrface.config`` is ours.
_RUN_CONFIG_KEYS = ("resources", "execution", "loggers", "ops")
_RESOURCE_CONFIG_KEYS = ("profile", "config_files", "settings")


def _unknown(origin: str, key: str, known: Any) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return f"{origin}: {key}: unknown key{hint}"


def _mapping(value: Any, origin: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError([f"{origin}: {key}: must be a mapping, got {type(value).__name__}"])
    return value


def _run_config_layers(data: dict[str, Any], origin: str) -> list[tuple[str, dict[str, Any]]]:
    """The settings layers of Dagster run config: strict about our wrapper keys, so a typo is never ignored."""
    problems = [_unknown(origin, str(k), _RUN_CONFIG_KEYS) for k in data if k not in _RUN_CONFIG_KEYS]
    resources = _mapping(data.get("resources"), origin, "resources")
    problems += [_unknown(origin, f"resources.{k}", ["attrface"]) for k in resources if k != "attrface"]
    attrface = _mapping(resources.get("attrface"), origin, "resources.attrface")
    problems += [_unknown(origin, f"resources.attrface.{k}", ["config"]) for k in attrface if k != "config"]
    resource = _mapping(attrface.get("config"), origin, "resources.attrface.config")
    problems += [_unknown(origin, f"resources.attrface.config.{k}", _RESOURCE_CONFIG_KEYS)
                 for k in resource if k not in _RESOURCE_CONFIG_KEYS]
    config_files = resource.get("config_files") or []
    if isinstance(config_files, str):
        config_files = [config_files]
    if not isinstance(config_files, list) or not all(isinstance(f, str) for f in config_files):
        problems.append(f"{origin}: resources.attrface.config.config_files: must be a list of YAML paths, got "
                        f"{_shown(config_files)}")
        config_files = []
    if problems:
        raise ConfigError(problems)
    layers = _files_layers(config_files, named_by=f"{origin}: resources.attrface.config.config_files")
    settings = dict(_mapping(resource.get("settings"), origin, "resources.attrface.config.settings"))
    if resource.get("profile"):
        settings.setdefault("profile", resource["profile"])
    return layers + [(origin, settings)]


def _file_layers(path: str | Path, named_by: str = f"-c or {ENV_CONFIG}") -> list[tuple[str, dict[str, Any]]]:
    path = Path(path)
    if not path.exists() and not path.is_absolute() and path.parts[:1] == ("configs",) \
            and (CONFIGS_DIR / path.relative_to("configs")).is_file():
        path = CONFIGS_DIR / path.relative_to("configs")  # `-c configs/full.yaml` outside a checkout: the shipped one
    try:
        data = read_yaml(path)
    except YAMLFileError as err:
        hint = f" (a config file, from {named_by})" if not path.is_file() else ""
        raise ConfigError([f"{err}{hint}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: must hold a mapping of settings (section: {{key: value}}) or Dagster run config, "
                           f"got a {type(data).__name__}"])
    if "resources" in data:  # Dagster run config (``-c`` file): the settings sit under resources.attrface.config
        return _run_config_layers(data, str(path))
    return [(str(path), data)]


def _files_layers(files: Sequence[str | Path], **kw: str) -> list[tuple[str, dict[str, Any]]]:
    """The layers of every file in order; the problems of all of them in one :class:`ConfigError`."""
    layers: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    for f in files:
        try:
            layers += _file_layers(f, **kw)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return layers


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """Settings mapping from a YAML file; accepts Dagster run config (resources.attrface.config) too."""
    merged: dict[str, Any] = {}
    for _, layer in _file_layers(path):
        merged = deep_merge(merged, layer)
    return merged


def _origin_of(loc: tuple, layers: list[tuple[str, dict[str, Any]]]) -> str:
    """The last layer that sets ``loc`` (the one whose value was validated), else the profile defaults."""
    for origin, layer in reversed(layers):
        node: Any = layer
        for part in loc:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                break
        else:
            return origin
    return "profile defaults"


def _config_problems(err: ValidationError, layers: list[tuple[str, dict[str, Any]]]) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key, origin = ".".join(loc) or "(top level)", _origin_of(loc, layers)
        if e["type"] == "extra_forbidden":
            problems.append(_unknown(origin, key, _fields_of(PipelineConfig, loc[:-1])))
        else:
            shown = f" (got {_shown(e.get('input'))})" if _has_value(e) else ""
            problems.append(f"{origin}: {key}: {_message(e)}{shown}")
    return problems


def check_home(home: str | Path | None = None) -> Path:
    """The working folder (``$ATTRFACE_HOME``), checked before anything is written there: it must be a folder this
    process can write to, or one it can create. ``home`` None: ``$ATTRFACE_HOME`` when set (else :data:`HOME`, the
    checkout or the current directory, is returned unchecked). Raises :class:`ConfigError` naming ATTRFACE_HOME."""
    value = str(home) if home is not None else os.environ.get(ENV_HOME)
    if not value:
        return HOME
    path = Path(value).expanduser()
    where = f"{ENV_HOME}={value}"
    need = "AttrFace writes data/ and dagster_home/ there; set it to a folder you can write to"
    if path.exists() and not path.is_dir():
        raise ConfigError([f"{where}: is a file, not a folder; {need}"])
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError([f"{where}: the folder is read-only for this user; {need}"])
        return path.resolve()
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError([f"{where}: does not exist and cannot be made ({parent} is a file); {need}"])
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError([f"{where}: does not exist and cannot be made ({parent} is read-only); {need}"])
    return path.resolve()


def load_config(
    profile: str | None = None,
    files: list[str | Path] | None = None,
    overrides: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Build the validated config: profile defaults, then YAML files, then overrides.

    With no arguments, ``$ATTRFACE_CONFIG`` (a YAML path, or several joined by ``os.pathsep``) and
    ``$ATTRFACE_PROFILE`` are read, so the Dagster code location and the CLI agree on one configuration.
    Raises :class:`ConfigError` with one line per problem, naming the file (or layer) and the key: files that are
    missing, folders, not UTF-8, not YAML or not a mapping, invalid values, and an unusable ``$ATTRFACE_HOME``.
    """
    check_home()
    if files is None:
        env = os.environ.get(ENV_CONFIG, "")
        files = [f for f in env.split(os.pathsep) if f]
    layers = _files_layers(files)
    if overrides:
        layers.append(("run config (resources.attrface.config.settings)", overrides))
    layered: dict[str, Any] = {}
    for _, layer in layers:
        layered = deep_merge(layered, layer)
    chosen = profile or layered.get("profile") or os.environ.get(ENV_PROFILE) or "offline"
    if not isinstance(chosen, str) or chosen not in PROFILES:
        origin = "profile argument" if profile else _origin_of(("profile",), layers)
        raise ConfigError([f"{origin}: profile: unknown profile {chosen!r}; "
                           f"choose one of {PROFILES}"])
    base: dict[str, Any] = FULL_PROFILE if chosen == "full" else {"profile": "offline"}
    merged = deep_merge(base, layered)
    merged["profile"] = chosen
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_config_problems(err, layers)) from None
