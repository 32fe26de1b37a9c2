"""training.pipes and assets.training.run_training_subprocess for real: a Dagster asset launches a probe trainer.

No ``from __future__ import annotations`` here: Dagster checks the asset's context annotation at definition time.
"""

import base64
import json
from pathlib import Path

import dagster as dg
import pytest

from attrface_pipeline.assets.training import LAUNCH_CONFIG, launch_command, run_training_subprocess
from training import pipes


def _materialize(tmp_path: Path, config: dict, **kw) -> tuple[dg.ExecuteInProcessResult, dg.DagsterInstance]:
    out = tmp_path / "run"

    @dg.asset(name="probe_model")
    def probe_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        invocation = run_training_subprocess(context, module="tests.training.pipes_probe",
                                             config={**config, "output_dir": str(out)}, output_dir=out, **kw)
        return invocation.get_materialize_result()

    instance = dg.DagsterInstance.ephemeral()
    return dg.materialize([probe_model], instance=instance, raise_on_error=False), instance


def _metadata(result: dg.ExecuteInProcessResult) -> dict:
    (mat,) = result.asset_materializations_for_node("probe_model")
    return mat.metadata


def _messages(instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult) -> list[str]:
    return [e.user_message for e in instance.all_logs(result.run_id)]


@pytest.mark.slow
def test_accelerate_launch_through_pipes_reports_metadata(tmp_path):
    config = {"name": "probe-1", "steps": 3, "train": {"mixed_precision": "no"}}
    result, instance = _materialize(tmp_path, config, extra_env={"PROBE_EXTRA": "yes"})
    assert result.success
    meta = _metadata(result)
    assert meta["steps"].value == 3 and meta["final_loss"].value == pytest.approx(1 / 3)
    curve = meta["loss_curve"]
    assert isinstance(curve, dg.MarkdownMetadataValue)
    assert curve.value.startswith("![loss_curve](data:image/png;base64,")
    png = base64.b64decode(curve.value.split("base64,", 1)[1].rstrip(")"))
    assert png == (tmp_path / "run" / "loss_curve.png").read_bytes() and png[:4] == b"\x89PNG"
    assert isinstance(meta["output_dir"], dg.PathMetadataValue) and meta["output_dir"].path == str(tmp_path / "run")
    assert meta["losses"].data == [{"step": 2, "loss": 0.5}, {"step": 3, "loss": 1 / 3}]
    env = meta["env"].data
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # set by accelerate launch: the launcher really ran
    assert (env["HF_HUB_OFFLINE"], env["PYTHONUNBUFFERED"], env["PROBE_EXTRA"]) == ("1", "1", "yes")
    assert env["OMP_NUM_THREADS"] != "1" or _cpu_count() == 1  # accelerate's CPU default of 1 thread is overridden
    assert json.loads((tmp_path / "run" / LAUNCH_CONFIG).read_text())["name"] == "probe-1"
    assert any("pipes_probe: probe-1 on rank -" in m for m in _messages(instance, result))


@pytest.mark.slow
def test_two_processes_report_once_from_the_main_process(tmp_path):
    """CPU DDP (gloo) under accelerate launch: rank 1 prints but only rank 0 talks to Dagster."""
    result, instance = _materialize(tmp_path, {"name": "probe-2", "steps": 2}, num_processes=2)
    assert result.success
    assert _metadata(result)["env"].data["RANK"] == "0"
    logged = [m for m in _messages(instance, result) if "pipes_probe:" in m]
    assert logged == ["pipes_probe: probe-2 on rank 0"]


def test_python_launcher_and_failure_surfaces(tmp_path):
    result, instance = _materialize(tmp_path, {"name": "probe-3", "steps": 2, "fail": True}, launcher="python")
    assert not result.success
    assert any(e.event_type_value == "STEP_FAILURE" for e in result.all_events)
    closed = [e.dagster_event for e in instance.all_logs(result.run_id)
              if "closed with exception" in e.user_message]  # the trainer's own traceback reaches the event log
    assert closed and "pipes_probe was asked to fail" in closed[0].event_specific_data.error.message


def test_launch_command_flags(tmp_path):
    cfg = tmp_path / LAUNCH_CONFIG
    cmd = launch_command("training.a2bfr.train", cfg, num_processes=1, mixed_precision="bf16", cuda=True)
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1", "--num_machines", "1",
                       "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "training.a2bfr.train",
                       "--config", str(cfg)]
    multi = launch_command("m", cfg, num_processes=4, cuda=True)
    assert "--multi_gpu" in multi and "--main_process_port" in multi
    assert launch_command("m", cfg, launcher="python")[1:] == ["-m", "m", "--config", str(cfg)]
    with pytest.raises(ValueError, match="one process"):
        launch_command("m", cfg, num_processes=2, launcher="python")


def test_session_outside_pipes_prints_and_ignores_reports(monkeypatch, capsys):
    monkeypatch.delenv(pipes.PIPES_CONTEXT_ENV, raising=False)
    with pipes.pipes_session() as session:
        assert not session.active
        session.log("hello")
        session.report({"x": 1})
    assert capsys.readouterr().out == "hello\n"
    monkeypatch.setenv(pipes.PIPES_CONTEXT_ENV, "not used")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a non-main process never opens Pipes
    with pipes.pipes_session() as session:
        assert not session.active


def test_metadata_values(tmp_path):
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG fake")
    assert pipes.pipes_metadata_value(png) == {
        "raw_value": f"![grid](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})", "type": "md"}
    assert pipes.pipes_metadata_value(tmp_path) == {"raw_value": str(tmp_path), "type": "path"}
    assert pipes.pipes_metadata_value(True)["type"] == "bool" and pipes.pipes_metadata_value(3)["type"] == "int"
    assert pipes.pipes_metadata_value(float("nan")) == {"raw_value": "nan", "type": "text"}
    assert pipes.pipes_metadata_value({"a": [1]}) == {"raw_value": {"a": [1]}, "type": "json"}
    assert pipes.pipes_metadata_value({"raw_value": "x", "type": "url"}) == {"raw_value": "x", "type": "url"}


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def test_a_message_read_while_it_is_written_arrives_whole(tmp_path):
    """A long report line appended in two writes, read in between, is parsed once complete (Dagster's own tail
    yields the cut half, which fails to parse and ends the reader)."""
    import json
    import threading
    import time

    from attrface_pipeline.assets.training import whole_lines

    path = tmp_path / "messages"
    path.write_text("")
    message = json.dumps({"method": "report_asset_materialization", "params": {"png": "x" * 50_000}}) + "\n"
    done = threading.Event()

    def write():
        with open(path, "a") as f:
            f.write('{"method": "log"}\n' + message[:20_000])
            f.flush()
            time.sleep(0.3)
            f.write(message[20_000:])
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    lines = list(whole_lines(str(path), lambda: done.is_set()))
    writer.join()
    assert [json.loads(line) for line in lines] == [{"method": "log"}, json.loads(message)]
