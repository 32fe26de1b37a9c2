"""Dagster side of training: run a trainer module with ``accelerate launch`` under Dagster Pipes.

A training asset writes nothing itself: it calls :func:`run_training_subprocess` with the trainer's module and its
config, and returns ``.get_materialize_result()`` of what comes back; the trainer reports its own metadata (loss
curve, sample grid, checkpoint path) through ``training.pipes.pipes_session``. Training runs in a child process so
that accelerate can start one process per GPU, and so that CUDA memory is returned when the run ends.
"""

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from attrface_pipeline.config import HOME
from attrface_pipeline.storage import atomic_write_json

LAUNCH_CONFIG = "launch_config.json"


def _find_key(tree: Any, key: str) -> Any:
    """The first value of ``key`` in a nested dict, depth first (the trainer's settings may sit in a sub-section)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(module: str, config_path: Path, *, num_processes: int = 1, mixed_precision: str = "no",
                   cuda: bool = True, launcher: str = "accelerate") -> list[str]:
    """The child's argv: ``accelerate launch`` with every flag it would otherwise ask for or warn about.

    ``launcher="python"`` runs ``python -m module`` directly (one process; no launcher start-up).
    """
    if launcher == "python":
        if num_processes != 1:
            raise ValueError("launcher='python' runs one process; use launcher='accelerate' for num_processes > 1")
        return [sys.executable, "-m", module, "--config", str(config_path)]
    if launcher != "accelerate":
        raise ValueError(f"launcher must be 'accelerate' or 'python', got {launcher!r}")
    # --quiet: a failed child ends the launcher with exit 1 instead of a second traceback (CalledProcessError); the
    # child has said what failed (training.child)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if num_processes > 1:
        # torchrun-style launcher; without CUDA the caller sets ACCELERATE_USE_CPU=1 and accelerate uses gloo (DDP)
        cmd += ["--multi_gpu", "--main_process_port", str(_free_port())]
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        # accelerate launch otherwise sets OMP_NUM_THREADS=1 in the child: one core per process on a CPU box
        cmd += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // num_processes))]
    return cmd + ["-m", module, "--config", str(config_path)]


def whole_lines(path: str, should_stop) -> Iterator[str]:
    """The complete lines appended to ``path`` while it is written, until ``should_stop()`` and nothing is left.

    Dagster's ``tail_file`` yields whatever ``readline`` returns; a line still being written comes back cut. A
    trainer's final report (loss curve and sample grid inline, ~40 KB) read mid-write then failed to parse, the
    reader thread died and the run lost its metadata. Here a piece without its newline waits for the rest."""
    pending = ""
    with open(path, encoding="utf-8") as stream:
        while True:
            piece = stream.readline()
            if piece:
                pending += piece
                if pending.endswith("\n"):
                    yield pending
                    pending = ""
            elif should_stop():
                if pending.strip():
                    yield pending  # the writer ended without a newline: parse what there is
                break
            else:
                time.sleep(0.01)


class _WholeLineFileReader(dg.PipesFileMessageReader):
    def _reader_thread(self, handler, is_resource_complete) -> None:
        try:
            for line in whole_lines(self._path, is_resource_complete.is_set):
                handler.handle_message(json.loads(line))
        except:  # noqa: E722 - Dagster's own reader reports every failure this way
            handler.report_pipes_framework_exception(f"{self.__class__.__name__} reader thread", sys.exc_info())
            raise


class WholeLineMessageReader(dg.PipesMessageReader):
    """Dagster's temp-file message reader, parsing only complete lines (:func:`whole_lines`)."""

    @contextlib.contextmanager
    def read_messages(self, handler):
        with tempfile.TemporaryDirectory() as tempdir:
            with _WholeLineFileReader(os.path.join(tempdir, "messages")).read_messages(handler) as params:
                yield params

    def no_messages_debug_text(self) -> str:
        return "Attempted to read messages from a local temporary file."


def run_training_subprocess(context: dg.AssetExecutionContext, *, module: str, config: dict, output_dir: Path,
                            num_processes: int = 1, extra_env: dict | None = None, launcher: str = "accelerate",
                            client: dg.PipesSubprocessClient | None = None,
                            cwd: Path | None = None) -> dg.PipesClientCompletedInvocation:
    """Write ``config`` to ``output_dir/launch_config.json`` and run ``module --config <it>`` through Dagster Pipes.

    The environment is this process's plus PYTHONUNBUFFERED=1 and HF_HUB_OFFLINE (1 unless already set), then
    ``extra_env``. Mixed precision comes from the config's first ``mixed_precision`` key ("no" if none). Returns the
    Pipes invocation: ``.get_materialize_result()`` gives the metadata the trainer reported. A non-zero exit raises;
    a failure the trainer reported as one line (training.child) fails the step with that line.
    """
    from training.child import ERROR_FILE_ENV, read_error

    import torch  # here, not at module import: the code location loads without it

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / LAUNCH_CONFIG
    atomic_write_json(config_path, config)
    cuda = torch.cuda.is_available()
    mixed_precision = _find_key(config, "mixed_precision") or "no"
    cmd = launch_command(module, config_path, num_processes=num_processes, mixed_precision=str(mixed_precision),
                         cuda=cuda, launcher=launcher)
    env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if num_processes > 1 and not cuda:
        env["ACCELERATE_USE_CPU"] = "1"
    env.update({k: str(v) for k, v in (extra_env or {}).items()})
    context.log.info(f"training: {' '.join(cmd)}  (config: {json.dumps(config, default=str)[:500]})")
    client = client or dg.PipesSubprocessClient(message_reader=WholeLineMessageReader())
    with tempfile.TemporaryDirectory() as tmp:
        env[ERROR_FILE_ENV] = os.path.join(tmp, "error.txt")
        try:
            return client.run(context=context, command=cmd, env=env, cwd=str(cwd or HOME))
        except dg.DagsterPipesExecutionError:
            line = read_error(env[ERROR_FILE_ENV])
            if line is None:
                raise
            raise dg.Failure(description=f"{module}: {line}", allow_retries=False) from None
