"""FaRL attribute model: facer checkpoint conversion and parity with facer's forward pass."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from attrface_pipeline.models.farl import (FacerCheckpointError, FaRLAttributeModel, convert_facer_state_dict,
                                           load_attribute_model, load_facer_checkpoint)


class _FacerLayerNorm(nn.Module):  # facer/farl/model.py: statistics in fp32, eps inside the sqrt
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width) + 0.1 * torch.randn(width))
        self.bias = nn.Parameter(0.1 * torch.randn(width))

    def forward(self, x):
        u = x.float().mean(-1, keepdim=True)
        s = (x.float() - u).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x.float() - u) / torch.sqrt(s + 1e-5)).to(x.dtype) + self.bias


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _FacerBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)  # sequence-first (LND), as in facer
        self.ln_1 = _FacerLayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = _FacerLayerNorm(width)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _FacerReference(nn.Module):
    """An independent re-statement of facer's FaRL classifier (backbone + VITClassificationHeadV0, layers=[-1])
    with facer's module names, so its state_dict() is in the published checkpoint's naming."""

    def __init__(self, width=64, layers=2, heads=2, patch=16, size=224, classes=40):
        super().__init__()
        grid = size // patch
        self.backbone = nn.Module()
        self.backbone.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.backbone.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.backbone.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width**-0.5)
        self.backbone.ln_pre = _FacerLayerNorm(width)
        self.backbone.transformer = nn.Module()
        self.backbone.transformer.resblocks = nn.ModuleList([_FacerBlock(width, heads) for _ in range(layers)])
        self.head = nn.Module()
        self.head.weights = nn.Parameter(torch.randn(1, 3, 1))
        for i in range(3):
            setattr(self.head, f"norm_{i}", _FacerLayerNorm(width))
        self.head.final_fc = nn.Linear(width, classes)

    def forward(self, image):  # returns logits, like facer's net; facer applies the sigmoid outside
        b = self.backbone
        x = b.conv1(image).reshape(image.shape[0], b.conv1.out_channels, -1).permute(0, 2, 1)
        cls = b.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = b.ln_pre(torch.cat([cls, x], 1) + b.positional_embedding).permute(1, 0, 2)
        for blk in b.transformer.resblocks:
            x = blk(x)
        x = x.permute(1, 0, 2)
        w = int((x.shape[1] - 1) ** 0.5)
        feature = x[:, 1:].reshape(x.shape[0], w, w, -1).permute(0, 3, 1, 2)
        xs = [feature.mean([2, 3]), feature.max(-1).values.max(-1).values, x[:, 0]]
        xs = torch.stack([getattr(self.head, f"norm_{i}")(v) for i, v in enumerate(xs)], 1)
        return self.head.final_fc((xs * self.head.weights.softmax(dim=1)).sum(1))


@pytest.fixture(scope="module")
def facer_reference():
    torch.manual_seed(0)
    return _FacerReference().eval()


def test_converter_maps_every_facer_key(facer_reference):
    sd = facer_reference.state_dict()
    sd["backbone.proj"] = torch.zeros(64, 32)  # present in plain CLIP checkpoints; facer deletes it, we ignore it
    ours, config = convert_facer_state_dict({f"module.{k}": v for k, v in sd.items()})
    assert config == dict(image_size=224, patch_size=16, width=64, layers=2, heads=1, num_classes=40)
    assert ours["head_norms.2.weight"] is sd["head.norm_2.weight"]
    assert ours["classifier.bias"] is sd["head.final_fc.bias"]
    assert ours["head_weights"].shape == (3,)
    assert "transformer.resblocks.1.attn.in_proj_weight" in ours and "proj" not in ours
    model = FaRLAttributeModel(**{**config, "heads": 2})
    assert set(model.state_dict()) == set(ours)


def test_converter_rejects_other_formats(facer_reference):
    sd = dict(facer_reference.state_dict())
    with pytest.raises(FacerCheckpointError, match="outside"):
        convert_facer_state_dict({**sd, "decoder.weight": torch.zeros(1)})
    with pytest.raises(FacerCheckpointError, match="single-layer"):
        convert_facer_state_dict({**sd, "head.weights": torch.zeros(1, 6, 1)})


def test_facer_checkpoint_parity(tmp_path, facer_reference, samples):
    """Our model loaded from a facer-format .pt gives facer's probabilities on real face pixels."""
    from attrface_pipeline.images import read_rgb
    from attrface_pipeline.stages.attributes import farl_input

    path = tmp_path / "face_attribute.farl.celeba.pt"
    torch.save(facer_reference.state_dict(), path)
    model = load_facer_checkpoint(path, heads=2)
    crops = [read_rgb(p) for p in sorted((samples / "hq").iterdir())[:3] if p.suffix in {".png", ".jpg"}]
    x = torch.from_numpy(np.stack([farl_input(np.ascontiguousarray(c[:512, :512])) for c in crops]))
    with torch.no_grad():
        expected = torch.sigmoid(facer_reference(x))
        got = model(x)
    assert got.shape == (len(crops), 40)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert float((expected - 0.5).abs().max()) > 0.05  # not a degenerate all-0.5 comparison


def test_load_attribute_model_reads_tiny_zoo_and_rejects_unknown(tiny_zoo, tmp_path):
    model = load_attribute_model(tiny_zoo / "farl")
    assert isinstance(model, FaRLAttributeModel) and not model.training
    bad = tmp_path / "weights.onnx"
    bad.write_bytes(b"x")
    with pytest.raises(FacerCheckpointError, match="expected a model directory"):
        load_attribute_model(bad)


def test_facer_load_is_weights_only(tmp_path):
    """A pickle that would run code is refused, not executed."""
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, path)
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        load_attribute_model(path)
