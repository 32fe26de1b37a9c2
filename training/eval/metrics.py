"""Image-quality metrics over HWC uint8 RGB arrays (the evaluation issue extends this module)."""

from __future__ import annotations

import numpy as np


def psnr(pred: np.ndarray, gt: np.ndarray, *, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels; ``inf`` for identical images."""
    if pred.shape != gt.shape:
        raise ValueError(f"PSNR needs equal shapes, got {pred.shape} and {gt.shape}")
    mse = float(np.mean((pred.astype(np.float64) - gt.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak * peak / mse))
