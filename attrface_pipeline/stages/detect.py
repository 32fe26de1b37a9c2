"""Face detection behind one interface: ``detector.detect(rgb) -> list[Face]``.

Backends:
- ``dlib`` (offline default): dlib's CNN (mmod) face detector and 68-point shape predictor, weights shipped by
  the ``face-recognition-models`` package. The 5 alignment points are derived from the 68: eye centres (mean of
  each eye's 6 points), nose tip (30), mouth corners (48, 54).
- ``insightface`` (full profile): an SCRFD/RetinaFace ONNX detector from a local model pack directory
  (e.g. ``buffalo_l/det_10g.onnx``), loaded through ``insightface.model_zoo.get_model``.

Both detect on a copy whose long side is bounded (cost grows with pixels) and map boxes and landmarks back to
full resolution; the dlib landmarks are then refined on the full-resolution image.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from attrface_pipeline.images import check_rgb


@dataclass
class Face:
    bbox: np.ndarray  # (4,) x0, y0, x1, y1 in source pixels
    score: float
    landmarks5: np.ndarray  # (5, 2): left eye, right eye, nose, left mouth, right mouth (image left/right)
    extra: dict = field(default_factory=dict)

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.landmarks5[1] - self.landmarks5[0]))

    @property
    def size(self) -> float:
        """Shorter side of the bounding box in pixels."""
        return float(min(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]))


class FaceDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Face]: ...


# The smallest side of the detection copy dlib's CNN is given. Measured: on copies 8 px wide or less it raises
# RuntimeError and corrupts the heap first ("corrupted size vs. prev_size" at exit, under MALLOC_CHECK_=3 at once),
# as a 2000x16 strip downscaled to 1024x8 or a 1x1 image does; 12 px was clean. The mmod detector finds faces of
# about 40 px and more, so nothing detectable is lost below 32.
MIN_DETECT_SIDE = 32


def detection_scale(width: int, height: int, max_side: int, max_upscale: float) -> float:
    """Resize factor for the detection copy: long side to ``max_side``, enlarging at most ``max_upscale``."""
    return min(max_side / max(width, height), max_upscale)


def _resized(image: np.ndarray, scale: float) -> np.ndarray:
    if abs(scale - 1.0) < 1e-6:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def face_recognition_models_dir() -> Path:
    """Folder of the dlib ``.dat`` files (the package itself cannot be imported: it needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "face-recognition-models is not installed; `pip install face-recognition-models` (ships dlib weights)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class DlibDetector:
    """dlib CNN (mmod) detector + 68-point landmarks -> 5 alignment points."""

    name = "dlib"

    def __init__(self, max_side: int = 1024, max_upscale: float = 1.0, upsample: int = 0):
        import dlib

        models = face_recognition_models_dir()
        self._cnn = dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat"))
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self._dlib = dlib
        self.max_side, self.max_upscale, self.upsample = max_side, max_upscale, upsample

    def detect(self, image: np.ndarray) -> list[Face]:
        check_rgb(image)
        h, w = image.shape[:2]
        scale = detection_scale(w, h, self.max_side, self.max_upscale)
        if min(round(w * scale), round(h * scale)) < MIN_DETECT_SIDE:
            return []  # no face fits, and dlib's CNN corrupts the heap on such inputs
        small = np.ascontiguousarray(_resized(image, scale))
        faces = []
        for det in self._cnn(small, self.upsample):
            r = det.rect
            box = np.array([r.left(), r.top(), r.right(), r.bottom()], np.float64) / scale
            full_rect = self._dlib.rectangle(*(int(round(v)) for v in box))
            shape = self._shape(image, full_rect)
            pts = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
            faces.append(Face(bbox=box, score=float(det.confidence), landmarks5=landmarks68_to_5(pts)))
        return faces


def landmarks68_to_5(pts: np.ndarray) -> np.ndarray:
    """iBUG 68 points -> (left eye centre, right eye centre, nose tip, left mouth corner, right mouth corner)."""
    if pts.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {pts.shape}")
    return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])


class InsightFaceDetector:
    """SCRFD/RetinaFace ONNX detector from an insightface model pack directory."""

    name = "insightface"
    DETECTOR_GLOBS = ("det_*.onnx", "scrfd*.onnx", "retinaface*.onnx")

    def __init__(self, pack_dir: str | Path, det_size: int = 640, min_score: float = 0.5, max_side: int = 1024,
                 max_upscale: float = 2.0):
        try:
            from insightface.model_zoo import get_model
        except ImportError as e:
            raise ModuleNotFoundError(
                "the insightface backend needs `pip install --no-deps insightface onnxruntime scikit-image` "
                "(see docs/dataset.md: insightface pulls opencv-python, which clashes with opencv-python-headless)"
            ) from e
        pack = Path(pack_dir)
        candidates = [p for g in self.DETECTOR_GLOBS for p in sorted(pack.glob(g))]
        if not candidates:
            raise FileNotFoundError(
                f"no detector ONNX ({', '.join(self.DETECTOR_GLOBS)}) in insightface pack {pack}; "
                "unpack e.g. buffalo_l.zip there"
            )
        self.model_file = candidates[0]
        from attrface_pipeline.models.device import onnx_providers

        self.providers, ctx_id = onnx_providers()
        self._model = get_model(str(self.model_file), providers=self.providers)
        if self._model is None or not hasattr(self._model, "detect"):
            raise ValueError(f"{self.model_file} is not a face detector insightface recognises")
        self._model.prepare(ctx_id=ctx_id, input_size=(det_size, det_size), det_thresh=min_score)
        self.det_size, self.max_side, self.max_upscale = det_size, max_side, max_upscale

    def detect(self, image: np.ndarray) -> list[Face]:
        check_rgb(image)
        h, w = image.shape[:2]
        scale = detection_scale(w, h, self.max_side, self.max_upscale)
        small_bgr = np.ascontiguousarray(_resized(image, scale)[:, :, ::-1])
        bboxes, kpss = self._model.detect(small_bgr, input_size=(self.det_size, self.det_size), max_num=0)
        faces = []
        for i, row in enumerate(bboxes):
            if kpss is None:
                raise ValueError(f"{self.model_file} returns no keypoints; alignment needs a 5-point detector")
            faces.append(Face(bbox=row[:4].astype(np.float64) / scale, score=float(row[4]),
                              landmarks5=kpss[i].astype(np.float64) / scale))
        return faces


def make_detector(backend: str, *, max_side: int, max_upscale: float, dlib_upsample: int = 0,
                  insightface_pack: str | Path | None = None, det_size: int = 640,
                  min_score: float = 0.5) -> FaceDetector:
    if backend == "dlib":
        return DlibDetector(max_side=max_side, max_upscale=max_upscale, upsample=dlib_upsample)
    if backend == "insightface":
        if insightface_pack is None:
            raise ValueError("the insightface backend needs a model pack directory")
        return InsightFaceDetector(insightface_pack, det_size=det_size, min_score=min_score, max_side=max_side,
                                   max_upscale=max_upscale)
    raise ValueError(f"unknown detector backend {backend!r}; choose dlib or insightface")


def face_rejection(face: Face, *, min_score: float, min_face_size: float, min_eye_distance: float) -> str:
    """Why a detection is not kept ("" when it is)."""
    if face.score < min_score:
        return "low_score"
    if face.size < min_face_size:
        return "too_small"
    if face.eye_distance < min_eye_distance:
        return "eyes_too_close"
    return ""


def detect_faces(image: np.ndarray, detector: FaceDetector | None = None) -> list[Face]:
    """Detect faces in an RGB image with ``detector`` (default: the offline dlib backend)."""
    return (detector or DlibDetector()).detect(image)
