import json

import numpy as np
import pytest
import torch

from attrface_pipeline.attributes import CELEBA_ATTRIBUTES, DEFAULT_CONTROLLABLE
from attrface_pipeline.config import load_config
from attrface_pipeline.images import read_rgb
from attrface_pipeline.models.farl import load_attribute_model
from attrface_pipeline.stages.align import align_face, similarity_transform, template_points
from attrface_pipeline.stages.attributes import (AttributeClassifier, attribute_state, attribute_states,
                                                 classify_faces, farl_input, state_counts)


@pytest.mark.parametrize(
    "p, state",
    [(0.95, "positive"), (0.6001, "positive"), (0.6, "unknown"), (0.5, "unknown"), (0.4, "unknown"),
     (0.3999, "negative"), (0.0, "negative")],
)
def test_thresholds_and_unknown_band(p, state):
    assert attribute_state(p, 0.6, 0.4) == state


def test_states_pick_the_named_columns():
    probs = np.full((2, 40), 0.5, np.float32)
    probs[0, CELEBA_ATTRIBUTES.index("Smiling")] = 0.9
    probs[1, CELEBA_ATTRIBUTES.index("Eyeglasses")] = 0.1
    states = attribute_states(probs, ["Smiling", "Eyeglasses"])
    assert states == [{"Smiling": "positive", "Eyeglasses": "unknown"},
                      {"Smiling": "unknown", "Eyeglasses": "negative"}]


def test_config_validates_attributes():
    assert load_config().attributes.controllable == list(DEFAULT_CONTROLLABLE)
    with pytest.raises(ValueError, match="unknown CelebA attribute"):
        load_config(overrides={"attributes": {"controllable": ["smiling"]}})
    with pytest.raises(ValueError, match="must not exceed"):
        load_config(overrides={"attributes": {"positive_threshold": 0.3, "negative_threshold": 0.5}})


def test_farl_input_puts_landmarks_on_facers_template(samples, dlib_detector):
    """The 512 crop's landmarks land on facer's 224 template after the warp; pixels are CLIP-normalised."""
    image = read_rgb(samples / "hq" / sorted(p.name for p in (samples / "hq").iterdir() if p.suffix != ".md")[0])
    face = dlib_detector.detect(image)[0]
    crop, matrix = align_face(image, face.landmarks5, 512)
    lm = face.landmarks5 @ matrix[:, :2].T + matrix[:, 2]
    x = farl_input(crop, lm)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert -2.0 < x.min() < x.max() < 2.7  # (0..1 - mean) / std
    m = similarity_transform(lm, template_points("farl", 224))
    mapped = lm @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - template_points("farl", 224)).max() < 6  # the similarity fit's residual only


def test_classifier_batches_consistently_on_real_crops(tiny_zoo, samples):
    model = load_attribute_model(tiny_zoo / "farl")
    crops = [read_rgb(p)[:300, :300] for p in sorted((samples / "hq").glob("*.*"))[:5] if p.suffix != ".md"]
    one = AttributeClassifier(model, "cpu", torch.float32, batch_size=1).predict(crops)
    many = AttributeClassifier(model, "cpu", torch.float32, batch_size=4).predict(crops)
    assert one.shape == (len(crops), 40) and ((one >= 0) & (one <= 1)).all()
    np.testing.assert_allclose(one, many, atol=1e-5)
    assert np.ptp(one, axis=0).max() > 1e-4  # different faces, different outputs


def test_classify_faces_rows(tiny_zoo, samples):
    model = load_attribute_model(tiny_zoo / "farl")
    clf = AttributeClassifier(model, batch_size=2)
    paths = [p for p in sorted((samples / "hq").iterdir()) if p.suffix != ".md"][:3]
    lm = template_points("ffhq", 512).reshape(-1).tolist()
    rows = [{"face_key": f"k{i}_00", "image_key": f"k{i}", "status": "ok", "aligned_path": str(p),
             "aligned_landmarks5": lm} for i, p in enumerate(paths)]
    rows.append({"face_key": "x_00", "image_key": "x", "status": "rejected", "aligned_path": "",
                 "aligned_landmarks5": None})
    out = classify_faces(rows, lambda rel: read_rgb(rel)[:512, :512], clf, ["Smiling", "Bald"], 0.6, 0.4, "tiny/farl")
    assert [r["face_key"] for r in out] == ["k0_00", "k1_00", "k2_00"]
    assert all(len(r["probabilities"]) == 40 and set(json.loads(r["states"])) == {"Smiling", "Bald"} for r in out)
    table = state_counts(out, ["Smiling", "Bald"])
    assert all(t["positive"] + t["negative"] + t["unknown"] == 3 for t in table)
