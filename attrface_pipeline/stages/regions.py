"""Soft face-region masks from the 5 aligned landmarks, to confine an edit or shape noise blending.

Regions are ellipses/bands scaled by the inter-ocular distance, so they follow the face in any crop. Values in
[0, 1], feathered with a Gaussian; 1 inside the region.
"""

from __future__ import annotations

import cv2
import numpy as np

# Where each controllable attribute lives; None = the whole image (age, for instance, changes everything).
ATTRIBUTE_REGIONS: dict[str, str | None] = {
    "Eyeglasses": "eyes", "Bushy_Eyebrows": "eyes", "Narrow_Eyes": "eyes", "Bags_Under_Eyes": "eyes",
    "Smiling": "mouth", "Mouth_Slightly_Open": "mouth", "Wearing_Lipstick": "mouth", "Big_Lips": "mouth",
    "Mustache": "mouth", "Bangs": "hair", "Blond_Hair": "hair", "Black_Hair": "hair", "Brown_Hair": "hair",
    "Gray_Hair": "hair", "Wavy_Hair": "hair", "Straight_Hair": "hair", "Bald": "hair", "Wearing_Hat": "hair",
    "Receding_Hairline": "hair", "Young": None,
}
REGIONS = ("eyes", "mouth", "hair")


def region_mask(landmarks5: np.ndarray, size: int, region: str | None, out_size: int | None = None,
                softness: float = 0.08) -> np.ndarray:
    """(out_size, out_size) float32 mask of ``region`` for a ``size`` x ``size`` crop with these landmarks."""
    out_size = out_size or size
    if region is None:
        return np.ones((out_size, out_size), np.float32)
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; choose one of {REGIONS} or None")
    lm = np.asarray(landmarks5, np.float64).reshape(5, 2)
    eye_l, eye_r, _nose, mouth_l, mouth_r = lm
    eye_dist = float(np.linalg.norm(eye_r - eye_l))
    angle = float(np.degrees(np.arctan2(*(eye_r - eye_l)[::-1])))
    mask = np.zeros((size, size), np.float32)
    if region == "eyes":  # both eyes and brows, a little above the eye line
        centre = (eye_l + eye_r) / 2 - [0, 0.15 * eye_dist]
        axes = (0.95 * eye_dist, 0.5 * eye_dist)
        cv2.ellipse(mask, _pt(centre), _pt(axes), angle, 0, 360, 1.0, -1)
    elif region == "mouth":  # lips, teeth and the cheeks a smile moves
        centre = (mouth_l + mouth_r) / 2
        axes = (0.6 * np.linalg.norm(mouth_r - mouth_l) + 0.25 * eye_dist, 0.45 * eye_dist)
        cv2.ellipse(mask, _pt(centre), _pt(axes), angle, 0, 360, 1.0, -1)
    else:  # hair: everything above the brows, plus the sides of the head down to the mouth
        brow_y = float(min(eye_l[1], eye_r[1]) - 0.45 * eye_dist)
        mask[: max(int(round(brow_y)), 0)] = 1.0
        mouth_y = int(round(float(max(mouth_l[1], mouth_r[1]))))
        left = int(round(float(eye_l[0] - 0.75 * eye_dist)))
        right = int(round(float(eye_r[0] + 0.75 * eye_dist)))
        mask[:mouth_y, : max(left, 0)] = 1.0
        mask[:mouth_y, max(right, 0):] = 1.0
    if softness > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=softness * size)
    if out_size != size:
        mask = cv2.resize(mask, (out_size, out_size), interpolation=cv2.INTER_AREA)
    return np.clip(mask, 0.0, 1.0).astype(np.float32)


def _pt(xy) -> tuple[int, int]:
    return int(round(float(xy[0]))), int(round(float(xy[1])))
