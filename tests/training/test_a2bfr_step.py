"""A²BFR's training step as OminiControl's, on the tiny Flux and real faces (CPU), against hand-computed
expectations: the condition latent is a posterior draw at OminiControl's point of the random stream, the LoRA starts
as configured, and a trained LoRA records its condition latent for restore. ``benchmarks/a2bfr_train_parity.py``
runs OminiControl's own training step side by side."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.images import read_rgb
from training.a2bfr.config import A2BFRTrainConfig, LossSettings
from training.a2bfr.losses import Objective
from training.a2bfr.model import ConditionedFlux, add_condition_lora
from training.a2bfr.pipeline import A2BFRPipeline, LoraFileError, device_generator, save_a2bfr_lora
from training.a2bfr.restore import A2BFRRestorer
from training.a2bfr.train import lora_record, run_record
from training.data import _fit, to_tensor

FACES = [PROJECT_ROOT / "data" / "samples" / "aligned_hq" / f"ffhq_0000{i}.png" for i in (0, 1)]
LQ = PROJECT_ROOT / "data" / "samples" / "lq_real" / "0240.png"


@pytest.fixture(scope="module")
def pipe(training_zoo):
    pipe = A2BFRPipeline.from_pretrained(training_zoo / "flux")
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    add_condition_lora(pipe.transformer, rank=4)
    return pipe


def _config(tmp_path, zoo, train: dict | None = None, **model) -> A2BFRTrainConfig:
    lora = model.pop("lora", {})
    return A2BFRTrainConfig.model_validate({
        "model": {"base": str(zoo / "flux"), "farl": str(zoo / "farl"), "resolution": 64, "max_sequence_length": 32,
                  "lora": {"rank": 4, "alpha": 4, **lora}, **model},
        "data": {"shards": str(tmp_path), "mode": "single", "batch_size": 2},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, **(train or {})}})


def _latent(pipe, dist, draw: bool):
    z = dist.sample() if draw else dist.mode()
    z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    return pipe._pack_latents(z, *z.shape)


def test_the_condition_latent_is_drawn_after_the_noise_as_ominicontrol(pipe):
    """OminiControl's step: GT draw, t = sigmoid(randn), noise, then the condition's posterior draw; condition
    dropout decides first and encodes the black image in the same batch draw."""
    gt = torch.stack([to_tensor(_fit(read_rgb(p), 64)) for p in FACES])
    lq = torch.stack([to_tensor(np.asarray(Image.open(LQ).convert("RGB").resize((64, 64))))] * 2)
    batch = {"gt": gt, "lq": lq, "prompt": ["a face", "a face"]}
    seen = {}
    main = pipe.transformer.x_embedder.base_layer.register_forward_pre_hook(
        lambda m, args: seen.setdefault("x_t", args[0].clone()))
    cond = pipe.transformer.x_embedder.register_forward_pre_hook(lambda m, args: seen.update(cond=args[0].clone()))
    model = ConditionedFlux(pipe.transformer)
    try:
        for latent, dropout in (("sample", 0.0), ("mean", 0.0), ("sample", 1.0)):
            loss = LossSettings(aal_weight=0, sdt_weight=0, text_dropout=0, condition_dropout=dropout)
            objective = Objective(pipe=pipe, farl=None, loss=loss, resolution=64, max_sequence_length=32,
                                  condition_latent=latent)
            seen.clear()
            torch.manual_seed(5)
            with torch.no_grad():
                objective(model, batch)
            torch.manual_seed(5)  # by hand, in OminiControl's order
            if dropout:
                assert bool((torch.rand(2) < dropout).all())
            x0 = _latent(pipe, pipe.vae.encode(gt).latent_dist, True)
            t = torch.sigmoid(torch.randn(2))
            eps = torch.randn(x0.shape)
            pixels = torch.full_like(lq, -1.0) if dropout else lq
            expected = _latent(pipe, pipe.vae.encode(pixels).latent_dist, latent == "sample")
            assert torch.equal(seen["x_t"], (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps), latent
            assert torch.equal(seen["cond"], expected), (latent, dropout)
        mean = _latent(pipe, pipe.vae.encode(lq).latent_dist, False)
        assert not torch.allclose(seen["cond"][:1], mean[:1])  # the black image, not the LQ
    finally:
        main.remove()
        cond.remove()


def test_the_lora_starts_as_configured(tmp_path, training_zoo):
    from training.a2bfr.train import load_models

    for init, dropout, dtype in (("gaussian", 0.0, "fp32"), ("kaiming", 0.05, "bf16")):
        lora = {"init": init, "dropout": dropout, "dtype": dtype}
        if dtype == "bf16":  # the whole model in bf16, as OminiControl
            with pytest.raises(ValueError, match="mixed_precision bf16"):
                _config(tmp_path, training_zoo, lora=lora)
        cfg = _config(tmp_path, training_zoo, {"mixed_precision": "bf16" if dtype == "bf16" else "no"}, lora=lora)
        torch.manual_seed(0)
        pipe, _ = load_models(cfg, torch.device("cpu"))
        named = dict(pipe.transformer.named_parameters())
        a = torch.cat([p.detach().float().flatten() for n, p in named.items() if ".lora_A." in n])
        b = [p for n, p in named.items() if ".lora_B." in n]
        assert all(not p.any() for p in b)  # B = 0: the adapter starts as the base model
        assert all(p.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
                   for n, p in named.items() if p.requires_grad)
        if init == "gaussian":
            assert abs(float(a.std()) - 1 / 4) < 0.02 and abs(float(a.mean())) < 0.02  # N(0, 1/r), r = 4
        else:  # kaiming-uniform (a = sqrt 5): |A| <= 1 / sqrt(fan_in), std well below 1/r on these widths
            x_embedder = named["x_embedder.lora_A.default.weight"].detach()
            assert float(x_embedder.abs().max()) <= 1 / x_embedder.shape[1] ** 0.5 + 1e-3
            assert float(a.std()) < 0.15
        drops = {float(m.lora_dropout["default"].p) if dropout else type(m.lora_dropout["default"]).__name__
                 for m in pipe.transformer.modules() if hasattr(m, "lora_dropout")}
        assert drops == ({dropout} if dropout else {"Identity"})


def test_a_trained_lora_records_its_condition_latent_and_restore_uses_it(tmp_path, training_zoo, pipe):
    old = _config(tmp_path, training_zoo, condition_latent="mean", lora={"init": "kaiming", "dropout": 0.01})
    new = _config(tmp_path, training_zoo)
    # runs from before these settings resume: their values are recorded by omission
    assert "condition_latent" not in run_record(old)["model"] and "init" not in run_record(old)["model"]["lora"]
    assert run_record(new)["model"]["condition_latent"] == "sample"
    assert run_record(new)["model"]["lora"]["init"] == "gaussian"
    folders = {}
    for name, cfg in (("mean", old), ("sample", new)):
        folders[name] = save_a2bfr_lora(pipe.transformer, tmp_path / name, adapter_name="default",
                                        record=lora_record(cfg))
        record = json.loads((folders[name] / "a2bfr_config.json").read_text())
        assert record["condition_latent"] == name and record["lora_dtype"] == "fp32"
        assert record["lora_init"] == cfg.model.lora.init and record["lora_dropout"] == cfg.model.lora.dropout
    before = tmp_path / "before"  # a LoRA saved before the record existed
    save_a2bfr_lora(pipe.transformer, before, adapter_name="default", record={"lora_scale": 1.0,
                                                                              "condition_attends": "all"})
    load = {"width": 64, "height": 64, "steps": 1, "max_sequence_length": 32}
    got = {}
    for name, folder, option in (("mean", folders["mean"], None), ("sample", folders["sample"], None),
                                 ("before", before, None), ("given", folders["mean"], "sample")):
        restorer = A2BFRRestorer.load(training_zoo / "flux", folder, condition_latent=option, **load)
        s = restorer.settings()
        got[name] = (s["condition_latent"], s["condition_latent_from"], s["official_path"])
    assert got == {"mean": ("mean", "the LoRA's record", False), "sample": ("sample", "the LoRA's record", True),
                   "before": ("sample", "default (the LoRA records none)", True), "given": ("sample", "option", True)}
    # the pipeline itself restores with the recorded choice when none is given
    mean_pipe = A2BFRPipeline.from_pretrained(training_zoo / "flux")
    mean_pipe.load_a2bfr_lora(folders["mean"])
    seen = []
    mean_pipe.transformer.x_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    image = Image.open(LQ)
    mean_pipe(image, height=64, width=64, num_inference_steps=1, max_sequence_length=32,
              generator=device_generator(0, "cpu"), progress=False)
    pixels = mean_pipe.image_processor.preprocess(image.convert("RGB").resize((64, 64)))
    assert torch.equal(seen[0], _latent(mean_pipe, mean_pipe.vae.encode(pixels).latent_dist, False))
    bad = json.loads((folders["mean"] / "a2bfr_config.json").read_text())
    (folders["mean"] / "a2bfr_config.json").write_text(json.dumps({**bad, "condition_latent": "median"}))
    with pytest.raises(LoraFileError, match="condition_latent 'median'"):
        A2BFRPipeline.from_pretrained(training_zoo / "flux").load_a2bfr_lora(folders["mean"])


def test_the_section_passes_the_options_and_names_the_run_by_them(tmp_path):
    from attrface_pipeline.builders import a2bfr_train_config
    from attrface_pipeline.config import load_config

    cfg = load_config(overrides={"paths": {"data_root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "c")},
                                 "a2bfr": {"text_cache": False, "latent_cache": False}})
    default = a2bfr_train_config(cfg, shards="shards")
    m = default.model
    assert (m.condition_latent, m.lora.init, m.lora.dropout, m.lora.dtype) == ("sample", "gaussian", 0.0, "fp32")
    before = a2bfr_train_config(cfg, shards="shards", condition_latent="mean", lora_init="kaiming", lora_dropout=0.01)
    m = before.model
    assert (m.condition_latent, m.lora.init, m.lora.dropout) == ("mean", "kaiming", 0.01)
    assert before.train.output_dir != default.train.output_dir  # another meaning, another run folder
    with pytest.raises(ValueError, match="mixed_precision bf16"):
        a2bfr_train_config(cfg, shards="shards", lora_dtype="bf16")
    bf16 = a2bfr_train_config(cfg, shards="shards", lora_dtype="bf16", mixed_precision="bf16")
    assert bf16.model.lora.dtype == "bf16" and bf16.train.mixed_precision == "bf16"
