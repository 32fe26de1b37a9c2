"""Decoupled cross-attention (DCA) as a diffusers attention processor, for every cross-attention layer of an
SD2-family UNet or ControlNet.

The processor's ``encoder_hidden_states`` is one sequence ``[text tokens ; N implicit tokens]`` (B, L + N, D): the
caption's text-encoder states followed by the Remover's N tokens, so the stock UNet / ControlNet forward carries both
unchanged. The processor knows N and splits off the last N tokens.

What the processor computes, with diffusers' ``BasicTransformerBlock`` around it (the block calls
``attn2(norm2(h), encoder_hidden_states)`` and adds the residual itself: ``h_out = h + attn2(...)``):

    n      = norm2(h)                                    (the processor's ``hidden_states``)
    a_text = to_out(Attn(to_q(n), to_k(c_text), to_v(c_text)))               -- the stock text cross-attention
    sequential (RoboFace):  u = n + a_text                                     -- the text-attended features
    parallel (IP-Adapter):  u = n
    a_impl = to_out_impl(Attn(to_q(u), to_k_impl(c_impl), to_v_impl(c_impl)))
    return a_text + a_impl

so the block's own residual gives, in the sequential form, ``h1 = h + a_text`` (the paper's text step) and
``h2 = h1 + CA_impl(u)`` (the implicit step, residual on h1). The paper writes the implicit query as a function
of h1; inside the block the processor only sees the normalised input n, so the query is built from
``n + a_text`` -- h1 with the block's LayerNorm applied to h (a LayerNorm cannot be undone to recover h itself).

``to_q`` is the layer's own query projection (shared, as in IP-Adapter); ``to_k_impl``/``to_v_impl`` start as
copies of ``to_k``/``to_v`` and ``to_out_impl`` starts at zero (weight and bias), so a freshly installed network
computes exactly what the base network computes with the text tokens alone.

A context of exactly N tokens (no text) is stage I's form: the implicit tokens take the text's place and the layer
runs stock cross-attention over them (``to_k``/``to_v``/``to_out``; the branch is unused). The choice is made from
the context's shape, not from processor state, so it survives gradient checkpointing's recomputation.

The new parameters live in :class:`ImplicitBranch` modules, *not* inside the processors: the processors hold a
reference, and :func:`install_dca` returns the branches as an ``nn.ModuleDict``. The UNet's / ControlNet's own
``state_dict`` therefore stays the stock one (``save_pretrained`` writes a ControlNet any diffusers loader reads),
and the DCA weights are saved separately (:func:`save_dca` / :func:`load_dca`, safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

DCAMode = Literal["sequential", "parallel"]
MODES: tuple[str, ...] = ("sequential", "parallel")
ORDERS: tuple[str, ...] = ("text_first", "implicit_first")


class ImplicitBranch(nn.Module):
    """The implicit tokens' key/value projections and output projection for one cross-attention layer."""

    def __init__(self, cross_attention_dim: int, key_dim: int, value_dim: int, out_dim: int, *, kv_bias: bool,
                 out_bias: bool = True):
        super().__init__()
        self.to_k_impl = nn.Linear(cross_attention_dim, key_dim, bias=kv_bias)
        self.to_v_impl = nn.Linear(cross_attention_dim, value_dim, bias=kv_bias)
        self.to_out_impl = nn.Linear(value_dim, out_dim, bias=out_bias)

    @classmethod
    def from_attention(cls, attn: nn.Module) -> ImplicitBranch:
        """K/V copied from ``attn.to_k``/``attn.to_v``; output projection zero (the branch adds nothing yet)."""
        to_k, to_v, to_out = attn.to_k, attn.to_v, attn.to_out[0]
        branch = cls(to_k.in_features, to_k.out_features, to_v.out_features, to_out.out_features,
                     kv_bias=to_k.bias is not None, out_bias=to_out.bias is not None)
        branch.to(device=to_k.weight.device, dtype=to_k.weight.dtype)
        with torch.no_grad():
            branch.to_k_impl.weight.copy_(to_k.weight)
            branch.to_v_impl.weight.copy_(to_v.weight)
            if to_k.bias is not None:
                branch.to_k_impl.bias.copy_(to_k.bias)
                branch.to_v_impl.bias.copy_(to_v.bias)
            nn.init.zeros_(branch.to_out_impl.weight)
            if branch.to_out_impl.bias is not None:
                nn.init.zeros_(branch.to_out_impl.bias)
        return branch


def _prepare_mask(attn, mask: torch.Tensor | None, length: int, batch: int) -> torch.Tensor | None:
    """diffusers' mask handling of AttnProcessor2_0: (B, heads, 1|Lq, Lk) for scaled_dot_product_attention."""
    if mask is None:
        return None
    mask = attn.prepare_attention_mask(mask, length, batch)
    return mask.view(batch, attn.heads, -1, mask.shape[-1])


def _attend(attn, query_input: torch.Tensor, context: torch.Tensor, to_k: nn.Module, to_v: nn.Module,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head attention of ``query_input`` (B, Lq, C) over ``context`` (B, Lk, D) -> (B, Lq, heads*head_dim),
    before the output projection; the same operations, in the same order, as diffusers' AttnProcessor2_0."""
    batch = query_input.shape[0]
    query = attn.to_q(query_input)
    weight = to_k.weight
    key = to_k(context.to(weight.dtype)).to(query.dtype)
    value = to_v(context.to(weight.dtype)).to(query.dtype)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


class DecoupledCrossAttnProcessor:
    """diffusers attention processor for ``encoder_hidden_states = [text ; N implicit tokens]`` (L + N tokens, L >= 1),
    or the N implicit tokens alone (stock cross-attention over them, stage I); see the module docstring."""

    def __init__(self, branch: ImplicitBranch, num_tokens: int, mode: DCAMode = "sequential", *,
                 order: str = "text_first", use_implicit: bool = True):
        if mode not in MODES:
            raise ValueError(f"unknown DCA mode {mode!r}; choose from {MODES}")
        if order not in ORDERS:
            raise ValueError(f"unknown DCA order {order!r}; choose from {ORDERS}")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        self.branch = branch
        self.num_tokens = num_tokens
        self.mode = mode
        self.order = order  # implicit_first: the implicit tokens first, the text query built from their output
        self.use_implicit = use_implicit  # False: the text cross-attention alone (the implicit tokens are ignored)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("DecoupledCrossAttnProcessor is for cross-attention layers: encoder_hidden_states "
                             "[text ; implicit tokens] is required")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, total = encoder_hidden_states.shape[:2]
        implicit_only = total == self.num_tokens
        text_len = total if implicit_only else total - self.num_tokens
        if text_len < 1:
            raise ValueError(f"encoder_hidden_states has {total} tokens; DCA expects [text ; {self.num_tokens} "
                             f"implicit tokens] or the {self.num_tokens} implicit tokens alone")
        text_mask = impl_mask = None
        if attention_mask is not None:
            if attention_mask.shape[-1] == total and not implicit_only:
                text_mask, impl_mask = attention_mask[..., :text_len], attention_mask[..., text_len:]
            elif attention_mask.shape[-1] == text_len:
                text_mask = attention_mask
            else:
                raise ValueError(f"attention mask over {attention_mask.shape[-1]} tokens; expected {total} "
                                 f"(text + implicit) or {text_len} (text)")
            text_mask = _prepare_mask(attn, text_mask, text_len, batch)
            impl_mask = _prepare_mask(attn, impl_mask, total - text_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)  # per token: split-safe
        text, implicit = encoder_hidden_states[:, :text_len], encoder_hidden_states[:, text_len:]

        def text_step(query_input: torch.Tensor) -> torch.Tensor:
            return attn.to_out[1](attn.to_out[0](_attend(attn, query_input, text, attn.to_k, attn.to_v, text_mask)))

        def implicit_step(query_input: torch.Tensor) -> torch.Tensor:
            branch = self.branch
            impl = _attend(attn, query_input, implicit, branch.to_k_impl, branch.to_v_impl, impl_mask)
            return attn.to_out[1](branch.to_out_impl(impl.to(branch.to_out_impl.weight.dtype)))

        if implicit_only or not self.use_implicit:
            out = text_step(hidden_states)
        elif self.order == "implicit_first":
            impl = implicit_step(hidden_states)
            out = text_step(hidden_states + impl.to(hidden_states.dtype) if self.mode == "sequential"
                            else hidden_states)
            out = out + impl.to(out.dtype)
        else:
            out = text_step(hidden_states)
            query_input = hidden_states + out if self.mode == "sequential" else hidden_states
            out = out + implicit_step(query_input).to(out.dtype)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every diffusers ``Attention`` module of ``model`` whose context is an encoder sequence, by module name."""
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in model.named_modules() if isinstance(m, Attention) and m.is_cross_attention}


def _branch_key(layer_name: str) -> str:
    return layer_name.replace(".", "__")  # ModuleDict keys cannot contain dots


def install_dca(model: nn.Module, num_tokens: int, mode: DCAMode = "sequential", *, order: str = "text_first",
                use_implicit: bool = True) -> nn.ModuleDict:
    """Put a :class:`DecoupledCrossAttnProcessor` on every cross-attention layer of a UNet2DConditionModel or
    ControlNetModel (self-attention processors untouched); returns the new trainable branches, keyed by layer."""
    layers = cross_attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no cross-attention layers to decouple")
    branches = nn.ModuleDict()
    for name, attn in layers.items():
        if isinstance(attn.processor, DecoupledCrossAttnProcessor):
            raise ValueError(f"{type(model).__name__}.{name} already has a DecoupledCrossAttnProcessor")
        branch = ImplicitBranch.from_attention(attn)
        branches[_branch_key(name)] = branch
        attn.set_processor(DecoupledCrossAttnProcessor(branch, num_tokens, mode, order=order,
                                                       use_implicit=use_implicit))
    return branches


def dca_processors(model: nn.Module) -> dict[str, DecoupledCrossAttnProcessor]:
    return {name: attn.processor for name, attn in cross_attention_layers(model).items()
            if isinstance(attn.processor, DecoupledCrossAttnProcessor)}


def set_dca_mode(model: nn.Module, mode: DCAMode) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown DCA mode {mode!r}; choose from {MODES}")
    for proc in dca_processors(model).values():
        proc.mode = mode


DCA_FILE = "dca.safetensors"


def save_dca(path: str | Path, branches: nn.ModuleDict, *, num_tokens: int, mode: str) -> Path:
    """Write the branches' weights (any nesting of ModuleDicts) as safetensors, with N and the mode as metadata."""
    from safetensors.torch import save

    from attrface_pipeline.storage import atomic_write_bytes

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in branches.state_dict().items()}
    metadata = {"format": "pt", "roboface_dca": json.dumps({"num_tokens": num_tokens, "mode": mode})}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def read_dca_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("roboface_dca", "{}"))


def load_dca(path: str | Path, branches: nn.ModuleDict) -> dict:
    """Load weights written by :func:`save_dca` into ``branches`` (strict: every layer, every tensor); returns
    the metadata (num_tokens, mode)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    branches.load_state_dict(state, strict=True)
    return read_dca_metadata(path)
