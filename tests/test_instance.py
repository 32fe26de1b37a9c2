"""Integration: the Dagster instance and CLI as users drive them -- bare commands from the activated venv, a
real ``kill -9`` of a running build, concurrent first runs, config and model errors before any step runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attrface_pipeline.config import PROJECT_ROOT

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PHOTOS = [PROJECT_ROOT / "data" / "samples" / "faces" / "hq" / f"ffhq_0000{i}.png" for i in (0, 1)]


def _home(tmp: Path, init: bool = True) -> Path:
    home = tmp / "dagster_home"
    if init:
        subprocess.run([BIN / "attrface", "init-instance", "--home", home], check=True, capture_output=True)
    return home


def _config(tmp: Path, **extra) -> Path:
    listing = tmp / "photos.txt"
    listing.write_text("\n".join(map(str, PHOTOS)) + "\n")
    # The shared cache keeps the tiny zoo generated once for the whole test session (and for `make demo`).
    settings = {"source": {"paths": [str(listing)], "chunk_size": 1},
                "paths": {"data_root": str(tmp / "out"), "cache_dir": str(PROJECT_ROOT / "data" / "cache")}, **extra}
    path = tmp / "attrface.yaml"
    path.write_text(json.dumps(settings))
    return path


def _bare(command: str, home: Path, config: Path, **popen) -> subprocess.Popen:
    """``command`` in a bash that sourced the venv's activate script, exactly as a user types it."""
    activate = BIN / "activate"
    assert "attrface_env.sh" in activate.read_text(), "scripts/setup.sh adds the AttrFace line to activate"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_CLI_")}
    env.update(DAGSTER_HOME=str(home), ATTRFACE_CONFIG=str(config))
    return subprocess.Popen(["bash", "-c", f". '{activate}' && exec {command}"], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _instance(home: Path):
    import dagster as dg

    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        return dg.DagsterInstance.get()
    finally:
        if old is None:
            del os.environ["DAGSTER_HOME"]
        else:
            os.environ["DAGSTER_HOME"] = old


def test_killed_run_never_blocks_the_next_one(tmp_path):
    """kill -9 of a running build_dataset (bare command), then a re-run: the dead run is failed, its gpu slot freed."""
    import dagster as dg

    home, config = _home(tmp_path), _config(tmp_path)
    run = _bare("dagster job execute -j build_dataset", home, config)
    instance = _instance(home)
    deadline = time.time() + 400
    while time.time() < deadline and run.poll() is None:  # wait until a step holds the gpu pool's slot
        if instance.event_log_storage.get_concurrency_info("gpu").claimed_slots:
            break
        time.sleep(1)
    assert run.poll() is None, f"the run ended before a gpu step started:\n{run.stdout.read()[-3000:]}"
    os.kill(run.pid, signal.SIGKILL)  # the CLI process, as a user's kill -9 does
    run.wait()
    (dead,) = instance.get_runs()
    assert dead.status == dg.DagsterRunStatus.STARTED  # what wedged the instance before
    assert [s.run_id for s in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots] == [dead.run_id]

    again = _bare("dagster job execute -j build_dataset", home, config)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-4000:]
    assert "had no live process left: marked FAILURE" in out
    statuses = {r.run_id: r.status for r in instance.get_runs()}
    assert statuses[dead.run_id] == dg.DagsterRunStatus.FAILURE and list(statuses.values()).count(
        dg.DagsterRunStatus.SUCCESS) == 1
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    assert (tmp_path / "out" / "attrface_shards" / "_stats.json").exists()
    assert not (home / "run_locks" / f"{dead.run_id}.lock").exists()


def test_concurrent_first_runs_on_an_initialised_home(tmp_path):
    """Two first runs at once on a fresh DAGSTER_HOME: setup's init-instance made the schema, so both succeed."""
    home, config = _home(tmp_path), _config(tmp_path)
    runs = [_bare("dagster job execute -j publish_dataset", home, config) for _ in range(2)]
    for run in runs:
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out[-4000:]
        assert "alembic" not in out


def test_config_errors_are_one_line_each_at_load_time(tmp_path):
    home = _home(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("edit: {stepz: 3}\nsource: {chunk_sise: 2}\nqc: {gate: [identiy]}\n")
    run = _bare("dagster job execute -j build_dataset", home, bad)
    out, _ = run.communicate(timeout=300)
    assert run.returncode != 0 and "Traceback" not in out, out[-4000:]
    assert f"{bad}: edit.stepz: unknown key; did you mean 'steps'?" in out
    assert f"{bad}: source.chunk_sise: unknown key; did you mean 'chunk_size'?" in out
    assert f"{bad}: qc.gate.0: Input should be" in out


def test_full_profile_lists_every_missing_model_before_any_step(tmp_path):
    home = _home(tmp_path)
    config = _config(tmp_path, profile="full", models={"allow_download": False})
    run = _bare("dagster job execute -j build_dataset", home, config)
    out, _ = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "3 model(s) missing" in out, out[-4000:]
    for key in ("models.insightface_pack = 'buffalo_l'", "models.farl =", "models.sd3 = 'stabilityai/"):
        assert key in out
    assert "STEP_START" not in out  # checked up front, not when the faces step loads its detector
