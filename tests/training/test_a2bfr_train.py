"""A²BFR training end to end on the tiny Flux and real sample shards (CPU): overfit, frozen base, kill + resume,
restore with the trained LoRA."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.images import read_rgb
from attrface_pipeline.stages.shards import Sample, write_split
from training.a2bfr.config import A2BFRTrainConfig
from training.a2bfr.train import load_models, train
from training.data import IMAGE_EXTENSIONS, make_loader
from training.engine import read_losses


@pytest.fixture(scope="module")
def two_pairs(shard_dir, tmp_path_factory):
    """A 2-pair train split (the first two pairs of the shared sample shards), for overfitting."""
    import webdataset as wds

    from training.data import resolve_shards

    out = tmp_path_factory.mktemp("two_pairs")
    raw = list(wds.WebDataset(resolve_shards(str(shard_dir)), shardshuffle=False))[:2]
    samples = []
    for r in raw:
        meta = json.loads(r["json"])
        paths = {}
        for side in ("src", "tar"):
            member = next(k for k in r if k.startswith(f"{side}.") and k.split(".", 1)[1] in IMAGE_EXTENSIONS)
            paths[side] = out / f"{r['__key__']}.{member}"
            paths[side].write_bytes(r[member])
        samples.append(Sample(r["__key__"], "train", paths["src"], paths["tar"], meta, r["src.txt"].decode(),
                              r["tar.txt"].decode()))
    write_split(samples, out / "shards" / "train", "train", shard_size=2, log=lambda m: None)
    return out / "shards"


def _config(tmp_path, zoo, shards, **train) -> A2BFRTrainConfig:
    return A2BFRTrainConfig.model_validate({
        "model": {"base": str(zoo / "flux"), "farl": str(zoo / "farl"), "resolution": 64, "max_sequence_length": 32,
                  "lora": {"rank": 8, "alpha": 8}},
        "loss": {"text_dropout": 0.0, "condition_dropout": 0.0},
        "data": {"shards": str(shards), "mode": "dual", "batch_size": 2, "num_workers": 0, "shuffle_buffer": 0,
                 "preset": "train"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 30, "checkpoint_every": 30, "seed": 0,
                  **train},
        "samples": {"faces": 2, "steps": 2},
    })


def _fixed_loss(cfg, pipe, farl, model) -> float:
    """The objective on the 2 pairs at fixed noise, eval mode (no LoRA dropout)."""
    from training.a2bfr.losses import Objective

    objective = Objective(pipe=pipe, farl=farl, loss=cfg.loss, resolution=64, max_sequence_length=32)
    batch = next(iter(make_loader(cfg.data.model_copy(update={"resolution": 64}), epoch=0)))
    model.eval()
    torch.manual_seed(123)
    with torch.no_grad():
        return float(sum(objective(model, batch)["loss"] for _ in range(4)) / 4)


def test_overfits_two_pairs_and_trains_only_the_lora(tmp_path, training_zoo, two_pairs):
    from training.a2bfr.model import ConditionedFlux
    from training.a2bfr.pipeline import A2BFRPipeline

    # AdamW: Prodigy starts its step size at d0 = 1e-6 and needs far more than 30 steps to warm up; this test is
    # about the gradient path (the optimizer is the engine's, tested there).
    cfg = _config(tmp_path, training_zoo, two_pairs, optimizer="adamw", lr=0.03)
    pipe, farl = load_models(cfg, torch.device("cpu"))
    model = ConditionedFlux(pipe.transformer)
    before = _fixed_loss(cfg, pipe, farl, model)
    base = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if "lora_" not in n}

    result, paths = train(cfg, log=lambda m: None)
    assert result.step == 30 and (result.final_dir / "pytorch_lora_weights.safetensors").is_file()
    record = json.loads((result.final_dir / "a2bfr_config.json").read_text())
    assert record["training"]["loss"]["sdt_margin"] == cfg.loss.sdt_margin  # lambda, m, alpha travel with it
    rows = read_losses(result.losses_path)
    assert len(rows) == 30 and {"loss", "diff", "attr", "dual", "gap"} <= rows[0].keys()
    assert paths["samples"].is_file() and paths["loss_curve"].is_file()

    trained = A2BFRPipeline.from_pretrained(training_zoo / "flux")
    trained.load_a2bfr_lora(result.final_dir)
    after = _fixed_loss(cfg, trained, farl, ConditionedFlux(trained.transformer))
    assert after < 0.9 * before, (before, after)  # measured 0.84 (3.131 -> 2.628)
    for name, param in trained.transformer.named_parameters():  # the base weights are the checkpoint's, untouched
        if "lora_" not in name:
            assert torch.equal(param, base[name]), name


@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint(tmp_path, training_zoo, two_pairs):
    """SIGKILL after a checkpoint, resume: the step count and Prodigy's state go on from the checkpoint."""
    cfg = _config(tmp_path, training_zoo, two_pairs, max_steps=400, checkpoint_every=3, keep_checkpoints=5)
    cfg.samples.faces = 0
    path = tmp_path / "run.json"
    path.write_text(cfg.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "training.a2bfr.train", "--config", str(path)], cwd=PROJECT_ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip().rsplit("-", 1)[1])
    saved = torch.load(tmp_path / "run" / "checkpoints" / latest.read_text().strip() / "optimizer.pt",
                       weights_only=True)
    assert killed_at >= 3 and killed_at < 400

    resumed_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": killed_at + 2})})
    result, _ = train(resumed_cfg, log=lambda m: None)
    assert result.resumed_from == killed_at and result.step == killed_at + 2
    steps = [r["step"] for r in read_losses(result.losses_path)]
    assert steps == list(range(1, killed_at + 3))  # no gap, no duplicate
    final = torch.load(tmp_path / "run" / "checkpoints" / f"checkpoint-{killed_at + 2:06d}" / "optimizer.pt",
                       weights_only=True)
    group0, group1 = saved["param_groups"][0], final["param_groups"][0]
    assert group1["k"] == group0["k"] + 2  # Prodigy's own step counter continued, not restarted
    # its step-size estimate carried over: d never shrinks, and its running numerator went on from the saved one
    assert group0["d_numerator"] != 0 and group1["d"] >= group0["d"]
    assert group1["d_numerator"] != group0["d_numerator"]
    # bit-identical to a run that was never killed (every random draw of the step -- GT and condition posterior
    # draws, timestep, noise -- continues from the checkpoint's streams)
    from safetensors.torch import load_file

    straight = resumed_cfg.model_copy(update={"train": resumed_cfg.train.model_copy(
        update={"output_dir": str(tmp_path / "straight")})})
    train(straight, log=lambda m: None)
    name = f"checkpoint-{killed_at + 2:06d}"
    killed = load_file(tmp_path / "run" / "checkpoints" / name / "trainable.safetensors")
    whole = load_file(tmp_path / "straight" / "checkpoints" / name / "trainable.safetensors")
    assert killed.keys() == whole.keys() and all(torch.equal(killed[k], whole[k]) for k in killed)


def test_restore_cli_layout_flags_and_exit_status_on_real_photos(tmp_path, training_zoo, two_pairs):
    import json

    from typer.testing import CliRunner

    from attrface_pipeline.cli import app

    cfg = _config(tmp_path, training_zoo, two_pairs, max_steps=2, checkpoint_every=2)
    cfg.samples.faces = 0
    result, _ = train(cfg, log=lambda m: None)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "group.png").write_bytes((PROJECT_ROOT / "data/samples/faces/whole/02.png").read_bytes())  # 4 faces
    (photos / "lq.png").write_bytes((PROJECT_ROOT / "data/samples/lq_real/0240.png").read_bytes())  # aligned
    (photos / "bad.jpg").write_bytes(b"not an image")
    runner = CliRunner()
    common = ["--weights", str(result.final_dir), "--base", str(training_zoo / "flux"), "--steps", "2"]
    out = runner.invoke(app, ["restore", "-i", str(photos), "-o", str(tmp_path / "res"), *common, "--upscale", "2",
                              "--only-center-face", "--suffix", "x", "--dtype", "bfloat16", "--seed", "3"])
    assert out.exit_code == 3, out.output  # some inputs failed: exit 3, the others are done
    assert "restored 2 face(s) in 2 image(s)" in out.output and "failed: bad.jpg" in out.output
    res = tmp_path / "res"
    files = sorted(p.relative_to(res).as_posix() for p in res.rglob("*.png"))
    assert files == ["cmp/group_00.png", "cmp/lq_00.png", "cropped_faces/group_00.png", "cropped_faces/lq_00.png",
                     "restored_faces/group_00_x.png", "restored_faces/lq_00_x.png", "restored_imgs/group_x.png"]
    group, restored = read_rgb(photos / "group.png"), read_rgb(res / "restored_imgs/group_x.png")
    assert restored.shape == (2 * group.shape[0], 2 * group.shape[1], 3)
    assert read_rgb(res / "restored_faces/lq_00_x.png").shape == (64, 64, 3)  # the LoRA's training size
    settings = json.loads((res / "settings.json").read_text())["settings"]
    assert settings["dtype"] == "bfloat16" and settings["seed"] == 3 and settings["official_path"]
    assert settings["lora_scale"] == 1.0 and settings["options"]["only_center_face"]
    log = [json.loads(line) for line in (res / "restore_log.jsonl").read_text().splitlines()]
    assert {r["name"]: r["status"] for r in log} == {"bad.jpg": "failed", "group.png": "ok", "lq.png": "ok"}
    again = runner.invoke(app, ["restore", "-i", str(photos), "-o", str(res), *common, "--upscale", "2",
                                "--only-center-face", "--suffix", "x", "--dtype", "bfloat16", "--seed", "3"])
    assert again.exit_code == 3 and "skipped 2 already done" in again.output
    # one aligned face, non-square, with the official resize: any multiple of 16
    one = runner.invoke(app, ["restore", "-i", str(photos / "lq.png"), "-o", str(tmp_path / "one"), *common,
                              "--has-aligned", "--width", "48", "--height", "64"])
    assert one.exit_code == 0, one.output
    assert read_rgb(tmp_path / "one/restored_faces/lq_00.png").shape == (64, 48, 3)
    missing = runner.invoke(app, ["restore", "-i", str(photos), "-o", str(tmp_path / "x"), "--weights",
                                  str(tmp_path / "nowhere"), "--base", str(training_zoo / "flux")])
    assert missing.exit_code == 1 and "no such file or folder" in missing.output
    latest = runner.invoke(app, ["restore", "-i", str(photos), "-o", str(tmp_path / "y"), "--weights", "latest",
                                 "--base", str(training_zoo / "flux"), "-c", str(_instance_yaml(tmp_path))])
    assert latest.exit_code == 1 and "no a2bfr run is trained here yet" in latest.output
    release = runner.invoke(app, ["restore", "-i", str(photos), "-o", str(tmp_path / "z"), "--base",
                                  str(training_zoo / "flux"), "-c", str(_instance_yaml(tmp_path))])
    assert release.exit_code == 1 and "hf download thetrigger/A2BFR default.safetensors" in release.output


def _instance_yaml(tmp_path):
    """A config whose data root holds no trained run and whose cache holds no release."""
    path = tmp_path / "instance.yaml"
    path.write_text(f"paths:\n  data_root: {tmp_path / 'empty_root'}\n  cache_dir: {tmp_path / 'empty_cache'}\n")
    return path

