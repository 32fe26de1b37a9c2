"""LPIPS and the FID Inception-v3 in the published weight formats, on the offline random-weight files and real faces."""

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.images import read_rgb
from attrface_pipeline.models import tiny
from attrface_pipeline.models.store import ModelStore
from training.eval.networks import FID_INCEPTION_FILES, FIDInceptionV3, LPIPS

ALIGNED = sorted((PROJECT_ROOT / "data" / "samples" / "aligned_hq").glob("*.png"))
# The published LPIPS v0.1 linear layers (lpips/weights/v0.1/alex.pth, sha256 df73285e...) ship with torchmetrics.
PUBLISHED_LPIPS_LIN = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "alex.pth"


def _faces(n: int, size: int) -> torch.Tensor:
    rgb = [cv2.resize(read_rgb(p), (size, size), interpolation=cv2.INTER_AREA) for p in ALIGNED[:n]]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metric_networks")
    return {name: tiny.generate(name, root / name) for name in ("lpips", "fid-inception")}


@pytest.fixture(scope="module")
def lpips(zoo) -> LPIPS:
    return LPIPS.from_pretrained(zoo["lpips"])


@pytest.fixture(scope="module")
def inception(zoo) -> FIDInceptionV3:
    return FIDInceptionV3.from_pretrained(zoo["fid-inception"])


# -- LPIPS ---------------------------------------------------------------------------------------------------------
def test_lpips_is_zero_on_identical_faces_symmetric_and_positive_otherwise(lpips):
    x = _faces(4, 64)
    y = x[[1, 2, 3, 0]]
    assert torch.equal(lpips(x, x), torch.zeros(4))
    d = lpips(x, y)
    assert d.shape == (4,) and (d > 0).all()
    assert torch.allclose(d, lpips(y, x), rtol=1e-5, atol=1e-7)


def test_lpips_grows_with_noise(lpips):
    face = _faces(1, 128)
    noise = torch.randn(face.shape, generator=torch.Generator().manual_seed(0))
    d = torch.cat([lpips(face, (face + s * noise).clamp(0, 1)) for s in (0.02, 0.05, 0.1, 0.2, 0.4)])
    assert (d.diff() > 0).all(), d


def test_lpips_is_bounded_by_its_unit_normalised_features(lpips):
    # Each layer compares unit vectors: sum_c w_c (a_c - b_c)^2 <= max(w) * |a - b|^2 <= 4 max(w).
    bound = 4 * sum(float(lin.weight.max()) for lin in lpips.lins)
    x = _faces(2, 64)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    d = torch.cat([lpips(x, 1 - x), lpips(x, noise)])
    assert (d > 0).all() and (d <= bound).all(), (d, bound)


def test_lpips_batch_equals_per_image(lpips):
    x, y = _faces(4, 64), _faces(4, 64).flip(-1)
    single = torch.cat([lpips(x[i:i + 1], y[i:i + 1]) for i in range(4)])
    assert torch.allclose(lpips(x, y), single, rtol=1e-5, atol=1e-7)


def test_lpips_is_frozen_with_the_published_sizes(lpips):
    # lpips/lpips.py ScalingLayer, applied after [0, 1] -> [-1, 1]
    assert torch.equal(lpips.shift.flatten(), torch.tensor([-0.030, -0.088, -0.188]))
    assert torch.equal(lpips.scale.flatten(), torch.tensor([0.458, 0.448, 0.450]))
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    assert all(isinstance(lpips.features[i], torch.nn.ReLU) for i in LPIPS._TAPS)  # relu1..relu5
    # torchvision's AlexNet has 61,100,840 parameters; its classifier (9216->4096->4096->1000) 58,631,144.
    assert sum(p.numel() for p in lpips.features.parameters()) == 61_100_840 - 58_631_144
    assert [tuple(lin.weight.shape) for lin in lpips.lins] == [(1, c, 1, 1) for c in (64, 192, 384, 256, 256)]


def test_lpips_ignores_the_classifier_and_takes_the_other_file_names(lpips, zoo, tmp_path):
    alex = torch.load(zoo["lpips"] / "alexnet-owt-7be5be79.pth", weights_only=True)
    alex["classifier.6.bias"] = torch.zeros(1000)  # the published file's classifier keys are unused by LPIPS
    torch.save(alex, tmp_path / "alexnet.pth")
    shutil.copy(zoo["lpips"] / "alex.pth", tmp_path / "lpips_alex.pth")
    again = LPIPS.from_pretrained(tmp_path)
    x, y = _faces(2, 64), _faces(2, 64).flip(-1)
    assert torch.equal(again(x, y), lpips(x, y))


def test_lpips_loads_the_published_linear_layers(zoo, tmp_path):
    if not PUBLISHED_LPIPS_LIN.is_file():
        pytest.skip(f"this torchmetrics ships no {PUBLISHED_LPIPS_LIN}")
    shutil.copy(zoo["lpips"] / "alexnet-owt-7be5be79.pth", tmp_path)
    shutil.copy(PUBLISHED_LPIPS_LIN, tmp_path / "alex.pth")  # its tensors were saved on CUDA: read onto the CPU
    model = LPIPS.from_pretrained(tmp_path)
    published = torch.load(PUBLISHED_LPIPS_LIN, map_location="cpu", weights_only=True)
    for i, lin in enumerate(model.lins):
        assert torch.equal(lin.weight, published[f"lin{i}.model.1.weight"])
        assert (lin.weight >= 0).all()


def test_lpips_save_pretrained_round_trips(lpips, tmp_path):
    restored = LPIPS.from_pretrained(lpips.save_pretrained(tmp_path))
    for (k, a), b in zip(lpips.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), k


def test_lpips_errors_name_the_folder_and_the_files(zoo, tmp_path, lpips):
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as err:
        LPIPS.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value) and "alex.pth" in str(err.value)
    shutil.copy(zoo["lpips"] / "alexnet-owt-7be5be79.pth", tmp_path)
    torch.save({f"lin{i}.model.1.weight": torch.ones(1, 8, 1, 1) for i in range(5)}, tmp_path / "alex.pth")
    with pytest.raises(ValueError, match="alex.pth"):
        LPIPS.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="equal shapes"):
        lpips(_faces(1, 64), _faces(1, 96))


def test_tiny_lpips_resolves_through_the_model_store(tmp_path):
    store = ModelStore(tmp_path)
    assert store.check("tiny/lpips") is None and store.check("tiny/fid-inception") is None
    model = LPIPS.from_pretrained(store.resolve("tiny/lpips"))
    assert model(_faces(1, 64), _faces(1, 64)).item() == 0


# -- FID Inception-v3 ----------------------------------------------------------------------------------------------
def test_inception_features_are_pool3_vectors_and_batch_independent(inception):
    x = _faces(3, 64)
    feats = inception(x)
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()
    assert (feats >= 0).all()  # an average of ReLU outputs
    assert feats.std() > 0 and not torch.allclose(feats[0], feats[1])
    for i in (0, 2):
        assert torch.allclose(inception(x[i:i + 1])[0], feats[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block,max_pool", [("Mixed_5b", False), ("Mixed_6b", False), ("Mixed_7b", False),
                                            ("Mixed_7c", True)])
def test_inception_pool_branches_follow_the_tf_graph(inception, block, max_pool):
    """pytorch-fid's patches: 3x3 average pools leave the padding out of the mean; Mixed_7c max-pools instead."""
    module = getattr(inception, block)
    x = torch.rand(1, module.branch_pool.conv.in_channels, 9, 9, generator=torch.Generator().manual_seed(1))
    out = module(x)[:, -module.branch_pool.conv.out_channels:]
    pooled = F.max_pool2d(x, 3, 1, 1) if max_pool else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    assert torch.allclose(out, module.branch_pool(pooled), atol=1e-5)
    plain = F.avg_pool2d(x, 3, 1, 1)  # torchvision's Inception: zeros of the padding count
    assert not torch.allclose(out, module.branch_pool(plain), atol=1e-3)


def test_inception_state_dict_has_the_pytorch_fid_layout(inception, zoo):
    state = inception.state_dict()
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_5b.branch1x1.bn.running_mean"].shape == (64,)
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.bias"].shape == (1008,)
    assert not any(k.startswith("AuxLogits") for k in state)
    assert {m.eps for m in inception.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.001}
    assert sum(k.endswith(".conv.weight") for k in state) == 94
    # The offline file is written from its own table of names and shapes: both must agree key for key.
    written = torch.load(zoo["fid-inception"] / FID_INCEPTION_FILES[0], weights_only=True)
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert all((v > 0).all() for k, v in written.items() if k.endswith("running_var"))


def test_inception_parameter_count_matches_the_published_architecture(inception):
    # torchvision's inception_v3 has 27,161,264 parameters with its aux head (conv0 1x1 768->128 + BN: 98,560;
    # conv1 5x5 128->768 + BN: 2,459,136; fc 768->1000: 769,000) and a 1000-way fc; pytorch-fid's has no aux head
    # and a 1008-way fc (8 more rows of 2048 weights + 1 bias).
    expected = 27_161_264 - (98_560 + 2_459_136 + 769_000) + 8 * 2049
    assert sum(p.numel() for p in inception.parameters()) == expected == 23_850_960


def test_inception_loads_from_folder_file_and_short_name(inception, zoo, tmp_path):
    file = zoo["fid-inception"] / FID_INCEPTION_FILES[0]
    os.symlink(file, tmp_path / "pt_inception.pth")
    for source in (file, tmp_path):
        loaded = FIDInceptionV3.from_pretrained(source)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert torch.equal(loaded.Mixed_7c.branch_pool.conv.weight, inception.Mixed_7c.branch_pool.conv.weight)
        assert torch.equal(loaded.Mixed_6e.branch7x7dbl_5.bn.running_var,
                           inception.Mixed_6e.branch7x7dbl_5.bn.running_var)


def test_inception_accepts_files_without_batch_counters(inception, zoo, tmp_path):
    state = torch.load(zoo["fid-inception"] / FID_INCEPTION_FILES[0], weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "w.pth")
    loaded = FIDInceptionV3.from_pretrained(tmp_path / "w.pth")
    assert torch.equal(loaded.fc.weight, inception.fc.weight)


def test_inception_errors_name_the_path_and_the_file(zoo, tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth") as err:
        FIDInceptionV3.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError):
        FIDInceptionV3.from_pretrained(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing keys"):
        FIDInceptionV3.from_pretrained(zoo["lpips"] / "alex.pth")
