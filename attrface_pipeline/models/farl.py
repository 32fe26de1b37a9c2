"""FaRL face-attribute model: CLIP ViT-B/16 visual backbone + facer's multi-pooling attribute head.

One file, diffusers-style: the constructor takes plain config values; ``save_pretrained``/``from_pretrained``
(``config.json`` + ``diffusion_pytorch_model.safetensors``) are exact inverses. Parameter names follow OpenAI
CLIP's visual tower (``conv1``, ``class_embedding``, ``transformer.resblocks.N``...) so the published facer
checkpoint maps onto it key by key.
"""

from __future__ import annotations

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
