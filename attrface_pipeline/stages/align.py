"""Face alignment: 5-point similarity transform to a canonical template (FFHQ 512, ArcFace 112).

Landmark order everywhere: left eye, right eye, nose tip, left mouth corner, right mouth corner, where
"left" means the image's left (the subject's right eye). All coordinates are (x, y) pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

# facexlib / GFPGAN FFHQ template at 512 px.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)
# insightface ArcFace template at 112 px (identity crops).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
# facer's FaRL attribute crop (celeba/224): its 256-px "xray" points shifted down 30 px, re-centred in a 500-px
# frame and scaled to 224 (facer/face_attribute/farl.py, get_std_points_xray(out_size=224, mid_size=500)).
FARL_TEMPLATE_224 = np.array(
    [
        [93.10780, 106.52508],
        [130.39183, 105.87947],
        [111.80915, 129.47227],
        [95.28799, 146.36223],
        [129.60949, 145.76724],
    ]
)
TEMPLATES = {
    "ffhq": (FFHQ_TEMPLATE_512, 512),
    "arcface": (ARCFACE_TEMPLATE_112, 112),
    "farl": (FARL_TEMPLATE_224, 224),
}
# GFPGAN's fill colour for pixels outside the source image.
BORDER_VALUE = (135, 133, 132)


def template_points(name: str, size: int) -> np.ndarray:
    """The named template's 5 points scaled to a ``size`` x ``size`` crop."""
    try:
        points, native = TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}") from None
    return points * (size / native)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity (rotation, uniform scale, translation) mapping ``src`` points onto ``dst`` (LMEDS)."""
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need matching point sets with >= 2 points, got {src.shape} and {dst.shape}")
    matrix, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if matrix is None or not np.all(np.isfinite(matrix)):
        raise ValueError("landmarks are degenerate: no similarity transform fits them")
    return matrix


def align_face(
    image: np.ndarray, landmarks5: np.ndarray, size: int = 512, template: str = "ffhq"
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` (HWC uint8 RGB) so the 5 landmarks land on the template; returns (crop, 2x3 matrix)."""
    matrix = similarity_transform(landmarks5, template_points(template, size))
    crop = cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_VALUE
    )
    return crop, matrix


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to (N, 2) points."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]
