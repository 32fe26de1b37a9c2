"""A²BFR's conditioned Flux on the tiny zoo model (CPU): faithful to the stock forward, LoRA only on condition
tokens, condition at t = 0, KV cache, both LoRA layouts, the differentiable FaRL path."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from attrface_pipeline.images import read_rgb
from attrface_pipeline.models.farl import load_attribute_model
from attrface_pipeline.stages.attributes import farl_input
from training.a2bfr.losses import Objective, farl_pixels
from training.a2bfr.model import (ConditionedFlux, add_condition_lora, freeze_unused_lora, lora_target_names,
                                  set_lora_scale)
from training.a2bfr.pipeline import A2BFRPipeline, find_lora_file, save_a2bfr_lora

B, GRID = 2, 4  # 64 px faces: 8x8 latents, 4x4 packed tokens


@pytest.fixture()
def transformer(training_zoo):
    return FluxTransformer2DModel.from_pretrained(training_zoo / "flux", subfolder="transformer").eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(B, GRID * GRID, 64, generator=g),
            "prompt_embeds": torch.randn(B, 8, 64, generator=g), "pooled": torch.randn(B, 32, generator=g),
            "timestep": torch.tensor([0.3, 0.8]), "guidance": torch.tensor([3.0, 3.0]),
            "img_ids": FluxPipeline._prepare_latent_image_ids(B, GRID, GRID, "cpu", torch.float32),
            "txt_ids": torch.zeros(8, 3)}


def _randomise_lora(module, seed=1):
    """Random adapter weights (B is zero at init), eval mode (the new LoRA dropout layers start in train mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    module.eval()


def _stock(transformer, x):
    return transformer(x["latents"], encoder_hidden_states=x["prompt_embeds"], pooled_projections=x["pooled"],
                       timestep=x["timestep"], img_ids=x["img_ids"], txt_ids=x["txt_ids"],
                       guidance=x["guidance"]).sample


def test_lora_targets_are_the_published_list(transformer):
    add_condition_lora(transformer, rank=4)
    names = lora_target_names(transformer)
    double = [f"transformer_blocks.0.{m}" for m in ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v",
                                                    "attn.to_out.0", "ff.net.2")]
    single = [f"single_transformer_blocks.{i}.{m}" for i in range(2)
              for m in ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")]
    assert sorted(names) == sorted(["x_embedder", *double, *single])
    assert "proj_out" not in names and not any("context" in n or "add_" in n for n in names)


def test_without_condition_it_is_the_stock_forward_whatever_the_lora(transformer):
    x = _inputs()
    reference = _stock(transformer, x)
    model = ConditionedFlux(transformer)
    assert torch.equal(model(**x), reference)
    add_condition_lora(transformer, rank=4)
    _randomise_lora(transformer)
    set_lora_scale(transformer, "default", 1.0)
    assert torch.equal(model(**x), reference)  # text and image tokens use the base weights only
    cond = torch.randn(B, GRID * GRID, 64)
    with_cond = model(**x, cond_tokens=cond)
    _randomise_lora(transformer, seed=2)
    assert torch.equal(model(**x), reference)
    assert not torch.allclose(model(**x, cond_tokens=cond), with_cond)  # ... and the condition stream uses LoRA


def test_condition_stream_runs_at_timestep_zero(transformer):
    seen = []
    transformer.time_text_embed.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    x = _inputs()
    ConditionedFlux(transformer)(**x, cond_tokens=torch.randn(B, GRID * GRID, 64))
    assert len(seen) == 2
    assert torch.allclose(seen[0], x["timestep"] * 1000) and torch.equal(seen[1], torch.zeros(B))


def test_condition_cache_equals_recomputing_and_needs_self_attention(transformer):
    add_condition_lora(transformer, rank=4)
    _randomise_lora(transformer)
    x, cond = _inputs(), torch.randn(B, GRID * GRID, 64)
    model = ConditionedFlux(transformer, condition_attends="self")
    cache = model.condition_cache(cond, x["img_ids"], pooled=x["pooled"], guidance=x["guidance"])
    assert len(cache) == 3  # 1 double + 2 single blocks
    torch.testing.assert_close(model(**x, cond_cache=cache), model(**x, cond_tokens=cond), rtol=0, atol=1e-6)
    every = ConditionedFlux(transformer, condition_attends="all")
    assert not torch.allclose(every(**x, cond_tokens=cond), model(**x, cond_tokens=cond))
    with pytest.raises(ValueError, match="condition_attends='self'"):
        every.condition_cache(cond, x["img_ids"], pooled=x["pooled"], guidance=x["guidance"])


def test_gradient_checkpointing_changes_nothing_but_memory(transformer):
    add_condition_lora(transformer, rank=4)
    _randomise_lora(transformer)
    frozen = freeze_unused_lora(transformer)
    assert len(frozen) == 6 and all(n.startswith("single_transformer_blocks.1.") for n in frozen)
    x, cond = _inputs(), torch.randn(B, GRID * GRID, 64)
    grads = []
    for ckpt in (False, True):
        transformer.zero_grad()
        out = ConditionedFlux(transformer, gradient_checkpointing=ckpt)(**x, cond_tokens=cond)
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all("lora_" in n for n in grads[0])
    for name in grads[0]:  # every trainable weight gets a gradient: DDP needs no find_unused_parameters
        torch.testing.assert_close(grads[0][name], grads[1][name])


def _lq_image(size=64):
    import cv2

    from attrface_pipeline.config import PROJECT_ROOT

    path = sorted((PROJECT_ROOT / "data" / "samples" / "lq_real").glob("*.png"))[0]
    return cv2.resize(read_rgb(path), (size, size), interpolation=cv2.INTER_AREA)


def _restore(pipe, lq, **kw):
    return np.asarray(pipe(lq, height=64, width=64, num_inference_steps=3, max_sequence_length=32,
                           generator=torch.Generator().manual_seed(0), progress=False, **kw).images[0])


def test_our_lora_saves_and_loads_to_identical_restorations(training_zoo, tmp_path):
    pipe = A2BFRPipeline.from_pretrained(training_zoo / "flux")
    add_condition_lora(pipe.transformer, rank=4, adapter_name="default")
    _randomise_lora(pipe.transformer)
    set_lora_scale(pipe.transformer, "default", 0.5)  # not the default: set_adapters would reset it on load
    pipe.adapter_name, pipe.condition_attends = "default", "self"
    lq = _lq_image()
    before = _restore(pipe, lq)
    save_a2bfr_lora(pipe.transformer, tmp_path / "lora", adapter_name="default",
                    record={"lora_scale": 0.5, "condition_attends": "self"})
    assert find_lora_file(tmp_path / "lora")[1] == "pytorch_lora_weights.safetensors"
    fresh = A2BFRPipeline.from_pretrained(training_zoo / "flux")
    record = fresh.load_a2bfr_lora(tmp_path / "lora")
    assert record["condition_attends"] == "self" and fresh.condition_attends == "self" and fresh.lora_scale == 0.5
    np.testing.assert_array_equal(_restore(fresh, lq), before)
    # a stock FluxPipeline loads the same file
    FluxPipeline.from_pretrained(training_zoo / "flux").load_lora_weights(tmp_path / "lora")


def test_official_release_layout_loads_as_deblurring(training_zoo, tmp_path):
    """MediaX-SJTU/A2BFR's infer.py: load_lora_weights(<file>, adapter_name='deblurring'), OminiControl's keys."""
    from peft.utils import get_peft_model_state_dict

    source = A2BFRPipeline.from_pretrained(training_zoo / "flux")
    add_condition_lora(source.transformer, rank=8, alpha=8, adapter_name="default")
    _randomise_lora(source.transformer, seed=5)
    state = get_peft_model_state_dict(source.transformer, adapter_name="default")
    FluxPipeline.save_lora_weights(tmp_path / "release", transformer_lora_layers=state,
                                   weight_name="default.safetensors")
    pipe = A2BFRPipeline.from_pretrained(training_zoo / "flux")
    assert pipe.load_a2bfr_lora(tmp_path / "release" / "default.safetensors") == {}
    assert pipe.adapter_name == "deblurring" and pipe.condition_attends == "all"
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="deblurring")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    set_lora_scale(source.transformer, "default", 1.0)
    source.adapter_name = "default"
    lq = _lq_image()
    loaded, original = (p(lq, height=64, width=64, num_inference_steps=3, max_sequence_length=32, output_type="pt",
                          generator=torch.Generator().manual_seed(0), progress=False).images for p in (pipe, source))
    torch.testing.assert_close(loaded, original, rtol=0, atol=1e-4)  # same weights; kernels may round differently
    with pytest.raises(FileNotFoundError, match="exactly one"):
        find_lora_file(tmp_path)


def test_image_guidance_runs_the_black_image_pass_as_the_official_or_batched(training_zoo):
    pipe = A2BFRPipeline.from_pretrained(training_zoo / "flux")
    calls = []
    pipe.transformer.x_embedder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    lq = _lq_image()
    plain = _restore(pipe, lq)
    assert calls == [1, 1] * 3  # noisy latents + condition, one row each, per step
    calls.clear()
    guided = _restore(pipe, lq, image_guidance_scale=2.0)
    assert calls == [1, 1] * 6 and not np.array_equal(plain, guided)  # a second call per step, as the official
    calls.clear()
    batched = _restore(pipe, lq, image_guidance_scale=2.0, batch_guidance=True)
    assert calls == [2, 2] * 3  # cond + uncond rows in one call per step
    assert np.abs(batched.astype(int) - guided.astype(int)).max() <= 1  # fp32: kernels round alike


def test_farl_pixels_match_the_classifier_input_on_real_faces():
    from attrface_pipeline.config import PROJECT_ROOT

    for path in sorted((PROJECT_ROOT / "data" / "samples" / "aligned_hq").glob("*.png"))[:2]:
        rgb = read_rgb(path)
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
        # within one grey level (1/255 / CLIP std ~ 0.015) of the cv2 warp the attribute stage uses
        assert np.abs(farl_pixels(x)[0].numpy() - farl_input(rgb)).max() < 0.015


def test_attribute_and_dual_losses_reach_only_the_lora(training_zoo):
    from training.a2bfr.config import LossSettings

    pipe = A2BFRPipeline.from_pretrained(training_zoo / "flux")
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    add_condition_lora(pipe.transformer, rank=4)
    _randomise_lora(pipe.transformer)
    freeze_unused_lora(pipe.transformer)
    farl = load_attribute_model(training_zoo / "farl").requires_grad_(False)
    model = ConditionedFlux(pipe.transformer)
    lq = torch.from_numpy(_lq_image()).permute(2, 0, 1)[None].float() / 127.5 - 1
    batch = {"lq": lq.repeat(2, 1, 1, 1), "gt_src": lq.repeat(2, 1, 1, 1), "gt_tar": -lq.repeat(2, 1, 1, 1),
             "prompt_src": ["a face", "a face"], "prompt_tar": ["a face, smiling"] * 2,
             "attr_index": torch.tensor([31, 31]), "attr_probs_src": torch.full((2, 40), 0.3),
             "attr_probs_tar": torch.full((2, 40), 0.3)}
    lora = {n: p for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    for only in ("attr", "dual"):
        loss = LossSettings(aal_weight=1.0, sdt_weight=1.0, sdt_margin=1.0, text_dropout=0, condition_dropout=0)
        objective = Objective(pipe=pipe, farl=farl, loss=loss, resolution=64, max_sequence_length=32)
        pipe.transformer.zero_grad()
        out = objective(model, batch)
        assert {"loss", "diff", "attr", "dual", "gap"} <= out.keys()
        out["loss"].backward()  # the step's loss backpropagates to the LoRA only ...
        assert all(p.grad is None for p in list(pipe.vae.parameters()) + list(farl.parameters()))
        pipe.transformer.zero_grad()
        objective.terms(model, batch)[only].backward()  # ... and so does each term alone
        with_grad = [n for n, p in pipe.transformer.named_parameters() if p.grad is not None]
        assert with_grad and set(with_grad) <= set(lora)
        assert any(float(lora[n].grad.abs().sum()) > 0 for n in with_grad), only
        assert all(p.grad is None for p in list(pipe.vae.parameters()) + list(farl.parameters()))
