"""Metric networks that load the published weight files: LPIPS v0.1 (AlexNet) and the FID Inception-v3.

Our own definitions (no torchvision); the computations follow the reference code:

- ``LPIPS``: richzhang/PerceptualSimilarity ``lpips/lpips.py`` with ``net='alex', version='0.1'`` and
  ``normalize=True`` (also what pyiqa's ``lpips`` computes). Inputs in [0, 1] go to [-1, 1], then
  ``(x - shift) / scale`` per channel. The AlexNet activations after relu1..relu5 (64, 192, 384, 256, 256 channels)
  are unit-normalised over channels (``f / (||f|| + 1e-10)``); their squared differences go through a bias-free
  1x1 conv per layer, are averaged over space and summed over the layers.
- ``FIDInceptionV3``: mseitzer/pytorch-fid ``inception.py`` (``fid_inception_v3``, output block 3). Inputs in
  [0, 1] are resized to 299x299 (bilinear, ``align_corners=False``) and scaled to [-1, 1]; torchvision's
  Inception-v3 layout with the TF graph's differences (the pool branches of Mixed_5b-d, 6b-e and 7b average without
  counting padding; Mixed_7c's pool branch is a max pool); the output is the 2048-d global average pool. The
  1008-way ``fc`` is unused and kept only so the published state dict loads strictly.

Both modules are frozen (``eval()``, ``requires_grad`` off); gradients still flow to the inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ALEXNET_FILES = ("alexnet-owt-7be5be79.pth", "alexnet.pth")
# The third is pyiqa's name for the same file (the suffix is the sha256 prefix of alex.pth).
LPIPS_LIN_FILES = ("alex.pth", "lpips_alex.pth", "LPIPS_v0.1_alex-df73285e.pth")
FID_INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "pt_inception.pth")
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LPIPS_LIN_SOURCE = "lpips/weights/v0.1/alex.pth in github.com/richzhang/PerceptualSimilarity"
FID_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W) in [0, 1], got {tuple(x.shape)}")


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path} does not hold the expected weights: {err}") from None


# -- LPIPS ---------------------------------------------------------------------------------------------------------
class LPIPS(nn.Module):
    """LPIPS v0.1 distance with the AlexNet trunk; ``forward(x, y)`` takes (N, 3, H, W) in [0, 1], returns (N,)."""

    CHANNELS = (64, 192, 384, 256, 256)
    _TAPS = (1, 4, 7, 9, 11)  # indices of relu1..relu5 in ``features``

    def __init__(self) -> None:
        super().__init__()
        # torchvision's AlexNet ``features`` up to relu5 (its last max pool is unused); the indices are the
        # published file's key names (features.0/3/6/8/10).
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def _normalised_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (2 * x - 1 - self.shift) / self.scale
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._TAPS:
                feats.append(x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS per pair: ``x``, ``y`` (N, 3, H, W) in [0, 1] -> (N,), 0 for identical images."""
        _check_images(x)
        if x.shape != y.shape:
            raise ValueError(f"LPIPS compares equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
        # Two passes, not one concatenated batch: identical inputs then give bitwise identical features (distance 0).
        total = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, self._normalised_features(x), self._normalised_features(y)):
            total = total + lin((fx - fy).square()).mean((1, 2, 3))
        return total

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> LPIPS:
        """Load torchvision's AlexNet file (``features.*`` only) and the LPIPS v0.1 ``alex.pth`` from ``folder``."""
        folder = Path(folder)
        alex_path, lin_path = _find(folder, ALEXNET_FILES), _find(folder, LPIPS_LIN_FILES)
        if alex_path is None or lin_path is None:
            raise FileNotFoundError(
                f"LPIPS weights not found in {folder}: it needs torchvision's AlexNet weights "
                f"({' or '.join(ALEXNET_FILES)}, from {ALEXNET_URL}) and the LPIPS v0.1 linear layers "
                f"({' or '.join(LPIPS_LIN_FILES)}: {LPIPS_LIN_SOURCE})"
            )
        model = cls()
        alex = _load(alex_path)
        _load_strict(model.features, {k[len("features."):]: v for k, v in alex.items() if k.startswith("features.")},
                     alex_path)
        lin = _load(lin_path)
        keys = [f"lin{i}.model.1.weight" for i in range(len(cls.CHANNELS))]
        if missing := [k for k in keys if k not in lin]:
            raise ValueError(f"{lin_path} is not an LPIPS v0.1 linear-layer file: missing {missing}")
        _load_strict(model.lins, {f"{i}.weight": lin[k] for i, k in enumerate(keys)}, lin_path)
        return model

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the two files ``from_pretrained`` reads (AlexNet ``features.*`` only, no classifier)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({f"features.{k}": v for k, v in self.features.state_dict().items()}, folder / ALEXNET_FILES[0])
        torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(self.lins)},
                   folder / LPIPS_LIN_FILES[0])
        return folder


# -- FID Inception-v3 ----------------------------------------------------------------------------------------------
class _ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001) -> ReLU, named ``conv``/``bn`` as in the published file.

    Stride-1 convs pad to keep the size unless ``valid``; stride-2 convs never pad.
    """

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, valid: bool = False):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (0, 0) if valid or stride > 1 else (kh // 2, kw // 2)
        self.conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average that ignores the zero padding, as TF's pool in the FID graph does."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_tf(x)),
        ], 1)


class _MixedB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _MixedC(nn.Module):
    """17x17 block with factorised 7x7 convs (Mixed_6b-e)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(_avg_pool_tf(x))], 1)


class _MixedD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = conv(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs (Mixed_7b, and Mixed_7c with ``max_pool``)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(three), self.branch3x3_2b(three),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's Inception-v3 pool3 features: (N, 3, H, W) in [0, 1] -> (N, 2048)."""

    _MIXED = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
              "Mixed_7a", "Mixed_7b", "Mixed_7c")

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3, valid=True)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3, valid=True)
        self.Mixed_5b = _MixedA(192, pool_features=32)
        self.Mixed_5c = _MixedA(256, pool_features=64)
        self.Mixed_5d = _MixedA(288, pool_features=64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b = _MixedC(768, c7=128)
        self.Mixed_6c = _MixedC(768, c7=160)
        self.Mixed_6d = _MixedC(768, c7=160)
        self.Mixed_6e = _MixedC(768, c7=192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the TF graph's 1008 classes; not used for FID features
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool3 features (N, 2048), non-negative, of images (N, 3, H, W) in [0, 1] (resized to 299x299)."""
        _check_images(x)
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in self._MIXED:
            x = getattr(self, name)(x)
        return x.mean((2, 3))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FIDInceptionV3:
        """Load ``pt_inception-2015-12-05-6726825d.pth``, given as the file or a folder holding it."""
        path = Path(path)
        file = _find(path, FID_INCEPTION_FILES) if path.is_dir() else path
        if file is None or not file.is_file():
            raise FileNotFoundError(
                f"FID Inception weights not found at {path}: give the file or a folder holding "
                f"{' or '.join(FID_INCEPTION_FILES)} (pytorch-fid's weights, from {FID_INCEPTION_URL})"
            )
        # BatchNorm's batch counters are training bookkeeping: files with or without them both load.
        state = {k: v for k, v in _load(file).items() if not k.endswith("num_batches_tracked")}
        model = cls()
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise ValueError(f"{file} does not hold the FID Inception weights: {err}") from None
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"{file} does not hold the FID Inception weights: missing keys {missing[:5]} "
                             f"({len(missing)}), unexpected keys {unexpected[:5]} ({len(unexpected)})")
        return model

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the state dict under the published file name; returns the file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), folder / FID_INCEPTION_FILES[0])
        return folder / FID_INCEPTION_FILES[0]
