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


@pytest.mark.slow
def test_all_rows_in_their_tiny_form_on_cpu(tmp_path):
    """`bench-gpu --all` on a CPU: every part runs (the tiny models) or says why not, into one JSON and the table;
    no goal is marked on tiny figures, and the papers' complexity table gets no restore time from them."""
    import json

    from attrface_pipeline.bench_gpu import all_table, run_all, update_docs

    if torch.cuda.is_available():
        pytest.skip("the CPU form")
    result = run_all(tmp_path, log=lambda m: None)
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert saved["summary"] == result["summary"] and saved["restore_s_per_face"] == {}
    s = result["summary"]
    for key in ("flowedit_s_per_pair", "a2bfr_bf16_b1_s_per_sample", "a2bfr_restore_cache_s_per_face",
                "roboface_train_s_per_sample", "roboface_restore_s_per_face", "farl_faces_per_s"):
        assert s[key] > 0, key
    assert any(k.startswith("eval lpips") for k in s)
    for base in ("fp8", "nf4"):
        assert result["parts"][f"a2bfr_{base}"]["note"].startswith(f"n/a: model.base_dtype {base} needs")
    table = (tmp_path / "bench_gpu.md").read_text()
    assert table.startswith("cpu (tiny models") and "✓" not in table and "✗" not in table
    docs = tmp_path / "benchmarks.md"
    docs.write_text("intro\n<!-- bench-gpu --all: start -->\nold\n<!-- bench-gpu --all: end -->\nrest\n")
    assert update_docs(result, docs)
    assert docs.read_text() == ("intro\n<!-- bench-gpu --all: start -->\n" + all_table(result)
                                + "\n<!-- bench-gpu --all: end -->\nrest\n")
