"""Degradation presets on real sample faces: sampled params inside their ranges, determinism and replay, severity
ordering of RoboFace's levels, YAML user presets and their errors."""

import json
import math
import pickle

import cv2
import numpy as np
import pytest

from attrface_pipeline.images import read_rgb
from training import degradation as deg
from training.degradation import PRESETS, DegradationPreset, PresetError, StageRanges

FACES = ["hq/ffhq_00000.png", "hq/ffhq_00001.png", "hq/obama.jpg", "hq/rose_leslie2.jpg", "lq_real/0143.png"]


@pytest.fixture(scope="module")
def faces(samples):
    """Five real faces at 128 px (params tests) and at 256 px (severity)."""
    full = [read_rgb(samples / name) for name in FACES]
    return {size: [cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in full] for size in (64, 256)}


def _inside(value, bounds, tol=1e-9):
    return bounds[0] - tol <= value <= bounds[1] + tol


def _check_kernel(kernel, spec: StageRanges, name):
    if kernel["type"] == "sinc":
        assert kernel["size"] in spec.kernel_sizes, name
        bounds = spec.sinc_omega if kernel["size"] < 13 else spec.sinc_omega_large
        assert _inside(kernel["omega_c"], bounds), name
        return
    assert kernel["type"] in spec.kernel_types, name
    assert _inside(kernel["sigma_x"], spec.blur_sigma) and _inside(kernel["sigma_y"], spec.blur_sigma), name
    if spec.kernel_sizes is None:
        assert kernel["size"] == 2 * math.ceil(3 * max(kernel["sigma_x"], kernel["sigma_y"])) + 1, name
    else:
        assert kernel["size"] in spec.kernel_sizes, name
    if "aniso" in kernel["type"]:
        assert _inside(kernel["angle"], spec.rotation), name
    else:
        assert kernel["sigma_x"] == kernel["sigma_y"] and kernel["angle"] == 0.0, name
    if kernel["type"].startswith("generalized"):
        assert _inside(kernel["beta"], spec.betag), name
    elif kernel["type"].startswith("plateau"):
        assert _inside(kernel["beta"], spec.betap), name
    else:
        assert kernel["beta"] is None, name


def _check_stage(stage, spec: StageRanges, base_size, name):
    if stage["blur"] is None:
        assert spec.blur_prob < 1, name
    else:
        _check_kernel(stage["blur"], spec, name)
    resize = stage["resize"]
    assert _inside(resize["scale"], spec.scale) and resize["mode"] in spec.resize_modes, name
    assert resize["size"] == [max(1, int(s * resize["scale"])) for s in base_size], name
    if spec.resize_probs is None:
        assert resize["direction"] is None, name
    else:
        expect = {"up": (1.0, spec.scale[1]), "down": (spec.scale[0], 1.0), "keep": (1.0, 1.0)}[resize["direction"]]
        assert _inside(resize["scale"], expect), name
    noise = stage["noise"]
    if noise["type"] == "gaussian":
        assert _inside(noise["sigma"], spec.noise_sigma), name
    else:
        assert noise["type"] == "poisson" and spec.gaussian_noise_prob < 1, name
        assert _inside(noise["scale"], spec.poisson_scale), name
    assert isinstance(noise["grey"], bool) and (spec.grey_noise_prob > 0 or not noise["grey"]), name
    assert isinstance(noise["seed"], int) and 0 <= noise["seed"] < 2**32, name
    q = stage["jpeg_quality"]
    assert isinstance(q, int) and spec.jpeg_quality[0] <= q <= spec.jpeg_quality[1], name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_params_in_range_deterministic_and_replayable(faces, name):
    preset = PRESETS[name]
    img = faces[64][0][:48]  # not square: H and W are kept apart
    h, w = img.shape[:2]
    seen = set()
    for seed in range(200):
        lq, params = deg.degrade_seeded(img, name, seed)
        assert lq.dtype == np.uint8 and lq.shape == img.shape
        assert params["preset"] == name and params["input_size"] == [h, w]
        target = [max(1, int(h / preset.sf)), max(1, int(w / preset.sf))]
        _check_stage(params["stage1"], preset.stage1, [h, w], f"{name} seed {seed} stage1")
        base2 = target if preset.stage2_scale_base == "target" else params["stage1"]["resize"]["size"]
        _check_stage(params["stage2"], preset.stage2, base2, f"{name} seed {seed} stage2")
        final = params["final"]
        assert final["size"] == target and final["resize_mode"] in preset.final_resize_modes
        assert final["upsample_mode"] == (preset.upsample_mode if preset.sf > 1 else None)
        if final["sinc"] is not None:
            assert preset.final_sinc_prob > 0 and final["sinc"]["size"] in preset.final_sinc_sizes
            assert _inside(final["sinc"]["omega_c"], preset.final_sinc_omega)
        if seed < 20:  # determinism and replay from the JSON record (the slow half of the test, so a subset)
            again, params_again = deg.degrade(img, name, np.random.default_rng(seed))
            assert again.tobytes() == lq.tobytes() and params_again == params
            assert deg.apply_params(img, json.loads(json.dumps(params))).tobytes() == lq.tobytes()
        seen.add(lq.tobytes())
    assert len(seen) >= 190  # distinct degradations (ood collapses 48x64 to a few pixels, so some coincide)
    assert not np.shares_memory(lq, img)


def test_realesrgan_draws_every_branch(faces):
    """Over 300 draws the recipe's probabilistic branches all occur (kernel zoo, sinc, Poisson, grey, up/down/keep)."""
    kinds, noises, directions, orders, greys, final_sinc = set(), set(), set(), set(), set(), set()
    for seed in range(300):
        p = deg.sample_params("realesrgan", (64, 64), np.random.default_rng(seed))
        for stage in ("stage1", "stage2"):
            kinds.add(p[stage]["blur"]["type"] if p[stage]["blur"] else None)
            noises.add(p[stage]["noise"]["type"])
            greys.add(p[stage]["noise"]["grey"])
            directions.add(p[stage]["resize"]["direction"])
        orders.add(p["final"]["resize_first"])
        final_sinc.add(p["final"]["sinc"] is not None)
    assert kinds == {*deg.KERNEL_TYPES, "sinc", None}
    assert noises == {"gaussian", "poisson"} and greys == orders == final_sinc == {True, False}
    assert directions == {"up", "down", "keep"}


def test_results_do_not_depend_on_cv2_threads(faces):
    img = faces[256][2]
    before = cv2.getNumThreads()
    try:
        outputs = []
        for threads in (1, 2):
            cv2.setNumThreads(threads)
            outputs.append([deg.degrade_seeded(img, name, (7, i))[0].tobytes() for name in PRESETS for i in range(3)])
    finally:
        cv2.setNumThreads(before)
    assert outputs[0] == outputs[1]


def test_severity_falls_from_train_to_partial_ood_to_ood(faces):
    def psnr(a, b):
        mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
        return 10 * math.log10(255**2 / max(mse, 1e-10))

    means = {}
    for name in ("train", "partial_ood", "ood"):
        means[name] = np.mean([psnr(deg.degrade_seeded(face, name, (i, seed))[0], face)
                               for i, face in enumerate(faces[256]) for seed in range(6)])
    # measured ~24.7 / 18.4 / 13.2 dB; a 2 dB margin each keeps the ordering meaningful, not just a tie-break
    assert means["train"] > means["partial_ood"] + 2.0 and means["partial_ood"] > means["ood"] + 2.0, means


def test_params_are_json_and_recorded(faces):
    lq, params = deg.degrade_seeded(faces[64][1], "realesrgan", 3)
    text = json.dumps(params, allow_nan=False)
    assert json.loads(text) == params
    assert params["preset"] == "realesrgan" and set(params) == {"preset", "input_size", "stage1", "stage2", "final"}


def test_kernels_match_basicsr_definitions():
    # The separable isotropic path equals the 2-D kernel; all kernels are normalised and point-symmetric.
    iso = deg.make_kernel({"type": "iso", "size": 9, "sigma_x": 1.7, "sigma_y": 1.7, "angle": 0.0, "beta": None})
    g = cv2.getGaussianKernel(9, 1.7)
    np.testing.assert_allclose(iso, g @ g.T, atol=1e-12)
    for kernel in ({"type": "aniso", "size": 15, "sigma_x": 3.0, "sigma_y": 0.5, "angle": 0.7, "beta": None},
                   {"type": "generalized_aniso", "size": 11, "sigma_x": 2.0, "sigma_y": 1.0, "angle": -1.0,
                    "beta": 0.6},
                   {"type": "plateau_iso", "size": 21, "sigma_x": 2.5, "sigma_y": 2.5, "angle": 0.0, "beta": 1.5},
                   {"type": "sinc", "size": 21, "omega_c": math.pi / 4}):
        k = deg.make_kernel(kernel)
        assert k.shape == (kernel["size"],) * 2 and abs(k.sum() - 1) < 1e-12
        np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)
    # anisotropic: elongated along the rotated major axis (angle 0 -> along x, i.e. along rows)
    k = deg.make_kernel({"type": "aniso", "size": 15, "sigma_x": 3.0, "sigma_y": 0.5, "angle": 0.0, "beta": None})
    assert k[7, 7 + 4] > 100 * k[7 + 4, 7]
    # J1 against reference values (mpmath.besselj(1, x)) and the sinc kernel's centre limit
    np.testing.assert_allclose(deg.bessel_j1(np.array([1.0, 3.0, 10.0, 40.0])),
                               [0.4400505857449335, 0.3390589585259365, 0.04347274616886144, 0.126038318037585],
                               atol=1e-12)
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.float32)
    blurred = deg._blur(img, {"type": "iso", "size": 9, "sigma_x": 1.7, "sigma_y": 1.7, "angle": 0.0, "beta": None})
    direct = cv2.filter2D(img, -1, iso.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(blurred, direct, atol=1e-3)


def test_get_preset_names_and_unknown():
    assert set(PRESETS) == {"train", "partial_ood", "ood", "realesrgan"}
    assert deg.get_preset("ood") is PRESETS["ood"] and deg.get_preset(PRESETS["train"]) is PRESETS["train"]
    with pytest.raises(KeyError, match=r"'nope'.*known: \['ood', 'partial_ood', 'realesrgan', 'train'\]"):
        deg.get_preset("nope")
    with pytest.raises(KeyError, match="mine"):
        deg.get_preset("nope", extra={"mine": PRESETS["train"]})
    with pytest.raises(KeyError, match="nope"):
        deg.degrade_seeded(np.zeros((8, 8, 3), np.uint8), "nope", 0)
    with pytest.raises(ValueError, match="HWC uint8 RGB"):
        deg.degrade_seeded(np.zeros((8, 8), np.uint8), "train", 0)


def test_builtin_presets_round_trip_through_plain_data():
    for name, preset in PRESETS.items():
        assert deg.preset_from_dict(name, json.loads(json.dumps(preset.to_dict()))) == preset
    # the RoboFace table, as written in the reference
    assert PRESETS["partial_ood"].stage1.scale == (0.02, 0.9) and PRESETS["ood"].stage2.noise_sigma == (30, 45)
    assert PRESETS["train"].stage2.jpeg_quality == (30, 95) and PRESETS["ood"].stage1.blur_sigma == (6, 10)


USER_YAML = """
heavier:
  base: train
  description: train with stronger noise
  stage1: {noise_sigma: [10, 50]}
  stage2: {jpeg_quality: [20, 60], grey_noise_prob: 0.5}
from_scratch:
  sf: 2
  stage1: {blur_sigma: [1, 2], scale: [0.5, 0.5], noise_sigma: [5, 5], jpeg_quality: [50, 50]}
  stage2: {blur_sigma: [0.5, 1], scale: [1, 1], noise_sigma: [0, 0], jpeg_quality: [90, 95], blur_prob: 0}
chained:
  base: heavier
  stage2_scale_base: stage1
"""


def test_yaml_user_presets_load_and_degrade(tmp_path, faces):
    path = tmp_path / "presets.yaml"
    path.write_text(USER_YAML)
    user = deg.load_presets(path)
    assert list(user) == ["heavier", "from_scratch", "chained"]
    heavier = user["heavier"]
    assert heavier.stage1.noise_sigma == (10.0, 50.0)
    assert heavier.stage1.blur_sigma == PRESETS["train"].stage1.blur_sigma and heavier.description.startswith("train")
    assert heavier.stage2.jpeg_quality == (20, 60) and heavier.stage2.grey_noise_prob == 0.5
    assert user["chained"].stage2_scale_base == "stage1" and user["chained"].stage1 == heavier.stage1
    assert user["from_scratch"].sf == 2.0 and user["from_scratch"].stage2.kernel_types == ("iso",)
    assert deg.get_preset("heavier", extra=user) is heavier
    for name, preset in user.items():
        lq, params = deg.degrade(faces[64][0], preset, np.random.default_rng(0))
        assert lq.shape == faces[64][0].shape and params["preset"] == name
        _check_stage(params["stage1"], preset.stage1, [64, 64], name)
    assert deg.load_presets(_write(tmp_path, "")) == {}


def _write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key, problem", [
    ("lvl:\n  base: train\n  stage1: {blur_sigma: [3, 1]}\n", "lvl.stage1.blur_sigma", "lo 3.0 > hi 1.0"),
    ("lvl:\n  base: ood\n  stage2: {jpeg_quality: [0, 50]}\n", "lvl.stage2.jpeg_quality", "outside the sane bounds"),
    ("lvl:\n  base: train\n  stage1: {jpeg_quality: [40.5, 50]}\n", "lvl.stage1.jpeg_quality", "expected an integer"),
    ("lvl:\n  base: train\n  stage1: {noise_sigma: [1, 300]}\n", "lvl.stage1.noise_sigma", "sane bounds"),
    ("lvl:\n  base: train\n  stage1: {scale: 0.5}\n", "lvl.stage1.scale", "expected a [lo, hi] pair"),
    ("lvl:\n  base: train\n  stage1: {blur_prob: 1.5}\n", "lvl.stage1.blur_prob", "outside [0, 1]"),
    ("lvl:\n  base: train\n  stage1: {blur_sigma: [a, 2]}\n", "lvl.stage1.blur_sigma", "expected a number"),
    ("lvl:\n  base: train\n  stage1: {kernel_types: [iso, box]}\n", "lvl.stage1.kernel_types", "'box'"),
    ("lvl:\n  base: train\n  stage1: {kernel_types: [iso, aniso]}\n", "lvl.stage1.kernel_probs", "expected 2"),
    ("lvl:\n  base: realesrgan\n  stage1: {kernel_sizes: [7, 8]}\n", "lvl.stage1.kernel_sizes", "odd"),
    ("lvl:\n  base: realesrgan\n  stage2: {resize_probs: [0.5, 0.5, 0.5]}\n", "lvl.stage2.resize_probs", "sum to 1.5"),
    ("lvl:\n  base: realesrgan\n  stage2: {scale: [0.2, 0.9]}\n", "lvl.stage2.scale", "must contain 1"),
    ("lvl:\n  base: train\n  stage1: {sinc_prob: 0.2}\n", "lvl.stage1.kernel_sizes", "needs explicit"),
    ("lvl:\n  base: train\n  stage1: {blur_sigmaa: [1, 2]}\n", "lvl.stage1.blur_sigmaa", "unknown field"),
    ("lvl:\n  base: train\n  sf: 0.5\n", "lvl.sf", "outside [1, 16]"),
    ("lvl:\n  base: train\n  upsample_mode: lanczos\n", "lvl.upsample_mode", "'lanczos'"),
    ("lvl:\n  base: nope\n", "lvl.base", "unknown preset 'nope'"),
    ("lvl:\n  stage1: {blur_sigma: [1, 2]}\n", "lvl.stage1.scale", "missing"),
    ("lvl: 3\n", "lvl", "expected a mapping"),
    ("train:\n  base: ood\n", "train", "redefines the built-in"),
    ("- a\n- b\n", "(top level)", "expected a mapping"),
    ("lvl: [unclosed\n", "(file)", "cannot read presets"),
])
def test_yaml_errors_name_file_and_key(tmp_path, text, key, problem):
    path = _write(tmp_path, text)
    with pytest.raises(PresetError) as info:
        deg.load_presets(path)
    assert info.value.key == key and str(path) in str(info.value), str(info.value)
    assert problem in str(info.value), str(info.value)
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_presets_validate_in_python_too():
    with pytest.raises(PresetError, match="blur_sigma: lo 2.0 > hi 1.0"):
        StageRanges(blur_sigma=(2, 1), scale=(1, 1), noise_sigma=(0, 0), jpeg_quality=(90, 90))
    good = StageRanges(blur_sigma=[1, 2], scale=[1, 1], noise_sigma=[0, 0], jpeg_quality=[90, 90])
    assert good.blur_sigma == (1.0, 2.0) and isinstance(good.resize_modes, tuple)
    with pytest.raises(PresetError, match="stage2_scale_base"):
        DegradationPreset("x", good, good, stage2_scale_base="previous")
    hash(DegradationPreset("x", good, good))  # frozen and hashable: usable as a cache key
    for preset in PRESETS.values():  # DataLoader workers receive presets by pickle
        assert pickle.loads(pickle.dumps(preset)) == preset


def test_noise_statistics():
    """Gaussian noise by quantile lookup has the requested sigma; grey noise is one field for all channels; Poisson
    noise at Real-ESRGAN's photon count (256 for an 8-bit image with > 128 levels) has variance scale^2 x 255/256."""
    table = deg._normal_quantiles()
    assert abs(float(table.mean())) < 1e-6 and abs(float(table.std()) - 1) < 1e-4 and table.min() == -table.max()
    flat = np.full((200, 200, 3), 128.0, np.float32)
    colour = deg._add_noise(flat.copy(), {"type": "gaussian", "sigma": 10.0, "grey": False, "seed": 1}) - 128
    assert abs(colour.std() - 10) < 0.1 and abs(colour.mean()) < 0.1
    assert abs(np.corrcoef(colour[..., 0].ravel(), colour[..., 1].ravel())[0, 1]) < 0.02
    grey = deg._add_noise(flat.copy(), {"type": "gaussian", "sigma": 10.0, "grey": True, "seed": 1}) - 128
    assert np.array_equal(grey[..., 0], grey[..., 2]) and abs(grey.std() - 10) < 0.1
    ramp = np.repeat(np.linspace(0, 255, 200, dtype=np.float32)[None, :, None], 200, 0).repeat(3, 2)
    ramp = np.rint(ramp)
    noisy = deg._add_noise(ramp.copy(), {"type": "poisson", "scale": 2.0, "grey": False, "seed": 2})
    mid = slice(80, 120)  # away from the clip at 0 and 255
    expected = 2.0**2 * ramp[:, mid] * 255 / 256
    ratio = (noisy[:, mid] - ramp[:, mid]).var(axis=(0, 2)) / expected[0, :, 0]  # 600 samples per column
    assert abs(ratio.mean() - 1) < 0.03 and ratio.min() > 0.7 and ratio.max() < 1.3, ratio
