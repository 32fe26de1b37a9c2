"""training.engine on a real (tiny) torch model: learning, checkpoints, exact resume after a kill, clear refusals."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attrface_pipeline.config import PROJECT_ROOT
from training import engine
from training.engine import (CheckpointError, OutputDirInUseError, ResumeMismatchError, Trainer, TrainSettings,
                             build_optimizer, read_losses, set_attention_backend)

SAMPLES, BATCH = 64, 16  # 4 batches per epoch: a 6-step run crosses an epoch, a checkpoint at 3 falls inside one
_gen = torch.Generator().manual_seed(1234)
X = torch.randn(SAMPLES, 4, generator=_gen)
Y = torch.sin(X @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]]))


class Regressor(torch.nn.Module):
    """Two layers; the first is frozen (as a base model under a LoRA is)."""

    def __init__(self, train_first: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.embed = torch.nn.Linear(4, 32)
        self.head = torch.nn.Linear(32, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.embed.requires_grad_(train_first)

    def forward(self, x):
        return self.head(torch.relu(self.embed(x)))


def loader_factory(epoch: int):
    order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(100 + epoch))
    for i in range(0, SAMPLES, BATCH):
        idx = order[i : i + BATCH]
        yield {"x": X[idx], "y": Y[idx], "key": [f"k{int(j)}" for j in idx]}


def step_fn(model, batch):
    noise = 0.05 * torch.randn_like(batch["x"])  # draws from the global RNG, as diffusion noise does
    pred = model(batch["x"] + noise)
    return {"loss": torch.nn.functional.mse_loss(pred, batch["y"]), "mae": (pred - batch["y"]).abs().mean()}


def save_fn(model, folder: Path):
    save_file({"head.weight": model.head.weight.detach().contiguous()}, folder / "head.safetensors")


def settings(out: Path, **kw) -> TrainSettings:
    return TrainSettings(**{"output_dir": str(out), "max_steps": 6, "checkpoint_every": 3, **kw})


def make_trainer(out: Path, *, model=None, on_checkpoint=None, config=None, **kw) -> Trainer:
    s = settings(out, **kw)
    return Trainer(s, model=model or Regressor(), loader_factory=loader_factory, step_fn=step_fn, save_fn=save_fn,
                   config=config if config is not None else {"model": "regressor", "data": {"samples": SAMPLES}},
                   on_checkpoint=on_checkpoint, log=lambda m: None)


def run_until_killed(out: str, kill_at: int, **kw) -> None:
    """Subprocess entry: train, and SIGKILL this process right after checkpoint ``kill_at`` is complete."""
    def hook(step, path):
        if step == kill_at:
            import os

            os.kill(os.getpid(), signal.SIGKILL)

    make_trainer(Path(out), on_checkpoint=hook, **kw).fit()


def rows_without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_losses(path)]


def test_loss_decreases_frozen_params_untouched(tmp_path):
    model = Regressor()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    head0 = model.head.weight.detach().clone()
    # Prodigy (the default) spends ~60 steps growing its step size d from d0 = 1e-6 here; then the loss drops 4x.
    result = make_trainer(tmp_path / "run", model=model, max_steps=120, checkpoint_every=60).fit()
    rows = read_losses(result.losses_path)
    assert [r["step"] for r in rows] == list(range(1, 121))
    first, last = sum(r["loss"] for r in rows[:20]) / 20, sum(r["loss"] for r in rows[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    assert rows[-1]["d"] > 1e-6  # Prodigy's estimate moved off d0
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.equal(model.head.weight, head0)
    assert result.step == 120 and result.resumed_from is None and result.seconds_per_step > 0
    assert torch.equal(load_file(result.final_dir / "head.safetensors")["head.weight"], model.head.weight)
    assert json.loads((result.final_dir / "config.json").read_text())["model"] == "regressor"
    assert json.loads((result.final_dir / "trainer_state.json").read_text())["step"] == 120
    assert result.loss_curve_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"loss", "mae", "grad_norm", "lr", "d", "seconds", "epoch"} <= set(rows[0])


def test_checkpoint_layout_and_pruning(tmp_path):
    out = tmp_path / "run"
    make_trainer(out, max_steps=7, checkpoint_every=2, keep_checkpoints=2).fit()
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-000006", "checkpoint-000007", "latest"]
    assert (root / "latest").read_text() == "checkpoint-000007"
    ckpt = root / "checkpoint-000006"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "head.safetensors", "optimizer.pt", "rng.pt",
                                                      "trainable.safetensors", "trainer_state.json"]
    assert set(load_file(ckpt / "trainable.safetensors")) == {"head.weight", "head.bias"}  # frozen layer not saved
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_into_epoch"]) == (6, 1, 2)
    assert state["settings"]["lr"] == 1.0 and state["config"]["model"] == "regressor"
    assert {"torch", "accelerate", "prodigyopt", "python"} <= set(state["versions"])
    rng = torch.load(ckpt / "rng.pt", weights_only=True)["processes"]
    assert len(rng) == 1 and {"python", "numpy", "torch"} <= set(rng[0])
    assert "d" in torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"][0]


def _optimizer_state(path: Path) -> dict:
    return torch.load(path / "optimizer.pt", weights_only=True)


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]  # Prodigy's d, d_max, d_numerator, k included
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]) if isinstance(v, torch.Tensor) else v == b["state"][i][k], k


def test_killed_and_resumed_run_matches_straight_run(tmp_path):
    # 30 steps of 4-batch epochs, checkpoints at 13 and 26 (2 batches into epoch 6): Prodigy's d leaves d0 at
    # step 19 here, so the checkpoint carries a moved estimate that the resumed run must continue from.
    kw = dict(max_steps=30, checkpoint_every=13)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight_model = Regressor()
    make_trainer(straight, model=straight_model, **kw).fit()

    code = (f"from tests.training.test_engine import run_until_killed; "
            f"run_until_killed({str(killed)!r}, 26, max_steps=30, checkpoint_every=13)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "checkpoints" / "latest").read_text() == "checkpoint-000026"
    assert not (killed / "final").exists()
    assert [r["step"] for r in read_losses(killed / "losses.jsonl")] == list(range(1, 27))
    at_kill = _optimizer_state(killed / "checkpoints" / "checkpoint-000026")["param_groups"][0]
    assert at_kill["d"] > 1e-6 and at_kill["k"] == 26

    resumed_model = Regressor()  # fresh weights: everything must come from the checkpoint
    result = make_trainer(killed, model=resumed_model, **kw).fit()
    assert (result.step, result.resumed_from) == (30, 26)
    assert rows_without_time(killed / "losses.jsonl") == rows_without_time(straight / "losses.jsonl")
    for (name, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name
    a = _optimizer_state(straight / "checkpoints" / "checkpoint-000030")
    b = _optimizer_state(killed / "checkpoints" / "checkpoint-000030")
    assert a["param_groups"][0]["d"] > at_kill["d"] and a["param_groups"][0]["k"] == 30
    _assert_same_optimizer(a, b)


def _launch_two_processes(out: Path, max_steps: int) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "tests.training.test_engine", str(out), str(max_steps)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}  # without CUDA: DDP over gloo
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_resumes_exactly(tmp_path):
    """DDP on CPU: losses are averaged over ranks, each rank's RNG is checkpointed, and a resume continues both."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _launch_two_processes(straight, 6)
    # the second run starts from the first run's checkpoint 3 (its later rows are dropped on resume)
    shutil.copytree(straight / "checkpoints/checkpoint-000003", resumed / "checkpoints/checkpoint-000003")
    (resumed / "checkpoints/latest").write_text("checkpoint-000003")
    shutil.copy(straight / "losses.jsonl", resumed / "losses.jsonl")
    assert "resumed_from=3 step=6" in _launch_two_processes(resumed, 6)
    rng = torch.load(tmp_path / "straight/checkpoints/checkpoint-000003/rng.pt", weights_only=True)["processes"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert rows_without_time(tmp_path / "straight/losses.jsonl") == rows_without_time(tmp_path / "resumed/losses.jsonl")
    a, b = (load_file(tmp_path / run / "final/head.safetensors")["head.weight"] for run in ("straight", "resumed"))
    assert torch.equal(a, b)
    single = make_trainer(tmp_path / "single", max_steps=1).fit()  # rank 1 draws other noise: the mean differs
    assert read_losses(single.losses_path)[0]["loss"] != read_losses(tmp_path / "straight/losses.jsonl")[0]["loss"]


def test_resume_with_gradient_accumulation_and_adamw(tmp_path):
    """An interruption (here an exception after checkpoint 2) mid-epoch, with 2 micro-batches per step."""
    kw = dict(max_steps=5, checkpoint_every=2, gradient_accumulation_steps=2, optimizer="adamw", lr=0.01)
    straight_model, resumed_model = Regressor(), Regressor()
    make_trainer(tmp_path / "a", model=straight_model, **kw).fit()

    def stop(step, path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "b", on_checkpoint=stop, **kw).fit()
    state = json.loads((tmp_path / "b/checkpoints/checkpoint-000002/trainer_state.json").read_text())
    assert (state["epoch"], state["batches_into_epoch"]) == (0, 4)  # the end of epoch 0: resume skips it whole
    result = make_trainer(tmp_path / "b", model=resumed_model, **kw).fit()
    assert result.resumed_from == 2
    assert rows_without_time(tmp_path / "a/losses.jsonl") == rows_without_time(tmp_path / "b/losses.jsonl")
    assert torch.equal(straight_model.head.weight, resumed_model.head.weight)


def test_resume_refuses_changed_lr_allows_longer_run(tmp_path):
    out = tmp_path / "run"
    make_trainer(out, max_steps=2, checkpoint_every=2).fit()
    with pytest.raises(ResumeMismatchError, match=r"settings\.lr: 1\.0 in the checkpoint, 0\.5 now"):
        make_trainer(out, max_steps=4, lr=0.5).fit()
    with pytest.raises(ResumeMismatchError, match=r"config\.data\.samples"):
        make_trainer(out, max_steps=4, config={"model": "regressor", "data": {"samples": 32}}).fit()
    result = make_trainer(out, max_steps=4, checkpoint_every=1).fit()  # length and cadence may change
    assert (result.resumed_from, result.step) == (2, 4)
    assert [r["step"] for r in read_losses(out / "losses.jsonl")] == [1, 2, 3, 4]


def test_resume_errors_name_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere" / "checkpoint-000009"
    with pytest.raises(CheckpointError, match=str(missing)):
        make_trainer(out, resume=str(missing)).fit()

    make_trainer(out, max_steps=3, checkpoint_every=3).fit()
    ckpt = out / "checkpoints" / "checkpoint-000003"
    (ckpt / "trainable.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=f"{ckpt}/trainable.safetensors: .*truncated or replaced.*resume from "
                                              f"another checkpoint folder"):
        make_trainer(out).fit()

    (out / "checkpoints" / "latest").write_text("checkpoint-000099")
    with pytest.raises(CheckpointError, match="checkpoint-000099"):
        make_trainer(out).fit()


def test_loader_errors(tmp_path):
    empty = make_trainer(tmp_path / "empty")
    empty.loader_factory = lambda epoch: iter(())
    with pytest.raises(ValueError, match=r"loader_factory\(0\) yielded no batches"):
        empty.fit()
    out = tmp_path / "run"
    make_trainer(out, max_steps=3).fit()  # checkpoint 3 batches into epoch 0
    shorter = make_trainer(out)
    shorter.loader_factory = lambda epoch: list(loader_factory(epoch))[:2]
    with pytest.raises(CheckpointError, match="epoch 0 has 2 batches but the checkpoint had consumed 3"):
        shorter.fit()


def test_trainable_set_must_match(tmp_path):
    out = tmp_path / "run"
    make_trainer(out, max_steps=3).fit()
    with pytest.raises(CheckpointError, match=r"missing \['embed\.bias', 'embed\.weight'\]"):
        make_trainer(out, model=Regressor(train_first=True)).fit()


def test_fresh_start_refuses_existing_checkpoints_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    make_trainer(out, max_steps=3).fit()
    (out / "launch_config.json").write_text("{}")  # a file of the launcher's: never ours to delete
    with pytest.raises(OutputDirInUseError, match="resume='latest'.*overwrite=True"):
        make_trainer(out, resume=None).fit()
    result = make_trainer(out, resume=None, overwrite=True, max_steps=2, checkpoint_every=1, keep_checkpoints=1).fit()
    assert result.resumed_from is None
    assert [r["step"] for r in read_losses(out / "losses.jsonl")] == [1, 2]
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-000002"]
    assert (out / "launch_config.json").exists()


def test_resume_from_earlier_checkpoint_replaces_later_timeline(tmp_path):
    out = tmp_path / "run"
    make_trainer(out, max_steps=6, checkpoint_every=2, keep_checkpoints=3).fit()
    result = make_trainer(out, max_steps=4, checkpoint_every=2, keep_checkpoints=3,
                          resume=str(out / "checkpoints" / "checkpoint-000002")).fit()
    assert (result.resumed_from, result.step) == (2, 4)
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-000002",
                                                                                   "checkpoint-000004"]
    assert [r["step"] for r in read_losses(out / "losses.jsonl")] == [1, 2, 3, 4]


def test_build_optimizer():
    p = [torch.nn.Parameter(torch.zeros(3))]
    prodigy = build_optimizer(p, settings(Path("x")))
    assert type(prodigy).__name__ == "Prodigy"
    group = prodigy.param_groups[0]
    assert group["use_bias_correction"] and group["safeguard_warmup"] and group["weight_decay"] == 0.01
    adamw = build_optimizer(p, settings(Path("x"), optimizer="adamw", lr=1e-4))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 1e-4
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([], settings(Path("x")))


def test_set_attention_backend_cpu_noop_and_unknown_names():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    cuda = torch.backends.cuda
    before = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
              cuda.cudnn_sdp_enabled())
    for name in engine.ATTENTION_BACKENDS:
        set_attention_backend(name)
    assert before == (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
                      cuda.cudnn_sdp_enabled())
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        set_attention_backend("xformers")


if __name__ == "__main__":  # for test_two_process_run_resumes_exactly: accelerate launch -m tests.training.test_engine
    _result = make_trainer(Path(sys.argv[1]), max_steps=int(sys.argv[2]), checkpoint_every=3).fit()
    print(f"resumed_from={_result.resumed_from} step={_result.step}")


# Integrity: trainer_state.json records every other file of the checkpoint; resuming verifies them all.


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGES = {
    "flipped": _flip_middle,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-5]),
    "garbage": lambda p: p.write_bytes(b"\x00garbage" * 9),
    "folder": lambda p: (p.unlink(), p.mkdir()),
    "deleted": lambda p: p.unlink(),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine") / "run"
    make_trainer(out, max_steps=3, checkpoint_every=3).fit()
    return out


def _copy_run(finished_run, tmp_path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out, out / "checkpoints" / "checkpoint-000003"


def test_the_state_records_every_file_of_the_checkpoint(finished_run):
    ckpt = finished_run / "checkpoints" / "checkpoint-000003"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["_artifact"]["kind"] == "checkpoint.state"
    assert sorted(state["files"]) == ["config.json", "head.safetensors", "optimizer.pt", "rng.pt",
                                      "trainable.safetensors"]  # save_fn's deliverable too
    assert state["files"]["rng.pt"]["bytes"] == (ckpt / "rng.pt").stat().st_size
    final = json.loads((finished_run / "final" / "trainer_state.json").read_text())
    assert sorted(final["files"]) == ["config.json", "head.safetensors"]
    assert engine.verify_checkpoint(finished_run / "final")["step"] == 3


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt", "rng.pt", "config.json",
                                  "head.safetensors"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_file_is_named(finished_run, tmp_path, name, damage):
    out, ckpt = _copy_run(finished_run, tmp_path)
    DAMAGES[damage](ckpt / name)
    with pytest.raises(CheckpointError, match=rf"^{ckpt / name}: .*; resume from another checkpoint folder "
                                              rf"\(resume=<path>\) or start over") as err:
        make_trainer(out).fit()
    assert "\n" not in str(err.value)
    assert not (out / "checkpoints" / "checkpoint-000006").exists()  # nothing trained on the damaged state


@pytest.mark.parametrize("damage", ["flipped", "truncated", "garbage", "folder", "old format", "edited"])
def test_a_damaged_trainer_state_is_named(finished_run, tmp_path, damage):
    from attrface_pipeline.artifacts import ArtifactError

    out, ckpt = _copy_run(finished_run, tmp_path)
    state = ckpt / "trainer_state.json"
    if damage == "old format":  # what earlier versions wrote: no integrity record, no file records
        data = json.loads(state.read_text())
        for key in ("_artifact", "files"):
            data.pop(key)
        state.write_text(json.dumps(data))
    elif damage == "edited":  # a step changed by hand: valid JSON, failing its checksum
        state.write_text(state.read_text().replace('"step": 3', '"step": 2'))
    else:
        DAMAGES[damage](state)
    with pytest.raises(CheckpointError, match=rf"^{state}: .*resume from another checkpoint folder") as err:
        make_trainer(out).fit()
    assert isinstance(err.value, ArtifactError) and "\n" not in str(err.value)


def test_a_deleted_trainer_state_or_a_folder_that_is_no_checkpoint(finished_run, tmp_path):
    out, ckpt = _copy_run(finished_run, tmp_path)
    (ckpt / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=rf"latest names {ckpt}, which is missing or incomplete"):
        make_trainer(out).fit()
    with pytest.raises(CheckpointError, match=rf"{ckpt} is not a checkpoint folder \(no trainer_state.json\)"):
        make_trainer(out, resume=str(ckpt)).fit()
    with pytest.raises(CheckpointError, match=rf"{out} is not a checkpoint folder"):
        make_trainer(tmp_path / "other", resume=str(out)).fit()
    (out / "checkpoints" / "latest").unlink()  # the newest folder is then taken: it must be complete
    with pytest.raises(CheckpointError, match=rf"^{ckpt / 'trainer_state.json'}: missing: not a checkpoint folder"):
        make_trainer(out).fit()


def test_an_intact_copy_resumes_and_later_files_are_not_checked(finished_run, tmp_path):
    out, ckpt = _copy_run(finished_run, tmp_path)
    (ckpt / "samples.png").write_bytes(b"a grid on_checkpoint wrote after the checkpoint was complete")
    result = make_trainer(out, max_steps=4).fit()
    assert (result.resumed_from, result.step) == (3, 4)


def test_the_checkpoint_kind_reads_its_example_and_refuses_each_damaged_file(tmp_path):
    from attrface_pipeline.artifacts import ArtifactError, all_kinds

    kind = all_kinds()["checkpoint.state"]
    files = kind.example(tmp_path / "pristine")
    assert files[0].name == "trainer_state.json" and {p.name for p in files} >= {
        "trainable.safetensors", "optimizer.pt", "rng.pt", "config.json", "model.safetensors"}
    assert kind.read(files[0])["state"]["step"] == 1
    for i, path in enumerate(files):
        case = tmp_path / f"case{i}"
        shutil.copytree(tmp_path / "pristine", case)
        damaged = case / path.relative_to(tmp_path / "pristine")
        _flip_middle(damaged)
        with pytest.raises(ArtifactError, match=str(damaged)):
            kind.read(case / files[0].relative_to(tmp_path / "pristine"))
