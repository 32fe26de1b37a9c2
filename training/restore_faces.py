"""Restore the faces of ordinary photos with any face restorer that works on aligned crops (A²BFR, RoboFace).

A restorer is a :data:`RestoreFn`: aligned RGB uint8 crops (``align_spec.size`` squared, FFHQ template) in, restored
crops of the same size out. :func:`restore_photo` makes it work on any photo, the way GFPGAN/CodeFormer's "whole
image" mode does:

- an already aligned face (``input_kind="aligned"``, or ``"auto"`` when :func:`looks_aligned` says so) is resized
  to the crop size, restored, and resized back;
- a photo: every face is detected (the project's detector), aligned with ``stages.align.align_face`` to the same
  FFHQ template and size the dataset uses, all crops are restored in one call (one batch), and each is warped back
  with the inverse of its alignment matrix and blended in under a soft mask (eroded, then Gaussian-feathered, so
  the blend reaches zero inside the crop's footprint). Faces are pasted in left-to-right order; pixels outside
  every footprint are returned bit-identical.

The background is not upsampled or restored (no Real-ESRGAN pass): only faces change.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from attrface_pipeline.config import IngestConfig, SourceConfig
from attrface_pipeline.images import EXTENSIONS, check_rgb, encode_image
from attrface_pipeline.stages.align import align_face, template_points, transform_points
from attrface_pipeline.stages.detect import Face, FaceDetector
from attrface_pipeline.stages.faces import AlignSpec
from attrface_pipeline.stages.ingest import QuarantineError, load_rgb
from attrface_pipeline.storage import atomic_write_bytes

RestoreFn = Callable[[list[np.ndarray]], list[np.ndarray]]  # aligned RGB uint8 crops (size x size) -> same size
TEMPLATE = "ffhq"  # the dataset's alignment (stages.faces aligns with align_face's default template)
IMAGE_SUFFIXES = frozenset(SourceConfig.model_fields["extensions"].default_factory())
_WRITE_FORMATS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}


@dataclass
class FaceRestoreReport:
    faces: int  # faces restored (1 for an aligned input)
    aligned_input: bool
    boxes: list = field(default_factory=list)  # [x0, y0, x1, y1] per restored face, source pixels
    seconds: float = 0.0


def _matches_template(faces: list[Face], shape: tuple[int, ...], tolerance: float) -> bool:
    h, w = shape[:2]
    if h != w or len(faces) != 1:
        return False
    error = np.linalg.norm(faces[0].landmarks5 - template_points(TEMPLATE, w), axis=1).mean()
    return bool(error <= tolerance * w)


def looks_aligned(rgb: np.ndarray, detector: FaceDetector, align_spec: AlignSpec, *, tolerance: float = 0.06) -> bool:
    """True for a square image with one detected face whose 5 landmarks lie on the FFHQ template at that size.

    ``tolerance``: mean landmark distance as a fraction of the side. Measured with dlib on the sample faces:
    aligned 512² faces (HQ and real LQ) 0.018-0.042; a square crop of an unaligned portrait 0.09-0.31.
    ``align_spec`` is accepted for symmetry with :func:`restore_photo`: any size is compared at its own scale.
    """
    check_rgb(rgb)
    if rgb.shape[0] != rgb.shape[1]:
        return False
    return _matches_template(detector.detect(rgb), rgb.shape, tolerance)


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    shrink = width < rgb.shape[1]
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def paste_back(photo: np.ndarray, restored: np.ndarray, matrix: np.ndarray, *, feather: float = 0.05) -> np.ndarray:
    """Warp ``restored`` (a crop aligned by the 2x3 ``matrix``) back into ``photo`` and blend it under a soft mask.

    ``feather``: the mask is eroded by this fraction of the face's side in the photo, then blurred over the same
    width, so it is 1 inside, 0 at the crop's edge and beyond; only the region around the footprint is warped.
    """
    check_rgb(photo)
    check_rgb(restored)
    h, w = photo.shape[:2]
    size = restored.shape[0]
    inverse = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    corners = transform_points(np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64), inverse)
    x0, y0 = (max(0, math.floor(v) - 1) for v in corners.min(0))
    x1, y1 = min(w, math.ceil(corners[:, 0].max()) + 2), min(h, math.ceil(corners[:, 1].max()) + 2)
    out = photo.copy()
    if x1 <= x0 or y1 <= y0:  # the crop lies outside the photo
        return out
    shifted = inverse.copy()
    shifted[:, 2] -= (x0, y0)
    roi = (x1 - x0, y1 - y0)
    face = cv2.warpAffine(restored, shifted, roi, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(np.ones((size, size), np.float32), shifted, roi, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    side = size * math.sqrt(abs(np.linalg.det(inverse[:, :2])))  # the crop's side in photo pixels
    radius = max(1, round(feather * side))
    kernel = 2 * radius + 1
    # erode() leaves the photo's own border alone (a face cut by the edge stays opaque up to that edge)
    mask = cv2.erode(mask, np.ones((kernel, kernel), np.uint8))
    mask = cv2.GaussianBlur(mask, (kernel, kernel), sigmaX=radius / 2)[..., None]  # support = radius: stays inside
    region = out[y0:y1, x0:x1]
    blended = np.rint(mask * face.astype(np.float32) + (1 - mask) * region.astype(np.float32)).astype(np.uint8)
    out[y0:y1, x0:x1] = np.where(mask > 0, blended, region)
    return out


def _check_restored(restored: list[np.ndarray], crops: list[np.ndarray]) -> None:
    if len(restored) != len(crops):
        raise ValueError(f"the restore function returned {len(restored)} crops for {len(crops)}")
    for r, c in zip(restored, crops):
        if not (isinstance(r, np.ndarray) and r.dtype == np.uint8 and r.shape == c.shape):
            raise ValueError(f"the restore function must return uint8 RGB crops of shape {c.shape}, got "
                             f"{getattr(r, 'dtype', type(r).__name__)} {getattr(r, 'shape', '')}")


def restore_photo(rgb: np.ndarray, restore: RestoreFn, *, detector: FaceDetector, align_spec: AlignSpec,
                  input_kind: Literal["auto", "aligned", "photo"] = "auto", min_face: int = 32,
                  min_score: float = 0.5, feather: float = 0.05, aligned_tolerance: float = 0.06,
                  ) -> tuple[np.ndarray, FaceRestoreReport]:
    """Restore every face of an RGB photo (or one aligned face); a photo without faces comes back unchanged.

    ``min_face``: detections whose box is smaller (source pixels) are left alone; ``min_score``: detector
    confidence below which a detection is ignored (dlib mmod score / insightface probability).
    """
    check_rgb(rgb)
    if input_kind not in ("auto", "aligned", "photo"):
        raise ValueError(f"input_kind must be 'auto', 'aligned' or 'photo', got {input_kind!r}")
    t0 = time.perf_counter()
    h, w = rgb.shape[:2]
    faces = None
    aligned = input_kind == "aligned"
    if input_kind == "auto" and h == w:
        faces = detector.detect(rgb)
        aligned = _matches_template(faces, rgb.shape, aligned_tolerance)
    if aligned:
        if h != w:
            raise ValueError(f"an aligned face must be square, got {w}x{h}; use input_kind='photo' or 'auto'")
        crop = _resize(rgb, align_spec.size, align_spec.size)
        restored = restore([crop])
        _check_restored(restored, [crop])
        out = _resize(restored[0], w, h)
        return out, FaceRestoreReport(1, True, [[0.0, 0.0, float(w), float(h)]], time.perf_counter() - t0)

    if faces is None:
        faces = detector.detect(rgb)
    kept = sorted((f for f in faces if f.size >= min_face and f.score >= min_score),
                  key=lambda f: (f.bbox[0], f.bbox[1]))
    crops, matrices, boxes = [], [], []
    for face in kept:
        try:
            crop, matrix = align_face(rgb, face.landmarks5, size=align_spec.size, template=TEMPLATE)
        except ValueError:  # degenerate landmarks: nothing to align, leave that region as it is
            continue
        crops.append(crop)
        matrices.append(matrix)
        boxes.append([float(v) for v in face.bbox])
    if not crops:
        return rgb.copy(), FaceRestoreReport(0, False, [], time.perf_counter() - t0)
    restored = restore(crops)
    _check_restored(restored, crops)
    out = rgb
    for face_rgb, matrix in zip(restored, matrices):
        out = paste_back(out, face_rgb, matrix, feather=feather)
    return out, FaceRestoreReport(len(crops), False, boxes, time.perf_counter() - t0)


def output_format(path: Path) -> str:
    """The image format a file name asks for; ValueError for a suffix nothing here can write."""
    suffix = Path(path).suffix.lower()
    if suffix in _WRITE_FORMATS:
        return _WRITE_FORMATS[suffix]
    Image.init()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"cannot write {path}: unknown image suffix {suffix!r}; use .png, .jpg or .webp")
    return fmt


def encode_for_path(rgb: np.ndarray, path: Path) -> bytes:
    """Encode ``rgb`` in the format the file name asks for (png/jpg/webp as the project writes them, else PIL's)."""
    fmt = output_format(path)
    if fmt in EXTENSIONS:
        return encode_image(rgb, fmt)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, fmt)
    return buf.getvalue()


def restore_paths(inputs: list[Path], outputs: list[Path], restore: RestoreFn, *, detector: FaceDetector,
                  align_spec: AlignSpec, input_kind: Literal["auto", "aligned", "photo"] = "auto",
                  progress: bool = True, log: Callable[[str], None] = print, min_face: int = 32,
                  max_pixels: int | None = None) -> list[dict]:
    """Restore each input into its output (written atomically); unreadable inputs become error records.

    Returns one record per input: path, out, faces, aligned_input, error ("" when written), seconds.
    ``max_pixels`` bounds width*height before decoding (default: the pipeline's ingest bound).
    """
    from tqdm.auto import tqdm

    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
    max_pixels = max_pixels or IngestConfig().max_pixels
    records = []
    bar = tqdm(list(zip(inputs, outputs)), desc="restore", unit="img", disable=not progress, dynamic_ncols=True)
    for src, dst in bar:
        src, dst = Path(src), Path(dst)
        record = {"path": str(src), "out": str(dst), "faces": 0, "aligned_input": False, "error": "", "seconds": 0.0}
        records.append(record)
        try:
            output_format(dst)  # refuse an unwritable suffix before the work
            rgb, _ = load_rgb(src, min_side=1, max_pixels=max_pixels)
        except (QuarantineError, ValueError) as e:
            record["error"] = f"unreadable: {e}" if isinstance(e, QuarantineError) else str(e)
            log(f"restore: skipped {src}: {record['error']}")
            continue
        out, report = restore_photo(rgb, restore, detector=detector, align_spec=align_spec, input_kind=input_kind,
                                    min_face=min_face)
        if report.faces == 0:
            log(f"restore: no face found in {src}; written unchanged")
        atomic_write_bytes(dst, encode_for_path(out, dst))
        record.update(faces=report.faces, aligned_input=report.aligned_input, seconds=round(report.seconds, 3))
        bar.set_postfix(faces=sum(r["faces"] for r in records))
    return records


def expand_io(src: Path, dst: Path) -> tuple[list[Path], list[Path]]:
    """Input and output paths: a file to a file (or into an existing folder), or a folder to a folder.

    Folder mode finds images recursively (the pipeline's source suffixes, hidden files skipped, and anything under
    ``dst`` when it lies inside ``src``), keeps their relative paths, and creates the output folder.
    """
    src, dst = Path(src), Path(dst)
    if src.is_file():
        if dst.is_dir():
            dst = dst / src.name
        if dst.resolve() == src.resolve():
            raise ValueError(f"output {dst} is the input: write the restored image elsewhere")
        return [src], [dst]
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist")
    if dst.exists() and not dst.is_dir():
        raise NotADirectoryError(f"{src} is a folder, so the output must be one too; {dst} is a file")
    if dst.resolve() == src.resolve():
        raise ValueError(f"output folder {dst} is the input folder: write the restored images elsewhere")
    dst_resolved = dst.resolve()
    inputs = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if (p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(part.startswith(".") for part in rel.parts)
                and not p.resolve().is_relative_to(dst_resolved)):
            inputs.append(p)
    dst.mkdir(parents=True, exist_ok=True)
    return inputs, [dst / p.relative_to(src) for p in inputs]
