from pathlib import Path

import numpy as np
import pytest

from attrface_pipeline.stages.align import (FFHQ_TEMPLATE_512, align_face, similarity_transform, template_points,
                                            transform_points)
from attrface_pipeline.stages.detect import Face, face_rejection, landmarks68_to_5
from attrface_pipeline.stages.ingest import load_rgb

# Counted by eye on the photos (every visible face large enough to align).
GROUP_PHOTOS = {
    "whole/02.png": 4,
    "whole/two_people.jpg": 2,
    "whole/obama_and_biden.jpg": 3,  # Biden, Obama, and the girl lower right
    "whole/gfpgan_Blake_Lively.jpg": 2,  # the woman and the child photo beside her
    "hq/kit_with_rose.jpg": 2,
}
# Adult, roughly frontal faces for the re-detection check.
REDETECT = ["whole/02.png", "whole/two_people.jpg", "hq/obama.jpg", "hq/rose_leslie2.jpg"]


def _load(samples, rel):
    return load_rgb(samples / rel, min_side=64, max_pixels=80_000_000)[0]


@pytest.mark.parametrize("rel,expected", sorted(GROUP_PHOTOS.items()))
def test_group_photos_yield_expected_face_count(samples, dlib_detector, rel, expected):
    faces = dlib_detector.detect(_load(samples, rel))
    kept = [f for f in faces if not face_rejection(f, min_score=0.5, min_face_size=48, min_eye_distance=12)]
    assert len(kept) == expected


@pytest.mark.parametrize("rel", REDETECT)
def test_aligned_crops_redetect_with_eyes_on_template(samples, dlib_detector, rel):
    image = _load(samples, rel)
    faces = dlib_detector.detect(image)
    assert faces
    for face in faces:
        crop, matrix = align_face(image, face.landmarks5, size=512)
        assert crop.shape == (512, 512, 3) and crop.dtype == np.uint8
        again = dlib_detector.detect(crop)
        assert again, "the aligned crop must still contain a detectable face"
        best = min(again, key=lambda f: np.linalg.norm(f.landmarks5[:2] - FFHQ_TEMPLATE_512[:2]))
        mapped = transform_points(face.landmarks5, matrix)
        # re-detected eyes land where the transform put them (alignment is geometrically right) ...
        assert np.linalg.norm(best.landmarks5[:2] - mapped[:2], axis=1).max() < 4.0
        # ... and within a few pixels of the template (residual of the 5-point similarity fit), of 126 px IOD
        assert np.linalg.norm(best.landmarks5[:2] - FFHQ_TEMPLATE_512[:2], axis=1).max() < 10.0


def test_similarity_transform_recovers_known_transform():
    angle, scale, shift = np.deg2rad(17.0), 0.73, np.array([31.0, -12.5])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = FFHQ_TEMPLATE_512
    dst = src @ rot.T + shift
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix[:, :2], rot, atol=1e-6)
    np.testing.assert_allclose(transform_points(src, matrix), dst, atol=1e-4)


def test_template_scaling_and_unknown_template():
    np.testing.assert_allclose(template_points("ffhq", 256), FFHQ_TEMPLATE_512 / 2)
    assert template_points("arcface", 112)[0, 0] == pytest.approx(38.2946)
    with pytest.raises(ValueError, match="unknown template"):
        template_points("nope", 512)


def test_degenerate_landmarks_raise_clear_error():
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.zeros((5, 2)), FFHQ_TEMPLATE_512)


def test_landmarks68_to_5_picks_eye_centres_nose_and_mouth_corners():
    pts = np.arange(136, dtype=float).reshape(68, 2)
    five = landmarks68_to_5(pts)
    np.testing.assert_allclose(five[0], pts[36:42].mean(0))
    np.testing.assert_allclose(five[1], pts[42:48].mean(0))
    np.testing.assert_allclose(five[2:], pts[[30, 48, 54]])


def test_face_rejection_reasons():
    lm = FFHQ_TEMPLATE_512 / 10  # eye distance ~12.6 px
    face = Face(bbox=np.array([0, 0, 60, 60.0]), score=0.9, landmarks5=lm)
    kwargs = dict(min_score=0.5, min_face_size=48, min_eye_distance=12)
    assert face_rejection(face, **kwargs) == ""
    assert face_rejection(Face(face.bbox, 0.1, lm), **kwargs) == "low_score"
    assert face_rejection(Face(np.array([0, 0, 20, 20.0]), 0.9, lm), **kwargs) == "too_small"
    assert face_rejection(Face(face.bbox, 0.9, lm / 2), **kwargs) == "eyes_too_close"


def test_degenerate_sizes_never_reach_dlib(tmp_path):
    """dlib's CNN corrupts the heap on detection copies a few pixels wide (a 2000x16 strip, 1x1): the detector
    answers "no face" before calling it. In a subprocess with glibc's heap checks on, so corruption aborts there."""
    import os
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import numpy as np\n"
        "from attrface_pipeline.builders import build_detector\n"
        "from attrface_pipeline.config import PipelineConfig\n"
        "det = build_detector(PipelineConfig())\n"
        "for h, w in [(2000, 16), (16, 2000), (1, 1), (8, 8), (100, 8), (31, 500)]:\n"
        "    assert det.detect(np.full((h, w, 3), 128, np.uint8)) == [], (h, w)\n"
        "print('clean')\n")
    import attrface_pipeline

    code = str(Path(attrface_pipeline.__file__).parents[1])  # the code under test, wherever it is imported from
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MALLOC_CHECK_": "3", "PYTHONPATH": code}, cwd=code)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-2000:]
