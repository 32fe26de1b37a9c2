"""The training loop both models share: accelerate for devices and precision, checkpoints that resume exactly.

A trainer supplies a model (only its ``requires_grad`` parameters are trained), ``loader_factory(epoch)`` (the
batches of one epoch, the same every time it is asked for that epoch), ``step_fn(model, batch) -> {"loss": ...}``
and ``save_fn(model, folder)`` (the deliverable weights, e.g. a LoRA in the diffusers format). :class:`Trainer`
does the rest the way the diffusers training examples do, as an importable object instead of a script:

    <output_dir>/losses.jsonl                       one JSON row per logged optimizer step
    <output_dir>/checkpoints/checkpoint-000500/     trainable.safetensors, optimizer.pt, rng.pt, trainer_state.json,
                                                    config.json and whatever save_fn writes (a usable deliverable)
    <output_dir>/checkpoints/latest                 the name of the newest complete checkpoint
    <output_dir>/final/                             save_fn's files + config.json + trainer_state.json
    <output_dir>/loss_curve.png

Exact resume: a checkpoint holds the trainable weights, the optimizer state (Prodigy's ``d`` lives in its param
groups), every process's python/numpy/torch/CUDA RNG states, and (epoch, batches consumed in that epoch). Resuming
rebuilds that epoch's loader, skips the consumed batches, then restores the RNG states, so on CPU in fp32 an
interrupted run reproduces the uninterrupted one bit for bit. This needs loaders that are deterministic per epoch
whatever the global RNG (``training.data.make_loader`` derives every random choice from (seed, epoch, key)).

A checkpoint is written into a hidden temp folder and renamed into place; ``latest`` is updated after the rename
and older checkpoints are pruned only then, so a crash at any moment leaves the previous checkpoint usable.
Only the main process writes files; ``save_fn`` and ``on_checkpoint`` run there, on the unwrapped model.

Integrity: ``trainer_state.json`` is a JSON artifact (kind ``checkpoint.state``, ``attrface_pipeline.artifacts``)
written last, recording the size and sha256 of every other file of the folder (weights, optimizer, RNG, scaler,
config and save_fn's deliverable). Resuming verifies them all first (:func:`verify_checkpoint`): a damaged, cut,
replaced or missing file, or a damaged or old-format state, is a one-line :class:`CheckpointError` naming the
file and the remedy (resume from another checkpoint folder, or start over). Files added to a checkpoint after it
was complete (``on_checkpoint``'s sample grids) are not part of it and are not checked.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from attrface_pipeline.artifacts import (ArtifactError, ArtifactKind, file_record, read_json, register, verify_file,
                                         write_json)
from attrface_pipeline.storage import atomic_write_bytes, atomic_write_json

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
LOSSES_FILE = "losses.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
FINAL_DIR = "final"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCALER_FILE = "scaler.pt"  # fp16 only: the GradScaler's loss scale
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
ATTENTION_BACKENDS = ("auto", "math", "flash", "efficient", "cudnn")
# Settings/config keys (matched on the last dotted part) that may change between a checkpoint and its resumption:
# they change how long or how visibly a run goes, not what it computes.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "resume", "overwrite",
    "attention_backend", "gradient_checkpointing", "accept_data_change", "max_bad_fraction", "text_cache",
    "latent_cache", "memory_check",
})
DATA_FINGERPRINT = "data_fingerprint"  # the config key trainers record the data under (training.data.data_fingerprint)
MIN_SAMPLES_FOR_BAD_FRACTION = 20  # the bad-sample fraction is judged once this many samples were read


RESUME_REMEDY = "resume from another checkpoint folder (resume=<path>) or start over (resume=None, overwrite=True)"
FILES_KEY = "files"  # trainer_state.json's record of the folder's other files: {relative path: {"bytes", "sha256"}}
CHECKPOINT_FILES = (TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE, CONFIG_FILE)  # what a resumable checkpoint records


class CheckpointError(ArtifactError, RuntimeError):
    """A checkpoint to resume from is missing, incomplete, damaged or unreadable: one line naming the path and the
    remedy. ``CheckpointError(message)`` or, like :class:`ArtifactError`, ``CheckpointError(path, problem,
    remedy)``."""

    def __init__(self, path_or_message: str | Path, problem: str | None = None, remedy: str = ""):
        if problem is None:
            self.path, self.problem, self.remedy = "", str(path_or_message), ""
            Exception.__init__(self, str(path_or_message))
        else:
            super().__init__(path_or_message, problem, remedy)

    @classmethod
    def of(cls, err: ArtifactError) -> CheckpointError:
        return err if isinstance(err, cls) else cls(err.path, err.problem, err.remedy or RESUME_REMEDY)


class ResumeMismatchError(ValueError):
    """The run's settings or config differ from the checkpoint's in keys that change what training computes."""


class TooManyBadSamplesError(RuntimeError):
    """More of the data than ``max_bad_fraction`` could not be read (the message names the worst shards)."""


class OutputDirInUseError(FileExistsError):
    """``resume=None`` on an output folder that already holds checkpoints, without ``overwrite``."""


class TrainSettings(BaseModel):
    """How the loop runs: length, checkpoints, precision, optimizer. Recorded in every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    output_dir: str  # the run folder
    max_steps: int = Field(ge=0)  # optimizer steps
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)  # older checkpoint-* folders are deleted once a new one is complete
    log_every: int = Field(1, ge=1)
    grad_clip: float | None = Field(0.5, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = True  # recorded here; the model code reads it
    seed: int = 0
    # "latest": resume if a checkpoint exists, else start; a checkpoint folder; None: start fresh (refused when
    # output_dir already has checkpoints, unless overwrite).
    resume: str | None = "latest"
    overwrite: bool = False
    optimizer: Literal["prodigy", "adamw", "adamw8bit"] = "prodigy"  # adamw8bit: bitsandbytes, CUDA
    lr: float = Field(1.0, gt=0)  # Prodigy's multiplier on its own estimate (1.0); AdamW's learning rate
    weight_decay: float = Field(0.01, ge=0)
    attention_backend: Literal["auto", "math", "flash", "efficient", "cudnn"] = "auto"
    # the loader's bad_samples: skip drops unreadable samples; past this fraction of the samples read, training stops
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    # resume even though the data differ from the checkpoint's (shards replaced, added or removed)
    accept_data_change: bool = False


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    final_dir: Path
    losses_path: Path
    seconds_per_step: float  # mean wall time of the optimizer steps run by this fit() (data loading included)
    resumed_from: int | None  # the checkpoint step this fit() started from; None for a fresh start
    loss_curve_path: Path | None = None


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], settings: TrainSettings
                    ) -> torch.optim.Optimizer:
    """Prodigy (REFERENCE.md A²BFR: bias correction, safeguard warm-up, weight decay), AdamW, or bitsandbytes'
    8-bit AdamW (CUDA) over ``params``."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: set requires_grad on the parameters to train (e.g. the LoRA)")
    if settings.optimizer == "prodigy":
        from prodigyopt import Prodigy

        with contextlib.redirect_stdout(io.StringIO()):  # Prodigy prints "Using decoupled weight decay"
            return Prodigy(params, lr=settings.lr, weight_decay=settings.weight_decay, use_bias_correction=True,
                           safeguard_warmup=True)
    if settings.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def set_attention_backend(name: str) -> None:
    """Choose PyTorch's scaled-dot-product-attention kernels for this process (CUDA only; a no-op on CPU).

    "auto" enables flash, memory-efficient and math attention but not cuDNN attention: on an H100 the backward of a
    FLUX-sized transformer under gradient checkpointing died with "CUDA error: an illegal memory access" with cuDNN
    attention on, twice, and ran with it off (docs ENVIRONMENT.md, GPU machines). "cudnn" allows all four again;
    "math" / "flash" / "efficient" enable only that kernel (for debugging and for comparing numerics).
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if not torch.cuda.is_available():
        return
    cuda = torch.backends.cuda
    only = {"math": "math", "flash": "flash", "efficient": "efficient"}.get(name)
    cuda.enable_math_sdp(only in (None, "math"))
    cuda.enable_flash_sdp(only in (None, "flash"))
    cuda.enable_mem_efficient_sdp(only in (None, "efficient"))
    cuda.enable_cudnn_sdp(name == "cudnn")


# RNG states


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's key as a tensor, so rng.pt loads with weights_only=True
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Hooks (a sample grid at a checkpoint) must not shift the training RNG, or a resumed run would diverge."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


# Checkpoint folders


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete ``checkpoint-N`` folders of a run, sorted by step (temp folders are never listed)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume_checkpoint(settings: TrainSettings) -> Path | None:
    """The checkpoint ``settings.resume`` points at (None: start fresh); raises :class:`CheckpointError` if gone."""
    if settings.resume is None:
        return None
    if settings.resume != "latest":
        path = Path(settings.resume)
        if not (path / STATE_FILE).exists():  # a damaged one is named by verify_checkpoint
            raise CheckpointError(f"resume={settings.resume!r}: {path} is not a checkpoint folder (no {STATE_FILE}); "
                                  f"point resume at a checkpoint-N folder, 'latest', or None to start fresh")
        return path
    root = Path(settings.output_dir) / CHECKPOINTS_DIR
    latest = root / LATEST_FILE
    if latest.is_file():
        path = root / latest.read_text().strip()
        if not (path / STATE_FILE).exists():  # a damaged one is named by verify_checkpoint
            raise CheckpointError(f"{latest} names {path}, which is missing or incomplete (no {STATE_FILE}); "
                                  f"set resume to another checkpoint folder, or resume=None with overwrite=True")
        return path
    found = list_checkpoints(settings.output_dir)  # a crash between the rename and writing `latest`
    return found[-1][1] if found else None


def flatten_tree(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf} (an empty nested mapping stays a leaf)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten_tree(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def json_normal(value: Any) -> Any:
    """What ``value`` reads back as from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def config_differences(saved: dict, current: dict, *, allowed: Iterable[str] = RESUMABLE_CHANGES) -> list[str]:
    """Keys (dotted) whose values differ between two config trees, except keys with a part in ``allowed``."""
    allowed = set(allowed)
    a, b = flatten_tree(json_normal(saved)), flatten_tree(json_normal(current))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in allowed or any(part in allowed for part in key.split(".")):  # a leaf, or a whole allowed subtree
            continue
        old = repr(a[key]) if key in a else "<absent>"
        new = repr(b[key]) if key in b else "<absent>"
        if key not in a or key not in b or a[key] != b[key]:
            diffs.append(f"{key}: {old} in the checkpoint, {new} now")
    return diffs


def _record_files(folder: Path) -> dict[str, dict]:
    """{path relative to ``folder``: file_record} of every file in it but trainer_state.json (subfolders too)."""
    return {p.relative_to(folder).as_posix(): file_record(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != STATE_FILE}


def verify_checkpoint(folder: str | Path, *, require: Iterable[str] = ()) -> dict:
    """The verified ``trainer_state.json`` of a checkpoint or deliverable folder (without its integrity record),
    after checking every file it records against its size and sha256 and that ``require`` (file names) are among
    them. :class:`CheckpointError` (an :class:`ArtifactError`) names the damaged or missing file and the remedy."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise CheckpointError(folder, "not a checkpoint folder (a file)", RESUME_REMEDY)
        if not (folder / STATE_FILE).exists():
            raise CheckpointError(folder / STATE_FILE, "missing: not a checkpoint folder, or one whose writing did "
                                                       "not finish", RESUME_REMEDY)
        state = read_json(folder / STATE_FILE, STATE_KIND)
        files = state.get(FILES_KEY)
        if not isinstance(files, dict):
            raise CheckpointError(folder / STATE_FILE, f"the trainer state records no {FILES_KEY!r}", RESUME_REMEDY)
        try:
            int(state["step"]), int(state["epoch"]), int(state["batches_into_epoch"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(folder / STATE_FILE, f"the trainer state has no valid position ({type(err).__name__}"
                                                       f": {err})", RESUME_REMEDY) from None
        for name in require:
            if name not in files:
                raise CheckpointError(folder / name, "the checkpoint does not record this file (incomplete)",
                                      RESUME_REMEDY)
        for name, record in files.items():
            target = folder / name
            if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(record, dict):
                raise CheckpointError(folder / STATE_FILE, f"the trainer state records an invalid file {name!r}",
                                      RESUME_REMEDY)
            verify_file(target, record, STATE_KIND)
    except ArtifactError as err:
        raise CheckpointError.of(err) from None
    return state


def _read_state(path: Path) -> dict:
    return verify_checkpoint(path, require=CHECKPOINT_FILES)


def write_state(folder: Path, state: dict) -> None:
    """trainer_state.json (kind ``checkpoint.state``): ``state`` and the record of every other file of ``folder``,
    so it must be written last."""
    write_json(folder / STATE_FILE, STATE_KIND, {**state, FILES_KEY: _record_files(folder)})


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "accelerate", "prodigyopt", "diffusers", "peft", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _scalar(value: torch.Tensor | float) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


def read_losses(path: str | Path) -> list[dict]:
    """The rows of a ``losses.jsonl`` (a torn last line from a killed process is skipped)."""
    rows = []
    path = Path(path)
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def _truncate_losses(path: Path, step: int) -> None:
    """Keep rows up to ``step``: a resumed run re-logs the steps after its checkpoint, so no step appears twice."""
    if path.exists():
        kept = [json.dumps(r) for r in read_losses(path) if r.get("step", 0) <= step]
        atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())


class Trainer:
    """One training run over ``settings``; :meth:`fit` starts it or resumes it (``settings.resume``)."""

    def __init__(self, settings: TrainSettings, *, model: torch.nn.Module,
                 loader_factory: Callable[[int], Iterable[dict]],
                 step_fn: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor | float]],
                 save_fn: Callable[[torch.nn.Module, Path], None],
                 config: dict,
                 on_checkpoint: Callable[[int, Path], None] | None = None,
                 log: Callable[[str], None] = print,
                 allow_changes: Iterable[str] = (),
                 accelerator_kwargs: dict[str, Any] | None = None):
        self.settings = settings
        self.model = model
        self.loader_factory = loader_factory
        self.step_fn = step_fn
        self.save_fn = save_fn
        self.config = config
        self.on_checkpoint = on_checkpoint
        self._log = log
        self.allow_changes = RESUMABLE_CHANGES | set(allow_changes)  # more config keys that may change on resume
        # e.g. {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]} when some trainable
        # parameters get no gradient in a step (a dropped condition) under multi-GPU DDP
        self.accelerator_kwargs = dict(accelerator_kwargs or {})
        self.output_dir = Path(settings.output_dir)
        if settings.accept_data_change:
            self.allow_changes |= {DATA_FINGERPRINT}
        self.bad = {"count": 0, "seen": 0, "by_shard": {}}  # bad-sample records met by this process (see data.py)

    # Set-up

    def _check_resumable(self, path: Path, state: dict) -> None:
        saved = {"settings": state.get("settings", {}), "config": state.get("config", {})}
        current = {"settings": self.settings.model_dump(), "config": self.config}
        diffs = config_differences(saved, current, allowed=self.allow_changes)
        data = [d for d in diffs if d.startswith(f"config.{DATA_FINGERPRINT}.")]
        if data:
            raise ResumeMismatchError(
                f"cannot resume from {path}: the training data differ from the data it was trained on:\n  "
                + "\n  ".join(data[:10]) + (f"\n  ... and {len(data) - 10} more" if len(data) > 10 else "")
                + "\nPut the original shards back, train into a new output_dir, or resume on these data anyway "
                  "with train.accept_data_change: true")
        if diffs:
            raise ResumeMismatchError(
                f"cannot resume from {path}: these settings/config keys differ from the checkpoint's and change what "
                f"training computes:\n  " + "\n  ".join(diffs) + "\nRestore them, train into a new output_dir, or "
                f"start over here with resume=None, overwrite=True (only {', '.join(sorted(RESUMABLE_CHANGES))} "
                f"may change on resume)")

    def _start_fresh(self) -> None:
        """resume=None: refuse a folder with checkpoints unless overwrite; then clear this trainer's own files."""
        found = list_checkpoints(self.output_dir)
        if found and not self.settings.overwrite:
            raise OutputDirInUseError(
                f"{self.output_dir} already has checkpoints (steps {', '.join(str(s) for s, _ in found[-3:])}) and "
                f"resume=None: set resume='latest' to continue that run, overwrite=True to start over, or choose "
                f"another output_dir")
        if self.settings.overwrite:
            for name in (CHECKPOINTS_DIR, FINAL_DIR):
                shutil.rmtree(self.output_dir / name, ignore_errors=True)
            (self.output_dir / LOSS_CURVE_FILE).unlink(missing_ok=True)
        (self.output_dir / LOSSES_FILE).unlink(missing_ok=True)

    def _load_checkpoint(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         accelerator: Any) -> dict[str, Any]:
        """Trainable weights and optimizer state into place; returns this process's RNG state (set later)."""
        from safetensors.torch import load_file

        # fit() verified every file of the folder (_read_state -> verify_checkpoint) before this is called
        try:
            saved = load_file(path / TRAINABLE_FILE)
            opt_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            rng = torch.load(path / RNG_FILE, map_location="cpu", weights_only=True)["processes"]
            scaler = (torch.load(path / SCALER_FILE, map_location="cpu", weights_only=True)
                      if (path / SCALER_FILE).is_file() else None)
        except Exception as e:  # noqa: BLE001 - any reader error means the same thing: this checkpoint is corrupt
            raise CheckpointError(path, f"the checkpoint does not load ({type(e).__name__}: {e})", RESUME_REMEDY
                                  ) from e
        params = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise CheckpointError(
                f"{path / TRAINABLE_FILE} does not match the model's trainable parameters: missing "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
                f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}); the model or its "
                f"trainable set (e.g. LoRA rank/targets) differs from the run that wrote it")
        for name, p in params.items():
            if tuple(saved[name].shape) != tuple(p.shape):
                raise CheckpointError(f"{path / TRAINABLE_FILE}: {name} has shape {tuple(saved[name].shape)}, the "
                                      f"model's is {tuple(p.shape)}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        optimizer.load_state_dict(opt_state)
        if scaler is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(scaler)
        index = accelerator.process_index
        if len(rng) != accelerator.num_processes:
            self._main_log(accelerator, f"warning: {path} was written by {len(rng)} processes, this run has "
                                        f"{accelerator.num_processes}; random streams will not continue exactly")
        return rng[index % len(rng)]

    def _main_log(self, accelerator: Any, message: str) -> None:
        if accelerator.is_main_process:
            self._log(message)

    # Writing

    def _state(self, step: int, epoch: int, into: int, accelerator: Any) -> dict:
        return {"step": step, "epoch": epoch, "batches_into_epoch": into, "config": self.config,
                "settings": self.settings.model_dump(), "versions": _versions(), "bad_samples": self.bad,
                "num_processes": accelerator.num_processes, "saved_at": datetime.now(timezone.utc).isoformat()}

    def _write_deliverable(self, folder: Path, model: torch.nn.Module, state: dict) -> None:
        self.save_fn(model, folder)
        atomic_write_json(folder / CONFIG_FILE, self.config)
        write_state(folder, state)  # last: its presence marks the folder complete

    def _save_checkpoint(self, step: int, epoch: int, into: int, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer, accelerator: Any) -> Path:
        from accelerate.utils import gather_object
        from safetensors.torch import save_file

        root = self.output_dir / CHECKPOINTS_DIR
        final = root / f"checkpoint-{step:06d}"
        accelerator.wait_for_everyone()
        rng = gather_object([_rng_state()])  # every process's streams, collected on all (a collective call)
        if accelerator.is_main_process:
            tmp = root / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            unwrapped = accelerator.unwrap_model(model)
            trainable = {n: p.detach().to("cpu", copy=True).contiguous()
                         for n, p in unwrapped.named_parameters() if p.requires_grad}
            save_file(trainable, tmp / TRAINABLE_FILE)
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / SCALER_FILE)
            torch.save({"processes": rng}, tmp / RNG_FILE)
            self._write_deliverable(tmp, unwrapped, self._state(step, epoch, into, accelerator))
            _fsync_tree(tmp)
            if final.exists():  # a later timeline's checkpoint of the same step (resumed from an earlier one)
                old = root / f".old-{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                shutil.rmtree(old)
            tmp.rename(final)
            atomic_write_bytes(root / LATEST_FILE, final.name.encode())
            self._prune(step)
            self._log(f"checkpoint {step}: {final}")
            if self.on_checkpoint is not None:
                with _preserved_rng():
                    self.on_checkpoint(step, final)
                model.train()
        accelerator.wait_for_everyone()
        return final

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep_checkpoints``; drop later steps of an abandoned timeline and crash leftovers."""
        found = list_checkpoints(self.output_dir)
        stale = [p for s, p in found if s > step]
        current = [p for s, p in found if s <= step]
        for p in stale + current[: -self.settings.keep_checkpoints]:
            shutil.rmtree(p, ignore_errors=True)
        for p in (self.output_dir / CHECKPOINTS_DIR).glob(".tmp-checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
        if stale:
            self._log(f"removed checkpoints of an abandoned later run: {', '.join(p.name for p in stale)}")

    def _write_final(self, step: int, epoch: int, into: int, model: torch.nn.Module, accelerator: Any,
                     scalar_keys: list[str]) -> Path | None:
        from attrface_pipeline.plots import loss_curve_png

        final = self.output_dir / FINAL_DIR
        accelerator.wait_for_everyone()
        curve = None
        if accelerator.is_main_process:
            tmp = self.output_dir / f".tmp-{FINAL_DIR}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._write_deliverable(tmp, accelerator.unwrap_model(model), self._state(step, epoch, into, accelerator))
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            rows = read_losses(self.output_dir / LOSSES_FILE)
            if rows:
                keys = [k for k in ("loss", *scalar_keys) if any(k in r for r in rows)]
                curve = self.output_dir / LOSS_CURVE_FILE
                atomic_write_bytes(curve, loss_curve_png(rows, keys=keys, title=f"{self.output_dir.name}: "
                                                                                  f"{step} steps"))
            self._log(f"final weights: {final}")
        accelerator.wait_for_everyone()
        return curve

    # The loop

    def _batches(self, epoch: int, into: int, pending_rng: dict | None) -> Iterator[tuple[int, int, dict]]:
        """(epoch, batches consumed in it, batch) from position (epoch, into) on, epoch after epoch.

        Resuming, the epoch's loader is rebuilt and its first ``into`` batches skipped before the checkpoint's RNG
        state is set: building and reading a loader may draw from the global RNG, as it did before the checkpoint.
        """
        while True:
            batches = iter(self.loader_factory(epoch))
            skipped = sum(1 for _ in itertools.islice(batches, into))
            if skipped < into:
                raise CheckpointError(f"epoch {epoch} has {skipped} batches but the checkpoint had consumed {into}: "
                                      f"the loader differs from the run that wrote it (data or batch size changed)")
            if pending_rng is not None:
                _set_rng_state(pending_rng)
                pending_rng = None
            start = into
            for batch in batches:
                into += 1
                yield epoch, into, batch
            if into == start == 0:
                raise ValueError(f"loader_factory({epoch}) yielded no batches; an epoch needs at least one")
            epoch, into = epoch + 1, 0


    def fit(self) -> TrainResult:
        """Train to ``max_steps`` optimizer steps (resuming per ``settings.resume``); returns where things are."""
        from accelerate import Accelerator
        from accelerate.utils import send_to_device, set_seed
        from tqdm.auto import tqdm

        s = self.settings
        set_attention_backend(s.attention_backend)
        accelerator = Accelerator(mixed_precision=s.mixed_precision,
                                  gradient_accumulation_steps=s.gradient_accumulation_steps, **self.accelerator_kwargs)
        main = accelerator.is_main_process
        resume_path = find_resume_checkpoint(s)
        saved_state = None
        if resume_path is not None:
            saved_state = _read_state(resume_path)
            self._check_resumable(resume_path, saved_state)
        elif main:
            self._start_fresh()
        accelerator.wait_for_everyone()
        set_seed(s.seed, device_specific=True)  # on resume the checkpoint's RNG states replace these streams

        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, s)
        model, optimizer = accelerator.prepare(self.model, optimizer)
        step = epoch = into = 0
        pending_rng = None  # this process's RNG state from the checkpoint, set once the consumed batches are skipped
        resumed_from = None
        if resume_path is not None:
            pending_rng = self._load_checkpoint(resume_path, model, optimizer, accelerator)
            step, epoch, into = (int(saved_state[k]) for k in ("step", "epoch", "batches_into_epoch"))
            self.bad = {"count": 0, "seen": 0, "by_shard": {}, **saved_state.get("bad_samples", {})}
            resumed_from = step
            self._main_log(accelerator, f"resuming from {resume_path} (step {step}, epoch {epoch}, "
                                        f"{into} batches into it)")
        losses_path = self.output_dir / LOSSES_FILE
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _truncate_losses(losses_path, step)
        accelerator.wait_for_everyone()

        model.train()
        bar = tqdm(total=s.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not accelerator.is_local_main_process)
        losses_file = open(losses_path, "a") if main else None  # closed in finally
        step_seconds: list[float] = []
        scalar_keys: list[str] = []
        try:
            micro: dict[str, list[float]] = {}
            grad_norm = None
            t0 = time.perf_counter()
            stream = self._batches(epoch, into, pending_rng) if step < s.max_steps else iter(())
            for epoch, into, batch in stream:
                if not self._count_bad(batch, accelerator):
                    continue  # a batch of bad-sample records only: nothing to train on
                batch = send_to_device(batch, accelerator.device, non_blocking=True)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        out = self.step_fn(model, batch)
                    if "loss" not in out:
                        raise KeyError(f"step_fn must return a dict with a 'loss' tensor; got keys {sorted(out)}")
                    accelerator.backward(out["loss"])
                    if accelerator.sync_gradients and s.grad_clip is not None:
                        grad_norm = accelerator.clip_grad_norm_(params, s.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in out.items():
                    micro.setdefault(k, []).append(_scalar(v))
                if not accelerator.sync_gradients:
                    continue
                step += 1
                seconds = time.perf_counter() - t0
                step_seconds.append(seconds)
                values = {k: sum(v) / len(v) for k, v in micro.items()}
                micro = {}
                scalar_keys = scalar_keys or [k for k in values if k != "loss"]
                if step % s.log_every == 0 or step == s.max_steps:
                    row = self._log_row(step, epoch, values, grad_norm, optimizer, seconds, accelerator)
                    row["bad_samples"] = self.bad["count"]
                    if losses_file is not None:
                        losses_file.write(json.dumps(row) + "\n")
                        losses_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4g}", s_step=f"{seconds:.3g}")
                if step % s.checkpoint_every == 0 or step == s.max_steps:
                    self._save_checkpoint(step, epoch, into, model, optimizer, accelerator)
                if step >= s.max_steps:
                    break
                t0 = time.perf_counter()
        finally:
            bar.close()
            if losses_file is not None:
                losses_file.close()
        curve = self._write_final(step, epoch, into, model, accelerator, scalar_keys)
        seconds_per_step = sum(step_seconds) / len(step_seconds) if step_seconds else 0.0
        self._main_log(accelerator, f"done: {step} steps, {seconds_per_step:.3g} s/step")
        return TrainResult(step=step, output_dir=self.output_dir, final_dir=self.output_dir / FINAL_DIR,
                           losses_path=losses_path, seconds_per_step=seconds_per_step, resumed_from=resumed_from,
                           loss_curve_path=curve)

    def _count_bad(self, batch: dict, accelerator: Any) -> bool:
        """Take the batch's bad-sample records (``training.data.collate``): count them per shard, log each, stop past
        ``max_bad_fraction``. False when the batch holds records only."""
        records = batch.pop("bad_samples", None) or []
        good = len(batch.get("key", ())) if batch else 0
        self.bad["seen"] += good + len(records)
        for r in records:
            self.bad["count"] += 1
            shard = str(r.get("shard"))
            self.bad["by_shard"][shard] = self.bad["by_shard"].get(shard, 0) + 1
            where = f"shard {shard}" + (f", sample {r['key']!r}" if r.get("key") else "")
            self._log(f"skipped a bad sample ({where}): {r.get('reason')}")
        seen, count = self.bad["seen"], self.bad["count"]
        if records and seen >= MIN_SAMPLES_FOR_BAD_FRACTION and count > self.settings.max_bad_fraction * seen:
            worst = sorted(self.bad["by_shard"].items(), key=lambda kv: -kv[1])[:5]
            raise TooManyBadSamplesError(
                f"{count} of the {seen} samples read so far could not be read ({count / seen:.1%} > "
                f"max_bad_fraction {self.settings.max_bad_fraction:.1%}); worst shards: "
                + ", ".join(f"{name} ({n})" for name, n in worst)
                + ". Re-publish those shards, or raise train.max_bad_fraction to train on the rest")
        return bool(batch)

    @staticmethod
    def _log_row(step: int, epoch: int, values: dict[str, float], grad_norm: Any, optimizer: Any, seconds: float,
                 accelerator: Any) -> dict:
        """One losses.jsonl row; scalars are averaged over processes (a collective: every process calls it)."""
        names = list(values)
        local = torch.tensor([values[k] for k in names], dtype=torch.float64, device=accelerator.device)
        mean = accelerator.reduce(local, reduction="mean") if accelerator.num_processes > 1 else local
        row: dict[str, Any] = {"step": step, "epoch": epoch}
        row.update({k: float(v) for k, v in zip(names, mean.tolist())})
        if grad_norm is not None:
            row["grad_norm"] = _scalar(grad_norm)
        group = optimizer.param_groups[0]
        row["lr"] = float(group["lr"])
        if "d" in group:  # Prodigy's step-size estimate: the effective learning rate is lr * d
            row["d"] = float(group["d"])
        row["seconds"] = round(seconds, 6)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


# The registered kind: a real checkpoint of a 1-step run of a tiny model, read back as resuming reads it.


def _example_checkpoint(folder: Path) -> list[Path]:
    """Train a 2->1 linear model for one step (AdamW, CPU-sized) into ``folder/run``; the checkpoint's files, its
    trainer_state.json first."""
    from safetensors.torch import save_file

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.zero_()
    x = torch.arange(8.0).reshape(4, 2) / 8

    def loader(epoch: int) -> Iterator[dict]:
        yield {"x": x, "y": x.sum(1, keepdim=True), "key": ["a", "b", "c", "d"]}

    def step(m: torch.nn.Module, batch: dict) -> dict:
        return {"loss": torch.nn.functional.mse_loss(m(batch["x"]), batch["y"])}

    def save(m: torch.nn.Module, out: Path) -> None:
        (out / "weights").mkdir()
        save_file({"weight": m.weight.detach().contiguous()}, out / "weights" / "model.safetensors")

    settings = TrainSettings(output_dir=str(Path(folder) / "run"), max_steps=1, checkpoint_every=1,
                             optimizer="adamw", lr=1e-3, resume=None)
    with _preserved_rng(), contextlib.redirect_stderr(io.StringIO()):  # no progress bar, no shifted global RNG
        Trainer(settings, model=model, loader_factory=loader, step_fn=step, save_fn=save,
                config={"model": "example"}, log=lambda m: None).fit()
    ckpt = Path(folder) / "run" / CHECKPOINTS_DIR / "checkpoint-000001"
    return [ckpt / STATE_FILE, *(p for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != STATE_FILE)]


def read_checkpoint(state_file: str | Path) -> dict:
    """What resuming reads of the checkpoint holding ``state_file``: its verified state, then the trainable weights,
    optimizer state and RNG states loaded ({"state", "trainable", "optimizer", "rng"})."""
    from safetensors.torch import load_file

    folder = Path(state_file).parent
    state = verify_checkpoint(folder, require=CHECKPOINT_FILES)
    try:
        return {"state": state, "trainable": load_file(folder / TRAINABLE_FILE),
                "optimizer": torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True),
                "rng": torch.load(folder / RNG_FILE, map_location="cpu", weights_only=True)["processes"]}
    except Exception as e:  # noqa: BLE001 - a verified file that does not load was written damaged
        raise CheckpointError(folder, f"the checkpoint does not load ({type(e).__name__}: {e})", RESUME_REMEDY) from e


STATE_KIND = register(ArtifactKind(
    "checkpoint.state", 2, "checkpoint", RESUME_REMEDY, example=_example_checkpoint, read=read_checkpoint))
