"""`attrface train-a2bfr` as a user runs it (a real child process under `accelerate launch`): a damaged checkpoint, a
deleted trainer_state.json or a replaced shard end the run with the child's one line -- no traceback of the child,
no CalledProcessError of the launcher."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow


def _attrface(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attrface_pipeline.cli", *args], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shard_dir, training_zoo):
    """A 2-step tiny A²BFR run trained through the CLI, checkpoints at steps 1 and 2."""
    home = tmp_path_factory.mktemp("train_cli")
    data = home / "data"
    shutil.copytree(shard_dir, data / "attrface_shards")
    config = home / "settings.yaml"
    config.write_text(yaml.safe_dump({
        "paths": {"data_root": str(data), "cache_dir": str(home / "cache")},
        "models": {"flux": str(training_zoo / "flux"), "farl": str(training_zoo / "farl")},
        "a2bfr": {"max_steps": 2, "checkpoint_every": 1, "batch_size": 1, "resolution": 32, "sample_faces": 0,
                  "max_sequence_length": 8}}))
    env = {**os.environ, "ATTRFACE_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home"),
           "OMP_NUM_THREADS": "2"}
    out = _attrface("train-a2bfr", "-c", str(config), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    run = next((data / "models" / "a2bfr").iterdir())
    return {"config": config, "env": env, "run": run, "data": data}


def _one_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "Traceback" not in text and "CalledProcessError" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors, text[-3000:]
    for needle in needles:
        assert needle in errors[0], errors


def test_a_damaged_checkpoint_is_one_line(trained, tmp_path):
    latest = sorted((trained["run"] / "checkpoints").glob("checkpoint-*"))[-1]
    weights = latest / "trainable.safetensors"
    original = weights.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    weights.write_bytes(bytes(damaged))
    try:
        out = _attrface("train-a2bfr", "-c", str(trained["config"]), "--max-steps", "3", env=trained["env"])
        _one_error(out, str(weights), "checksum")
    finally:
        weights.write_bytes(original)


def test_a_deleted_trainer_state_is_one_line(trained):
    latest = sorted((trained["run"] / "checkpoints").glob("checkpoint-*"))[-1]
    state = latest / "trainer_state.json"
    kept = state.read_bytes()
    state.unlink()
    try:
        out = _attrface("train-a2bfr", "-c", str(trained["config"]), "--max-steps", "3", "--resume", str(latest),
                        env=trained["env"])
        assert out.returncode == 2 and "trainer_state.json" in out.stderr and "Traceback" not in out.stderr, \
            out.stderr[-2000:]  # refused when the option is parsed
    finally:
        state.write_bytes(kept)


def test_a_replaced_shard_is_one_line(trained):
    """One pixel byte of a face changed inside a shard: same size, same names, other data than the checkpoint's."""
    import tarfile

    shard = sorted((trained["data"] / "attrface_shards" / "train").glob("*.tar"))[0]
    original = shard.read_bytes()
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".tar.jpg"))
    changed = bytearray(original)
    changed[member.offset_data + member.size // 2] ^= 0x01
    shard.write_bytes(bytes(changed))
    try:
        out = _attrface("train-a2bfr", "-c", str(trained["config"]), "--max-steps", "3", env=trained["env"])
        _one_error(out, shard.name)
    finally:
        shard.write_bytes(original)
