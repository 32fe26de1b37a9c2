"""Synthetic degradation of HQ faces into LQ inputs: RoboFace's three levels and the Real-ESRGAN recipe, numpy + OpenCV.

Model (second order, Real-ESRGAN / RoboFace): ``x = [(y ⊗ k)↓r + n]_JPEG`` applied twice with independent parameters
(stage 1 on the GT, stage 2 on the result), then resized back to the GT size. Per stage, in this order:

1. blur with probability ``blur_prob``: a kernel from the zoo (isotropic / anisotropic Gaussian, generalised Gaussian,
   plateau; each iso or aniso) of an odd size, or with probability ``sinc_prob`` a circular low-pass (sinc) kernel;
2. resize by a factor ``r`` with a random mode (area / bilinear / bicubic); either ``r ~ U(scale)`` (RoboFace) or
   Real-ESRGAN's up / down / keep draw (``resize_probs``: up ``U(1, hi)``, down ``U(lo, 1)``, keep 1);
3. noise: Gaussian (sigma in 0-255 units) with probability ``gaussian_noise_prob``, else Poisson; grey (one field for
   all channels) with probability ``grey_noise_prob``; clipped to [0, 255];
4. JPEG at an integer quality (cv2, 4:2:0 like Real-ESRGAN's DiffJPEG).

Stage 2's JPEG is the final step and, as in Real-ESRGAN, is ordered with the final resize to the LQ size
``GT / sf`` and an optional final sinc filter: with probability ``resize_before_jpeg_prob`` resize + sinc then JPEG,
otherwise JPEG then resize + sinc. Where ``sf > 1`` the LQ is then upsampled to the GT size (``upsample_mode``), the
usual practice when a Real-ESRGAN x4 degradation feeds a same-size restoration model.

Sampling and applying are separate: :func:`sample_params` draws every parameter (plain JSON data, including one noise
seed per stage) and :func:`apply_params` is a pure function of the image and those params, so a recorded ``params``
dict replays to the byte-identical LQ. Only the generator passed in is used; no global random state.

Presets (:data:`PRESETS` is the one source of truth; user presets come from YAML via :func:`load_presets`):

- ``train`` / ``partial_ood`` / ``ood``: RoboFace's table (blur sigma, scale r, noise delta, JPEG q per stage).
  *Design decisions* where the paper is silent: isotropic Gaussian kernel of size ``2*ceil(3*sigma)+1`` (covers
  +-3 sigma, so large OOD sigmas are not truncated), Gaussian colour noise, ``r ~ U(lo, hi)``, random resize modes,
  stage 2's scale relative to the GT size (as in Real-ESRGAN, whose ranges the train level copies; ``stage1`` makes
  it relative to stage 1's output instead: the OOD level then collapses to a few pixels), JPEG then resize back.
- ``realesrgan``: ``options/train_realesrgan_x4plus.yml`` + basicsr ``degradations.py`` defaults: sizes 7..21,
  kernel probabilities iso .45 / aniso .25 / generalised .12 / .03 / plateau .12 / .03, sigma [0.2, 3] / [0.2, 1.5],
  betag [0.5, 4], betap [1, 2], sinc .1 (omega_c in [pi/3, pi] below size 13, else [pi/5, pi]), second blur .8,
  resize up/down/keep .2/.7/.1 and .3/.4/.3 over [0.15, 1.5] / [0.3, 1.2], Gaussian noise .5 in [1, 30] / [1, 25],
  Poisson scale [0.05, 3] / [0.05, 2.5], grey .4, JPEG [30, 95], final sinc .8 (omega_c [pi/3, pi]), sf 4.

Departures from BasicSR: no USM sharpening of the GT (that concerns the training target, not the LQ); JPEG through
libjpeg at an integer quality instead of the differentiable DiffJPEG at a real-valued one; cv2 'area' resizing
(fractional box filter) instead of torch's adaptive average pooling; borders reflect-101 like torch's 'reflect'
padding but also for kernels wider than the image; Gaussian noise drawn by inverse-CDF lookup (2**16 quantiles, tails
cut at 4.3 sigma) from 16-bit uniforms, 3x faster than numpy's exact normals and invisible after 8-bit quantisation.
Poisson noise follows ``random_add_poisson_noise_pt``: the image quantised to 8 bits, photon count
``2**ceil(log2(#distinct levels))``, noise scaled by the sampled scale.

Speed (``make bench-degradation``, 512 px, one core): ``train`` ~50-60 img/s, ``realesrgan`` ~20 (its Poisson noise
is numpy's exact sampler).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import cv2
import numpy as np
import yaml

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
STAGE2_SCALE_BASES = ("target", "stage1")
REALESRGAN_SIZES = tuple(range(7, 22, 2))
_BORDER = cv2.BORDER_REFLECT_101
_PI = math.pi

Range = tuple[float, float]


class PresetError(ValueError):
    """A preset field is missing, of the wrong type or out of bounds; the message names the file (if any) and key."""

    def __init__(self, key: str, problem: str, file: str | Path | None = None):
        self.key, self.problem, self.file = key, problem, file
        super().__init__((f"{file}: " if file is not None else "") + f"{key}: {problem}")


# --- field coercion and validation ------------------------------------------------------------------------------------
# Presets come from Python and from YAML, so each field is normalised (lists -> tuples, numeric strings like '1e-3'
# that YAML 1.1 leaves as str -> float) and checked in __post_init__; the error names the field.


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise PresetError(key, f"expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PresetError(key, f"expected a number, got {value!r}") from None


def _integer(key: str, value: Any) -> int:
    number = _number(key, value)
    if number != int(number):
        raise PresetError(key, f"expected an integer, got {value!r}")
    return int(number)


def _prob(key: str, value: Any) -> float:
    p = _number(key, value)
    if not 0.0 <= p <= 1.0:
        raise PresetError(key, f"probability {p} outside [0, 1]")
    return p


def _range(key: str, value: Any, lo_bound: float, hi_bound: float, *, integer: bool = False) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise PresetError(key, f"expected a [lo, hi] pair, got {value!r}")
    lo, hi = (_integer(key, v) if integer else _number(key, v) for v in value)
    if lo > hi:
        raise PresetError(key, f"lo {lo} > hi {hi}")
    if lo < lo_bound or hi > hi_bound:
        raise PresetError(key, f"[{lo}, {hi}] outside the sane bounds [{lo_bound}, {hi_bound}]")
    return lo, hi


def _names(key: str, value: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise PresetError(key, f"expected a non-empty list of names from {list(allowed)}, got {value!r}")
    bad = [v for v in value if v not in allowed]
    if bad or len(set(value)) != len(value):
        raise PresetError(key, f"unknown or repeated names {bad or list(value)}; allowed: {list(allowed)}")
    return tuple(value)


def _probs(key: str, value: Any, length: int) -> tuple[float, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != length:
        raise PresetError(key, f"expected {length} probabilities, got {value!r}")
    probs = tuple(_prob(key, v) for v in value)
    if abs(sum(probs) - 1.0) > 1e-6:
        raise PresetError(key, f"probabilities {list(probs)} sum to {sum(probs):g}, not 1")
    return probs


def _sizes(key: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise PresetError(key, f"expected a non-empty list of odd kernel sizes, got {value!r}")
    sizes = tuple(_integer(key, v) for v in value)
    if any(s % 2 == 0 or not 3 <= s <= 101 for s in sizes):
        raise PresetError(key, f"kernel sizes {list(sizes)} must be odd and within [3, 101]")
    return sizes


def _choice_of(key: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise PresetError(key, f"{value!r} is not one of {list(allowed)}")
    return value


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclass: normalise once, in __post_init__


@dataclass(frozen=True)
class StageRanges:
    """Sampling ranges of one degradation stage. The first four fields are RoboFace's table columns."""

    blur_sigma: Range  # kernel sigma(s), pixels
    scale: Range  # resize factor r
    noise_sigma: Range  # Gaussian noise sigma, 0-255 units
    jpeg_quality: tuple[int, int]  # inclusive
    blur_prob: float = 1.0
    kernel_types: tuple[str, ...] = ("iso",)
    kernel_probs: tuple[float, ...] = (1.0,)
    kernel_sizes: tuple[int, ...] | None = None  # None: 2*ceil(3*sigma)+1 from the sampled sigma
    rotation: Range = (-_PI, _PI)  # anisotropic kernels' angle, radians
    betag: Range = (0.5, 4.0)  # generalised Gaussian shape
    betap: Range = (1.0, 2.0)  # plateau shape
    sinc_prob: float = 0.0
    sinc_omega: Range = (_PI / 3, _PI)  # cutoff for kernel sizes < 13
    sinc_omega_large: Range = (_PI / 5, _PI)  # cutoff for sizes >= 13 (wider kernels resolve lower cutoffs)
    resize_probs: tuple[float, float, float] | None = None  # up, down, keep (Real-ESRGAN); None: r ~ U(scale)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    gaussian_noise_prob: float = 1.0  # otherwise Poisson
    poisson_scale: Range = (0.05, 3.0)
    grey_noise_prob: float = 0.0

    def __post_init__(self) -> None:
        _set(self, "blur_sigma", _range("blur_sigma", self.blur_sigma, 1e-3, 50.0))
        _set(self, "scale", _range("scale", self.scale, 1e-3, 8.0))
        _set(self, "noise_sigma", _range("noise_sigma", self.noise_sigma, 0.0, 255.0))
        _set(self, "jpeg_quality", _range("jpeg_quality", self.jpeg_quality, 1, 100, integer=True))
        for name in ("blur_prob", "sinc_prob", "gaussian_noise_prob", "grey_noise_prob"):
            _set(self, name, _prob(name, getattr(self, name)))
        _set(self, "kernel_types", _names("kernel_types", self.kernel_types, KERNEL_TYPES))
        _set(self, "kernel_probs", _probs("kernel_probs", self.kernel_probs, len(self.kernel_types)))
        if self.kernel_sizes is not None:
            _set(self, "kernel_sizes", _sizes("kernel_sizes", self.kernel_sizes))
        elif self.sinc_prob > 0:
            raise PresetError("kernel_sizes", "sinc_prob > 0 needs explicit kernel_sizes")
        _set(self, "rotation", _range("rotation", self.rotation, -2 * _PI, 2 * _PI))
        # Real-ESRGAN draws beta from [lo, 1] or [1, hi] with equal odds, so 1 must lie inside the range.
        _set(self, "betag", _range("betag", self.betag, 0.05, 16.0))
        _set(self, "betap", _range("betap", self.betap, 0.05, 16.0))
        for name in ("betag", "betap"):
            if not getattr(self, name)[0] <= 1.0 <= getattr(self, name)[1]:
                raise PresetError(name, f"{list(getattr(self, name))} must contain 1 (beta is drawn below or above 1)")
        _set(self, "sinc_omega", _range("sinc_omega", self.sinc_omega, 1e-3, _PI))
        _set(self, "sinc_omega_large", _range("sinc_omega_large", self.sinc_omega_large, 1e-3, _PI))
        if self.resize_probs is not None:
            _set(self, "resize_probs", _probs("resize_probs", self.resize_probs, 3))
            if not self.scale[0] <= 1.0 <= self.scale[1]:
                raise PresetError("scale", f"{list(self.scale)} must contain 1 when resize_probs (up/down/keep) is set")
        _set(self, "resize_modes", _names("resize_modes", self.resize_modes, tuple(RESIZE_MODES)))
        _set(self, "poisson_scale", _range("poisson_scale", self.poisson_scale, 0.0, 10.0))


@dataclass(frozen=True)
class DegradationPreset:
    """A named degradation level: two stages of ranges plus the final resize / sinc / JPEG ordering."""

    name: str
    stage1: StageRanges
    stage2: StageRanges
    sf: float = 1.0  # LQ size = GT / sf before the upsampling back to the GT size
    stage2_scale_base: str = "target"  # stage 2's r multiplies GT/sf ('target', Real-ESRGAN) or stage 1's output
    final_resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    resize_before_jpeg_prob: float = 0.0  # Real-ESRGAN: 0.5; RoboFace's formula: JPEG, then resize back
    final_sinc_prob: float = 0.0
    final_sinc_sizes: tuple[int, ...] = REALESRGAN_SIZES
    final_sinc_omega: Range = (_PI / 3, _PI)
    upsample_mode: str = "bicubic"
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PresetError("name", f"expected a non-empty string, got {self.name!r}")
        for stage in ("stage1", "stage2"):
            if not isinstance(getattr(self, stage), StageRanges):
                raise PresetError(stage, f"expected StageRanges, got {type(getattr(self, stage)).__name__}")
        _set(self, "sf", _number("sf", self.sf))
        if not 1.0 <= self.sf <= 16.0:
            raise PresetError("sf", f"{self.sf} outside [1, 16]")
        _choice_of("stage2_scale_base", self.stage2_scale_base, STAGE2_SCALE_BASES)
        _set(self, "final_resize_modes", _names("final_resize_modes", self.final_resize_modes, tuple(RESIZE_MODES)))
        _set(self, "resize_before_jpeg_prob", _prob("resize_before_jpeg_prob", self.resize_before_jpeg_prob))
        _set(self, "final_sinc_prob", _prob("final_sinc_prob", self.final_sinc_prob))
        _set(self, "final_sinc_sizes", _sizes("final_sinc_sizes", self.final_sinc_sizes))
        _set(self, "final_sinc_omega", _range("final_sinc_omega", self.final_sinc_omega, 1e-3, _PI))
        _choice_of("upsample_mode", self.upsample_mode, tuple(RESIZE_MODES))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings); ``preset_from_dict(p.name, p.to_dict())`` gives ``p`` back."""

        def plain(value: Any) -> Any:
            return list(value) if isinstance(value, tuple) else value

        out = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "name"}
        for stage in ("stage1", "stage2"):
            out[stage] = {f.name: plain(getattr(getattr(self, stage), f.name)) for f in dataclasses.fields(StageRanges)}
        return out


_STAGE_FIELDS = tuple(f.name for f in dataclasses.fields(StageRanges))
_PRESET_FIELDS = tuple(f.name for f in dataclasses.fields(DegradationPreset) if f.name != "name")


def _roboface(stage1: tuple, stage2: tuple) -> tuple[StageRanges, StageRanges]:
    return StageRanges(*stage1), StageRanges(*stage2)


def _realesrgan_stage(sigma: Range, resize_probs: tuple, scale: Range, noise: Range, poisson: Range,
                      blur_prob: float) -> StageRanges:
    return StageRanges(blur_sigma=sigma, scale=scale, noise_sigma=noise, jpeg_quality=(30, 95), blur_prob=blur_prob,
                       kernel_types=KERNEL_TYPES, kernel_probs=(0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
                       kernel_sizes=REALESRGAN_SIZES, sinc_prob=0.1, resize_probs=resize_probs,
                       gaussian_noise_prob=0.5, poisson_scale=poisson, grey_noise_prob=0.4)


PRESETS: dict[str, DegradationPreset] = {
    # RoboFace levels: (blur sigma, scale r, noise delta, JPEG q) per stage.
    "train": DegradationPreset("train", *_roboface(((0.2, 3), (0.15, 1.5), (1, 30), (30, 95)),
                                                   ((0.2, 1.5), (0.3, 1.2), (1, 25), (30, 95))),
                               description="RoboFace training level (FID 110)"),
    "partial_ood": DegradationPreset("partial_ood", *_roboface(((1.2, 6), (0.02, 0.9), (15, 55), (5, 60)),
                                                               ((1, 4), (0.1, 0.8), (15, 40), (5, 60))),
                                     description="RoboFace partial out-of-distribution level (FID 199)"),
    "ood": DegradationPreset("ood", *_roboface(((6, 10), (0.05, 0.1), (60, 90), (1, 20)),
                                               ((3, 6), (0.05, 0.2), (30, 45), (1, 20))),
                             description="RoboFace out-of-distribution level (FID 262)"),
    "realesrgan": DegradationPreset(
        "realesrgan",
        _realesrgan_stage((0.2, 3.0), (0.2, 0.7, 0.1), (0.15, 1.5), (1, 30), (0.05, 3.0), blur_prob=1.0),
        _realesrgan_stage((0.2, 1.5), (0.3, 0.4, 0.3), (0.3, 1.2), (1, 25), (0.05, 2.5), blur_prob=0.8),
        sf=4.0, resize_before_jpeg_prob=0.5, final_sinc_prob=0.8,
        description="Real-ESRGAN x4plus (BasicSR) second-order recipe, LQ upsampled back to the GT size"),
}


def preset_from_dict(name: str, data: Mapping[str, Any],
                     known: Mapping[str, DegradationPreset] | None = None) -> DegradationPreset:
    """Build a preset from plain data. ``base: <name>`` starts from a known preset and overrides only the given
    fields (stage fields too); without it, each stage needs the four table fields."""
    if not isinstance(data, Mapping):
        raise PresetError(name, f"expected a mapping of fields, got {type(data).__name__}")
    data = dict(data)
    base = None
    if "base" in data:
        base_name = data.pop("base")
        pool = {**PRESETS, **(known or {})}
        if base_name not in pool:
            raise PresetError("base", f"unknown preset {base_name!r}; known: {sorted(pool)}")
        base = pool[base_name]
    unknown = sorted(set(data) - set(_PRESET_FIELDS))
    if unknown:
        raise PresetError(unknown[0], f"unknown field; preset fields: {['base', *_PRESET_FIELDS]}")
    kwargs: dict[str, Any] = {}
    for stage in ("stage1", "stage2"):
        given = data.pop(stage, {})
        if not isinstance(given, Mapping):
            raise PresetError(stage, f"expected a mapping of stage fields, got {type(given).__name__}")
        unknown = sorted(set(given) - set(_STAGE_FIELDS))
        if unknown:
            raise PresetError(f"{stage}.{unknown[0]}", f"unknown field; stage fields: {list(_STAGE_FIELDS)}")
        fields_ = {**(dataclasses.asdict(getattr(base, stage)) if base else {}), **given}
        try:
            kwargs[stage] = StageRanges(**fields_)
        except TypeError:
            missing = [f for f in _STAGE_FIELDS[:4] if f not in fields_]
            if not missing:
                raise
            raise PresetError(f"{stage}.{missing[0]}", "missing (required unless the preset names a `base`)") from None
        except PresetError as e:
            raise PresetError(f"{stage}.{e.key}", e.problem) from None
    if base is not None:
        inherited = {f: getattr(base, f) for f in _PRESET_FIELDS if f not in ("stage1", "stage2", "description")}
        data = inherited | {"description": f"based on {base.name}"} | data
    return DegradationPreset(name=name, **kwargs, **data)


def load_presets(path: str | Path) -> dict[str, DegradationPreset]:
    """User presets from a YAML mapping ``name -> fields`` (see :func:`preset_from_dict`); a preset may use a built-in
    or an earlier preset of the same file as ``base``. Built-in names cannot be redefined (one source of truth)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PresetError("(file)", f"cannot read presets: {e}", file=path) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise PresetError("(top level)", f"expected a mapping of preset name -> fields, got {type(data).__name__}",
                          file=path)
    out: dict[str, DegradationPreset] = {}
    for name, fields_ in data.items():
        if not isinstance(name, str) or not name:
            raise PresetError(repr(name), "preset names must be non-empty strings", file=path)
        if name in PRESETS:
            raise PresetError(name, f"redefines the built-in preset {name!r}; use `base: {name}` under a new name",
                              file=path)
        try:
            out[name] = preset_from_dict(name, fields_, known=out)
        except PresetError as e:
            key = e.key if e.key == name else f"{name}.{e.key}"
            raise PresetError(key, e.problem, file=path) from None
    return out


def get_preset(name_or_preset: str | DegradationPreset,
               extra: Mapping[str, DegradationPreset] | None = None) -> DegradationPreset:
    """A preset by name (user presets in ``extra`` first, then :data:`PRESETS`); a preset object passes through."""
    if isinstance(name_or_preset, DegradationPreset):
        return name_or_preset
    pool = {**PRESETS, **(extra or {})}
    if name_or_preset not in pool:
        raise KeyError(f"unknown degradation preset {name_or_preset!r}; known: {sorted(pool)}")
    return pool[name_or_preset]


# --- kernels ----------------------------------------------------------------------------------------------------------


def bessel_j1(x: np.ndarray) -> np.ndarray:
    """J1 by Bessel's integral (1/2pi) * int_0^2pi cos(t - x sin t) dt; the trapezoid rule on a periodic analytic
    integrand converges geometrically, 128 nodes give ~1e-15 for |x| < 60 (sinc kernels need |x| <= pi*15)."""
    t = np.linspace(0.0, 2 * _PI, 128, endpoint=False)
    x = np.asarray(x, dtype=np.float64)
    return np.cos(t - x[..., None] * np.sin(t)).mean(axis=-1)


def make_kernel(kernel: Mapping[str, Any]) -> np.ndarray:
    """The normalised float64 kernel described by a ``params`` blur entry (BasicSR's definitions)."""
    size = int(kernel["size"])
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    xx, yy = np.meshgrid(ax, ax)
    if kernel["type"] == "sinc":
        omega = float(kernel["omega_c"])
        r = np.hypot(xx, yy)
        with np.errstate(invalid="ignore", divide="ignore"):
            k = omega * bessel_j1(omega * r) / (2 * _PI * r)
        k[size // 2, size // 2] = omega**2 / (4 * _PI)  # the limit at r = 0
        return k / k.sum()
    sx, sy, angle = float(kernel["sigma_x"]), float(kernel["sigma_y"]), float(kernel["angle"])
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    inv = np.linalg.inv(rot @ np.diag([sx * sx, sy * sy]) @ rot.T)
    # Squared Mahalanobis distance of each tap under the rotated covariance.
    d2 = inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy
    if kernel["type"].startswith("generalized"):
        k = np.exp(-0.5 * np.power(d2, float(kernel["beta"])))
    elif kernel["type"].startswith("plateau"):
        k = 1.0 / (np.power(d2, float(kernel["beta"])) + 1.0)
    else:
        k = np.exp(-0.5 * d2)
    return k / k.sum()


# --- sampling ---------------------------------------------------------------------------------------------------------


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _pick(rng: np.random.Generator, items: Sequence, probs: Sequence[float] | None = None):
    if probs is None:
        return items[int(rng.integers(len(items)))]
    p = np.asarray(probs, dtype=np.float64)
    return items[int(rng.choice(len(items), p=p / p.sum()))]


def _sample_beta(rng: np.random.Generator, bounds: Range) -> float:
    # BasicSR: below or above 1 with equal odds, so heavy- and light-tailed shapes are equally common.
    return _uniform(rng, (bounds[0], 1.0)) if rng.random() < 0.5 else _uniform(rng, (1.0, bounds[1]))


def _sample_kernel(rng: np.random.Generator, s: StageRanges) -> dict[str, Any]:
    size = int(_pick(rng, s.kernel_sizes)) if s.kernel_sizes else None
    if s.sinc_prob > 0 and rng.random() < s.sinc_prob:
        omega = _uniform(rng, s.sinc_omega if size < 13 else s.sinc_omega_large)
        return {"type": "sinc", "size": size, "omega_c": omega}
    kind = _pick(rng, s.kernel_types, s.kernel_probs)
    sigma_x = _uniform(rng, s.blur_sigma)
    sigma_y, angle = (_uniform(rng, s.blur_sigma), _uniform(rng, s.rotation)) if "aniso" in kind else (sigma_x, 0.0)
    beta = None
    if kind.startswith("generalized"):
        beta = _sample_beta(rng, s.betag)
    elif kind.startswith("plateau"):
        beta = _sample_beta(rng, s.betap)
    if size is None:
        size = 2 * math.ceil(3 * max(sigma_x, sigma_y)) + 1
    return {"type": kind, "size": size, "sigma_x": sigma_x, "sigma_y": sigma_y, "angle": angle, "beta": beta}


def _sample_scale(rng: np.random.Generator, s: StageRanges) -> tuple[float, str | None]:
    if s.resize_probs is None:
        return _uniform(rng, s.scale), None
    direction = _pick(rng, ("up", "down", "keep"), s.resize_probs)
    if direction == "up":
        return _uniform(rng, (1.0, s.scale[1])), direction
    if direction == "down":
        return _uniform(rng, (s.scale[0], 1.0)), direction
    return 1.0, direction


def _scaled(size: Sequence[int], factor: float) -> list[int]:
    # floor like torch's interpolate(scale_factor=...) and Real-ESRGAN's int(...), never below one pixel
    return [max(1, int(size[0] * factor)), max(1, int(size[1] * factor))]


def _sample_stage(rng: np.random.Generator, s: StageRanges, base_size: Sequence[int]) -> dict[str, Any]:
    blur = _sample_kernel(rng, s) if rng.random() < s.blur_prob else None
    scale, direction = _sample_scale(rng, s)
    mode = _pick(rng, s.resize_modes)
    if rng.random() < s.gaussian_noise_prob:
        noise = {"type": "gaussian", "sigma": _uniform(rng, s.noise_sigma)}
    else:
        noise = {"type": "poisson", "scale": _uniform(rng, s.poisson_scale)}
    noise["grey"] = bool(rng.random() < s.grey_noise_prob)
    noise["seed"] = int(rng.integers(2**32))  # the noise field itself is replayed from this
    quality = int(rng.integers(s.jpeg_quality[0], s.jpeg_quality[1] + 1))
    return {"blur": blur, "resize": {"scale": scale, "direction": direction, "mode": mode,
                                     "size": _scaled(base_size, scale)},
            "noise": noise, "jpeg_quality": quality}


def sample_params(preset: str | DegradationPreset, size: Sequence[int], rng: np.random.Generator) -> dict[str, Any]:
    """Draw every parameter of one degradation of an image of ``size`` = (H, W); plain JSON-serialisable data."""
    p = get_preset(preset)
    h, w = int(size[0]), int(size[1])
    target = _scaled((h, w), 1.0 / p.sf)
    stage1 = _sample_stage(rng, p.stage1, (h, w))
    stage2 = _sample_stage(rng, p.stage2, target if p.stage2_scale_base == "target" else stage1["resize"]["size"])
    resize_first = bool(rng.random() < p.resize_before_jpeg_prob)
    mode = _pick(rng, p.final_resize_modes)
    sinc = None
    if rng.random() < p.final_sinc_prob:
        size = int(_pick(rng, p.final_sinc_sizes))
        sinc = {"type": "sinc", "size": size, "omega_c": _uniform(rng, p.final_sinc_omega)}
    return {"preset": p.name, "input_size": [h, w], "stage1": stage1, "stage2": stage2,
            "final": {"resize_first": resize_first, "size": target, "resize_mode": mode, "sinc": sinc,
                      "upsample_mode": p.upsample_mode if target != [h, w] else None}}


# --- applying ---------------------------------------------------------------------------------------------------------
# Internally float32 BGR in 0-255: cv2's JPEG expects BGR, and no conversion is paid between steps.


def _blur(x: np.ndarray, kernel: Mapping[str, Any]) -> np.ndarray:
    if kernel["type"] == "iso":  # separable: two 1-D passes instead of size^2 taps
        sigma = float(kernel["sigma_x"])
        return cv2.GaussianBlur(x, (kernel["size"], kernel["size"]), sigma, sigmaY=sigma, borderType=_BORDER)
    return cv2.filter2D(x, -1, make_kernel(kernel).astype(np.float32), borderType=_BORDER)


def _resize(x: np.ndarray, size: Sequence[int], mode: str) -> np.ndarray:
    if list(x.shape[:2]) == list(size):
        return x
    return cv2.resize(x, (int(size[1]), int(size[0])), interpolation=RESIZE_MODES[mode])


def _to_uint8(x: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    # clip, then cv2's round-half-even conversion (same bytes as np.rint(...).astype(np.uint8), a third of the time);
    # in_place clips x itself where the caller discards it anyway
    return cv2.convertScaleAbs(np.clip(x, 0.0, 255.0, out=x if in_place else None))


@functools.cache
def _normal_quantiles() -> np.ndarray:
    """Phi^-1 at the midpoints of 2**16 equal bins: a 16-bit uniform draw indexes a standard normal value."""
    normal = NormalDist()
    return np.array([normal.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float32)


def _add_noise(x: np.ndarray, noise: Mapping[str, Any]) -> np.ndarray:
    gen = np.random.default_rng(noise["seed"])
    h, w = x.shape[:2]
    if noise["type"] == "gaussian":
        # Inverse-CDF lookup instead of numpy's ziggurat: 3x faster at 512 px (the noise was most of the train
        # level's time); 65,536 quantiles, tails cut at 4.3 sigma, invisible after 8-bit quantisation.
        channels = 1 if noise["grey"] else 3
        words = gen.bit_generator.random_raw(-(-h * w * channels // 4))  # 64 random bits = four 16-bit indices
        index = words.view(np.uint16)[: h * w * channels].reshape(h, w, channels)
        field_ = np.take(_normal_quantiles() * np.float32(noise["sigma"]), index, mode="wrap")  # wrap: no bounds check
    else:
        # Real-ESRGAN's Poisson: on the 8-bit quantised image, photon count the next power of two of its level count.
        q = _to_uint8(cv2.cvtColor(x, cv2.COLOR_BGR2GRAY) if noise["grey"] else x)
        levels = np.count_nonzero(np.bincount(q.ravel(), minlength=256))
        vals = 2.0 ** math.ceil(math.log2(max(levels, 1)))
        qf = q.astype(np.float32)
        field_ = gen.poisson(qf * (vals / 255.0)).astype(np.float32) * np.float32(255.0 / vals) - qf
        field_ *= np.float32(noise["scale"])
        if noise["grey"]:
            field_ = field_[..., None]
    # In place: every array reaching here was made by apply_params (never the caller's image).
    x += field_  # a grey (h, w, 1) field broadcasts over the channels
    return np.clip(x, 0.0, 255.0, out=x)


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", _to_uint8(x, in_place=True), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("cv2.imencode('.jpg') failed")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR).astype(np.float32)


def _stage_without_jpeg(x: np.ndarray, stage: Mapping[str, Any]) -> np.ndarray:
    if stage["blur"] is not None:
        x = _blur(x, stage["blur"])
    x = _resize(x, stage["resize"]["size"], stage["resize"]["mode"])
    return _add_noise(x, stage["noise"])


def _check_rgb(img: np.ndarray) -> None:
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
        shape = getattr(img, "shape", None)
        raise ValueError(f"expected HWC uint8 RGB array, got {type(img).__name__} {getattr(img, 'dtype', '')} {shape}")


def apply_params(img: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """The LQ image of ``img`` (HWC uint8 RGB) under recorded ``params``; a pure function of both."""
    _check_rgb(img)
    h, w = img.shape[:2]
    if [h, w] != list(params["input_size"]):
        raise ValueError(f"params were sampled for {params['input_size']}, image is {[h, w]}")
    x = cv2.cvtColor(img, cv2.COLOR_RGB2BGR).astype(np.float32)
    x = _jpeg(_stage_without_jpeg(x, params["stage1"]), params["stage1"]["jpeg_quality"])
    x = _stage_without_jpeg(x, params["stage2"])
    final = params["final"]
    quality = params["stage2"]["jpeg_quality"]
    if not final["resize_first"]:
        x = _jpeg(x, quality)
    x = _resize(x, final["size"], final["resize_mode"])
    if final["sinc"] is not None:
        x = _blur(x, final["sinc"])
    if final["resize_first"]:
        x = _jpeg(x, quality)
    if final["upsample_mode"] is not None:
        x = _resize(x, (h, w), final["upsample_mode"])
    return cv2.cvtColor(_to_uint8(x, in_place=True), cv2.COLOR_BGR2RGB)


def degrade(img: np.ndarray, preset: str | DegradationPreset, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Degrade ``img`` (HWC uint8 RGB) with parameters drawn from ``preset`` by ``rng``; returns the LQ image (same
    H x W, uint8 RGB) and the sampled params (JSON data; :func:`apply_params` replays them)."""
    _check_rgb(img)
    params = sample_params(preset, img.shape[:2], rng)
    return apply_params(img, params), params


def degrade_seeded(img: np.ndarray, preset: str | DegradationPreset,
                   seed: int | Sequence[int]) -> tuple[np.ndarray, dict]:
    """:func:`degrade` with ``np.random.default_rng(seed)``; e.g. ``seed=(epoch, sample_index)``."""
    return degrade(img, preset, np.random.default_rng(seed))
