"""WebDataset loaders over published AttrFace shards (single / dual) and over plain folders of HQ faces (folder).

Every sample's LQ is synthesised inside the DataLoader worker by ``training.degradation.degrade`` from one GT, with
an rng derived from sha256(seed, epoch, key) -- never from the worker id or the sample's position -- so a given
(seed, epoch, key) gives the same LQ whatever the number of workers or nodes, and the degradation parameters travel
with the sample. Images are float CHW in [-1, 1] (the diffusers convention). Batches from ``collate``:

    single: gt, lq [B,3,H,W]; prompt list[str]; lq_from list['src'|'tar']; key list[str]; degradation list[dict]
    dual:   gt_src, gt_tar, lq [B,3,H,W]; prompt_src, prompt_tar list[str]; attr_index [B] int64;
            attr_probs_src, attr_probs_tar [B,40] float32; attribute, direction, lq_from, key, degradation lists
    folder: like single, with lq_from 'hq' and prompt = ``LoaderConfig.prompt``

attr_probs_tar is the source's vector with the flipped attribute set to 1.0 (add) or 0.0 (remove); see pair_sample.

Bad samples: ``bad_samples="skip"`` (default, webdataset's ``warn_and_continue`` convention) drops a sample that
cannot be read (a corrupt image, invalid JSON, a missing member) and the rest of a shard that is cut short or not a
tar at all, and records each event ({shard, key, reason}); the records ride with the next good sample to the
trainer, so they cross DataLoader workers, and ``collate`` puts them in ``batch["bad_samples"]``. The engine counts
them per shard, logs them, keeps the counts in every checkpoint and the loss log, and stops past
``TrainSettings.max_bad_fraction``. ``bad_samples="raise"`` stops at the first, naming the shard and the key.

Multi-process: shards are split by node (``wds.split_by_node``: env RANK/WORLD_SIZE or torch.distributed) and then
by DataLoader worker (``wds.split_by_worker``), so without resampling every sample is read once per epoch as long as
there are at least nodes x workers shards. ``resampled=True`` draws shards with replacement (infinite) and cuts each
worker's stream to its share of ``epoch_samples`` (``with_epoch``), for multi-GPU training on uneven shard counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np
import torch
import webdataset as wds
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch.utils.data import DataLoader, default_collate

from attrface_pipeline.attributes import ADD, CELEBA_ATTRIBUTES, REMOVE

if TYPE_CHECKING:
    from training.degradation import DegradationPreset

IMAGE_EXTENSIONS = ("jpg", "png", "webp", "jpeg")  # what publish.image_format can write, plus .jpeg
FOLDER_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
HOW_TO_PUBLISH = ("publish them with the `build_dataset` Dagster job (`make demo` builds the sample dataset into "
                  "data/build/attrface_shards/{train,test}/), or set `shards` to a folder, a brace pattern "
                  "(.../attrface-train-{000000..000009}.tar) or a list of .tar files")
_TO_UNIT = (np.arange(256) / 127.5 - 1).astype(np.float32)  # uint8 -> [-1, 1], the diffusers convention


class ShardsNotFoundError(FileNotFoundError):
    """No shards where the config points (missing path, empty folder, or a listed shard that does not exist)."""


class ImagesNotFoundError(FileNotFoundError):
    """Folder mode: the HQ image folder is missing or holds no images."""


class BadSampleError(ValueError):
    """A sample or a shard could not be read (``bad_samples="raise"``); the message names the shard and the key."""


class ShardFormatError(BadSampleError):
    """A sample lacks a member (or a json field) that the configured mode needs."""


BAD_KEY = "__bad__"  # a sample's field carrying the bad-sample records met before it in its worker
RECORD_ONLY = "__record_only__"  # an item that carries only records (a worker's stream ended on bad samples)


class LoaderConfig(BaseModel):
    """Everything a training loader needs; one object, validated, no hidden defaults elsewhere."""

    model_config = ConfigDict(extra="forbid")

    # A folder (the publish root with train/ and test/, or one split's folder), a brace pattern, or a list of tars.
    shards: str | list[str] | None = None
    split: Literal["train", "test"] = "train"  # picks the sub-folder when ``shards`` is the publish root
    images: str | None = None  # folder mode: a folder of HQ face images (searched recursively)
    mode: Literal["single", "dual", "folder"] = "single"
    lq_from: Literal["src", "tar", "random"] = "src"  # which GT the LQ is degraded from; random: per sample+epoch
    prompt: str = ""  # folder mode: the fixed prompt of every sample
    preset: str = "train"  # a name in training.degradation.PRESETS or in ``presets_file``
    presets_file: str | None = None  # extra YAML presets (training.degradation.load_presets)
    resolution: int | None = Field(default=None, ge=8)  # square training size; None keeps the stored size
    batch_size: int = Field(default=8, ge=1)
    num_workers: int = Field(default=2, ge=0)
    seed: int = 0
    resampled: bool = False
    epoch_samples: int | None = Field(default=None, ge=1)  # resampled: samples per epoch over all nodes and workers
    shuffle_buffer: int = Field(default=1000, ge=0)  # 0: shards and samples in stored order
    drop_last: bool = False
    pin_memory: bool = False
    bad_samples: Literal["skip", "raise"] = "skip"  # skip: drop, count and log unreadable samples; raise: stop

    @field_validator("shards", "images", "presets_file", mode="before")
    @classmethod
    def _paths_as_strings(cls, value: Any) -> Any:
        # Paths become strings here, not in a Path field: a Path would collapse "pipe:" and "s3://" urls.
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (list, tuple)):
            return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        return value

    @model_validator(mode="after")
    def _check_source(self) -> LoaderConfig:
        if self.mode == "folder" and self.images is None:
            raise ValueError("mode 'folder' reads HQ images: set `images` to a folder")
        if self.mode != "folder" and self.shards is None:
            raise ValueError(f"mode {self.mode!r} reads AttrFace shards: set `shards`")
        if self.resampled and self.epoch_samples is None:
            raise ValueError("resampled shards are infinite: set `epoch_samples` (samples per epoch, all nodes)")
        return self


def sample_rng(*, seed: int, epoch: int, key: str, purpose: str = "degrade") -> np.random.Generator:
    """The rng of one sample in one epoch: sha256 of (purpose, seed, epoch, key), independent of worker and order."""
    digest = hashlib.sha256(f"attrface:{purpose}:{seed}:{epoch}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (shard order, shuffle buffers); stable across processes, unlike hash()."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def resolve_shards(shards: str | Sequence[str], *, split: str = "train") -> list[str]:
    """The shard urls a config names: a folder (root or split), a brace pattern or a list; local ones must exist."""
    if isinstance(shards, str):
        path = Path(shards)
        if _is_local(shards) and path.is_dir():
            folder = path / split if (path / split).is_dir() else path
            urls = sorted(str(p) for p in folder.glob("*.tar") if not p.name.startswith("."))  # not temp files
            if not urls:
                raise ShardsNotFoundError(f"no shards (*.tar) in {folder}: {HOW_TO_PUBLISH}")
            return urls
        urls = wds.shardlists.expand_urls(shards)
    else:
        urls = [str(u) for u in shards]
    if not urls:
        raise ShardsNotFoundError(f"no shards in {shards!r}: {HOW_TO_PUBLISH}")
    missing = [u for u in urls if _is_local(u) and not Path(u).is_file()]
    if missing:
        head = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ShardsNotFoundError(f"shards not found: {head}: {HOW_TO_PUBLISH}")
    return urls


def data_fingerprint(cfg: LoaderConfig) -> dict:
    """What a run trains on, recorded in every checkpoint: each shard's name, size, content sha256 and the sha256 of
    its parquet index (folder mode: each image's relative path and size). Resuming on other data is refused with
    what changed -- a shard replaced by another of the same size too.

    Cost: every local shard is read once per process (``artifacts.content_fingerprint`` memoizes each file's hash by
    path, size, times and inode): ~1 s per GB on the first call, a stat per shard after."""
    if cfg.mode == "folder":
        root = Path(cfg.images)
        files = list_images(root)
        digest = hashlib.sha256("\n".join(f"{Path(f).relative_to(root).as_posix()}:{Path(f).stat().st_size}"
                                          for f in files).encode()).hexdigest()[:16]
        return {"images": len(files), "listing_sha256": digest}
    from attrface_pipeline.artifacts import content_fingerprint

    shards = {}
    for url in resolve_shards(cfg.shards, split=cfg.split):
        entry: dict[str, Any] = {}
        if _is_local(url):
            path = Path(url)
            entry["bytes"] = path.stat().st_size
            entry["sha256"] = content_fingerprint(path)[:16]
            index = path.with_suffix(".parquet")
            if index.is_file():
                entry["index_sha256"] = hashlib.sha256(index.read_bytes()).hexdigest()[:16]
        shards[Path(url).name] = entry
    return {"split": cfg.split, "shards": shards}


def list_images(folder: str | Path) -> list[str]:
    """Every image file under ``folder`` (recursive, sorted), for folder mode."""
    root = Path(folder)
    if not root.is_dir():
        raise ImagesNotFoundError(f"HQ image folder {root} does not exist (folder mode wants a folder of face images, "
                                  f"e.g. FFHQ's 512 px PNGs)")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in FOLDER_SUFFIXES and p.is_file())
    if not files:
        raise ImagesNotFoundError(f"no images ({', '.join(sorted(FOLDER_SUFFIXES))}) under {root}")
    return files


def resolve_preset(cfg: LoaderConfig) -> DegradationPreset:
    """The DegradationPreset the config names, resolved in the main process so a bad name fails before workers."""
    from training.degradation import get_preset, load_presets

    extra = load_presets(cfg.presets_file) if cfg.presets_file else None
    return get_preset(cfg.preset, extra)


def _decode(raw: dict, name: str) -> np.ndarray:
    """One image member's bytes -> HWC uint8 RGB."""
    bgr = cv2.imdecode(np.frombuffer(raw[name], np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ShardFormatError(f"{_where(raw)}: member {name} is not a decodable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _fit(rgb: np.ndarray, resolution: int | None) -> np.ndarray:
    """Centre-crop to a square and resize to ``resolution`` (no-op when None or already that size)."""
    if resolution is None:
        return rgb
    h, w = rgb.shape[:2]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        rgb = rgb[top:top + side, left:left + side]
    if rgb.shape[0] == resolution:
        return np.ascontiguousarray(rgb)
    interp = cv2.INTER_AREA if rgb.shape[0] > resolution else cv2.INTER_CUBIC  # area: no aliasing when shrinking
    return cv2.resize(rgb, (resolution, resolution), interpolation=interp)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32 in [-1, 1]."""
    # Transpose the uint8 array (1 byte/element), then one table lookup per element: ~3x faster than torch's
    # float/div/sub passes at 512 px, and each value is the correctly rounded x / 127.5 - 1.
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    return torch.from_numpy(cv2.LUT(chw.reshape(-1, chw.shape[-1]), _TO_UNIT).reshape(chw.shape))


def _where(raw: dict) -> str:
    return f"shard {Path(str(raw.get('__url__', '?'))).name}, sample {raw.get('__key__', '?')!r}"


def _image_name(raw: dict, side: str) -> str | None:
    """The member holding ``side``'s image, whatever format it was published in."""
    return next((f"{side}.{ext}" for ext in IMAGE_EXTENSIONS if f"{side}.{ext}" in raw), None)


def _check_members(raw: dict, *, mode: str, lq_from: str) -> None:
    """Raise ShardFormatError naming the shard, the key and every member the mode needs that the sample lacks."""
    # random needs both sides up front, so a broken sample fails on every epoch, not only when its side is drawn
    sides = ("src", "tar") if mode == "dual" or lq_from == "random" else (lq_from,)
    missing = [f"{side}.jpg (or .{'/.'.join(IMAGE_EXTENSIONS[1:])})" for side in sides if not _image_name(raw, side)]
    missing += [name for name in [f"{side}.txt" for side in sides] + (["json"] if mode == "dual" else [])
                if name not in raw]
    if missing:
        present = sorted(k for k in raw if not k.startswith("__"))
        raise ShardFormatError(f"{_where(raw)} lacks member {', '.join(missing)}, which mode {mode!r} needs "
                               f"(members: {present})")


def _attribute_targets(raw: dict, meta: dict) -> tuple[int, np.ndarray, np.ndarray, str, str]:
    """(attr_index, probs_src [40], probs_tar [40], attribute, direction) from the json member."""
    try:
        attribute, direction = meta["edit"]["attribute"], meta["edit"]["direction"]
        table = meta["attributes"]["probabilities"]
    except (KeyError, TypeError) as e:
        raise ShardFormatError(f"{_where(raw)}: json lacks {e} (needs edit.attribute, edit.direction and "
                               f"attributes.probabilities for dual mode)") from None
    missing = [name for name in CELEBA_ATTRIBUTES if name not in table]
    if missing or attribute not in CELEBA_ATTRIBUTES or direction not in (ADD, REMOVE):
        raise ShardFormatError(f"{_where(raw)}: json has attribute {attribute!r}, direction {direction!r}, "
                               f"probabilities missing {missing[:5]}; expected a CelebA name, add|remove, all 40")
    index = CELEBA_ATTRIBUTES.index(attribute)
    probs_src = np.array([table[name] for name in CELEBA_ATTRIBUTES], np.float32)
    probs_tar = probs_src.copy()
    probs_tar[index] = 1.0 if direction == ADD else 0.0
    return index, probs_src, probs_tar, attribute, direction


def _lq(gt: np.ndarray, *, preset: DegradationPreset, seed: int, epoch: int, key: str) -> tuple[torch.Tensor, dict]:
    from training.degradation import degrade

    lq, params = degrade(gt, preset, sample_rng(seed=seed, epoch=epoch, key=key))
    return to_tensor(lq), params


def pair_sample(raw: dict, *, mode: str, lq_from: str, preset: DegradationPreset, resolution: int | None,
                seed: int, epoch: int) -> dict:
    """One raw WebDataset sample (member bytes) -> one training sample (tensors + prompts + degradation params).

    Dual mode's target probabilities are a design decision: FaRL never scored the edit at publish time, so the
    target vector is the source's with the flipped attribute set to its intended state (1.0 for add, 0.0 for
    remove) -- the label the edit was asked to realise, the other 39 assumed unchanged (QC bounds their drift).
    """
    key = raw["__key__"]
    _check_members(raw, mode=mode, lq_from=lq_from)
    if lq_from == "random":
        side = "src" if sample_rng(seed=seed, epoch=epoch, key=key, purpose="side").random() < 0.5 else "tar"
    else:
        side = lq_from
    if mode == "single":
        gt = _fit(_decode(raw, _image_name(raw, side)), resolution)
        lq, params = _lq(gt, preset=preset, seed=seed, epoch=epoch, key=key)
        return {"key": key, "gt": to_tensor(gt), "lq": lq, "prompt": raw[f"{side}.txt"].decode(),
                "lq_from": side, "degradation": params}
    gts = {s: _fit(_decode(raw, _image_name(raw, s)), resolution) for s in ("src", "tar")}
    # one LQ, from the configured side's GT, shared by both targets: the dual loss restores it to either face
    lq, params = _lq(gts[side], preset=preset, seed=seed, epoch=epoch, key=key)
    try:
        meta = json.loads(raw["json"])
    except ValueError as err:
        raise ShardFormatError(f"{_where(raw)}: its json member is not valid JSON ({err})") from None
    index, probs_src, probs_tar, attribute, direction = _attribute_targets(raw, meta)
    return {"key": key, "gt_src": to_tensor(gts["src"]), "gt_tar": to_tensor(gts["tar"]), "lq": lq,
            "prompt_src": raw["src.txt"].decode(), "prompt_tar": raw["tar.txt"].decode(),
            "attr_index": index, "attr_probs_src": torch.from_numpy(probs_src),
            "attr_probs_tar": torch.from_numpy(probs_tar), "attribute": attribute, "direction": direction,
            "lq_from": side, "degradation": params}


def folder_sample(item: dict, *, root: str, prompt: str, preset: DegradationPreset, resolution: int | None, seed: int,
                  epoch: int) -> dict:
    """One HQ image file ({'url': path}) -> a single-mode sample (GT, its LQ, the fixed prompt)."""
    from PIL import Image, ImageOps

    path = Path(item["url"])
    with Image.open(path) as im:
        gt = _fit(np.asarray(ImageOps.exif_transpose(im).convert("RGB")), resolution)
    key = path.relative_to(root).with_suffix("").as_posix()
    lq, params = _lq(gt, preset=preset, seed=seed, epoch=epoch, key=key)
    return {"key": key, "gt": to_tensor(gt), "lq": lq, "prompt": prompt, "lq_from": "hq", "degradation": params}


class BadSamples:
    """One worker's bad-sample records (webdataset handler for shard-level errors, and the sample converter's)."""

    def __init__(self, policy: str):
        self.policy = policy
        self.pending: list[dict] = []

    def __call__(self, exn: Exception) -> bool:
        """webdataset's handler: a shard that is truncated, not a tar, or unreadable (webdataset puts its url in
        the exception's arguments)."""
        text = " ".join(str(a) for a in exn.args) if exn.args else type(exn).__name__
        urls = [str(a) for a in exn.args[1:] if isinstance(a, str)]
        shard = Path(urls[-1]).name if urls else Path(text.rsplit(" @ ", 1)[-1]).name if " @ " in text else "?"
        reason = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        if self.policy == "raise":
            raise BadSampleError(f"shard {shard}: {reason} (the shard is damaged; re-publish it, or set "
                                 f"bad_samples: skip to train on the rest)") from exn
        self.pending.append({"shard": shard, "key": None, "reason": reason})
        return True

    def sample_failed(self, raw: dict, exn: Exception) -> None:
        shard = Path(str(raw["__url__"])).name if "__url__" in raw else "folder"
        key = raw.get("__key__", raw.get("url", "?"))
        if self.policy == "raise":
            if isinstance(exn, BadSampleError):  # already names the shard and the key
                raise exn
            raise BadSampleError(f"shard {shard}, sample {key!r}: {type(exn).__name__}: {exn}") from exn
        reason = str(exn) if isinstance(exn, BadSampleError) else f"{type(exn).__name__}: {exn}"
        self.pending.append({"shard": shard, "key": str(key), "reason": reason})

    def take(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out


def shard_lengths(urls: Sequence[str]) -> dict[str, int]:
    """Samples per local shard from its parquet index (publishing writes one beside every shard)."""
    import pyarrow.parquet as pq

    out = {}
    for url in urls:
        index = Path(url).with_suffix(".parquet")
        if _is_local(url) and index.is_file():
            with contextlib.suppress(Exception):  # an unreadable index only loses this check
                out[url] = pq.ParquetFile(index).metadata.num_rows
    return out


def _check_lengths(src, *, expected: dict[str, int], bad: BadSamples):
    """A shard cut at a tar block boundary reads as a shorter, valid tar: compare each shard's sample count with
    its index and record the shortfall."""
    current, count = None, 0

    def finish():
        if current in expected and count < expected[current]:
            bad(EOFError(f"the shard ended after {count} of its {expected[current]} samples (cut short)", current))

    for sample in src:
        url = sample.get("__url__")
        if url != current:
            finish()
            current, count = url, 0
        count += 1
        yield sample
    finish()


def _convert(src, *, to_sample, bad: BadSamples):
    """raw samples -> training samples; a sample that fails becomes a record on the next good one."""
    for raw in src:
        try:
            sample = to_sample(raw)
        except Exception as exn:  # noqa: BLE001 - any unreadable content is a bad sample, by policy
            bad.sample_failed(raw, exn)
            continue
        sample[BAD_KEY] = bad.take()
        yield sample
    if bad.pending:  # the worker's stream ended on bad samples: their records travel alone
        yield {RECORD_ONLY: True, BAD_KEY: bad.take()}


def _shuffle_samples(src, *, bufsize: int, seed: int, epoch: int):
    """Buffered sample shuffle, seeded per (seed, epoch, node, worker) so a rerun gives the same order."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = random.Random(_derived_seed("samples", seed, epoch, rank, worker))
    yield from wds.shuffle(bufsize, initial=min(bufsize, 100), rng=rng)(src)


def make_dataset(cfg: LoaderConfig, *, epoch: int = 0) -> wds.DataPipeline:
    """The per-sample pipeline (an IterableDataset): shard list -> node/worker split -> tar -> shuffle -> sample."""
    preset = resolve_preset(cfg)
    if cfg.mode == "folder":
        urls = list_images(cfg.images)
        to_sample = partial(folder_sample, root=cfg.images, prompt=cfg.prompt, preset=preset,
                            resolution=cfg.resolution, seed=cfg.seed, epoch=epoch)
    else:
        urls = resolve_shards(cfg.shards, split=cfg.split)
        to_sample = partial(pair_sample, mode=cfg.mode, lq_from=cfg.lq_from, preset=preset,
                            resolution=cfg.resolution, seed=cfg.seed, epoch=epoch)
    list_seed = _derived_seed("shards", cfg.seed, epoch)
    if cfg.resampled:
        # deterministic: the shard draw is seeded by (list_seed, node, worker) and not by time or pid
        stages = [wds.ResampledShards(urls, seed=list_seed, deterministic=True)]
    else:
        # every node shuffles the list with the same seed, so the node/worker slices partition it exactly
        stages = [wds.SimpleShardList(urls, seed=list_seed if cfg.shuffle_buffer else None),
                  wds.split_by_node, wds.split_by_worker]
    bad = BadSamples(cfg.bad_samples)
    if cfg.mode != "folder":
        stages.append(wds.tarfile_to_samples(handler=bad))
        if not cfg.resampled:
            stages.append(partial(_check_lengths, expected=shard_lengths(urls), bad=bad))
        if cfg.shuffle_buffer:
            stages.append(partial(_shuffle_samples, bufsize=cfg.shuffle_buffer, seed=cfg.seed, epoch=epoch))
    stages.append(partial(_convert, to_sample=to_sample, bad=bad))
    dataset = wds.DataPipeline(*stages)
    if cfg.resampled:
        _, world_size, _, _ = wds.utils.pytorch_worker_info()
        dataset = dataset.with_epoch(math.ceil(cfg.epoch_samples / (world_size * max(cfg.num_workers, 1))))
    return dataset


def _stack(name: str, values: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch {name!r}: samples have shapes {sorted(shapes)}; set `resolution` in the "
                         f"loader config to bring every image to one size")
    # default_collate stacks straight into shared memory inside a worker, saving a copy on the way to the trainer
    return default_collate(values)


def collate(samples: list[dict]) -> dict:
    """Samples -> a batch: tensors stacked ([B, ...]), ints as an int64 tensor, strings and dicts as lists;
    ``bad_samples``: the records of the bad samples met on the way (a batch of records only holds just that)."""
    bad = [r for s in samples for r in s.get(BAD_KEY, ())]
    samples = [s for s in samples if not s.get(RECORD_ONLY)]
    if not samples:
        return {"bad_samples": bad}
    batch = {}
    for name in samples[0]:
        if name.startswith("__"):  # webdataset's bookkeeping (wds.map puts __key__ back); ``key`` carries it
            continue
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = _stack(name, values)
        elif isinstance(values[0], int) and not isinstance(values[0], bool):
            batch[name] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[name] = values
    batch["bad_samples"] = bad
    return batch


def make_loader(cfg: LoaderConfig, *, epoch: int = 0) -> DataLoader:
    """A DataLoader of ``collate`` batches for one epoch (build one per epoch: the epoch seeds order and LQs)."""
    # No cv2.setNumThreads(1) in a worker_init_fn: in a forked worker it tears down the thread pool inherited from a
    # parent that used OpenCV, and blocks forever in pthread_cond_destroy (seen with 512 px resizes before the loader).
    return DataLoader(make_dataset(cfg, epoch=epoch), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                      collate_fn=collate, drop_last=cfg.drop_last, pin_memory=cfg.pin_memory)


def preview_batch(cfg: LoaderConfig, *, size: int, split: str, resolution: int | None = None) -> dict | None:
    """The first ``size`` samples of ``split`` in stored order, no shuffling (the train split if that one has none):
    the fixed batch trainers render their sample grids from. None if ``size`` is 0 or there is no data."""
    if not size:
        return None
    for name in dict.fromkeys([split, "train"]):
        data = cfg.model_copy(update={"split": name, "batch_size": size, "num_workers": 0, "shuffle_buffer": 0,
                                      "resampled": False, "epoch_samples": None, "drop_last": False,
                                      "resolution": resolution if resolution is not None else cfg.resolution})
        try:
            return next(iter(make_loader(data, epoch=0)))
        except (ShardsNotFoundError, StopIteration):
            continue
    return None
