"""RoboFace as a :data:`training.restore_faces.RestoreFn`: aligned crops in, restored crops out, in batches.

``weights`` is a trained RoboFace folder -- ``<run>/stage2/final`` (or a stage-2 checkpoint): Mapper, Remover,
ControlNet and the DCA branches, with the ``config.json`` the trainer recorded (N, DCA mode, resolution, image
encoder, captioner). ``base`` is the SD2.1-family pipeline folder it was trained on. Without a user prompt, each
crop's stage-I restoration is captioned by the recorded captioner (``none``: the empty caption).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attrface_pipeline.models.weights import WeightsError, safetensors_shapes
from training.roboface.attention import DCA_FILE
from training.roboface.config import RoboFaceConfig
from training.roboface.model import MANIFEST, RoboFace
from training.roboface.pipeline import RoboFaceRestorer

STAGE2_PARTS = ("mapper", "remover", "controlnet", "dca")


def trained_config(weights: str | Path) -> RoboFaceConfig:
    """The RoboFaceConfig a trained folder was made with (``config.json``'s model section), checked against its
    ``roboface.json`` manifest."""
    weights = Path(weights)
    manifest_path = weights / MANIFEST
    if not manifest_path.is_file():
        if weights.is_file() or (weights / "pytorch_lora_weights.safetensors").is_file():
            raise WeightsError(f"{weights} is an A²BFR LoRA, not a RoboFace run: restore it with --model a2bfr")
        raise FileNotFoundError(f"{weights} is not a trained RoboFace folder (no {MANIFEST}); pass "
                                f"<run>/stage2/final as --weights")
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["num_tokens"], manifest["dca_mode"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{manifest_path}: unreadable RoboFace manifest ({type(err).__name__}: {err}); copy or "
                           f"train the run again") from None
    missing = [p for p in STAGE2_PARTS if p not in manifest.get("parts", [])]
    if missing:
        raise ValueError(f"{weights} lacks {missing} (a stage-I folder?): restoring needs the stage-II model, "
                         f"<run>/stage2/final")
    check_parts(weights)
    record = json.loads((weights / "config.json").read_text()) if (weights / "config.json").is_file() else {}
    model = {k: v for k, v in (record.get("model") or {}).items() if k in RoboFaceConfig.model_fields}
    cfg = RoboFaceConfig.model_validate(model)
    return cfg.model_copy(update={"num_tokens": manifest["num_tokens"],
                                  "dca": cfg.dca.model_copy(update={"mode": manifest["dca_mode"]})})


def check_parts(weights: Path, parts=STAGE2_PARTS) -> None:
    """Every part's weight files present and readable (safetensors headers), before anything loads."""
    for part in parts:
        if part == "dca":
            safetensors_shapes(weights / DCA_FILE, what="RoboFace DCA weights")
            continue
        folder = weights / part
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if not (folder / "config.json").is_file() or not files:
            raise WeightsError(f"{folder}: missing or incomplete (a config.json and .safetensors weights expected, "
                               f"found {sorted(p.name for p in folder.iterdir()) if folder.is_dir() else 'nothing'})"
                               f"; copy or train the run again")
        for file in files:
            safetensors_shapes(file, what=f"RoboFace {part}")


@dataclass
class RoboFaceRestoreFn:
    restorer: RoboFaceRestorer
    prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 4

    def settings(self) -> dict:
        """Everything that decides the output, for the settings file written beside the results."""
        model = self.restorer.model
        return {"prompt": self.prompt, "steps": self.steps, "guidance": self.guidance, "seed": self.seed,
                "batch_size": self.batch_size, "resolution": model.config.resolution,
                "num_tokens": model.config.num_tokens, "dca_mode": model.config.dca.mode,
                "captioner": type(self.restorer.captioner).__name__ if self.restorer.captioner else None}

    def __call__(self, crops: list[np.ndarray], prompts: list[str] | None = None) -> list[np.ndarray]:
        """Restore aligned crops; ``prompts`` (one per crop) replace the captions, as ``prompt`` does."""
        if prompts is not None and len(prompts) != len(crops):
            raise ValueError(f"{len(prompts)} prompts for {len(crops)} crops")
        out: list[np.ndarray] = []
        for start in range(0, len(crops), self.batch_size):
            text = prompts[start:start + self.batch_size] if prompts is not None else self.prompt
            # each crop's noise comes from seed + its index in the call (the restorer adds the index in the batch)
            out += self.restorer.restore(crops[start:start + self.batch_size], text, steps=self.steps,
                                         guidance=self.guidance, seed=self.seed + start)
        return out


def load_restorer(base: str | Path, weights: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, captioner=None, store=None) -> RoboFaceRestorer:
    """The bundle from ``base`` + the trained parts of ``weights``; the recorded captioner unless one is given.
    ``store`` (a ModelStore) resolves a separate image encoder / a transformers captioner (default: the pipeline
    config's)."""
    from training.roboface.captioner import build_captioner

    cfg = trained_config(weights)
    if store is None and (cfg.image_encoder or cfg.caption.backend == "transformers"):
        from attrface_pipeline.config import load_config
        from attrface_pipeline.models.store import ModelStore

        store = ModelStore.from_config(load_config())
    model = RoboFace.from_pretrained(base, config=cfg, trained=weights,
                                     image_encoder=store.resolve(cfg.image_encoder) if cfg.image_encoder else None,
                                     dtype=None if dtype == torch.float32 else dtype)
    # the bundle keeps trained parts in fp32 for training; restoring, everything runs in the restore dtype
    model = model.to(device=device, dtype=dtype).eval()
    return RoboFaceRestorer(model, captioner if captioner is not None else build_captioner(cfg.caption, store))


def build_restorer(base: str | Path, weights: str | Path, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, prompt: str | None = None, steps: int | None = None,
                   guidance_scale: float | None = None, image_guidance_scale: float | None = None,
                   seed: int = 0) -> RoboFaceRestoreFn:
    """The ``attrface restore --model roboface`` entry point (None: the model's restore defaults, 50 steps, CFG
    7.5). ``prompt`` replaces the caption of the stage-I restoration."""
    if image_guidance_scale is not None:
        raise ValueError("RoboFace has no image guidance (its LQ condition is the ControlNet); leave "
                         "--image-guidance unset")
    return RoboFaceRestoreFn(load_restorer(base, weights, device=device, dtype=dtype), prompt=prompt, steps=steps,
                             guidance=guidance_scale, seed=seed)
