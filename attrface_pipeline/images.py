"""Image conventions in one place: HWC uint8 RGB ``np.ndarray`` across stage boundaries."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}


def encode_image(rgb: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode an HWC uint8 RGB array; png/webp lossless, jpg at ``quality`` with 4:4:4 chroma."""
    check_rgb(rgb)
    buf = io.BytesIO()
    im = Image.fromarray(rgb, "RGB")
    if fmt == "png":
        im.save(buf, "PNG", compress_level=4)
    elif fmt == "jpg":
        im.save(buf, "JPEG", quality=quality, subsampling=0)
    elif fmt == "webp":
        im.save(buf, "WEBP", lossless=True)
    else:
        raise ValueError(f"unsupported image format {fmt!r}; use one of {sorted(EXTENSIONS)}")
    return buf.getvalue()


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file written by this project (already RGB, orientation applied)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def check_rgb(rgb: np.ndarray) -> None:
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        shape = getattr(rgb, "shape", None)
        raise ValueError(f"expected HWC uint8 RGB array, got {type(rgb).__name__} {getattr(rgb, 'dtype', '')} {shape}")


def preview_grid(images: Sequence[np.ndarray], tile: int = 96, columns: int = 6) -> np.ndarray:
    """Tile RGB images (resized to ``tile`` px squares) into one grid image; an empty list gives a blank tile."""
    if not images:
        return np.full((tile, tile, 3), 255, np.uint8)
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    grid = np.full((rows * tile, columns * tile, 3), 255, np.uint8)
    for i, img in enumerate(images):
        small = np.asarray(Image.fromarray(img).resize((tile, tile), Image.Resampling.BILINEAR))
        r, c = divmod(i, columns)
        grid[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = small
    return grid
