"""Metric functions against hand-computed values and their defining properties, on the real sample faces."""

import math

import cv2
import numpy as np
import pytest
import torch

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.images import read_rgb
from training.eval import metrics as M

ALIGNED = sorted((PROJECT_ROOT / "data" / "samples" / "aligned_hq").glob("*.png"))


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    return [read_rgb(p) for p in ALIGNED]


def _noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, img.shape)
    return np.clip(img.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def test_psnr_against_hand_computed_values(faces):
    a, b = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 110, np.uint8)
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-5)
    assert M.psnr(a, a) == math.inf
    # one channel of one pixel set to 0: MSE = 100^2 / (16*16*3) (torchmetrics takes log10 of the range in float32:
    # agreement to 1e-5 dB)
    c = a.copy()
    c[3, 4, 1] = 255 if a[3, 4, 1] == 0 else 0
    mse = (int(a[3, 4, 1]) - int(c[3, 4, 1])) ** 2 / a.size
    assert M.psnr(a, c) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-5)
    x, y = faces[0], _noisy(faces[0], 10)
    manual = 10 * math.log10(255**2 / np.mean((x.astype(np.float64) - y) ** 2))
    assert M.psnr_batch([x, y], [y, x]) == pytest.approx([manual, manual], abs=1e-5)


def test_ssim_against_hand_computed_values(faces):
    # constant images: variances and covariance vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) at every pixel
    c1 = (0.01 * 255) ** 2
    a, b = np.full((32, 32, 3), 100, np.uint8), np.full((32, 32, 3), 110, np.uint8)
    # float32: flat images are the worst case for the variance terms' cancellation (measured 6.6e-5 off)
    assert M.ssim_batch([a], [b])[0] == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), abs=1e-4)
    face = cv2.resize(faces[1], (128, 128), interpolation=cv2.INTER_AREA)
    assert M.ssim_batch([face], [face])[0] == pytest.approx(1.0, abs=1e-6)
    noisy = [_noisy(face, s) for s in (5, 15, 40)]
    scores = M.ssim_batch(noisy, [face] * 3)
    assert 1 > scores[0] > scores[1] > scores[2] > 0
    # computed in float32 for speed: within 3e-5 of torchmetrics in float64
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim64
    exact = ssim64(M.to_tensor(noisy, dtype=torch.float64, scale=1.0), M.to_tensor([face] * 3, dtype=torch.float64,
                   scale=1.0), data_range=255.0, reduction="none").numpy()
    assert scores == pytest.approx(exact, abs=3e-5)


def test_shape_mismatch_is_a_clear_error(faces):
    with pytest.raises(ValueError, match="shapes differ"):
        M.psnr_batch([faces[0]], [faces[0][:-1]])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        M.ssim_batch(faces[:2], faces[:1])


def test_ids_of_a_face_with_itself_is_one_and_lower_across_people(faces):
    from attrface_pipeline.stages.checks import DlibScorer

    scorer = DlibScorer()
    self_sim = M.identity_cosines(scorer, faces[:4], faces[:4])
    assert self_sim == pytest.approx([1.0] * 4, abs=1e-9)
    across = M.identity_cosines(scorer, faces[:4], faces[4:8])
    assert np.all(across < 0.99)
    blurred = [cv2.GaussianBlur(f, (0, 0), 2) for f in faces[:4]]
    same = M.identity_cosines(scorer, faces[:4], blurred)
    assert np.all(same > across.max() - 0.02) and np.all(same < 1)


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8))
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    shift = np.arange(8) * 0.5
    assert M.frechet_distance(x, x + shift) == pytest.approx(float(np.sum(shift**2)), rel=1e-9)
    # 1-D Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2, with the sample statistics
    a, b = rng.normal(1, 2, size=(500, 1)), rng.normal(-1, 0.5, size=(500, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # fewer samples than dimensions: singular covariances still give a finite, symmetric value
    few, other = rng.normal(size=(5, 32)), rng.normal(size=(6, 32))
    assert M.frechet_distance(few, other) == pytest.approx(M.frechet_distance(other, few), rel=1e-8)
    with pytest.raises(ValueError, match="at least 2 images"):
        M.frechet_distance(x[:1], x)


@pytest.mark.parametrize("n_a, n_b, dim", [(40, 50, 16), (6, 9, 64), (4100, 4100, 3)])  # last: the D x D path
def test_frechet_distance_matches_the_sqrtm_formula(n_a, n_b, dim):
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(dim)
    a, b = rng.normal(size=(n_a, dim)), rng.normal(0.5, 1.5, size=(n_b, dim)) @ rng.normal(size=(dim, dim))
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_no_reference_metrics_name_the_extra_when_pyiqa_is_absent():
    try:
        import pyiqa  # noqa: F401
    except ImportError:
        with pytest.raises(M.MetricUnavailable, match=r"attrface\[iqa\]"):
            M.NoReferenceIQA("musiq")
    else:
        pytest.skip("pyiqa is installed here: the metric loads instead")


@pytest.fixture(scope="module")
def metric_zoo(tmp_path_factory):
    from attrface_pipeline.models import tiny

    root = tmp_path_factory.mktemp("metric_zoo")
    return {name: tiny.generate(name, root / name) for name in ("lpips", "fid-inception")}


def test_lpips_batch_is_zero_on_itself_symmetric_and_grows_with_noise(faces, metric_zoo):
    from training.eval.networks import LPIPS

    model = LPIPS.from_pretrained(metric_zoo["lpips"])
    small = [cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in faces[:3]]
    assert M.lpips_batch(model, small, small) == pytest.approx([0, 0, 0], abs=1e-7)
    ab, ba = M.lpips_batch(model, small[:2], small[1:3]), M.lpips_batch(model, small[1:3], small[:2])
    assert ab == pytest.approx(ba, rel=1e-5) and np.all(ab > 0)
    noisy = M.lpips_batch(model, [_noisy(small[0], s) for s in (4, 16, 48)], [small[0]] * 3)
    assert 0 < noisy[0] < noisy[1] < noisy[2]


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(faces, metric_zoo):
    from training.eval.networks import FIDInceptionV3

    net = FIDInceptionV3.from_pretrained(metric_zoo["fid-inception"])
    small = [cv2.resize(f, (96, 96), interpolation=cv2.INTER_AREA) for f in faces[:4]]
    feats = M.image_features(net, small, batch_size=4)
    assert feats.shape == (4, 2048)
    assert M.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    fids = [M.fid(net, [_noisy(f, s, i) for i, f in enumerate(small)], small) for s in (8, 32, 96)]
    assert 0 < fids[0] < fids[1] < fids[2]
