"""ModelStore: turn a model spec from the config into a local directory, or fail with the fix.

Specs:
- an existing local path (file or directory) -> itself;
- ``tiny/<name>`` -> ``<cache>/tiny/<name>``, generated deterministically on first use (offline zoo);
- ``org/name`` or ``org/name@revision`` -> a Hugging Face hub snapshot in ``<cache>/hub``: read from the cache
  offline; downloaded only when ``allow_download`` is on (and the licence accepted on the hub);
- a bare name such as ``buffalo_l`` -> an insightface model pack under ``<cache>/insightface/models/<name>``.

Nothing is downloaded at import time, and nothing is written outside ``cache_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from attrface_pipeline.config import PipelineConfig


class ModelNotAvailableError(RuntimeError):
    """A model spec cannot be resolved to local files; the message says how to fix it."""


def _split_revision(spec: str) -> tuple[str, str | None]:
    if "@" in spec:
        repo, rev = spec.rsplit("@", 1)
        return repo, rev or None
    return spec, None


class ModelStore:
    def __init__(self, cache_dir: str | Path, allow_download: bool = False):
        self.cache_dir = Path(cache_dir)
        self.allow_download = allow_download

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> ModelStore:
        return cls(cfg.paths.cache_dir, allow_download=cfg.models.allow_download)

    @property
    def hub_cache(self) -> Path:
        return self.cache_dir / "hub"

    def resolve(self, spec: str) -> Path:
        """Local path for ``spec``; raises :class:`ModelNotAvailableError` with an actionable message."""
        if not spec:
            raise ModelNotAvailableError("empty model spec; set it in the config (models.*)")
        local = Path(spec).expanduser()
        if local.is_absolute() or spec.startswith((".", "~")):
            if local.exists():
                return local
            raise ModelNotAvailableError(f"model path {local} does not exist; point the config at a downloaded copy")
        if spec.startswith("tiny/"):
            return self._tiny(spec.split("/", 1)[1])
        if "/" not in spec:
            return self._insightface_pack(spec)
        return self._hub(spec)

    def check(self, spec: str) -> str | None:
        """Why ``spec`` cannot be resolved, or None when it can: no generation, no download (a preflight)."""
        if spec.startswith("tiny/"):
            from attrface_pipeline.models import tiny

            name = spec.split("/", 1)[1]
            if name in tiny.GENERATORS:
                return None
            return f"unknown tiny model {name!r}; available: {sorted(tiny.GENERATORS)}"
        if "/" in spec and not spec.startswith((".", "~", "/")) and self.allow_download \
                and os.environ.get("HF_HUB_OFFLINE") != "1":
            return None  # fetched on first use
        try:
            self.resolve(spec)
        except ModelNotAvailableError as err:
            return str(err)
        return None

    # -- offline zoo -------------------------------------------------------------------------------------------
    def _tiny(self, name: str) -> Path:
        from attrface_pipeline.models import tiny

        if name not in tiny.GENERATORS:
            raise ModelNotAvailableError(f"unknown tiny model {name!r}; available: {sorted(tiny.GENERATORS)}")
        target = self.cache_dir / "tiny" / name
        if _zoo_version(target / tiny.DONE_MARKER) == tiny.ZOO_VERSION:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build in a sibling temp dir and rename: a crash never leaves a half-written model behind.
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        try:
            tiny.generate(name, tmp)
            if _zoo_version(target / tiny.DONE_MARKER) == tiny.ZOO_VERSION:  # a concurrent run finished first
                shutil.rmtree(tmp)
                return target
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if _zoo_version(target / tiny.DONE_MARKER) == tiny.ZOO_VERSION:  # replaced under us by a complete one
                return target
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    # -- insightface packs ---------------------------------------------------------------------------------------
    def _insightface_pack(self, name: str) -> Path:
        pack = self.cache_dir / "insightface" / "models" / name
        if pack.is_dir() and any(pack.glob("*.onnx")):
            return pack
        raise ModelNotAvailableError(
            f"insightface model pack {name!r} not found at {pack}. insightface packs are not downloaded by this "
            f"project: get {name}.zip from the insightface model zoo on a connected machine (check its licence: "
            f"the buffalo packs are for non-commercial research), unzip it so the .onnx files sit in {pack}, or "
            f"set models.insightface_pack to the directory holding them."
        )

    # -- hugging face hub ----------------------------------------------------------------------------------------
    def _hub(self, spec: str) -> Path:
        from huggingface_hub import snapshot_download

        repo_id, revision = _split_revision(spec)
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=self.hub_cache, local_files_only=True))
        except Exception as cached_error:  # noqa: BLE001 - any cache miss falls through to the download/advice
            if not self.allow_download or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise ModelNotAvailableError(
                    f"model {repo_id!r}{f' (revision {revision})' if revision else ''} is not in the cache "
                    f"{self.hub_cache} and downloads are off. Either: (1) on a machine with internet, accept the "
                    f"model licence at https://huggingface.co/{repo_id}, then run "
                    f"`hf download {repo_id} --cache-dir {self.hub_cache}` and copy the cache here; (2) set "
                    f"models.allow_download: true (needs network and an HF token with access); or (3) point the "
                    f"config at a local directory. Offline, the default profile uses tiny/* models. "
                    f"[{type(cached_error).__name__}]"
                ) from None
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=self.hub_cache))
        except Exception as e:  # noqa: BLE001
            raise ModelNotAvailableError(
                f"downloading {repo_id!r} failed ({type(e).__name__}: {e}). Gated models (FLUX.1-dev, SD3.5) need "
                f"their licence accepted on the hub and `hf auth login` (or HF_TOKEN) first."
            ) from e


class ModelsMissingError(ModelNotAvailableError):
    """Several models are missing; one line per config key."""


# How to get each model when its check fails (appended to the store's own message).
FETCH_HINTS = {
    "farl": "facer publishes it as a GitHub release file of FacePerceiver/facer (face_attribute.farl.celeba.pt, "
            "FaRL/facer terms): download it to that path",
    "qwen3": "`hf download Qwen/Qwen3-8B --cache-dir <cache_dir>/hub` on a connected machine (Apache-2.0)",
}


def required_models(cfg: PipelineConfig, steps: Iterable[str]) -> dict[str, str]:
    """The ``models.*`` keys (-> specs) the given asset steps will load under this config."""
    steps = set(steps)
    need: dict[str, str] = {}
    if steps & {"faces", "real_lq"} and cfg.detect.backend == "insightface" and (
            "faces" in steps or cfg.benchmarks.real_lq_align == "detect"):
        need["insightface_pack"] = cfg.models.insightface_pack
    if steps & {"face_attributes", "qc"}:
        need["farl"] = cfg.models.farl
    if "edit_prompts" in steps and cfg.verbalize.backend == "transformers":
        need["qwen3"] = cfg.models.qwen3
    if "edits" in steps:
        need["sd3"] = cfg.models.sd3
    if steps & {"qc", "face_identities"} and cfg.qc.identity_backend == "arcface":
        need["insightface_pack"] = cfg.models.insightface_pack
    if steps & {"roboface_stage1", "roboface_model"}:
        need["sd2_controlnet"] = cfg.models.sd2_controlnet
    if "a2bfr_lora" in steps:
        need["flux"] = cfg.models.flux
        need["farl"] = cfg.models.farl
    return need


def check_models(cfg: PipelineConfig, steps: Iterable[str]) -> None:
    """Raise :class:`ModelsMissingError` listing every missing model of these steps, with its key and the fix."""
    store = ModelStore.from_config(cfg)
    problems = [f"models.{key} = {spec!r}: {why}" + (f" Fetch: {FETCH_HINTS[key]}." if key in FETCH_HINTS else "")
                for key, spec in required_models(cfg, steps).items() if (why := store.check(spec))]
    if problems:
        raise ModelsMissingError(f"{len(problems)} model(s) missing for this run (profile {cfg.profile}):\n"
                                 + "\n".join(f"  - {p}" for p in problems))


def _zoo_version(marker: Path) -> int | None:
    try:
        return json.loads(marker.read_text()).get("version", 1)
    except (FileNotFoundError, ValueError):
        return None


def model_fingerprint(spec: str) -> str:
    """What identifies a model spec's weights in asset fingerprints: the spec, plus the zoo version for tiny/."""
    if spec.startswith("tiny/"):
        from attrface_pipeline.models.tiny import ZOO_VERSION

        return f"{spec}@zoo{ZOO_VERSION}"
    return spec
