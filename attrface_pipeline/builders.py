"""Components built from config, in one place: config in, ready component out.

The assets, the CLI, the benchmarks and the trainers build their detector, attribute classifier, verbalizer,
editor and QC scorers here, so each is configured the same way everywhere. Nothing here knows Dagster; each
builder resolves its models through :class:`ModelStore` (local directory, cache or hub) and picks device and
dtype through ``models.device``. The ``*_spec`` / ``*_thresholds`` / ``*_params`` functions pick the plain typed
arguments that stage functions take out of the config tree.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields

from attrface_pipeline.config import EditConfig, PipelineConfig
from attrface_pipeline.models.device import resolve_device, resolve_dtype
from attrface_pipeline.models.farl import load_attribute_model
from attrface_pipeline.models.store import ModelStore
from attrface_pipeline.stages.attributes import AttributeClassifier
from attrface_pipeline.stages.checks import ArcFaceScorer, DlibScorer, IdentityScorer, LandmarkLocator, QCThresholds
from attrface_pipeline.stages.detect import FaceDetector, make_detector
from attrface_pipeline.stages.edits import EditSpec
from attrface_pipeline.stages.faces import AlignSpec, FaceThresholds
from attrface_pipeline.stages.flowedit import FlowEditor, FlowEditParams
from attrface_pipeline.stages.verbalize import (RequestCache, RetryPolicy, TemplateVerbalizer, TransformersVerbalizer,
                                                Verbalizer, VllmVerbalizer)

# Detection and alignment


def build_detector(cfg: PipelineConfig) -> FaceDetector:
    """The configured face detector (dlib CNN offline, insightface's pack in the full profile)."""
    det = cfg.detect
    pack = ModelStore.from_config(cfg).resolve(cfg.models.insightface_pack) if det.backend == "insightface" else None
    return make_detector(det.backend, max_side=det.max_side, max_upscale=det.max_upscale,
                         dlib_upsample=det.dlib_upsample, insightface_pack=pack, det_size=det.insightface_det_size,
                         min_score=det.min_score)


def face_thresholds(cfg: PipelineConfig) -> FaceThresholds:
    det = cfg.detect
    return FaceThresholds(det.min_score, det.min_face_size, det.min_eye_distance)


def align_spec(cfg: PipelineConfig) -> AlignSpec:
    return AlignSpec(cfg.align.size, cfg.align.image_format, cfg.align.jpeg_quality)


# Attributes and prompts


def build_classifier(cfg: PipelineConfig) -> AttributeClassifier:
    """The configured FaRL model on the configured device (bf16 on CUDA by default), batched."""
    acfg = cfg.attributes
    device = resolve_device(acfg.device)
    model = load_attribute_model(ModelStore.from_config(cfg).resolve(cfg.models.farl))
    return AttributeClassifier(model, device, resolve_dtype(acfg.dtype, device), acfg.batch_size)


def build_verbalizer(cfg: PipelineConfig) -> Verbalizer:
    """The configured backend; LLM backends cache validated answers under ``<cache_dir>/verbalize``."""
    vcfg = cfg.verbalize
    if vcfg.backend == "template":
        return TemplateVerbalizer()
    cache = RequestCache(cfg.paths.cache_dir / "verbalize")
    retry = RetryPolicy(vcfg.vllm.max_retries, vcfg.vllm.backoff_s)
    common = dict(retry=retry, cache=cache, temperature=vcfg.temperature, max_tokens=vcfg.max_tokens, seed=vcfg.seed)
    if vcfg.backend == "vllm":
        v = vcfg.vllm
        return VllmVerbalizer(v.base_url, v.model, os.environ.get(v.api_key_env, "EMPTY"), v.concurrency,
                              v.timeout_s, v.structured_output, **common)
    path = ModelStore.from_config(cfg).resolve(cfg.models.qwen3)
    return TransformersVerbalizer(path, cfg.models.qwen3, device=str(resolve_device(cfg.attributes.device)), **common)


# Edits

_FLOWEDIT_FIELDS = frozenset(f.name for f in fields(FlowEditParams))


def flowedit_params(edit: EditConfig) -> FlowEditParams:
    """FlowEdit's knobs from the ``edit`` section: every field of :class:`FlowEditParams`, by name."""
    return FlowEditParams(**edit.model_dump(include=_FLOWEDIT_FIELDS))


def edit_spec(cfg: PipelineConfig) -> EditSpec:
    e = cfg.edit
    return EditSpec(resolution=e.resolution, params=flowedit_params(e), seed=e.seed, region_masks=e.region_masks,
                    beta_map=e.beta_map, mask_softness=e.mask_softness, batch_size=e.batch_size,
                    model_id=cfg.models.sd3, image_format=cfg.publish.image_format,
                    jpeg_quality=cfg.publish.jpeg_quality, lossless_master=e.lossless_master)


def build_editor(cfg: PipelineConfig) -> FlowEditor:
    """The SD3/SD3.5 pipeline of ``models.sd3`` on the configured device, dtype and memory options."""
    e = cfg.edit
    device = resolve_device(e.device)
    return FlowEditor.from_pretrained(
        ModelStore.from_config(cfg).resolve(cfg.models.sd3), device=device, dtype=resolve_dtype(e.dtype, device),
        cpu_offload=e.cpu_offload, vae_slicing=e.vae_slicing, vae_tiling=e.vae_tiling,
        compile=(device.type == "cuda") if e.compile == "auto" else e.compile, quantize=e.quantize,
        batch_size=e.batch_size,
    )


# Quality control


@dataclass(frozen=True)
class QCScorers:
    """What ``stages.checks.score_pairs`` measures with: the attribute model, an identity scorer, landmarks."""

    classifier: AttributeClassifier
    identity: IdentityScorer
    locator: LandmarkLocator


def qc_thresholds(cfg: PipelineConfig) -> QCThresholds:
    q, a = cfg.qc, cfg.attributes
    dlib = q.identity_backend == "dlib"
    return QCThresholds(
        controllable=tuple(a.controllable), positive_threshold=a.positive_threshold,
        negative_threshold=a.negative_threshold, attribute_tolerance=q.attribute_tolerance,
        min_identity_similarity=None if dlib else q.arcface_min_similarity,
        max_identity_distance=q.dlib_max_distance if dlib else None, min_ssim=q.min_ssim,
        max_landmark_displacement=q.max_landmark_displacement, gate=tuple(q.gate),
    )


def build_identity_scorer(cfg: PipelineConfig) -> IdentityScorer:
    """dlib's 128-d descriptor offline; ArcFace from insightface's pack with ``qc.identity_backend: arcface``."""
    if cfg.qc.identity_backend == "arcface":
        return ArcFaceScorer(ModelStore.from_config(cfg).resolve(cfg.models.insightface_pack))
    return DlibScorer()


def build_qc_scorers(cfg: PipelineConfig) -> QCScorers:
    return QCScorers(build_classifier(cfg), build_identity_scorer(cfg), LandmarkLocator())


# Model training


A2BFR_HISTORICAL_LORA = {"init": "kaiming", "dropout": 0.01, "dtype": "fp32"}  # the LoRA before these settings


def a2bfr_train_config(cfg: PipelineConfig, *, shards: str, output_dir: str | None = None, **overrides):
    """The A2BFRTrainConfig the ``a2bfr_lora`` asset (and ``attrface train a2bfr``) launches: the config's a2bfr
    section + its model specs; ``overrides`` (a2bfr field names) win. The run folder defaults to one per
    meaning-changing setting: the same settings resume, other settings start a new run."""
    from training.a2bfr.config import A2BFRTrainConfig

    a = type(cfg.a2bfr).model_validate({**cfg.a2bfr.model_dump(), **{k: v for k, v in overrides.items()
                                                                       if v is not None}})
    body = {
        "model": {"base": cfg.models.flux, "farl": cfg.models.farl, "resolution": a.resolution,
                  **({"base_dtype": a.base_dtype} if a.base_dtype != "bf16" else {}),
                  "max_sequence_length": a.max_sequence_length, "condition_attends": a.condition_attends,
                  "condition_latent": a.condition_latent,
                  "lora": {"rank": a.lora_rank, "alpha": a.lora_alpha, "init": a.lora_init, "dropout": a.lora_dropout,
                           "dtype": a.lora_dtype}},
        "loss": {"aal_weight": a.aal_weight, "sdt_margin": a.sdt_margin, "sdt_weight": a.sdt_weight},
        "data": {"shards": shards, "mode": a.mode, "preset": a.degradation, "batch_size": a.batch_size,
                 "num_workers": 0 if cfg.profile == "offline" else 4, "seed": 0,
                 **({"lq_from": a.lq_from} if a.lq_from != "src" else {})},
        "samples": {"faces": a.sample_faces, "steps": a.sample_steps},
        "cache_dir": str(cfg.paths.cache_dir), "allow_download": cfg.models.allow_download,
    }
    # Settings added later name the run by omission at the value earlier runs trained with, so those runs resume.
    lora = {k: v for k, v in body["model"]["lora"].items() if A2BFR_HISTORICAL_LORA.get(k, ()) != v}
    model = {k: v for k, v in body["model"].items() if (k, v) != ("condition_latent", "mean")}
    meaning = json.dumps({**body, "model": {**model, "lora": lora}, "optimizer": a.optimizer, "lr": a.lr,
                          "mixed_precision": a.mixed_precision}, sort_keys=True)
    run = output_dir or a.output_dir or cfg.paths.data_root / "models" / "a2bfr" / hashlib.sha256(
        meaning.encode()).hexdigest()[:12]
    body["train"] = {"output_dir": str(run), "max_steps": a.max_steps, "checkpoint_every": a.checkpoint_every,
                     "lr": a.lr, "optimizer": a.optimizer, "mixed_precision": a.mixed_precision,
                     "gradient_checkpointing": a.gradient_checkpointing}
    if a.text_cache:  # not part of the run's name: the same embeddings, computed once instead of every step
        body["text_cache"] = str(text_cache_dir(cfg))
    if a.latent_cache:  # the same: the GT posteriors are the encoder's, read instead of recomputed
        body["latent_cache"] = str(latent_cache_dir(cfg))
    return A2BFRTrainConfig.model_validate(body)


LATENT_DIR = "gt_latents"


def latent_cache_dir(cfg: PipelineConfig):
    """Where the gt_latents asset stores the train split's GT posteriors for models.flux's VAE at the a2bfr
    section's resolution and precision: ``<data_root>/gt_latents/<fingerprint>``."""
    a = cfg.a2bfr
    return _cache_dir(cfg, LATENT_DIR, cfg.models.flux, a.resolution, a.mixed_precision, parts=LATENT_PARTS)


# The subfolders of a diffusers model folder whose files each cache's entries are computed from.
LATENT_PARTS = ("vae",)
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
ROBOFACE_TEXT_PARTS = ("text_encoder", "tokenizer")


def weights_fingerprint(spec: str, parts: tuple[str, ...]) -> str | None:
    """A content fingerprint of the weight files a cache depends on, for a local model path (absolute, ``./`` or
    ``~``): the sha256 of every file under the ``parts`` subfolders it has (the whole path when it has none of
    them, e.g. a single-file checkpoint), with the names of the parts found. So a text encoder replaced in place
    gets a new cache folder instead of stale entries.

    None for the specs whose name already pins their content, and then the spec alone names the cache (as
    before): a hub spec (``org/name@revision``; the hub's files are content-addressed -- pin a revision, or an
    unpinned spec's cache is reused when ``main`` moves), a tiny-zoo spec (its zoo version), and a local path that
    does not exist (nothing can be encoded with it). Nothing is downloaded or generated here.

    Cost: the weights are read once per process (``artifacts.content_fingerprint`` memoizes each file's hash by
    path, size, times and inode), e.g. ~10 GB for FLUX's two text encoders: tens of seconds on the first call."""
    from pathlib import Path

    from attrface_pipeline.artifacts import content_fingerprint

    local = Path(spec).expanduser()
    if not (local.is_absolute() or spec.startswith((".", "~"))) or not local.exists():
        return None
    found = [name for name in parts if (local / name).exists()] if local.is_dir() else []
    content = content_fingerprint([local / name for name in found] if found else [local])
    return hashlib.sha256(json.dumps([found, content]).encode()).hexdigest()


def _cache_dir(cfg: PipelineConfig, root: str, spec: str, size: int, mixed_precision: str, prefix: str = "", *,
               parts: tuple[str, ...] = ()):
    """``<data_root>/<root>/<prefix><fingerprint>``: the fingerprint of the model spec, the content of the weight
    files the entries are computed with (``parts`` of a local model folder: :func:`weights_fingerprint`), the size
    (tokens or pixels) and the frozen weights' dtype under ``mixed_precision`` -- what a cache's entries depend
    on."""
    from attrface_pipeline.models.store import model_fingerprint
    from training.roboface.train import weight_dtype
    from training.text_cache import cache_fingerprint

    name = cache_fingerprint(model_fingerprint(spec), size, weight_dtype(mixed_precision),
                             weights_fingerprint(spec, parts))
    return cfg.paths.data_root / root / (prefix + name)


def build_gt_latents(cfg: PipelineConfig, log=print) -> dict:
    """Encode the train split's GT faces the cache lacks with models.flux's VAE (loaded only when something is
    missing) into :func:`latent_cache_dir`; the ``gt_latents`` asset and ``attrface train-a2bfr`` run it."""
    import torch

    from attrface_pipeline.models.store import model_fingerprint
    from training.a2bfr.train import weight_dtype
    from training.latent_cache import build_latent_cache

    a = cfg.a2bfr
    dtype = weight_dtype(a.mixed_precision)
    device = resolve_device("auto")
    vae = None

    def encode(images: torch.Tensor) -> torch.Tensor:
        nonlocal vae
        if vae is None:
            from diffusers import AutoencoderKL

            path = ModelStore.from_config(cfg).resolve(cfg.models.flux)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype).to(device).eval()
        with torch.no_grad():
            return vae.encode(images.to(device).to(dtype)).latent_dist.parameters

    meta = {"model": model_fingerprint(cfg.models.flux), "dtype": str(dtype).removeprefix("torch.")}
    return {**build_latent_cache(encode, cfg.paths.data_root / "attrface_shards", latent_cache_dir(cfg),
                                 resolution=a.resolution, meta=meta, log=log), **meta}


TEXT_DIR = "text_embeddings"


def build_text_embeddings(cfg: PipelineConfig, log=print) -> dict:
    """Encode every prompt of the published shards the cache lacks with models.flux's text encoders (loaded only
    when something is missing) into :func:`text_cache_dir`; the ``text_embeddings`` asset and ``attrface
    train-a2bfr`` run it. Returns the cache's summary and what it was made with."""
    import torch

    from attrface_pipeline.models.store import model_fingerprint
    from training.a2bfr.pipeline import A2BFRPipeline
    from training.a2bfr.train import weight_dtype
    from training.text_cache import build_cache, shard_prompts

    a = cfg.a2bfr
    prompts = shard_prompts(cfg.paths.data_root / "attrface_shards")
    dtype = weight_dtype(a.mixed_precision)
    device = resolve_device("auto")
    pipe = None

    def encode(batch: list[str]):
        nonlocal pipe
        if pipe is None:
            path = ModelStore.from_config(cfg).resolve(cfg.models.flux)
            pipe = A2BFRPipeline.from_pretrained(path, dtype=dtype, transformer=None, vae=None).to(device)
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(prompt=batch, prompt_2=None, device=device,
                                                   max_sequence_length=a.max_sequence_length)
        return embeds, pooled

    meta = {"model": model_fingerprint(cfg.models.flux), "max_sequence_length": a.max_sequence_length,
            "dtype": str(dtype).removeprefix("torch.")}
    return {**build_cache(encode, prompts, text_cache_dir(cfg), meta=meta, log=log), **meta}


def text_cache_dir(cfg: PipelineConfig):
    """Where the text_embeddings asset stores the prompts' embeddings for ``models.flux`` at the a2bfr section's
    token count and precision: ``<data_root>/text_embeddings/<encoder fingerprint>``."""
    a = cfg.a2bfr
    return _cache_dir(cfg, TEXT_DIR, cfg.models.flux, a.max_sequence_length, a.mixed_precision, parts=TEXT_PARTS)


def _run_hash(meaning: dict) -> str:
    return hashlib.sha256(json.dumps(meaning, sort_keys=True, default=str).encode()).hexdigest()[:12]


_DCA_FIELDS = {"order": "dca_order", "explicit": "explicit", "implicit": "implicit", "use_remover": "use_remover"}


def experiment_config(cfg: PipelineConfig, experiment) -> PipelineConfig:
    """``cfg`` with an experiment's overrides applied to its model's section (training/experiments.py). Overrides
    the section refuses raise ``training.experiments.ExperimentError``, one line each naming the experiment."""
    from pydantic import ValidationError

    section = getattr(cfg, experiment.model)
    try:
        merged = type(section).model_validate({**section.model_dump(), **experiment.overrides})
    except ValidationError as err:
        from attrface_pipeline.config import validation_lines
        from training.experiments import ExperimentError

        where = f"{experiment.source or 'experiment'}: {experiment.model}.{experiment.name}"
        raise ExperimentError(validation_lines(err, "overrides.", where=where, model=type(section))) from None
    return cfg.model_copy(update={experiment.model: merged})


def experiment_run_dir(cfg: PipelineConfig, experiment, *, shards: str):
    """The folder an experiment trains into (A²BFR: the run; RoboFace: stage II's run, stage I's beside it). Its
    name is the experiment's fingerprint: two names with one resolved config share it and train once."""
    from pathlib import Path

    exp_cfg = experiment_config(cfg, experiment)
    if experiment.model == "a2bfr":
        return Path(a2bfr_train_config(exp_cfg, shards=shards).train.output_dir)
    captions = str(cfg.paths.data_root / "roboface_captions" / captions_folder(exp_cfg) / "captions.parquet")
    stage1 = roboface_train_config(exp_cfg, shards=shards, stage="stage1")
    # step counts are not part of a run folder's name: a fixed one spares reading the train split's size
    return Path(roboface_train_config(exp_cfg, shards=shards, stage="stage2", captions=captions, stage2_steps=1,
                                      stage1_dir=str(Path(stage1.run.output_dir) / "stage1b" / "final"))
                .run.output_dir)


def captions_folder(cfg: PipelineConfig) -> str:
    """The captions' folder name under ``<data_root>/roboface_captions``: a hash of the captioner's settings, so
    experiments with one captioner share their captions."""
    caption = roboface_caption_config(cfg).model_dump(mode="json")
    return _run_hash({k: caption[k] for k in caption if k != "cache_dir"})


def roboface_caption_config(cfg: PipelineConfig):
    """The captioner settings of RoboFace's explicit text (training captions and restore-time captions), cached
    under ``<cache_dir>/roboface_captions``."""
    from training.roboface.config import CaptionConfig

    r = cfg.roboface
    body: dict = {"backend": r.caption_backend, "cache_dir": str(cfg.paths.cache_dir / "roboface_captions")}
    if r.caption_backend == "vlm":
        body["vlm"] = {"base_url": r.caption_base_url, "model": r.caption_model}
    elif r.caption_backend == "transformers" and r.caption_model:
        body["transformers"] = {"model": r.caption_model}
    return CaptionConfig.model_validate(body)


def build_roboface_captioner(cfg: PipelineConfig):
    """The configured captioner (``none`` offline), behind its per-image cache."""
    from training.roboface.captioner import build_captioner

    return build_captioner(roboface_caption_config(cfg), ModelStore.from_config(cfg))


def _train_split_size(shards: str) -> int:
    from pathlib import Path

    sizes = Path(shards) / "train" / "sizes.json"
    if not sizes.is_file():
        raise FileNotFoundError(f"{sizes} is missing: stage-II length in epochs needs the published train split's "
                                f"size; publish the shards or set roboface.stage2_steps")
    return sum(json.loads(sizes.read_text()).values())


def roboface_train_config(cfg: PipelineConfig, *, shards: str, stage: str, captions: str | None = None,
                          stage1_dir: str | None = None, output_dir: str | None = None, **overrides):
    """The RoboFaceTrainConfig the ``roboface_stage1`` / ``roboface_model`` assets launch: the config's roboface
    section + ``models.sd2_controlnet``; ``overrides`` (roboface field names) win.

    Run folders: ``<root>/stage1-<hash>`` of what stage I's result depends on, and ``<root>/stage2-<hash>`` of the
    stage-I weights it starts from, the captions file's content and the stage-II settings -- so the same settings
    resume, other settings start a new run, and changing stage II never retrains stage I. Step counts are not in the
    hashes: raising them continues a run."""
    import math
    from pathlib import Path

    from training.roboface.train import RoboFaceTrainConfig

    if stage not in ("stage1", "stage2"):
        raise ValueError(f"unknown RoboFace stage {stage!r}; choose stage1 or stage2")
    r = type(cfg.roboface).model_validate({**cfg.roboface.model_dump(), **{k: v for k, v in overrides.items()
                                                                             if v is not None}})
    stage1 = {"lr": r.stage1_lr, "batch_size": r.stage1_batch_size}
    model = {"base_model": cfg.models.sd2_controlnet, "image_encoder": r.image_encoder,
             "image_encoder_subfolder": r.image_encoder_subfolder, "num_tokens": r.num_tokens,
             "resolution": r.resolution, "stage1a": stage1, "stage1b": stage1}
    data = {"shards": shards, "mode": "single", "lq_from": "src", "preset": r.degradation, "seed": 0,
            "num_workers": 0 if cfg.profile == "offline" else 4}
    root = Path(output_dir or r.output_dir or cfg.paths.data_root / "models" / "roboface")
    stage1_run = root / f"stage1-{_run_hash({'model': model, 'data': data, 'precision': r.mixed_precision})}"
    model["stage1a"] = {**stage1, "steps": r.stage1a_steps}
    model["stage1b"] = {**stage1, "steps": r.stage1b_steps}
    stage2 = {"lr": r.stage2_lr, "batch_size": r.stage2_batch_size, "epochs": r.stage2_epochs,
              "gradient_accumulation_steps": r.stage2_accumulation, "caption_dropout": r.caption_dropout}
    caption = roboface_caption_config(cfg).model_dump(mode="json")
    dca = {"mode": r.dca_mode, "order": r.dca_order, "explicit": r.explicit, "implicit": r.implicit,
           "use_remover": r.use_remover}
    ablated = {k: v for k, v in dca.items() if k != "mode" and v != type(r).model_fields[_DCA_FIELDS[k]].default}
    body = {"model": {**model, "stage2": stage2, "dca": dca, "caption": caption}, "data": data,
            "stage": stage, "captions": captions, "empty_caption": r.empty_caption,
            "samples": {"faces": r.sample_faces, "steps": r.sample_steps},
            "cache_dir": str(cfg.paths.cache_dir), "allow_download": cfg.models.allow_download}
    if stage == "stage1":
        run = stage1_run
    else:
        body["stage1_dir"] = str(stage1_dir or stage1_run / "stage1b" / "final")
        digest = (hashlib.sha256(Path(captions).read_bytes()).hexdigest() if captions and Path(captions).is_file()
                  else None)
        # the paper's decoupled cross-attention is named by its mode alone (run folders of earlier versions stay)
        meaning = {"stage1": body["stage1_dir"], "stage2": stage2, "dca": {"mode": r.dca_mode, **ablated}
                   if ablated else r.dca_mode, "captions": digest,
                   "caption": {k: caption[k] for k in ("backend", "prompt")}, "empty_caption": r.empty_caption,
                   "precision": r.mixed_precision}
        run = root / f"stage2-{_run_hash(meaning)}"
        steps = r.stage2_steps
        if steps is None:
            per_step = r.stage2_batch_size * r.stage2_accumulation * r.num_processes
            steps = math.ceil(r.stage2_epochs * _train_split_size(shards) / per_step)
        body["model"]["stage2"] = {**stage2, "steps": steps}
    body["run"] = {"output_dir": str(run), "checkpoint_every": r.checkpoint_every, "mixed_precision": r.mixed_precision,
                   "gradient_checkpointing": r.gradient_checkpointing}
    if stage == "stage2" and r.text_cache:  # stage I attends no text; stage II reads the encoder's states
        body["text_cache"] = str(roboface_text_cache_dir(cfg))
    return RoboFaceTrainConfig.model_validate(body)


def roboface_text_cache_dir(cfg: PipelineConfig):
    """Where RoboFace's text-encoder states of the prompts and captions are cached: ``<data_root>/text_embeddings/
    sd2-<fingerprint>`` (one folder for every captioner: entries are keyed by their text)."""
    return _cache_dir(cfg, TEXT_DIR, cfg.models.sd2_controlnet, 77, cfg.roboface.mixed_precision, prefix="sd2-",
                      parts=ROBOFACE_TEXT_PARTS)


def build_roboface_text_embeddings(cfg: PipelineConfig, captions: str | None = None, log=print) -> dict:
    """Encode the published prompts, the captions of ``captions`` (a captions.parquet) and the empty prompt with
    models.sd2_controlnet's text encoder (loaded only when something is missing) into
    :func:`roboface_text_cache_dir`."""
    from pathlib import Path

    import torch

    from attrface_pipeline.models.store import model_fingerprint
    from training.roboface.model import clip_text_states
    from training.roboface.train import weight_dtype
    from training.text_cache import build_cache, shard_prompts

    texts = shard_prompts(cfg.paths.data_root / "attrface_shards")
    if captions and Path(captions).is_file():
        from training.roboface.captions import read_captions

        texts += [r["caption"] for r in read_captions(captions).values() if r["caption"]]
    dtype = getattr(torch, weight_dtype(cfg.roboface.mixed_precision))
    device = resolve_device("auto")
    parts: dict = {}

    def encode(batch: list[str]):
        if not parts:
            from transformers import AutoTokenizer, CLIPTextModel

            base = Path(ModelStore.from_config(cfg).resolve(cfg.models.sd2_controlnet))
            parts["tokenizer"] = AutoTokenizer.from_pretrained(base, subfolder="tokenizer")
            parts["encoder"] = CLIPTextModel.from_pretrained(base, subfolder="text_encoder",
                                                             torch_dtype=dtype).to(device).eval()
        with torch.no_grad():
            states = clip_text_states(parts["tokenizer"], parts["encoder"], batch)
        return states, states[:, 0]  # the cache's pooled slot holds the first state (unused by RoboFace)

    meta = {"model": model_fingerprint(cfg.models.sd2_controlnet), "max_sequence_length": 77,
            "dtype": str(dtype).removeprefix("torch.")}
    return {**build_cache(encode, texts, roboface_text_cache_dir(cfg), meta=meta, log=log), **meta}


# Evaluation


def _scorer_or_reason(what: str, build):
    """The built scorer, or why it cannot be built (shown in the report's n/a cells)."""
    try:
        return build()
    except Exception as err:  # noqa: BLE001 - a metric that cannot load is reported, not fatal
        return f"{what} not available: {type(err).__name__}: {err}"[:400]


def build_eval_scorers(cfg: PipelineConfig, metrics: list[str] | None = None):
    """LPIPS, the FID extractor, the identity scorer, the pyiqa metrics and the VLM judge of ``eval`` -- each built
    only when one of ``metrics`` (default ``eval.metrics``) needs it; a string in its place is the reason it is not
    available."""
    from training.eval.metrics import HFVisionFeatures, NoReferenceIQA
    from training.eval.networks import LPIPS, FIDInceptionV3
    from training.eval.report import NR_METRICS, Scorers

    e = cfg.eval
    metrics = list(e.metrics if metrics is None else metrics)
    device = resolve_device(e.device)
    store = ModelStore.from_config(cfg)
    unused = "not requested (eval.metrics)"

    def network(spec: str | None, load, field: str):
        if spec is None:
            raise FileNotFoundError(f"eval.{field} is not set; docs/evaluation.md lists the standard weight files")
        return load(store.resolve(spec)).to(device).eval()

    def fid_extractor():
        if e.fid_extractor == "inception":
            return network(e.fid_weights, FIDInceptionV3.from_pretrained, "fid_weights")
        return network(e.fid_weights, HFVisionFeatures, "fid_weights")

    lpips = (_scorer_or_reason("LPIPS", lambda: network(e.lpips_weights, LPIPS.from_pretrained, "lpips_weights"))
             if "lpips" in metrics else unused)
    fid = _scorer_or_reason(f"FID ({e.fid_extractor})", fid_extractor) if "fid" in metrics else unused
    identity = (_scorer_or_reason(f"identity ({cfg.qc.identity_backend})", lambda: build_identity_scorer(cfg))
                if {"ids", "cp_ids"} & set(metrics) else unused)
    iqa = {m: _scorer_or_reason(m, lambda m=m: NoReferenceIQA(m, device=device)) for m in NR_METRICS if m in metrics}
    judge = build_judge(cfg) if {"sc", "aa"} & set(metrics) else unused
    untrained = "{} from an untrained network ({}): not comparable with published numbers"
    caveats = {}
    if (e.lpips_weights or "").startswith("tiny/"):
        caveats["lpips"] = untrained.format("LPIPS", e.lpips_weights)
    if (e.fid_weights or "").startswith("tiny/"):
        caveats["fid"] = untrained.format("FID", e.fid_weights)
    if cfg.qc.identity_backend == "arcface" and cfg.models.insightface_pack.startswith("tiny/"):
        caveats["ids"] = caveats["cp_ids"] = untrained.format("identity", cfg.models.insightface_pack)
    return Scorers(lpips=lpips, fid=fid, identity=identity, iqa=iqa, judge=judge, batch_size=e.batch_size,
                   caveats=caveats)


def build_judge(cfg: PipelineConfig):
    """The VLM judge of ``eval.judge`` with its answer cache under ``<cache_dir>/judge``, checked against the
    server; the reason it is not available otherwise."""
    from training.eval.judge import VLMJudge

    j = cfg.eval.judge
    if not j.base_url:
        return "no VLM judge configured (set eval.judge.base_url to an OpenAI-compatible server with image input)"
    judge = VLMJudge(j.base_url, j.model, api_key=os.environ.get(j.api_key_env, "EMPTY"),
                     cache_dir=cfg.paths.cache_dir / "judge", retry=RetryPolicy(max_retries=j.max_retries),
                     concurrency=j.concurrency, timeout_s=j.timeout_s)
    try:
        judge.preflight()
    except Exception as err:  # noqa: BLE001 - an unreachable judge makes SC/AA n/a, with the reason
        judge.close()
        return f"VLM judge at {j.base_url} not usable: {type(err).__name__}: {err}"[:400]
    return judge


def build_eval_methods(cfg: PipelineConfig, weights: dict[str, str | None]):
    """The report's methods in ``eval.methods`` order, then ``eval.external``. ``weights`` maps a model method to
    its trained folder (the ``a2bfr_lora`` / ``roboface_model`` checkpoint), None when not trained yet."""
    from pathlib import Path

    from training.eval.report import MODELS, Method, baseline_methods, external_methods

    e = cfg.eval
    device = resolve_device(e.device)
    dtype = resolve_dtype("auto", device)
    methods = []
    for name in e.methods:
        if name not in MODELS:
            methods += baseline_methods([name], bicubic_factor=e.bicubic_factor)
            continue
        folder = weights.get(name)
        asset = {"a2bfr": "a2bfr_lora", "roboface": "roboface_model"}[name]
        base = cfg.models.flux if name == "a2bfr" else cfg.models.sd2_controlnet
        if not folder or not Path(folder).is_dir():
            methods.append(Method(name, "model", f"{base} + (untrained)", prompted=True,
                                  unavailable=f"{asset} is not materialized yet (no trained weights"
                                              f"{' at ' + str(folder) if folder else ''}); materialize it first"))
            continue
        steps = e.a2bfr_steps if name == "a2bfr" else e.roboface_steps
        model_id = f"{base} + {folder} (steps {steps or 'default'}, seed {e.seed}, {dtype})"
        caveat = (f"{name} on the tiny random {base}: not comparable with published numbers"
                  if base.startswith("tiny/") else "")

        def load(name=name, folder=folder, base=base, steps=steps):
            base_path = ModelStore.from_config(cfg).resolve(base)
            if name == "a2bfr":
                from training.a2bfr.restore import build_restorer
            else:
                from training.roboface.restore import build_restorer
            return build_restorer(base_path, folder, device=device, dtype=dtype, steps=steps, seed=e.seed)

        methods.append(Method(name, "model", model_id, prompted=True, load=load, caveat=caveat))
    return methods + external_methods(e.external)


def build_baseline_methods(cfg: PipelineConfig, a2bfr_weights: str | None, *, names=("bicubic", "identity",
                           "restore_then_edit")):
    """The reproduction's baselines that need no one else's weights: bicubic, identity and restore-then-edit
    (A²BFR's prompt-agnostic restoration with ``a2bfr_weights``, then the project's FlowEdit to the target prompt),
    then ``eval.external``'s folders."""
    from pathlib import Path

    from training.a2bfr.pipeline import DEFAULT_PROMPT
    from training.eval.report import Method, baseline_methods, external_methods, restore_then_edit

    e = cfg.eval
    device = resolve_device(e.device)
    dtype = resolve_dtype("auto", device)
    methods = baseline_methods([n for n in names if n in ("bicubic", "identity")], bicubic_factor=e.bicubic_factor)
    if "restore_then_edit" in names:
        edit = cfg.edit
        model_id = (f"{cfg.models.flux} + {a2bfr_weights} ({DEFAULT_PROMPT!r}, steps {e.a2bfr_steps or 'default'}) "
                    f"-> FlowEdit {cfg.models.sd3} ({edit.resolution} px, {edit.steps} steps, n_max {edit.n_max}, "
                    f"seed {edit.seed})")
        tiny = [m for m in (cfg.models.flux, cfg.models.sd3) if m.startswith("tiny/")]
        caveat = (f"restore-then-edit on the tiny random {' and '.join(tiny)}: not comparable with published numbers"
                  if tiny else "")

        def load():
            from training.a2bfr.restore import build_restorer

            store = ModelStore.from_config(cfg)
            restorer = build_restorer(store.resolve(cfg.models.flux), a2bfr_weights, device=device, dtype=dtype,
                                      steps=e.a2bfr_steps, seed=e.seed)
            return restore_then_edit(restorer, build_editor(cfg), flowedit_params(edit), prompt=DEFAULT_PROMPT,
                                     resolution=edit.resolution, seed=edit.seed)

        missing = ("" if a2bfr_weights and Path(a2bfr_weights).exists() else
                   "no A²BFR weights for the restore stage: train the default experiment (train_a2bfr) or cache the "
                   "release (models.a2bfr_release)")
        methods.append(Method("restore_then_edit", "baseline", model_id, prompted=True, load=load, caveat=caveat,
                              unavailable=missing, source_prompts=True))
    return methods + external_methods(e.external)


# -- restore weights ---------------------------------------------------------------------------------------------
RELEASE_FILE = "default.safetensors"  # training.a2bfr.pipeline.RELEASE_WEIGHTS (kept import-free of torch here)


def trained_runs(cfg: PipelineConfig, model: str) -> list:
    """This instance's finished runs of ``model`` (their ``final`` folders), newest first."""
    from pathlib import Path

    if model == "a2bfr":
        root = Path(cfg.a2bfr.output_dir or cfg.paths.data_root / "models" / "a2bfr")
        finals = [p for p in root.glob("*/final") if (p / "pytorch_lora_weights.safetensors").is_file()]
        if cfg.a2bfr.output_dir and (root / "final" / "pytorch_lora_weights.safetensors").is_file():
            finals.append(root / "final")
    elif model == "roboface":
        root = Path(cfg.roboface.output_dir or cfg.paths.data_root / "models" / "roboface")
        finals = [p for p in root.glob("stage2-*/final") if (p / "roboface.json").is_file()]
    else:
        raise ValueError(f"unknown model {model!r}; choose a2bfr or roboface")
    return sorted(finals, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_restore_weights(cfg: PipelineConfig, model: str, spec: str | None):
    """``attrface restore --weights``: ``release`` (A²BFR's default: the official release through the model store,
    ``models.a2bfr_release``), ``latest`` (this instance's newest trained run; RoboFace's default) or a path.
    Returns (path, what it is); :class:`ModelNotAvailableError` says how to get what is missing."""
    from pathlib import Path

    from attrface_pipeline.models.store import ModelNotAvailableError

    spec = spec or ("release" if model == "a2bfr" else "latest")
    runs = trained_runs(cfg, model)
    train = {"a2bfr": "make train-a2bfr", "roboface": "make train-roboface"}[model]
    local = (f"restore with a run trained here: --weights latest (newest: {runs[0]})" if runs else
             f"no {model} run is trained here yet ({train} trains one)")
    if spec == "latest":
        if not runs:
            raise ModelNotAvailableError(f"--weights latest: {local}; or pass --weights PATH")
        return runs[0], f"latest trained run {runs[0]}"
    if spec == "release":
        if model != "a2bfr":
            raise ModelNotAvailableError("RoboFace has no public weights release: pass --weights latest or the "
                                         "trained folder <run>/stage2/final")
        repo = cfg.models.a2bfr_release
        store = ModelStore.from_config(cfg)
        try:
            folder = store.resolve(repo)
        except ModelNotAvailableError as err:
            offline = not store.allow_download or os.environ.get("HF_HUB_OFFLINE") == "1"
            why = (f"is not in the model cache {store.hub_cache} and downloads are off" if offline else
                   f"could not be downloaded ({err})")
            raise ModelNotAvailableError(
                f"the A²BFR release {repo} ({RELEASE_FILE}) {why}. Get it on a connected machine with `hf download "
                f"{repo} {RELEASE_FILE} --cache-dir {store.hub_cache}` and copy that cache here, or set "
                f"models.allow_download: true; it fits FLUX.1-dev (models.flux: black-forest-labs/FLUX.1-dev, "
                f"licence accepted on the hub). Or {local}.") from None
        return folder, f"official release {repo}"
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotAvailableError(f"--weights {spec}: no such file or folder (use release, latest or a path; "
                                     f"{local})")
    return path, str(path)
