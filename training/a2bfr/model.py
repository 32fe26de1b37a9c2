"""A²BFR's conditioned Flux: the LQ image as extra tokens in the transformer's sequence (OminiControl conditioning).

The stock :class:`diffusers.FluxTransformer2DModel` keeps its weights and modules; this module runs its blocks
over three token streams instead of two:

- text tokens (``context_embedder``, the ``*_context`` / ``add_*`` weights), timestep t;
- noisy image tokens (base weights), timestep t;
- condition tokens: the VAE-encoded LQ image packed like the target, position ids a copy of the target grid (delta
  (0, 0): spatially aligned), timestep 0, and the **LoRA** weights. Only this stream calls the LoRA-wrapped layers;
  the other two call their base layers, so the adapter cannot change a forward without a condition.

Every stream has its own adaLN modulation (its own temb). Attention runs over the concatenated keys of all streams;
with ``condition_attends="self"`` the condition tokens attend only to themselves, which makes their keys/values the
same at every denoising step: :meth:`ConditionedFlux.condition_cache` computes them once per image and
:meth:`ConditionedFlux.forward` reuses them (``cond_cache=``) without running the condition stream again.

LoRA scale: like OminiControl, the condition stream applies the adapter at ``lora_scale`` (1.0), not peft's
alpha/rank; alpha is stored with the adapter and matters only to a stock pipeline that applies it everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn
from torch.utils.checkpoint import checkpoint

# REFERENCE.md (A²BFR, from OminiControl): x_embedder; double blocks norm1.linear, attn.to_q/k/v/out.0, ff.net.2;
# single blocks norm.linear, proj_mlp, proj_out, attn.to_q/k/v. Full-name regex: the top-level proj_out, the
# *_context and add_* (text) weights are not targets.
LORA_TARGETS = (
    r"x_embedder"
    r"|transformer_blocks\.\d+\.(norm1\.linear|attn\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.(to_q|to_k|to_v))"
)
CondAttends = Literal["all", "self"]


def lora_target_names(transformer: nn.Module) -> list[str]:
    """Module names the LoRA wraps (for tests and the saved adapter's documentation)."""
    pattern = re.compile(LORA_TARGETS)
    return [name for name, _ in transformer.named_modules() if pattern.fullmatch(name)]


LORA_INITS = {"gaussian": "gaussian", "kaiming": True}  # our names -> peft's init_lora_weights


def add_condition_lora(transformer: nn.Module, *, rank: int = 64, alpha: float = 4.0, dropout: float = 0.0,
                       adapter_name: str = "default", init: bool | str = "gaussian") -> None:
    """Wrap the LoRA targets with a peft adapter (diffusers' ``add_adapter``: saved/loaded in diffusers' format).

    ``init``: "gaussian" (A ~ N(0, 1/rank), B = 0: OminiControl's ``init_lora_weights: gaussian``), "kaiming"
    (peft's default: kaiming-uniform A, B = 0), or any peft ``init_lora_weights`` value. Defaults: OminiControl's
    training config (gaussian, peft's dropout 0)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        init_lora_weights=LORA_INITS.get(init, init) if isinstance(init, str) else init,
                        target_modules=LORA_TARGETS)
    transformer.add_adapter(config, adapter_name=adapter_name)


def freeze_unused_lora(transformer: nn.Module) -> list[str]:
    """Freeze the adapter weights whose condition-stream output nothing reads; returns their module names.

    Only the image tokens leave the last block, so the condition stream there needs only its keys and values: its
    query, MLP and output projection never reach the loss. Their LoRA weights stay at init (B = 0: no effect) and
    out of the optimizer, and DDP needs no ``find_unused_parameters``.
    """
    last = len(transformer.single_transformer_blocks) - 1
    names = [f"single_transformer_blocks.{last}.{m}" for m in ("attn.to_q", "proj_mlp", "proj_out")]
    frozen = []
    for name, param in transformer.named_parameters():
        if "lora_" in name and any(name.startswith(n + ".") for n in names):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def set_lora_scale(transformer: nn.Module, adapter_name: str, scale: float) -> int:
    """Set the adapter's scaling on every wrapped layer (OminiControl applies it at 1.0); returns the layer count."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in transformer.modules() if isinstance(m, LoraLayer) and adapter_name in m.scaling]
    if not layers:
        raise ValueError(f"the transformer has no LoRA adapter named {adapter_name!r}")
    for layer in layers:
        layer.scaling[adapter_name] = scale
    return len(layers)


def _linear(layer: nn.Module, x: torch.Tensor, lora: bool) -> torch.Tensor:
    """The layer with its adapter (condition stream) or its base layer alone (text and image streams)."""
    if not lora and hasattr(layer, "get_base_layer"):
        return layer.get_base_layer()(x)
    return layer(x)


def _modulate(norm: nn.Module, x: torch.Tensor, emb: torch.Tensor, lora: bool, chunks: int):
    """AdaLayerNormZero(Single) with the LoRA choice on its ``linear``: (x normed and modulated, *gates)."""
    params = _linear(norm.linear, F.silu(emb), lora).chunk(chunks, dim=1)
    shift, scale = params[0], params[1]
    return (norm.norm(x) * (1 + scale[:, None]) + shift[:, None], *params[2:])


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)  # (B, S, H*D) -> (B, H, S, D)


def _qkv(attn: nn.Module, x: torch.Tensor, lora: bool, *, context: bool = False):
    if context:
        q, k, v = attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
        norm_q, norm_k = attn.norm_added_q, attn.norm_added_k
    else:
        q, k, v = (_linear(layer, x, lora) for layer in (attn.to_q, attn.to_k, attn.to_v))
        norm_q, norm_k = attn.norm_q, attn.norm_k
    q, k, v = (_heads(t, attn.head_dim) for t in (q, k, v))
    return norm_q(q), norm_k(k), v


def _rope(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return apply_rotary_emb(x, freqs, sequence_dim=2)


def _attend(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> torch.Tensor:
    k = keys[0] if len(keys) == 1 else torch.cat(list(keys), dim=2)
    v = values[0] if len(values) == 1 else torch.cat(list(values), dim=2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2).to(q.dtype)


def _attend_main(q_m, k_m, v_m, k_c, v_c) -> torch.Tensor:
    """Text and image queries over their own keys and the condition's (computed now or cached), if any."""
    if k_c is None:
        return _attend(q_m, [k_m], [v_m])
    return _attend(q_m, [k_m, k_c], [v_m, v_c])


@dataclass
class Streams:
    """Per-block state: main = [text; image] tokens (None when only the condition runs), cond = condition tokens."""

    txt: torch.Tensor | None
    img: torch.Tensor | None
    cond: torch.Tensor | None


class ConditionedFlux(nn.Module):
    """Runs a (LoRA-wrapped) ``FluxTransformer2DModel`` with condition tokens; see the module docstring."""

    def __init__(self, transformer: nn.Module, *, condition_attends: CondAttends = "all",
                 gradient_checkpointing: bool = False):
        super().__init__()
        if condition_attends not in ("all", "self"):
            raise ValueError(f"condition_attends must be 'all' or 'self', not {condition_attends!r}")
        self.transformer = transformer
        self.condition_attends = condition_attends
        self.gradient_checkpointing = gradient_checkpointing

    # -- embeddings -------------------------------------------------------------------------------------------
    def _temb(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor, dtype) -> torch.Tensor:
        t = self.transformer
        timestep = timestep.to(dtype) * 1000
        if t.config.guidance_embeds:
            if guidance is None:
                raise ValueError("this Flux transformer embeds guidance: pass guidance")
            return t.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled)
        return t.time_text_embed(timestep, pooled)

    def _cond_temb(self, like: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor, dtype):
        """The condition stream's temb: timestep 0 always, guidance input 1 (OminiControl)."""
        guidance = torch.ones_like(guidance) if guidance is not None else None
        return self._temb(torch.zeros_like(like), guidance, pooled, dtype)

    def _attend_condition(self, q_c, k_c, v_c, main_kv: tuple | None) -> torch.Tensor:
        """Condition queries over every token ("all", when the main streams run) or over themselves only."""
        if self.condition_attends == "all" and main_kv is not None:
            return _attend(q_c, [main_kv[0], k_c], [main_kv[1], v_c])
        return _attend(q_c, [k_c], [v_c])

    # -- blocks -----------------------------------------------------------------------------------------------
    def _double(self, block, s: Streams, temb, temb_c, rope_main, rope_c, cache_in, record: list | None) -> Streams:
        attn = block.attn
        main = s.img is not None
        out_t = out_i = out_c = None
        if main:
            n_t, *g_t = block.norm1_context(s.txt, emb=temb)
            n_i, *g_i = _modulate(block.norm1, s.img, temb, False, 6)
            q_t, k_t, v_t = _qkv(attn, n_t, False, context=True)
            q_i, k_i, v_i = _qkv(attn, n_i, False)
            q_m = _rope(torch.cat([q_t, q_i], 2), rope_main)
            k_m, v_m = _rope(torch.cat([k_t, k_i], 2), rope_main), torch.cat([v_t, v_i], 2)
        if s.cond is not None:
            n_c, *g_c = _modulate(block.norm1, s.cond, temb_c, True, 6)
            q_c, k_c, v_c = _qkv(attn, n_c, True)
            q_c, k_c = _rope(q_c, rope_c), _rope(k_c, rope_c)
            if record is not None:
                record.append((k_c, v_c))
        else:
            k_c, v_c = cache_in if cache_in is not None else (None, None)
        if main:
            a_m = _attend_main(q_m, k_m, v_m, k_c, v_c)
            a_t, a_i = a_m[:, : s.txt.shape[1]], a_m[:, s.txt.shape[1]:]
            out_t = self._double_tail(s.txt, attn.to_add_out(a_t), g_t, block.norm2_context, block.ff_context, None)
            out_i = self._double_tail(s.img, _linear(attn.to_out[0], a_i, False), g_i, block.norm2, block.ff, False)
        if s.cond is not None:
            a_c = self._attend_condition(q_c, k_c, v_c, (k_m, v_m) if main else None)
            out_c = self._double_tail(s.cond, _linear(attn.to_out[0], a_c, True), g_c, block.norm2, block.ff, True)
        return Streams(out_t, out_i, out_c)

    @staticmethod
    def _double_tail(x, attn_out, gates, norm2, ff, lora: bool | None):
        gate_msa, shift_mlp, scale_mlp, gate_mlp = gates
        x = x + gate_msa.unsqueeze(1) * attn_out
        h = norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        h = ff.net[1](ff.net[0](h))
        h = ff.net[2](h) if lora is None else _linear(ff.net[2], h, lora)
        return x + gate_mlp.unsqueeze(1) * h

    def _single(self, block, s: Streams, temb, temb_c, rope_main, rope_c, cache_in, record: list | None) -> Streams:
        attn = block.attn
        last = block is self.transformer.single_transformer_blocks[-1]

        def prepare(x, emb, lora):
            n, gate = _modulate(block.norm, x, emb, lora, 3)
            if lora and last:  # nothing reads the condition's output after the last block: keys and values only
                return gate, None, None, *_qkv(attn, n, lora)[1:]
            mlp = block.act_mlp(_linear(block.proj_mlp, n, lora))
            q, k, v = _qkv(attn, n, lora)
            return gate, mlp, q, k, v

        def finish(x, a, mlp, gate, lora):
            return x + gate.unsqueeze(1) * _linear(block.proj_out, torch.cat([a, mlp], dim=2), lora)

        main = s.img is not None
        out_m = out_c = None
        if main:
            x_m = torch.cat([s.txt, s.img], dim=1)
            gate_m, mlp_m, q_m, k_m, v_m = prepare(x_m, temb, False)
            q_m, k_m = _rope(q_m, rope_main), _rope(k_m, rope_main)
        if s.cond is not None:
            gate_c, mlp_c, q_c, k_c, v_c = prepare(s.cond, temb_c, True)
            k_c = _rope(k_c, rope_c)
            if record is not None:
                record.append((k_c, v_c))
        else:
            k_c, v_c = cache_in if cache_in is not None else (None, None)
        if main:
            out_m = finish(x_m, _attend_main(q_m, k_m, v_m, k_c, v_c), mlp_m, gate_m, False)
        if s.cond is not None and not last:
            q_c = _rope(q_c, rope_c)
            a_c = self._attend_condition(q_c, k_c, v_c, (k_m, v_m) if main else None)
            out_c = finish(s.cond, a_c, mlp_c, gate_c, True)
        n_txt = s.txt.shape[1] if main else 0
        return Streams(out_m[:, :n_txt] if main else None, out_m[:, n_txt:] if main else None, out_c)

    def _run(self, streams: Streams, temb, temb_c, rope_main, rope_c, cache: list | None, record: list | None):
        t = self.transformer
        blocks = [(self._double, b) for b in t.transformer_blocks]
        blocks += [(self._single, b) for b in t.single_transformer_blocks]
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for index, (fn, block) in enumerate(blocks):
            cache_in = cache[index] if cache is not None else None
            if use_ckpt and record is None:
                streams = checkpoint(fn, block, streams, temb, temb_c, rope_main, rope_c, cache_in, None,
                                     use_reentrant=False)
            else:
                streams = fn(block, streams, temb, temb_c, rope_main, rope_c, cache_in, record)
        return streams

    # -- public -----------------------------------------------------------------------------------------------
    def condition_cache(self, cond_tokens: torch.Tensor, cond_ids: torch.Tensor, *, pooled: torch.Tensor,
                        guidance: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the condition tokens in every block (``condition_attends="self"`` only)."""
        if self.condition_attends != "self":
            raise ValueError("a condition cache needs condition_attends='self' (with 'all' the condition's keys "
                             "depend on the noisy tokens at every step)")
        t = self.transformer
        cond = _linear(t.x_embedder, cond_tokens, True)
        temb_c = self._cond_temb(torch.zeros(cond.shape[0], device=cond.device), guidance, pooled, cond.dtype)
        record: list = []
        self._run(Streams(None, None, cond), None, temb_c, None, t.pos_embed(cond_ids), None, record)
        return record

    def forward(self, latents: torch.Tensor, *, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                timestep: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor,
                guidance: torch.Tensor | None = None, cond_tokens: torch.Tensor | None = None,
                cond_ids: torch.Tensor | None = None, cond_cache: list | None = None) -> torch.Tensor:
        """Velocity prediction for the packed ``latents`` (B, L, C). Without a condition (no ``cond_tokens`` and
        no ``cond_cache``) this is the stock transformer's forward."""
        if cond_tokens is not None and cond_cache is not None:
            raise ValueError("pass cond_tokens or cond_cache, not both")
        t = self.transformer
        img = _linear(t.x_embedder, latents, False)
        txt = t.context_embedder(prompt_embeds)
        temb = self._temb(timestep, guidance, pooled, img.dtype)
        rope_main = t.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
        cond = temb_c = rope_c = None
        if cond_tokens is not None:
            cond_ids = img_ids if cond_ids is None else cond_ids
            cond = _linear(t.x_embedder, cond_tokens, True)
            temb_c = self._cond_temb(timestep, guidance, pooled, img.dtype)
            rope_c = t.pos_embed(cond_ids)
        streams = self._run(Streams(txt, img, cond), temb, temb_c, rope_main, rope_c, cond_cache, None)
        return t.proj_out(t.norm_out(streams.img, temb))


def condition_ids_like(img_ids: torch.Tensor, delta: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Position ids of the condition tokens: a copy of the target grid, shifted by ``delta`` (0, 0 = aligned)."""
    ids = img_ids.clone()
    ids[:, 1] += delta[0]
    ids[:, 2] += delta[1]
    return ids
