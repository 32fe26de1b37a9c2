"""The GPU benchmark's architectures are the published ones (built on the meta device: no memory, no weights), and
its CPU path runs the tiny model end to end through the project's FlowEditor."""

import pytest
import torch

from attrface_pipeline import bench_gpu
from attrface_pipeline.bench_gpu import NO_CUDA_PEAK, SD35, build_architecture, check_arguments, run_benchmark, table
from attrface_pipeline.config import PROJECT_ROOT


# The transformers of the published configs as diffusers builds them (Stability quotes 8.1 B for Large).
@pytest.mark.parametrize("name, billions", [("large", 8.06), ("medium", 2.24)])
def test_sd35_architectures_from_their_configs(name, billions):
    pipe = build_architecture(name, torch.device("meta"), torch.bfloat16)
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
    assert params == pytest.approx(billions, abs=0.02)
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.num_layers == SD35[name]["num_layers"]


def test_cpu_run_is_the_tiny_model_and_says_so(tiny_zoo, tmp_path):
    """The tiny model comes from the model store it is given (here one holding the session's tiny zoo); a missing
    figure (peak memory on a CPU, every figure of an fp8 row) says why, in the JSON and in the table."""
    import json

    if torch.cuda.is_available():
        pytest.skip("the CPU form")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tiny").symlink_to(tiny_zoo, target_is_directory=True)
    lines = []
    result = run_benchmark(modes=["eager", "fp8"], batches=[2], resolution=64, repeats=1, log=lines.append,
                           cache_dir=tmp_path / "cache", json_path=tmp_path / "out" / "bench.json")
    assert "say nothing about SD3.5" in lines[0] and "132 evaluations/pair" in lines[1]
    assert lines[2].startswith("mode fp8 cannot run here (float8 needs an NVIDIA GPU")
    eager, fp8 = result["rows"]
    assert eager["model"] == "tiny" and eager["s_per_pair"] > 0 and eager["tflops"] > 0
    assert eager["gpu_hours_per_10k"] == pytest.approx(eager["s_per_pair"] * 10_000 / 3600, rel=0.01)
    assert eager["peak_gib"] is None and eager["note"] == NO_CUDA_PEAK
    assert fp8["s_per_pair"] is None and fp8["note"].startswith("n/a: float8 needs an NVIDIA GPU")
    md = table(result)
    assert "| tiny | eager | 2 | 256 |" in md and f"| — | {eager['gpu_hours_per_10k']} | {NO_CUDA_PEAK} |" in md
    assert json.loads((tmp_path / "out" / "bench.json").read_text()) == result


def _nothing_built(monkeypatch):
    """Any attempt to build a model fails the test: refusals must come first."""
    def build(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(bench_gpu, "_editor", build)
    monkeypatch.setattr(bench_gpu, "build_architecture", build)


@pytest.mark.parametrize("kwargs, message", [
    (dict(models=["large"]), "model large (SD3.5 Large) needs a CUDA GPU and this machine has none: here only "
                             "the tiny random SD3 runs (model tiny)"),
    (dict(models=["tiny", "medium"]), "model medium (SD3.5 Medium) needs a CUDA GPU"),
    (dict(models="tiny"), "expected a list of names"),
    (dict(models=["huge"]), "model 'huge': choose from large, medium, tiny"),
    (dict(modes=["turbo"]), "mode 'turbo': choose from eager, compiled, fp8"),
    (dict(repeats=0), "repeats 0: expected a whole number >= 1"),
    (dict(repeats=-3), "repeats -3"),
    (dict(repeats=1.5), "repeats 1.5"),
    (dict(batches=[1, 0]), "batch 0: expected a whole number >= 1"),
    (dict(batches=[True]), "batch True"),
    (dict(msls=[-1]), "max_sequence_length -1: expected a whole number from 8 to 512 T5 tokens"),
    (dict(msls=[513]), "max_sequence_length 513"),
    (dict(resolution=0), "resolution 0: expected a whole number >= 16 px"),
    (dict(resolution=100), "resolution 100: expected a multiple of 16"),
    (dict(json_path="."), "is a folder: name a file"),
])
def test_bad_arguments_are_refused_before_anything_runs(kwargs, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _nothing_built(monkeypatch)
    with pytest.raises(ValueError) as err:
        run_benchmark(**{"resolution": 64, "repeats": 1, **kwargs}, log=lambda m: None)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cuda_limits_and_defaults():
    """Checked without a GPU: the published models' positional embeddings bound the resolution; defaults per
    machine."""
    with pytest.raises(ValueError, match="model large covers at most 3072 px"):
        check_arguments(["large", "medium"], resolution=3088, cuda=True)
    assert check_arguments(["medium"], resolution=6144, cuda=True)["resolution"] == 6144
    gpu, cpu = check_arguments(cuda=True), check_arguments(cuda=False)
    assert gpu["models"] == ["large", "medium"] and gpu["modes"] == ["eager", "compiled", "fp8"]
    assert cpu["models"] == ["tiny"] and cpu["batches"] == [1, 4] and cpu["msls"] == []
    assert check_arguments(batches=[2, 2, 1], cuda=False, resolution=2048)["batches"] == [2, 1]  # CPU caps at 128
    none = check_arguments(resolution=None, repeats=None, cuda=False)  # None: the default (an option not given)
    assert (none["resolution"], none["repeats"]) == (512, 2)


def test_cpu_says_up_front_what_compiled_and_fp8_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_gpu, "measure", lambda model, mode, batch, msl, **k: (
        bench_gpu.Row(model, mode, batch, msl, 1.0, 1.0, None, 1.0, NO_CUDA_PEAK), []))
    lines = []
    result = run_benchmark(["tiny"], ["compiled", "fp8"], [1], None, 64, 1, log=lines.append)
    assert any(line.startswith("mode compiled on a CPU: torch.compile") for line in lines)
    assert any(line.startswith("mode fp8 cannot run here") for line in lines)
    assert [r["mode"] for r in result["rows"]] == ["compiled", "fp8"]


def test_run_all_uses_the_folders_it_is_given(tmp_path, monkeypatch):
    """--all: the model store and output folder are arguments (the CLI passes the configured ones), checked
    before any work; every part gets the store; a figure without a value says why in the JSON and the table."""
    import json

    from attrface_pipeline.bench_gpu import all_table, run_all

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    afile = tmp_path / "afile"
    afile.write_text("x")
    calls = []
    monkeypatch.setattr(bench_gpu, "run_benchmark", lambda *a, **k: calls.append(("flowedit", a, k)) or {
        "rows": [dict(model="tiny", mode="eager", batch=1, max_sequence_length=256, s_per_pair=2.0, tflops=0.1,
                      peak_gib=None, gpu_hours_per_10k=5.5, note=NO_CUDA_PEAK)]})
    for bad, message in ((dict(out=afile), "output folder .* is a file"), (dict(cache_dir=afile), "cache folder"),
                         (dict(json_path=tmp_path), "is a folder")):
        with pytest.raises(ValueError, match=message):
            run_all(**{"out": tmp_path / "out", "cache_dir": tmp_path / "cache", **bad}, log=lambda m: None)
    assert calls == [] and not (tmp_path / "out").exists()

    train = {"part": "train", "variant": "self", "batch": 1, "per_sample": 0.5, "peak_gib": None}
    restore = {"part": "restore", "variant": "cache", "batch": 1, "seconds": 3.0, "peak_gib": None}
    robo = [{"part": "train", "dca": "on", "per_item": 0.2, "peak_gib": None},
            {"part": "restore", "dca": "on", "per_item": 4.0, "peak_gib": None}]

    def script(name, args, out, log, timeout):
        calls.append((name, args))
        if name == "a2bfr_speed.py":
            return {"rows": [train, restore]} if "--base-dtype" not in args else {"note": "n/a: needs CUDA"}
        return {"rows": robo} if name == "roboface_speed.py" else {"metrics": {"psnr": {"img_s": 100.0}}}

    monkeypatch.setattr(bench_gpu, "_script", script)
    monkeypatch.setattr(bench_gpu, "_farl_rate", lambda *a: {"batch": 4, "faces_per_s": 9.0})
    result = run_all(tmp_path / "out", cache_dir=tmp_path / "cache", json_path=tmp_path / "copy.json",
                     log=lambda m: None)
    cache = str((tmp_path / "cache").absolute())
    assert calls[0][2]["cache_dir"] == tmp_path / "cache"
    for name, args in calls[1:]:
        if name != "eval_metrics_speed.py":
            assert args[args.index("--cache-dir") + 1] == cache, name
    assert result["notes"]["a2bfr_bf16_b1_peak_gib"] == NO_CUDA_PEAK
    assert result["notes"]["roboface_train_peak_gib"] == NO_CUDA_PEAK
    md = (tmp_path / "out" / "bench_gpu.md").read_text()
    assert f"| a2bfr_bf16_b1_peak_gib | — ({NO_CUDA_PEAK}) |" in md and md == all_table(result) + "\n"
    saved = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    assert saved == json.loads((tmp_path / "copy.json").read_text()) and saved["summary"] == result["summary"]


@pytest.mark.slow
def test_all_rows_in_their_tiny_form_on_cpu(tmp_path, tiny_zoo):
    """`bench-gpu --all` on a CPU: every part runs (the tiny models) or says why not, into one JSON and the table;
    no goal is marked on tiny figures, and the papers' complexity table gets no restore time from them."""
    import json

    from attrface_pipeline.bench_gpu import all_table, run_all, update_docs

    if torch.cuda.is_available():
        pytest.skip("the CPU form")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tiny").symlink_to(tiny_zoo, target_is_directory=True)  # the session's zoo, not a new one
    result = run_all(tmp_path, cache_dir=tmp_path / "cache", log=lambda m: None)
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
    assert f"| a2bfr_bf16_b1_peak_gib | — ({NO_CUDA_PEAK}) |" in table
    # every tiny model came from the store it was given, none from (or into) the checkout's
    assert {"flux", "sd2-controlnet", "sd3"} <= {p.name for p in (tmp_path / "cache" / "tiny").iterdir()}
    assert str(PROJECT_ROOT / "data" / "cache") not in json.dumps(result, default=str)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("intro\n<!-- bench-gpu --all: start -->\nold\n<!-- bench-gpu --all: end -->\nrest\n")
    assert update_docs(result, docs)
    assert docs.read_text() == ("intro\n<!-- bench-gpu --all: start -->\n" + all_table(result)
                                + "\n<!-- bench-gpu --all: end -->\nrest\n")
