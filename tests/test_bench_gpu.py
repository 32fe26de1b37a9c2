"""The GPU benchmark's architectures are the published ones (built on the meta device: no memory, no weights), and
its CPU path runs the tiny model end to end through the project's FlowEditor."""

import pytest
import torch

from attrface_pipeline.bench_gpu import SD35, build_architecture, run_benchmark, table


# The transformers of the published configs as diffusers builds them (Stability quotes 8.1 B for Large).
@pytest.mark.parametrize("name, billions", [("large", 8.06), ("medium", 2.24)])
def test_sd35_architectures_from_their_configs(name, billions):
    pipe = build_architecture(name, torch.device("meta"), torch.bfloat16)
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
    assert params == pytest.approx(billions, abs=0.02)
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.num_layers == SD35[name]["num_layers"]


def test_cpu_run_is_the_tiny_model_and_says_so(tiny_zoo, monkeypatch):
    from attrface_pipeline.models.store import ModelStore

    monkeypatch.setattr(ModelStore, "resolve", lambda self, spec: tiny_zoo / "sd3")
    lines = []
    result = run_benchmark(modes=["eager", "fp8"], batches=[2], resolution=64, repeats=1, log=lines.append)
    assert "say nothing about SD3.5" in lines[0] and "132 evaluations/pair" in lines[1]
    eager, fp8 = result["rows"]
    assert eager["model"] == "tiny" and eager["s_per_pair"] > 0 and eager["tflops"] > 0
    assert eager["gpu_hours_per_10k"] == pytest.approx(eager["s_per_pair"] * 10_000 / 3600, rel=0.01)
    assert fp8["s_per_pair"] is None and fp8["note"].startswith("n/a: float8 needs an NVIDIA GPU")
    assert "| tiny | eager | 2 | 256 |" in table(result)
