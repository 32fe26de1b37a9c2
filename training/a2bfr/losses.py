"""A²BFR's training objective: flow matching + attribute-aware loss (AAL) + semantic dual-training (SDT).

REFERENCE.md: t = sigmoid(randn), x_t = (1 - t) x0 + t eps, target v = eps - x0. AAL: x0_hat = x_t - t v_hat,
unpacked, un-scaled, decoded by the frozen VAE (differentiably, optionally at reduced size), scored by the frozen
FaRL model, BCE against the GT probabilities. SDT (dual batches): one LQ, two targets (source GT + prompt, target
GT + prompt); L_dual = max(0, m - |A_tar - A_src|) on the flipped attribute's confidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from attrface_pipeline.models.farl import CLIP_MEAN, CLIP_STD
from attrface_pipeline.stages.align import BORDER_VALUE, similarity_transform, template_points


def farl_grid_theta(size: int, out: int, batch: int, device, dtype) -> torch.Tensor:
    """affine_grid theta for the FFHQ-aligned ``size`` crop -> FaRL's template at ``out`` (as farl_input warps)."""
    m = np.vstack([similarity_transform(template_points("ffhq", size), template_points("farl", out)), [0, 0, 1]])
    pixel_from_norm_out = np.array([[out / 2, 0, out / 2 - 0.5], [0, out / 2, out / 2 - 0.5], [0, 0, 1]])
    norm_from_pixel_in = np.array([[2 / size, 0, 1 / size - 1], [0, 2 / size, 1 / size - 1], [0, 0, 1]])
    theta = (norm_from_pixel_in @ np.linalg.inv(m) @ pixel_from_norm_out)[:2]
    return torch.as_tensor(theta, dtype=dtype, device=device).expand(batch, 2, 3)


def farl_pixels(images: torch.Tensor, out: int = 224) -> torch.Tensor:
    """Differentiable FaRL input from aligned faces in [-1, 1]: the warp and normalisation of ``farl_input``.

    FaRL's template frames the face more loosely than FFHQ's, so its crop reaches past the aligned image: those
    pixels get the same grey ``align_face`` fills (BORDER_VALUE)."""
    theta = farl_grid_theta(images.shape[-1], out, images.shape[0], images.device, images.dtype)
    grid = F.affine_grid(theta, [images.shape[0], 3, out, out], align_corners=False)
    grey = (torch.tensor(BORDER_VALUE, device=images.device, dtype=images.dtype) / 127.5 - 1).view(1, 3, 1, 1)
    x = F.grid_sample(images - grey, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + grey
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def attribute_bce(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE over faces and the 40 attributes (FaRL outputs probabilities)."""
    eps = 1e-6
    return F.binary_cross_entropy(probs.float().clamp(eps, 1 - eps), target.float())


def dual_hinge(a_src: torch.Tensor, a_tar: torch.Tensor, margin: float) -> torch.Tensor:
    """L_dual = max(0, m - |A_tar - A_src|), averaged over the batch."""
    return torch.relu(margin - (a_tar - a_src).abs()).mean()


def flow_sample(x0: torch.Tensor, generator: torch.Generator | None = None):
    """(t, x_t, target): t = sigmoid(randn) per sample, x_t = (1 - t) x0 + t eps, target eps - x0."""
    t = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device, generator=generator)).to(x0.dtype)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    tt = t.view(-1, *([1] * (x0.ndim - 1)))
    return t, (1 - tt) * x0 + tt * eps, eps - x0


@dataclass
class Objective:
    """Everything frozen the loss needs: the pipeline (VAE, text encoders), FaRL, the settings, cached embeddings."""

    pipe: object  # A2BFRPipeline
    farl: torch.nn.Module
    loss: object  # LossSettings
    resolution: int
    max_sequence_length: int
    latents: object | None = None  # a training.latent_cache.LatentCache of the GT images' VAE posteriors
    _empty: tuple | None = None

    @torch.no_grad()
    def encode_text(self, prompts: list[str]):
        embeds, pooled, txt_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                          device=self.pipe._execution_device,
                                                          max_sequence_length=self.max_sequence_length)
        return embeds, pooled, txt_ids

    def empty_text(self):
        if self._empty is None:
            self._empty = self.encode_text([""])[:2]
        return self._empty

    @torch.no_grad()
    def condition(self, lq: torch.Tensor) -> torch.Tensor:
        """Condition tokens of the LQ images; a ``condition_dropout`` share become the black image's tokens (the
        same 'no condition' the image guidance's unconditional pass uses)."""
        tokens = self.pipe.encode_packed(lq, sample=False)
        p = self.loss.condition_dropout
        if p > 0:
            drop = torch.rand(lq.shape[0], device=lq.device) < p
            if drop.any():
                black = self.pipe.encode_packed(torch.full_like(lq[:1], -1.0), sample=False)
                tokens = torch.where(drop.view(-1, 1, 1), black.expand_as(tokens), tokens)
        return tokens

    def text(self, prompts: list[str]):
        embeds, pooled, txt_ids = self.encode_text(prompts)
        p = self.loss.text_dropout
        if p > 0:
            drop = torch.rand(len(prompts), device=embeds.device) < p
            if drop.any():
                e0, p0 = self.empty_text()
                embeds = torch.where(drop.view(-1, 1, 1), e0.expand_as(embeds), embeds)
                pooled = torch.where(drop.view(-1, 1), p0.expand_as(pooled), pooled)
        return embeds, pooled, txt_ids

    def attributes(self, packed_x0: torch.Tensor) -> torch.Tensor:
        """FaRL probabilities (B, 40) of the decoded prediction; gradients flow through VAE and FaRL to the LoRA."""
        images = self.pipe.decode_packed(packed_x0, self.resolution, self.resolution, scale=self.loss.aal_scale)
        return self.farl(farl_pixels(images.float().clamp(-1, 1)).to(self.farl.dtype))

    @torch.no_grad()
    def gt_attributes(self, gt: torch.Tensor) -> torch.Tensor:
        return self.farl(farl_pixels(gt.float()).to(self.farl.dtype))

    def branch(self, model, gt: torch.Tensor, cond: torch.Tensor, prompts: list[str],
               target_probs: torch.Tensor | None, with_attributes: bool, gt_ids: list[str] | None = None) -> dict:
        """One target: flow-matching loss, and (if asked) the prediction's attribute probabilities and their BCE.
        ``gt_ids`` name the GT images in the latent cache: their cached posteriors are drawn from instead of
        encoding (the same draw: the VAE encoder consumes no random numbers)."""
        pipe = self.pipe
        with torch.no_grad():
            if self.latents is not None and gt_ids is not None:
                x0 = pipe.pack_posterior(self.latents.parameters(gt_ids))
            else:
                x0 = pipe.encode_packed(gt)
        embeds, pooled, txt_ids = self.text(prompts)
        t, x_t, target = flow_sample(x0)
        ids = pipe.latent_ids(gt.shape[0], self.resolution, self.resolution)
        guidance = (torch.full((gt.shape[0],), self.loss.train_guidance, device=x0.device, dtype=x0.dtype)
                    if pipe.transformer.config.guidance_embeds else None)
        v = model(x_t, prompt_embeds=embeds, pooled=pooled, timestep=t, img_ids=ids, txt_ids=txt_ids,
                  guidance=guidance, cond_tokens=cond)
        out = {"diff": F.mse_loss(v.float(), target.float())}
        if with_attributes:
            x0_hat = x_t - t.view(-1, 1, 1) * v
            probs = self.attributes(x0_hat)
            out["probs"] = probs
            if target_probs is None:
                target_probs = self.gt_attributes(gt)
            out["attr"] = attribute_bce(probs, target_probs)
        return out

    def terms(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """The loss terms (with gradients): diff and attr (per branch averaged), dual and gap in dual batches."""
        s = self.loss
        dual = "gt_src" in batch
        cond = self.condition(batch["lq"])
        aal = s.aal_weight > 0
        keys = list(batch.get("key", ()))
        if not dual:
            ids = [f"{k}.{side}" for k, side in zip(keys, batch.get("lq_from", ()))] or None
            b = self.branch(model, batch["gt"], cond, list(batch["prompt"]), None, aal, gt_ids=ids)
            return {k: v for k, v in b.items() if k != "probs"}
        need_probs = aal or s.sdt_weight > 0
        # Both targets in one transformer call (rows [src; tar], the same LQ condition twice): equal halves, so the
        # batch means are the means of the two branches' means.
        both = self.branch(model, torch.cat([batch["gt_src"], batch["gt_tar"]]), torch.cat([cond, cond]),
                           list(batch["prompt_src"]) + list(batch["prompt_tar"]),
                           torch.cat([batch["attr_probs_src"], batch["attr_probs_tar"]]), need_probs,
                           gt_ids=[f"{k}.src" for k in keys] + [f"{k}.tar" for k in keys] if keys else None)
        out = {"diff": both["diff"]}
        if need_probs:
            out["attr"] = both["attr"]
            index = torch.as_tensor(batch["attr_index"], device=cond.device).long().view(-1, 1)
            p_src, p_tar = both["probs"].chunk(2)
            a_src, a_tar = p_src.gather(1, index)[:, 0], p_tar.gather(1, index)[:, 0]
            out["dual"] = dual_hinge(a_src, a_tar, s.sdt_margin)
            out["gap"] = (a_tar - a_src).abs().mean()
        return out

    def __call__(self, model, batch: dict) -> dict:
        """The engine's step_fn. Single: L_diff + lambda L_attr. Dual: the sum of both branches' L_AAL (twice the
        branch means) + alpha L_dual."""
        s = self.loss
        terms = self.terms(model, batch)
        branches = 2 if "gt_src" in batch else 1
        loss = terms["diff"] * branches
        if s.aal_weight > 0:
            loss = loss + s.aal_weight * terms["attr"] * branches
        if s.sdt_weight > 0 and "dual" in terms:
            loss = loss + s.sdt_weight * terms["dual"]
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}
