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
    """(t, x_t, target): t = sigmoid(randn) per sample, x_t = (1 - t) x0 + t eps, target eps - x0.

    As OminiControl's training step: t stays float32 (the transformer rounds it to its dtype), eps is drawn in
    x0's dtype, x_t is computed at t's precision and then cast to x0's dtype."""
    t = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device, generator=generator))
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    tt = t.view(-1, *([1] * (x0.ndim - 1)))
    return t, ((1 - tt) * x0 + tt * eps).to(x0.dtype), eps - x0


@dataclass
class Objective:
    """Everything frozen the loss needs: the pipeline (VAE, text encoders), FaRL, the settings, cached embeddings."""

    pipe: object  # A2BFRPipeline
    farl: torch.nn.Module
    loss: object  # LossSettings
    resolution: int
    max_sequence_length: int
    latents: object | None = None  # a training.latent_cache.LatentCache of the GT images' VAE posteriors
    condition_latent: str = "sample"  # the LQ's latent: a posterior draw (OminiControl) or the posterior mean
    lora_dtype: str = "fp32"  # bf16: the flow-matching loss in the prediction's bf16, as OminiControl's step
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

    def condition_drop(self, lq: torch.Tensor) -> torch.Tensor | None:
        """Which LQ images ``condition_dropout`` replaces by the black image (None: dropout off, nothing drawn).
        Drawn first in a step: OminiControl decides its dropout in the data, before the step's draws."""
        p = self.loss.condition_dropout
        return torch.rand(lq.shape[0], device=lq.device) < p if p > 0 else None

    @torch.no_grad()
    def condition(self, lq: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Condition tokens of the LQ images, drawn from the VAE posterior (``condition_latent="sample"``) or its
        mean. ``drop``'s images become the black image (pixels -1, the 'no condition' of the image guidance's
        unconditional pass) before encoding, as OminiControl's dataset replaces the condition image: their tokens
        come from the same batch draw as the others."""
        if drop is not None and drop.any():
            lq = torch.where(drop.view(-1, 1, 1, 1), torch.full_like(lq, -1.0), lq)
        return self.pipe.encode_packed(lq, sample=self.condition_latent == "sample")

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

    def branch(self, model, gt: torch.Tensor, lq: torch.Tensor, prompts: list[str],
               target_probs: torch.Tensor | None, with_attributes: bool, gt_ids: list[str] | None = None,
               drop: torch.Tensor | None = None, repeat: int = 1) -> dict:
        """One target: flow-matching loss, and (if asked) the prediction's attribute probabilities and their BCE.
        ``gt_ids`` name the GT images in the latent cache: their cached posteriors are drawn from instead of
        encoding (the same draw: the VAE encoder consumes no random numbers). The random draws come in
        OminiControl's order: GT latent, (text dropout), t, noise, then the condition latent of ``lq`` (``drop``:
        :meth:`condition_drop`), whose tokens are used ``repeat`` times (rows [lq; lq] for two targets)."""
        pipe = self.pipe
        with torch.no_grad():
            if self.latents is not None and gt_ids is not None:
                x0 = pipe.pack_posterior(self.latents.parameters(gt_ids))
            else:
                x0 = pipe.encode_packed(gt)
        embeds, pooled, txt_ids = self.text(prompts)
        t, x_t, target = flow_sample(x0)
        cond = self.condition(lq, drop)
        cond = torch.cat([cond] * repeat) if repeat > 1 else cond
        ids = pipe.latent_ids(gt.shape[0], self.resolution, self.resolution)
        guidance = (torch.full((gt.shape[0],), self.loss.train_guidance, device=x0.device, dtype=x0.dtype)
                    if pipe.transformer.config.guidance_embeds else None)
        v = model(x_t, prompt_embeds=embeds, pooled=pooled, timestep=t, img_ids=ids, txt_ids=txt_ids,
                  guidance=guidance, cond_tokens=cond)
        # bf16 LoRA: OminiControl's mse of the bf16 prediction and target; else in float32
        out = {"diff": F.mse_loss(v, target.to(v.dtype)) if self.lora_dtype == "bf16"
               else F.mse_loss(v.float(), target.float())}
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
        lq = batch["lq"]
        drop = self.condition_drop(lq)
        aal = s.aal_weight > 0
        keys = list(batch.get("key", ()))
        if not dual:
            ids = [f"{k}.{side}" for k, side in zip(keys, batch.get("lq_from", ()))] or None
            b = self.branch(model, batch["gt"], lq, list(batch["prompt"]), None, aal, gt_ids=ids, drop=drop)
            return {k: v for k, v in b.items() if k != "probs"}
        need_probs = aal or s.sdt_weight > 0
        # Both targets in one transformer call (rows [src; tar], the same LQ condition twice): equal halves, so the
        # batch means are the means of the two branches' means.
        both = self.branch(model, torch.cat([batch["gt_src"], batch["gt_tar"]]), lq,
                           list(batch["prompt_src"]) + list(batch["prompt_tar"]),
                           torch.cat([batch["attr_probs_src"], batch["attr_probs_tar"]]), need_probs,
                           gt_ids=[f"{k}.src" for k in keys] + [f"{k}.tar" for k in keys] if keys else None,
                           drop=drop, repeat=2)
        out = {"diff": both["diff"]}
        if need_probs:
            out["attr"] = both["attr"]
            index = torch.as_tensor(batch["attr_index"], device=lq.device).long().view(-1, 1)
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
