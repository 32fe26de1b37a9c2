"""Memory plans from the real architectures on the meta device; quantized bases and 8-bit optimizers that cannot run
here stop before any weight is read; the train commands' --plan."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from attrface_pipeline.config import PROJECT_ROOT, load_config
from training.plan import GIB, PlanDoesNotFit, a2bfr_plan, check_fits, roboface_plan


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_plan_counts_equal_the_loaded_models(training_zoo, tmp_path):
    """The tiny checkpoints' folders give the plan's architectures: their counts equal the loaded weights'."""
    from training.a2bfr.config import A2BFRTrainConfig
    from training.a2bfr.train import load_models

    cfg = load_config(overrides={"paths": {"cache_dir": str(tmp_path)}, "models": {
        "flux": str(training_zoo / "flux"), "farl": str(training_zoo / "farl")}})
    plan = {c.name: c for c in a2bfr_plan(cfg, text_cache=False).components}
    train_cfg = A2BFRTrainConfig.model_validate({
        "model": {"base": str(training_zoo / "flux"), "farl": str(training_zoo / "farl"), "resolution": 64,
                  "lora": {"rank": cfg.a2bfr.lora_rank, "alpha": cfg.a2bfr.lora_alpha}},
        "data": {"shards": str(tmp_path), "mode": "dual"}, "train": {"output_dir": str(tmp_path), "max_steps": 1}})
    pipe, farl = load_models(train_cfg, torch.device("cpu"))
    lora = sum(p.numel() for n, p in pipe.transformer.named_parameters() if "lora_" in n)
    trained = sum(p.numel() for p in pipe.transformer.parameters() if p.requires_grad)
    assert plan["transformer (frozen)"].params == _count(pipe.transformer) - lora
    assert (plan[f"LoRA r{cfg.a2bfr.lora_rank} (trained)"].params, plan[f"LoRA r{cfg.a2bfr.lora_rank} (trained)"]
            .trainable) == (lora, trained)
    assert plan["VAE"].params == _count(pipe.vae)
    assert plan["CLIP-L text encoder"].params == _count(pipe.text_encoder)
    assert plan["T5 text encoder"].params == _count(pipe.text_encoder_2)
    assert plan["FaRL (attribute loss)"].params == _count(farl)


def test_published_architectures_and_the_fit_check():
    cfg = load_config("full")
    plan = a2bfr_plan(cfg, batch_size=1, base_dtype="nf4", text_cache=True)
    parts = {c.name: c for c in plan.components}
    assert parts["transformer (frozen)"].params == 11_901_408_320  # FLUX.1-dev's transformer
    assert parts["T5 text encoder"].params == 4_762_310_656 and not parts["T5 text encoder"].on_gpu
    assert plan.peak_gib < 24 < a2bfr_plan(cfg, batch_size=1, text_cache=False).peak_gib
    assert roboface_plan(cfg).trainable > 0
    rtx = SimpleNamespace(total_memory=24 * GIB, name="RTX 4090")
    with pytest.raises(PlanDoesNotFit, match="a2bfr.text_cache: true and a2bfr.base_dtype: nf4 would fit"):
        check_fits(lambda **kw: a2bfr_plan(cfg, **{"batch_size": 1, "text_cache": False, **kw}), rtx)
    assert check_fits(lambda **kw: a2bfr_plan(cfg, **{"batch_size": 1, "base_dtype": "nf4", "text_cache": True,
                                                      **kw}), rtx).peak_gib < 24


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("base_dtype,optimizer,needs", [("nf4", "prodigy", "bitsandbytes"),
                                                        ("fp8", "prodigy", "torchao"),
                                                        ("bf16", "adamw8bit", "bitsandbytes")])
def test_quantized_options_stop_before_loading_weights(tmp_path, monkeypatch, base_dtype, optimizer, needs):
    from training.a2bfr import train as a2bfr_train
    from training.a2bfr.config import A2BFRTrainConfig
    from training.quantize import QuantizationUnavailable

    def never(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(a2bfr_train.A2BFRPipeline, "from_pretrained", never)
    cfg = A2BFRTrainConfig.model_validate({
        "model": {"base": "tiny/flux", "base_dtype": base_dtype}, "data": {"shards": str(tmp_path)},
        "train": {"output_dir": str(tmp_path), "max_steps": 1, "optimizer": optimizer}})
    with pytest.raises(QuantizationUnavailable, match=f"needs .*{needs}.*no CUDA device here"):
        a2bfr_train.load_models(cfg, torch.device("cpu"))


def test_train_a2bfr_plan_command_prints_the_full_table():
    out = subprocess.run([sys.executable, "-m", "attrface_pipeline.cli", "train-a2bfr", "--plan", "--profile", "full",
                          "--base-dtype", "nf4", "--batch-size", "1"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "base_dtype=nf4" in out.stdout and "11,901,408,320" in out.stdout
    peak = next(line for line in out.stdout.splitlines() if "peak" in line)
    assert float(peak.split("estimated peak ")[1].split(" GiB")[0]) < 24
