"""Ingest: list source photos, split them into chunks, and decode each one safely.

Bad inputs never raise out of :func:`ingest_file`: each becomes a record with ``status="quarantined"`` and a
reason from :class:`Reason`. :func:`load_rgb` is the single place a source file becomes an RGB array (EXIF
orientation applied, modes converted), so every later stage sees the same pixels that ingest validated.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

KEY_LENGTH = 16  # hex chars of sha256: 64 bits, collision-free far beyond 100M images
SUPPORTED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"}
# Modes PIL converts to RGB without losing meaning; alpha is composited on white.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIMPLE_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "P", "LAB", "HSV", "RGBX"}
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class Reason(str, Enum):
    not_an_image = "not_an_image"
    unsupported_format = "unsupported_format"
    unsupported_mode = "unsupported_mode"
    truncated = "truncated"
    too_small = "too_small"
    decompression_bomb = "decompression_bomb"
    unreadable = "unreadable"
    duplicate = "duplicate"


class QuarantineError(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class SourceRecord:
    key: str
    source_path: str
    sha256: str
    width: int
    height: int
    format: str
    mode: str
    orientation: int
    status: str  # "ok" | "quarantined"
    reason: str  # "" when ok
    detail: str


SOURCE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_path", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("orientation", pa.int32()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def list_sources(specs: Iterable[str], extensions: Iterable[str]) -> list[str]:
    """Absolute paths of source images, in a stable order: per spec, sorted; specs in the given order.

    A spec is a folder (scanned recursively), a glob pattern, a ``.txt`` file listing one path per line
    (relative paths resolve against the list file's folder; ``#`` starts a comment), or a single file.
    New data appended as a new spec leaves earlier chunks unchanged.
    """
    exts = {e.lower() for e in extensions}
    seen: set[str] = set()
    out: list[str] = []

    def add(paths: Iterable[str]) -> None:
        for p in sorted(paths):
            p = os.path.abspath(p)
            if p not in seen:
                seen.add(p)
                out.append(p)

    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            add(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        elif path.suffix.lower() == ".txt" and path.is_file():
            lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
            add(str((path.parent / ln) if not os.path.isabs(ln) else Path(ln)) for ln in lines if ln)
        elif any(ch in spec for ch in "*?["):
            add(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        elif path.is_file():
            add([str(path)])
        else:
            raise FileNotFoundError(f"source {spec!r} is not a folder, list file, glob or file")
    return out


def chunk_key(index: int) -> str:
    return f"chunk-{index:05d}"


def chunk_sources(paths: list[str], chunk_size: int) -> dict[str, list[str]]:
    """Split the ordered source list into partitions ``chunk-00000``, ``chunk-00001``, ..."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return {chunk_key(i // chunk_size): paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)}


def sample_key(sha256_hex: str) -> str:
    """Short content hash: the same photo always gets the same key (hex only, so never a dot)."""
    return sha256_hex[:KEY_LENGTH]


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in _WIDE_MODES:
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:  # 32-bit int or float: stretch the actual range
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIMPLE_MODES:
        return im.convert("RGB")
    raise QuarantineError(Reason.unsupported_mode, f"image mode {mode!r} has no sensible RGB conversion")


def decode_image(data: bytes, *, min_side: int, max_pixels: int) -> tuple[np.ndarray, dict]:
    """Decode bytes to HWC uint8 RGB with EXIF orientation applied; raise :class:`QuarantineError` on bad input."""
    import io

    if not data:
        raise QuarantineError(Reason.not_an_image, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise QuarantineError(Reason.not_an_image, "no image decoder recognises this file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise QuarantineError(Reason.decompression_bomb, str(e)) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-file quarantine, never a crash
        raise QuarantineError(Reason.unreadable, f"{type(e).__name__}: {e}") from None
    with im:
        fmt = im.format or "?"
        if fmt not in SUPPORTED_FORMATS:
            raise QuarantineError(Reason.unsupported_format, f"format {fmt} is not one of {sorted(SUPPORTED_FORMATS)}")
        width, height = im.size
        if width * height > max_pixels:  # checked on the header, before any pixel is decoded
            raise QuarantineError(Reason.decompression_bomb, f"{width}x{height} exceeds max_pixels={max_pixels}")
        orientation = int(im.getexif().get(0x0112, 1) or 1)
        mode = im.mode
        try:
            im.load()
        except OSError as e:
            reason = Reason.truncated if "truncated" in str(e).lower() or "broken" in str(e).lower() else Reason.unreadable
            raise QuarantineError(reason, f"{type(e).__name__}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise QuarantineError(Reason.unreadable, f"{type(e).__name__}: {e}") from None
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a malformed EXIF block should not lose the image
            upright = im
        rgb = _to_rgb(upright)
    if min(rgb.size) < min_side:
        raise QuarantineError(Reason.too_small, f"{rgb.size[0]}x{rgb.size[1]} has a side below min_side={min_side}")
    info = {"format": fmt, "mode": mode, "orientation": orientation, "width": rgb.size[0], "height": rgb.size[1]}
    return np.asarray(rgb, dtype=np.uint8), info


def load_rgb(path: str | Path, *, min_side: int, max_pixels: int) -> tuple[np.ndarray, str]:
    """Read a source file, returning (RGB array, sha256 hex of its bytes)."""
    data = Path(path).read_bytes()
    rgb, _ = decode_image(data, min_side=min_side, max_pixels=max_pixels)
    return rgb, hashlib.sha256(data).hexdigest()


def ingest_file(path: str, *, min_side: int, max_pixels: int) -> SourceRecord:
    """Validate one source file; never raises for bad content (it is quarantined with the reason)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return SourceRecord("", path, "", 0, 0, "", "", 1, "quarantined", Reason.unreadable.value, str(e))
    digest = hashlib.sha256(data).hexdigest()
    key = sample_key(digest)
    try:
        _, info = decode_image(data, min_side=min_side, max_pixels=max_pixels)
    except QuarantineError as q:
        return SourceRecord(key, path, digest, 0, 0, "", "", 1, "quarantined", q.reason.value, q.detail)
    return SourceRecord(
        key, path, digest, info["width"], info["height"], info["format"], info["mode"], info["orientation"],
        "ok", "", "",
    )


def ingest_chunk(paths: list[str], *, min_side: int, max_pixels: int) -> list[SourceRecord]:
    """Ingest every path of a chunk; identical contents keep the first path and quarantine the rest."""
    records: list[SourceRecord] = []
    first_by_key: dict[str, str] = {}
    for path in paths:
        rec = ingest_file(path, min_side=min_side, max_pixels=max_pixels)
        if rec.status == "ok":
            if rec.key in first_by_key:
                rec.status, rec.reason = "quarantined", Reason.duplicate.value
                rec.detail = f"same content as {first_by_key[rec.key]}"
            else:
                first_by_key[rec.key] = path
        records.append(rec)
    return records


def records_to_rows(records: list[SourceRecord]) -> list[dict]:
    return [asdict(r) for r in records]
