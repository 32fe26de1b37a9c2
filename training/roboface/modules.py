"""RoboFace's two token networks, saved and loaded like any diffusers model (``save_pretrained``/``from_pretrained``).

* :class:`Mapper` -- CLIP image features (patch tokens of a hidden layer, B x P x C) -> N tokens in the UNet's
  cross-attention space (B x N x D). A small perceiver: N learned queries, each layer a cross-attention from the
  queries to the (projected) patches plus an MLP, pre-norm and residual; a final projection and LayerNorm put the
  tokens at the scale of the text encoder's normalised states. *Design decision*: the paper says only "Mapper";
  a resampler over patch tokens (as IP-Adapter-Plus) keeps the spatial detail an autoencoder needs.
* :class:`Remover` -- a pre-norm transformer encoder over the N tokens with learned positions, wrapped in a residual
  whose output projection starts at zero: an untrained Remover is the identity, so stage I-b starts from the
  Mapper's own tokens.

Default widths follow the UNet (``width=None`` -> cross_attention_dim: 1024 for SD2.1, 32 for the tiny zoo) and
heads are ``width // head_dim`` (64), so the same config scales from the tiny zoo to the real model.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _heads(width: int, head_dim: int) -> int:
    heads = max(1, width // head_dim)
    if width % heads:
        raise ValueError(f"width {width} is not divisible into {heads} heads of ~{head_dim}")
    return heads


class _MLP(nn.Sequential):
    def __init__(self, width: int, ratio: float):
        hidden = int(width * ratio)
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class _PerceiverLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = _MLP(width, mlp_ratio)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(queries)
        kv = torch.cat([self.norm_kv(context), q], dim=1)  # queries see the patches and each other
        queries = queries + self.attn(q, kv, kv, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class Mapper(ModelMixin, ConfigMixin):
    """CLIP patch features (B, P, image_dim) -> N tokens (B, N, cross_attention_dim)."""

    @register_to_config
    def __init__(self, image_dim: int, cross_attention_dim: int, num_tokens: int = 30, width: int | None = None,
                 depth: int = 2, head_dim: int = 64, mlp_ratio: float = 4.0):
        super().__init__()
        width = width or cross_attention_dim
        heads = _heads(width, head_dim)
        self.proj_in = nn.Linear(image_dim, width)
        self.queries = nn.Parameter(torch.randn(1, num_tokens, width) * width ** -0.5)
        self.layers = nn.ModuleList([_PerceiverLayer(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, cross_attention_dim)
        self.norm_tokens = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        context = self.proj_in(image_features.to(self.proj_in.weight.dtype))
        tokens = self.queries.expand(context.shape[0], -1, -1)
        for layer in self.layers:
            tokens = layer(tokens, context)
        return self.norm_tokens(self.proj_out(self.norm_out(tokens)))


class Remover(ModelMixin, ConfigMixin):
    """N tokens (B, N, dim) -> N tokens (B, N, dim); the identity until trained (zero output projection)."""

    @register_to_config
    def __init__(self, dim: int, num_tokens: int = 30, width: int | None = None, depth: int = 4, head_dim: int = 64,
                 mlp_ratio: float = 4.0):
        super().__init__()
        width = width or dim
        heads = _heads(width, head_dim)
        self.norm_in = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, width)
        self.positions = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, int(width * mlp_ratio), dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.proj_in.weight.dtype)
        x = self.proj_in(self.norm_in(tokens)) + self.positions
        return tokens + self.proj_out(self.norm_out(self.blocks(x)))
