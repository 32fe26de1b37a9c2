"""Attribute classification on aligned faces: FaRL input warp, batched inference, three-state decisions."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from attrface_pipeline.attributes import CELEBA_ATTRIBUTES, NEGATIVE, POSITIVE, UNKNOWN
from attrface_pipeline.models.farl import CLIP_MEAN, CLIP_STD, FaRLAttributeModel
from attrface_pipeline.stages.align import align_face, template_points

FARL_SIZE = 224


def farl_input(crop: np.ndarray, landmarks5: np.ndarray | None = None, size: int = FARL_SIZE) -> np.ndarray:
    """(3, size, size) float32 CLIP-normalised input from an aligned HWC uint8 crop.

    ``landmarks5`` are the face's 5 points in crop pixels; without them the crop is assumed FFHQ-aligned and the
    template's points stand in (what our 512 crops are by construction, up to the fit residual).
    """
    if landmarks5 is None:
        landmarks5 = template_points("ffhq", crop.shape[0])
    warped, _ = align_face(crop, np.asarray(landmarks5, np.float64), size=size, template="farl")
    x = warped.astype(np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class AttributeClassifier:
    """Batched FaRL inference on any device: ``predict(crops) -> (N, 40)`` sigmoid probabilities (float32)."""

    def __init__(self, model: FaRLAttributeModel, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        # cast only when needed: diffusers warns on every dtype cast of a ModelMixin
        model = model.to(self.device) if model.dtype == dtype else model.to(self.device, dtype)
        self.model = model.eval()
        if model.config.num_classes != len(CELEBA_ATTRIBUTES):
            raise ValueError(f"attribute model has {model.config.num_classes} outputs, expected 40 CelebA attributes")
        self.input_size = model.config.image_size

    @torch.inference_mode()
    def predict(self, crops: Sequence[np.ndarray], landmarks5: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
        if landmarks5 is None:
            landmarks5 = [None] * len(crops)
        if len(landmarks5) != len(crops):
            raise ValueError(f"{len(crops)} crops but {len(landmarks5)} landmark sets")
        out = np.zeros((len(crops), len(CELEBA_ATTRIBUTES)), np.float32)
        for start in range(0, len(crops), self.batch_size):
            stop = start + self.batch_size
            batch = np.stack([farl_input(c, lm, self.input_size)
                              for c, lm in zip(crops[start:stop], landmarks5[start:stop])])
            x = torch.from_numpy(batch).to(self.device, self.dtype)
            out[start:stop] = self.model(x).float().cpu().numpy()
        return out


def attribute_state(p: float, positive_threshold: float = 0.6, negative_threshold: float = 0.4) -> str:
    """positive above the upper threshold, negative below the lower one, unknown in between (never flipped)."""
    if p > positive_threshold:
        return POSITIVE
    if p < negative_threshold:
        return NEGATIVE
    return UNKNOWN


def attribute_states(probs: np.ndarray, names: Sequence[str], positive_threshold: float = 0.6,
                     negative_threshold: float = 0.4) -> list[dict[str, str]]:
    """Per face, ``{name: state}`` for the named attributes (e.g. the controllable ones) from (N, 40) probs."""
    idx = [CELEBA_ATTRIBUTES.index(n) for n in names]
    return [
        {n: attribute_state(float(row[i]), positive_threshold, negative_threshold) for n, i in zip(names, idx)}
        for row in np.asarray(probs)
    ]


ATTRIBUTE_SCHEMA = pa.schema(
    [
        ("face_key", pa.string()),
        ("image_key", pa.string()),
        ("aligned_path", pa.string()),  # the faces partition's crop, relative to its directory
        ("probabilities", pa.list_(pa.float32(), len(CELEBA_ATTRIBUTES))),  # CELEBA_ATTRIBUTES order
        ("states", pa.string()),  # JSON {name: positive|negative|unknown} over the controllable attributes
        ("known", pa.int32()),  # how many controllable attributes are not unknown
        ("model_id", pa.string()),
    ]
)


def classify_faces(face_rows: Sequence[dict], read_crop: Callable[[str], np.ndarray], classifier: AttributeClassifier,
                   controllable: Sequence[str], positive_threshold: float, negative_threshold: float,
                   model_id: str) -> list[dict]:
    """Rows of :data:`ATTRIBUTE_SCHEMA` for the ``status == ok`` faces of a faces manifest."""
    ok = [r for r in face_rows if r["status"] == "ok"]
    out: list[dict] = []
    for start in range(0, len(ok), classifier.batch_size):  # bounded memory: crops are read one batch at a time
        batch = ok[start:start + classifier.batch_size]
        crops = [read_crop(r["aligned_path"]) for r in batch]
        landmarks = [np.asarray(r["aligned_landmarks5"], np.float64).reshape(5, 2) for r in batch]
        probs = classifier.predict(crops, landmarks)
        states = attribute_states(probs, controllable, positive_threshold, negative_threshold)
        for row, p, s in zip(batch, probs, states):
            out.append({
                "face_key": row["face_key"], "image_key": row["image_key"], "aligned_path": row["aligned_path"],
                "probabilities": [float(v) for v in p], "states": json.dumps(s),
                "known": sum(v != UNKNOWN for v in s.values()), "model_id": model_id,
            })
    return out


def state_counts(rows: Sequence[dict], names: Sequence[str]) -> list[dict]:
    """Per attribute: how many faces are positive / negative / unknown, and the mean probability."""
    table = []
    for name in names:
        idx = CELEBA_ATTRIBUTES.index(name)
        states = [json.loads(r["states"]).get(name, UNKNOWN) for r in rows]
        probs = [r["probabilities"][idx] for r in rows]
        table.append({
            "attribute": name, POSITIVE: states.count(POSITIVE), NEGATIVE: states.count(NEGATIVE),
            UNKNOWN: states.count(UNKNOWN), "mean_p": round(float(np.mean(probs)), 4) if probs else 0.0,
        })
    return table
