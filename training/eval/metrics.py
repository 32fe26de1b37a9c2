"""Image-quality metrics: plain functions over lists of HWC uint8 RGB arrays, batched, on CPU or GPU.

Full-reference: PSNR and SSIM (torchmetrics, float64, RGB, data range 255; SSIM with the usual 11x11 Gaussian window,
sigma 1.5), LPIPS (AlexNet v0.1, :class:`training.eval.networks.LPIPS`), IDS (identity cosine through the QC
identity backend: ArcFace on a full install, dlib's descriptor offline). Distribution: FID (Fréchet distance of
feature statistics; the extractor is selectable). Between two restorations: CP-IDS. No-reference (MUSIQ, MANIQA,
CLIP-IQA, HyperIQA, TopIQ): through ``pyiqa``, an optional extra (it needs torchvision and downloads its weights),
so the numbers are the ones the papers report; :class:`MetricUnavailable` names the extra when it is absent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

IQA_EXTRA = "pip install 'attrface[iqa]' (pyiqa; needs torchvision, so a GPU box with a CUDA torch)"


class MetricUnavailable(RuntimeError):
    """A metric cannot run on this install; the message says why and how to enable it."""


# --- helpers -----------------------------------------------------------------------------------------------------
def _check_pairs(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> None:
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} references")
    for i, (p, g) in enumerate(zip(preds, gts)):
        if p.shape != g.shape:
            raise ValueError(f"pair {i}: shapes differ ({p.shape} vs {g.shape}); resize predictions to the GT size")


def to_tensor(images: Sequence[np.ndarray], *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, scale: float = 1 / 255) -> torch.Tensor:
    """(N, 3, H, W) tensor from equal-shaped HWC uint8 RGB arrays, multiplied by ``scale`` ([0, 1] by default)."""
    batch = torch.from_numpy(np.stack([np.ascontiguousarray(im) for im in images])).to(device)
    return batch.permute(0, 3, 1, 2).to(dtype) * scale


def _batched(fn: Callable[[list, list], torch.Tensor], a: Sequence, b: Sequence, batch_size: int) -> np.ndarray:
    """``fn`` over batches of at most ``batch_size`` consecutive pairs of one image shape (a folder may hold faces
    of several sizes: a batch never mixes them), concatenated in order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r}: expected a whole number >= 1")
    out, start = [], 0
    while start < len(a):
        end = start + 1
        while end < len(a) and end - start < batch_size and np.shape(a[end]) == np.shape(a[start]):
            end += 1
        out.append(fn(list(a[start:end]), list(b[start:end])).detach().cpu().double().reshape(-1))
        start = end
    return torch.cat(out).numpy() if out else np.zeros(0)


# --- full reference ------------------------------------------------------------------------------------------------
def psnr_batch(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], *, batch_size: int = 16,
               device: torch.device | str = "cpu") -> np.ndarray:
    """Per-pair PSNR in dB over RGB (``inf`` for identical images)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pairs(preds, gts)

    def one(p, g):
        x = to_tensor(p, device=device, dtype=torch.float64, scale=1.0)
        y = to_tensor(g, device=device, dtype=torch.float64, scale=1.0)
        return peak_signal_noise_ratio(x, y, data_range=255.0, reduction="none", dim=(1, 2, 3))

    return _batched(one, preds, gts, batch_size)


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """PSNR in dB of one pair (the benchmark sets record LQ vs GT with it)."""
    return float(psnr_batch([pred], [gt])[0])


def ssim_batch(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], *, batch_size: int = 16,
               device: torch.device | str = "cpu") -> np.ndarray:
    """Per-pair SSIM (Wang et al. 2004: Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03), mean over RGB channels.

    In float32: CPU convolutions in float64 are ~20x slower (18 s for four 512² pairs). float32 agrees with the
    float64 computation within 3e-5 on real faces and 1e-4 on flat images (the worst case; tested), within the 4
    decimals tables report."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pairs(preds, gts)

    def one(p, g):
        x, y = to_tensor(p, device=device), to_tensor(g, device=device)  # float32 in [0, 1]
        return structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")

    return _batched(one, preds, gts, batch_size)


@torch.no_grad()
def lpips_batch(model: torch.nn.Module, preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], *,
                batch_size: int = 8) -> np.ndarray:
    """Per-pair LPIPS distance (lower is closer) with a :class:`training.eval.networks.LPIPS` model."""
    _check_pairs(preds, gts)
    device = next(model.parameters()).device
    return _batched(lambda p, g: model(to_tensor(p, device=device), to_tensor(g, device=device)), preds, gts,
                    batch_size)


class IdentityScorer(Protocol):
    """``attrface_pipeline.stages.checks`` scorers (ArcFace, dlib) satisfy this."""

    name: str

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray: ...


def identity_cosines(scorer: IdentityScorer, a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """Per pair, the cosine of the two faces' identity embeddings: IDS (restoration vs GT) and CP-IDS (two
    restorations of one LQ under different prompts). Images are aligned crops (FFHQ template)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} faces for {len(b)} faces")
    if not len(a):
        return np.zeros(0)
    ea, eb = np.asarray(scorer.embed(list(a)), np.float64), np.asarray(scorer.embed(list(b)), np.float64)
    ea /= np.linalg.norm(ea, axis=1, keepdims=True) + 1e-12
    eb /= np.linalg.norm(eb, axis=1, keepdims=True) + 1e-12
    return np.einsum("ij,ij->i", ea, eb)


# --- distribution ----------------------------------------------------------------------------------------------------
class FeatureExtractor(Protocol):
    name: str

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...  # (N, 3, H, W) in [0, 1] -> (N, D)


@torch.no_grad()
def image_features(extractor: torch.nn.Module, images: Sequence[np.ndarray], *, batch_size: int = 16) -> np.ndarray:
    """(N, D) float64 features of ``images`` (any sizes: each batch groups equal shapes in order)."""
    device = next(extractor.parameters()).device
    feats = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        shapes = {im.shape for im in chunk}
        groups = [chunk] if len(shapes) == 1 else [[im] for im in chunk]
        feats += [extractor(to_tensor(g, device=device)).double().cpu() for g in groups]
    return torch.cat(feats).numpy() if feats else np.zeros((0, 0))


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two (N, D) feature sets, exact (no sqrtm iteration).

    With centred features X_a, X_b and c = (n_a - 1)(n_b - 1), the eigenvalues of S_a S_b are those of
    (X_a X_b^T)^T (X_a X_b^T) / c (plus zeros), so Tr((S_a S_b)^1/2) is the nuclear norm of X_a X_b^T / sqrt(c): an
    n_a x n_b problem, cheap for evaluation-sized sets. Large sets use Tr((A S_b A)^1/2) with A = S_a^1/2 (D x D).
    Both stay real and exact when few samples make the covariances singular.
    """
    feats_a, feats_b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError(f"FID needs at least 2 images per side (got {len(feats_a)} and {len(feats_b)})")
    (na, dim), nb = feats_a.shape, len(feats_b)
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    xa, xb = feats_a - mu_a, feats_b - mu_b
    trace_a, trace_b = np.sum(xa * xa) / (na - 1), np.sum(xb * xb) / (nb - 1)
    if na * nb <= max(dim * dim, 4096 * 4096):
        cross = np.linalg.svd(xa @ xb.T / np.sqrt((na - 1) * (nb - 1)), compute_uv=False).sum()
    else:
        root = _psd_sqrt(xa.T @ xa / (na - 1))
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ (xb.T @ xb / (nb - 1)) @ root), 0, None)).sum()
    return float(max(np.sum((mu_a - mu_b) ** 2) + trace_a + trace_b - 2 * cross, 0.0))


def fid(extractor: torch.nn.Module, preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], *,
        batch_size: int = 16) -> float:
    """FID between two image sets with ``extractor`` (Inception-v3 pool3 for the standard number)."""
    return frechet_distance(image_features(extractor, preds, batch_size=batch_size),
                            image_features(extractor, refs, batch_size=batch_size))


class HFVisionFeatures(torch.nn.Module):
    """Pooled features of a transformers vision tower (CLIP vision, DINOv2, ...) for FID-style distances.

    Loaded with ``from_pretrained`` from a local folder (a ModelStore spec resolved by the caller); images are
    resized to the model's ``image_size`` and normalised with its processor's mean and std.
    """

    def __init__(self, folder: str | Path):
        super().__init__()
        import json

        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        vision_cfg = getattr(self.model.config, "vision_config", self.model.config)
        self.size = int(getattr(vision_cfg, "image_size", 224))
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
        proc = Path(folder) / "preprocessor_config.json"
        if proc.is_file():
            p = json.loads(proc.read_text())
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.name = f"hf:{self.model.config.model_type}"

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(batch, size=(self.size, self.size), mode="bicubic", align_corners=False,
                                            antialias=True)
        out = self.model(pixel_values=((x - self.mean) / self.std).to(self.model.dtype))
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = getattr(out, "image_embeds", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float()


# --- no reference ------------------------------------------------------------------------------------------------
PYIQA_NAMES = {"musiq": "musiq", "maniqa": "maniqa", "clipiqa": "clipiqa", "hyperiqa": "hyperiqa",
               "topiq": "topiq_nr"}


class NoReferenceIQA:
    """A pyiqa no-reference metric (higher is better for all five the papers report)."""

    def __init__(self, name: str, *, device: torch.device | str = "cpu"):
        try:
            import pyiqa
        except ImportError as err:  # pyiqa itself, or torchvision under it
            raise MetricUnavailable(f"{name} needs pyiqa, which is not importable ({err}): {IQA_EXTRA}") from None
        self.name = name
        self.metric = pyiqa.create_metric(PYIQA_NAMES.get(name, name), device=torch.device(device), as_loss=False)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        device = next(iter(self.metric.parameters()), torch.zeros(0)).device
        out = [self.metric(to_tensor([im], device=device)).double().cpu().reshape(-1) for im in images]
        return torch.cat(out).numpy() if out else np.zeros(0)
