"""QC measures on real aligned faces: SSIM, landmark displacement, identity (dlib's real descriptor, tiny ArcFace)."""

import cv2
import numpy as np
import pytest

from attrface_pipeline.attributes import CELEBA_ATTRIBUTES
from attrface_pipeline.images import read_rgb
from attrface_pipeline.stages.align import align_face
from attrface_pipeline.stages.checks import (ArcFaceScorer, DlibScorer, LandmarkLocator, attribute_check,
                                             identity_scores, landmark_displacement, luminance, ssim,
                                             structure_ssim)


@pytest.fixture(scope="module")
def crops(samples, dlib_detector):
    """Aligned 512 crops: Rose Leslie twice (two photos), Barack Obama, Lin-Manuel Miranda."""
    out = {}
    for name in ("rose_leslie2.jpg", "obama.jpg", "lin-manuel-miranda.png", "kit_with_rose.jpg"):
        image = read_rgb(samples / "hq" / name)
        faces = sorted(dlib_detector.detect(image), key=lambda f: f.bbox[0])
        out[name] = align_face(image, faces[0].landmarks5, 512)[0]  # kit_with_rose: Rose is on the left
    return out


def test_ssim_orders_degradations(crops):
    a = crops["obama.jpg"]
    assert structure_ssim(a, a) == pytest.approx(1.0)
    blurred = structure_ssim(a, cv2.GaussianBlur(a, (0, 0), 3))
    noisy = structure_ssim(a, np.clip(a + np.random.default_rng(0).normal(0, 8, a.shape), 0, 255).astype(np.uint8))
    other = structure_ssim(a, crops["lin-manuel-miranda.png"])
    assert 1.0 > blurred > other and 1.0 > noisy > other
    assert structure_ssim(a, cv2.resize(a, (128, 128), interpolation=cv2.INTER_AREA)) > 0.99  # sizes reconciled
    with pytest.raises(ValueError):
        ssim(luminance(a), luminance(a[:100]))


def test_landmark_displacement(crops):
    loc = LandmarkLocator()
    a = crops["obama.jpg"]
    assert landmark_displacement(loc, a, a) == 0.0
    assert landmark_displacement(loc, a, cv2.resize(a, (128, 128))) < 4  # re-located at a quarter of the size
    assert 14 < landmark_displacement(loc, a, np.roll(a, 20, axis=1)) < 26  # a 20 px shift is measured as such


def test_dlib_identity_tells_people_apart(crops):
    scorer = DlibScorer()
    rose, rose2 = crops["rose_leslie2.jpg"], crops["kit_with_rose.jpg"]
    same, other = identity_scores(scorer, [rose, rose], [rose2, crops["obama.jpg"]])
    assert same["distance"] < 0.6 < other["distance"]  # dlib's own same-person rule
    assert same["similarity"] > other["similarity"]
    (small,) = identity_scores(scorer, [rose], [cv2.resize(rose, (128, 128), interpolation=cv2.INTER_AREA)])
    assert small["distance"] < 0.3


def test_arcface_scorer_loads_a_pack(tiny_zoo, crops):
    scorer = ArcFaceScorer(tiny_zoo / "insightface")
    emb = scorer.embed([crops["obama.jpg"], crops["obama.jpg"], crops["rose_leslie2.jpg"]])
    assert emb.shape == (3, 512)
    (same, other) = identity_scores(scorer, [crops["obama.jpg"]] * 2, [crops["obama.jpg"], crops["rose_leslie2.jpg"]])
    assert same["similarity"] == pytest.approx(1.0) and other["similarity"] < 1.0  # random weights: no more claimed


def test_attribute_check_directions_and_tolerance():
    before = np.full(40, 0.2)
    after = before.copy()
    smile, young = CELEBA_ATTRIBUTES.index("Smiling"), CELEBA_ATTRIBUTES.index("Young")
    after[smile] = 0.9
    r = attribute_check(before, after, "Smiling", "add", ["Smiling", "Young"], 0.6, 0.4, 0.2)
    assert r["flipped"] and r["others_kept"] and r["p_after"] == 0.9
    after[young] = 0.7
    r = attribute_check(before, after, "Smiling", "add", ["Smiling", "Young"], 0.6, 0.4, 0.2)
    assert r["flipped"] and not r["others_kept"] and r["max_drift_attribute"] == "Young"
    assert not attribute_check(before, after, "Smiling", "remove", ["Smiling"], 0.6, 0.4, 0.2)["flipped"]


def test_score_pairs_and_pass_rates(crops, tiny_zoo):
    """An unchanged face keeps identity and structure; another person's face fails both. (The attribute model is
    the tiny random one, so only the attribute check's bookkeeping is asserted.)"""
    import torch

    from attrface_pipeline.attributes import DEFAULT_CONTROLLABLE
    from attrface_pipeline.models.farl import load_attribute_model
    from attrface_pipeline.stages.attributes import AttributeClassifier
    from attrface_pipeline.stages.checks import QCThresholds, pass_rates, score_pairs

    rose, rose2, obama = crops["rose_leslie2.jpg"], crops["kit_with_rose.jpg"], crops["obama.jpg"]
    images = {"same": rose, "rose2": rose2, "obama": obama}
    pairs = [{"pair_key": f"k_{n}", "face_key": "k", "attribute": "Smiling", "direction": "add", "edit": n}
             for n in images]
    clf = AttributeClassifier(load_attribute_model(tiny_zoo / "farl"), "cpu", torch.float32)
    th = QCThresholds(controllable=DEFAULT_CONTROLLABLE, max_identity_distance=0.6, min_identity_similarity=None)
    rows = score_pairs(pairs, read_source=lambda p: rose,
                       read_edit=lambda p: cv2.resize(images[p["edit"]], (256, 256)), classifier=clf,
                       identity=DlibScorer(), locator=LandmarkLocator(), th=th, batch_size=2)
    by = {r["pair_key"]: r for r in rows}
    assert by["k_same"]["pass_identity"] and by["k_same"]["pass_similarity"] and by["k_same"]["ssim"] > 0.95
    assert by["k_rose2"]["pass_identity"]  # the same woman in another photo
    assert not by["k_obama"]["pass_identity"] and "identity" in by["k_obama"]["reasons"]
    assert by["k_same"]["max_drift"] < 0.05  # same pixels, same probabilities (up to the resize)
    assert all(r["passed"] == (r["reasons"] == "") for r in rows)
    rates = pass_rates(rows)
    assert rates["identity"] == pytest.approx(2 / 3) and 0 <= rates["overall"] <= rates["identity"]
    assert pass_rates([])["overall"] == 0.0
