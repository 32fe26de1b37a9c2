"""FaRL face-attribute model: CLIP ViT-B/16 visual backbone + facer's multi-pooling attribute head.

One file, diffusers-style: the constructor takes plain config values; ``save_pretrained``/``from_pretrained``
(``config.json`` + ``diffusion_pytorch_model.safetensors``) are exact inverses. Parameter names follow OpenAI
CLIP's visual tower (``conv1``, ``class_embedding``, ``transformer.resblocks.N``...) so the published facer
checkpoint maps onto it key by key.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", _QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([_ResidualAttentionBlock(width, heads) for _ in range(layers)])


class FaRLAttributeModel(ModelMixin, ConfigMixin):
    """Input (N, 3, image_size, image_size) CLIP-normalised; output (N, num_classes) sigmoid probabilities."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, image_size: int = 224, patch_size: int = 16, width: int = 768, layers: int = 12,
                 heads: int = 12, num_classes: int = 40):
        super().__init__()
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads)
        # facer head: mean-, max- and CLS-pooled tokens, each with its own LayerNorm, softmax-weighted sum.
        self.head_norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(3)])
        self.head_weights = nn.Parameter(torch.zeros(3))
        self.classifier = nn.Linear(width, num_classes)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.features(pixel_values)
        patches = tokens[:, 1:]
        pooled = [patches.mean(1), patches.max(1).values, tokens[:, 0]]
        weights = torch.softmax(self.head_weights, dim=0)
        fused = sum(w * norm(p) for w, norm, p in zip(weights, self.head_norms, pooled))
        return torch.sigmoid(self.classifier(fused))


# --- facer checkpoint format ------------------------------------------------------------------------------------
# facer (FacePerceiver/facer, facer/farl/classification.py) wraps OpenAI-CLIP's VisualTransformer as ``backbone``
# (``proj`` and ``ln_post`` deleted) and VITClassificationHeadV0 as ``head``: ``weights`` (1, 3, 1) softmaxed over
# [mean, max, cls], ``norm_0..2`` LayerNorms in that order, ``final_fc`` Linear. Its forward returns logits.
_FACER_HEAD = {"head.final_fc.weight": "classifier.weight", "head.final_fc.bias": "classifier.bias"}
_FACER_IGNORED = ("backbone.proj", "backbone.ln_post.weight", "backbone.ln_post.bias")


class FacerCheckpointError(ValueError):
    """The state dict is not facer's FaRL attribute format (names or shapes differ)."""


def convert_facer_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """facer ``face_attribute.farl.*.pt`` state dict -> (our state dict, our config kwargs)."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in sd.items():
        if key in _FACER_IGNORED:
            continue
        if key in _FACER_HEAD:
            out[_FACER_HEAD[key]] = value
        elif key == "head.weights":
            if value.numel() != 3:
                raise FacerCheckpointError(
                    f"head.weights has {value.numel()} entries: a head over {value.numel() // 3} layers; only the "
                    "single-layer head of the published CelebA checkpoint (layers=[11]) is supported"
                )
            out["head_weights"] = value.reshape(3)
        elif key.startswith("head.norm_") and key.count(".") == 2:
            _, norm, param = key.split(".")
            out[f"head_norms.{norm.removeprefix('norm_')}.{param}"] = value
        elif key.startswith("backbone."):
            out[key.removeprefix("backbone.")] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise FacerCheckpointError(f"keys outside facer's FaRL attribute format: {unexpected[:5]}")
    try:
        width, _, patch, _ = out["conv1.weight"].shape
        tokens = out["positional_embedding"].shape[0]
        layers = 1 + max(int(k.split(".")[2]) for k in out if k.startswith("transformer.resblocks."))
        num_classes = out["classifier.weight"].shape[0]
    except (KeyError, ValueError) as err:
        raise FacerCheckpointError(f"not a facer FaRL attribute state dict: missing {err}") from None
    grid = int(round((tokens - 1) ** 0.5))
    config = dict(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                  heads=max(1, width // 64), num_classes=num_classes)  # CLIP's rule: 64-dim heads
    return out, config


def load_facer_checkpoint(path: str | Path, heads: int | None = None) -> FaRLAttributeModel:
    """Build our model from facer's ``.pt`` file, read with ``weights_only=True`` (no pickled code runs)."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise FacerCheckpointError(f"{path}: expected a state dict, got {type(raw).__name__}")
    state, config = convert_facer_state_dict(raw)
    if heads is not None:
        config["heads"] = heads
    model = FaRLAttributeModel(**config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FacerCheckpointError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def load_attribute_model(path: str | Path) -> FaRLAttributeModel:
    """A ``from_pretrained`` directory (ours, e.g. the tiny zoo or a converted checkpoint) or a facer ``.pt``."""
    path = Path(path)
    if path.is_dir():
        return FaRLAttributeModel.from_pretrained(path).eval()
    if path.suffix in {".pt", ".pth", ".bin"}:
        return load_facer_checkpoint(path)
    raise FacerCheckpointError(f"{path}: expected a model directory (config.json) or facer's .pt checkpoint")
