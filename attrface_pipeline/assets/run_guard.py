"""Dead-run reaping and run preflight for the CLI path, where no Dagster daemon runs.

``dagster job execute`` has no daemon, so Dagster's run monitoring never sees a run whose process was killed:
the run stays STARTED and keeps its slot in the ``gpu`` pool, and every later run waits for that slot forever.
Each run's orchestrator (and each of its step processes) therefore holds a shared ``flock`` on
``$DAGSTER_HOME/run_locks/<run_id>.lock``. The kernel drops the lock when a process dies, whatever the signal, so
a lock that can be taken exclusively belongs to a run with no live process: such a run is marked failed and its
pool slots are freed. Every run does this sweep when it starts, before its first step asks for a slot.

Lock files name their host; runs of other hosts (a shared Postgres instance) are left to the daemon's run
monitoring (``run_monitoring`` in dagster.yaml), which the UI's daemon applies.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

_ACTIVE = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def lock_dir(instance: dg.DagsterInstance) -> Path | None:
    try:
        return Path(instance.root_directory) / "run_locks"
    except Exception:  # noqa: BLE001 - an instance without a local root (remote storage) has no lock files
        return None


@contextmanager
def hold_run_lock(instance: dg.DagsterInstance, run_id: str) -> Iterator[None]:
    """Hold a shared lock on this run's lock file for the life of the block (or of the process, if killed)."""
    folder = lock_dir(instance)
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        info = json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}).encode()
        if os.fstat(fd).st_size == 0:  # the orchestrator writes it; step processes only join the lock
            os.write(fd, info)
        yield
    finally:
        os.close(fd)  # releases the lock


def exit_when_orphaned(instance: dg.DagsterInstance, run_id: str, poll_s: float = 1.0) -> threading.Event:
    """In a step process: once the returned event is set (the step's work is over) and the run's orchestrator is
    gone (``kill -9``), end this process. A forked step of a dead orchestrator would otherwise hang at exit on its
    event queue, keeping itself and the forkserver alive; its work is already on disk and the next run resumes it.
    No-op in the orchestrator itself (``in_process``) or without a lock file."""
    finished = threading.Event()
    folder = lock_dir(instance)
    try:
        pid = json.loads((folder / f"{run_id}.lock").read_text() or "{}").get("pid") if folder else None
    except (OSError, ValueError):
        pid = None
    if not pid or pid == os.getpid():
        return finished

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if finished.is_set():
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    os._exit(1)  # nobody is left to receive this step's events

    threading.Thread(target=watch, name="attrface-orphan-watch", daemon=True).start()
    return finished


def _lock_host(path: Path) -> str | None:
    try:
        return json.loads(path.read_text() or "{}").get("host")
    except (OSError, ValueError):
        return None


def reap_dead_runs(instance: dg.DagsterInstance, *, current_run_id: str,
                   log: Callable[[str], None] = print) -> list[str]:
    """Mark runs whose processes are all gone as failed and free their pool slots; returns their run ids."""
    folder = lock_dir(instance)
    if folder is None or not folder.is_dir():
        return []
    host, reaped = socket.gethostname(), []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_ACTIVE)):
        path = folder / f"{run.run_id}.lock"
        if run.run_id == current_run_id or not path.exists() or _lock_host(path) != host:
            continue
        fd = os.open(path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # some process of that run is alive
            current = instance.get_run_by_id(run.run_id)
            if current is None or current.status not in _ACTIVE:
                continue  # another run reaped it first
            held = _claimed_slots(instance, run.run_id)
            instance.report_run_failed(
                current, message=f"Every process of this run is gone (killed?); marked failed by run "
                                 f"{current_run_id} at {time.strftime('%Y-%m-%d %H:%M:%S')} on {host}.")
            if instance.event_log_storage.supports_global_concurrency_limits:
                instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            path.unlink(missing_ok=True)
            reaped.append(run.run_id)
            log(f"run {run.run_id} ({run.job_name}) had no live process left: marked FAILURE and freed its "
                f"pool slots ({', '.join(held) or 'none held'})")
        finally:
            os.close(fd)
    for stale in folder.glob("*.lock"):  # lock files of runs that have ended
        run = instance.get_run_by_id(stale.stem)
        if stale.stem != current_run_id and (run is None or run.status not in _ACTIVE):
            stale.unlink(missing_ok=True)
    return reaped


def _claimed_slots(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    return [f"{pool}:{slot.step_key}" for pool in sorted(storage.get_concurrency_keys())
            for slot in storage.get_concurrency_info(pool).claimed_slots if slot.run_id == run_id]


class GuardedExecutor(dg.Executor):
    """Dagster's multiprocess executor, plus: hold the run lock, reap dead runs, check models, then execute."""

    def __init__(self, inner: dg.Executor, preflight: Callable[[object, list[str]], None] | None = None):
        self._inner = inner
        self._preflight = preflight

    @property
    def retries(self):
        return self._inner.retries

    @property
    def step_dependency_config(self):
        return self._inner.step_dependency_config

    def execute(self, plan_context, execution_plan):
        instance, run_id = plan_context.instance, plan_context.run_id
        # The lock file stays after the run (Dagster need not resume this generator after its last event); the
        # next run's sweep removes lock files of ended runs.
        with hold_run_lock(instance, run_id):
            reap_dead_runs(instance, current_run_id=run_id, log=plan_context.log.warning)
            if self._preflight is not None:
                self._preflight(plan_context.run_config, list(execution_plan.step_keys_to_execute))
            yield from self._inner.execute(plan_context, execution_plan)


def guarded_executor(preflight: Callable[[object, list[str]], None] | None = None,
                     base: dg.ExecutorDefinition | None = None,
                     defaults: dict | None = None) -> dg.ExecutorDefinition:
    """``base`` (Dagster's multiprocess executor by default; ``dagster_k8s.k8s_job_executor`` on a cluster), with
    its name and config schema, wrapped in :class:`GuardedExecutor`. ``defaults``: executor config used for keys
    the run config leaves out (``execution.config`` still overrides each of them)."""
    base = base or dg.multiprocess_executor

    def create(init_context) -> dg.Executor:
        if defaults:
            init_context = dg.InitExecutorContext(
                job=init_context.job, executor_def=init_context.executor_def, instance=init_context.instance,
                executor_config={**defaults, **(init_context.executor_config or {})})
        return GuardedExecutor(base.executor_creation_fn(init_context), preflight)

    return dg.ExecutorDefinition(
        name=base.name, config_schema=base.config_schema, requirements=base.get_requirements,
        executor_creation_fn=create, description=f"{base.description} Reaps dead runs and checks models first.",
    )
