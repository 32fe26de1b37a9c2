"""Scale-out on real processes: chunks built by concurrent runs on a Postgres-backed instance, then photos added.

A private PostgreSQL server (scripts/postgres.sh, Debian's package) runs for the module. CI sets
ATTRFACE_REQUIRE_POSTGRES=1, so a missing server is a failure there; elsewhere these tests skip without one.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.stages.shards import read_back
from tests.test_dagster_build import DAGSTER, _execute, _published_digests

pytestmark = pytest.mark.slow
SAMPLES = PROJECT_ROOT / "data" / "samples" / "faces"
# Four chunks of one photo each; then five photos more. obama.jpg (added) shows the person of obama_and_biden.jpg
# (built first) and its content key sorts first: the identity group must keep its name, and its samples their split.
FIRST = [SAMPLES / "hq" / "ffhq_00001.png", SAMPLES / "lq_real" / "0143.png", SAMPLES / "hq" / "alex_lacamoire1.jpg",
         SAMPLES / "whole" / "obama_and_biden.jpg"]
ADDED = [SAMPLES / "hq" / "obama.jpg", SAMPLES / "lq_real" / "Einstein01.png", SAMPLES / "hq" / "ffhq_00000.png",
         SAMPLES / "hq" / "lin-manuel-miranda.png", SAMPLES / "hq" / "rose_leslie2.jpg"]
NEW_CHUNKS = [f"chunk-{i:05d}" for i in range(4, 9)]
CHUNK_ASSETS = ("raw_images", "faces", "face_identities", "face_attributes", "edit_prompts", "edits", "qc")
GPU_STEPS = ("face_attributes", "edits", "qc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    if not any(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        if os.environ.get("ATTRFACE_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is not installed: run `bash scripts/postgres.sh install`")
        pytest.skip("PostgreSQL is not installed (bash scripts/postgres.sh install)")
    pgdata = tempfile.mkdtemp(prefix="attrface-pg-")  # in /tmp: the postgres user must reach it
    env = {**os.environ, "ATTRFACE_PGDATA": pgdata, "DAGSTER_PG_PORT": str(_free_port()),
           "DAGSTER_PG_DB": "attrface_test"}
    script = str(PROJECT_ROOT / "scripts" / "postgres.sh")
    subprocess.run(["bash", script, "start"], env=env, check=True, capture_output=True, timeout=300)
    exports = subprocess.run(["bash", script, "env"], env=env, check=True, capture_output=True, text=True).stdout
    pg_env = dict(kv.split("=", 1) for kv in exports.split()[1:])
    try:
        yield pg_env
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(pgdata, ignore_errors=True)


def _setup(tmp: Path, photos: list[Path], home: Path | None = None) -> tuple[Path, dict]:
    """A source folder with ``photos``, a config with chunks of 1, a fresh data root; env for the CLI."""
    src = tmp / "photos"
    src.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        shutil.copy(photo, src / photo.name)
    cfg = tmp / "attrface.yaml"
    # The project's model cache (./data/cache), as a deployment shares its weights: the tiny zoo is generated once.
    cfg.write_text(json.dumps({"source": {"paths": [str(src)], "chunk_size": 1},
                               "paths": {"data_root": str(tmp / "out")}}))
    env = {**os.environ, "ATTRFACE_CONFIG": str(cfg)}
    if home is None:  # SQLite, the default instance
        home = tmp / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text((PROJECT_ROOT / "dagster_home" / "dagster.yaml").read_text())
    env["DAGSTER_HOME"] = str(home)
    return src, env


def _instance(env):
    import dagster as dg

    saved = {k: os.environ.get(k) for k in env if k.startswith("DAGSTER_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("DAGSTER_")})
    try:
        return dg.DagsterInstance.get()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _samples(pub: Path) -> dict[str, tuple[str, dict[str, bytes]]]:
    """{key: (split, members)} of every published sample."""
    out = {}
    for sizes in sorted(pub.glob("*/sizes.json")):
        for shard in json.loads(sizes.read_text()):
            for sample in read_back(sizes.parent / shard):
                out[sample["__key__"]] = (sizes.parent.name, {k: v for k, v in sample.items() if k != "__key__"})
    return out


@pytest.fixture(scope="module")
def parallel(tmp_path_factory, postgres):
    """Four chunks built by four concurrent `dagster job execute` runs on the Postgres instance, then published."""
    tmp = tmp_path_factory.mktemp("parallel")
    home = PROJECT_ROOT / "dagster_home" / "postgres"
    src, env = _setup(tmp, FIRST, home=tmp / "pg_home")
    (tmp / "pg_home").mkdir()
    shutil.copy(home / "dagster.yaml", tmp / "pg_home" / "dagster.yaml")
    env.update(postgres)
    env["DAGSTER_HOME"] = str(tmp / "pg_home")
    attrface = str(Path(DAGSTER).with_name("attrface"))
    subprocess.run([attrface, "init-instance"], env=env, check=True, capture_output=True, timeout=300)
    for model in ("tiny/farl", "tiny/sd3"):  # weights in place before the runs, as on a cluster (deploy/README.md)
        subprocess.run([attrface, "resolve-model", model], env=env, check=True, capture_output=True, timeout=900)
    chunks = [f"chunk-{i:05d}" for i in range(4)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([DAGSTER, "job", "execute", "-m", "attrface_pipeline.definitions", "-j",
                               "build_dataset_chunk", "--tags", json.dumps({"dagster/partition": c})],
                              env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in chunks]
    logs = [p.communicate(timeout=1200)[0] for p in procs]
    seconds = time.perf_counter() - t0
    for chunk, proc, log in zip(chunks, procs, logs):
        assert proc.returncode == 0, f"{chunk}:\n{log[-4000:]}"
    _execute(env, "-j", "publish_dataset")
    return tmp, src, env, logs, seconds


def test_concurrent_chunk_runs_on_postgres_match_a_serial_build(parallel, tmp_path):
    import dagster as dg

    tmp, _, env, logs, _ = parallel
    for log in logs:
        assert "database is locked" not in log and "deadlock" not in log.lower()
    instance = _instance(env)
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    runs = instance.get_runs(filters=dg.RunsFilter(job_name="build_dataset_chunk"))
    assert len(runs) == 4 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    for asset in CHUNK_ASSETS:  # each partition materialized exactly once
        records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
        assert sorted(r.partition_key for r in records) == [f"chunk-{i:05d}" for i in range(4)], asset
    # The gpu pool (limit 1) held across runs: no two GPU steps of any runs overlapped in time.
    spans = []
    for run in runs:
        starts = {}
        for event in instance.all_logs(run.run_id):
            kind = event.dagster_event.event_type_value if event.dagster_event else None
            if event.step_key in GPU_STEPS and kind == "STEP_START":
                starts[event.step_key] = event.timestamp
            elif event.step_key in GPU_STEPS and kind == "STEP_SUCCESS":
                spans.append((starts[event.step_key], event.timestamp))
    spans.sort()
    assert len(spans) == 4 * len(GPU_STEPS)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans

    # The same photos built serially in one run (SQLite instance) publish byte-identical shards.
    _, serial_env = _setup(tmp_path, FIRST)
    _execute(serial_env, "-j", "build_dataset")
    assert _published_digests(tmp_path / "out" / "attrface_shards") == _published_digests(
        tmp / "out" / "attrface_shards")


def test_added_photos_form_new_chunks_and_only_those_compute(parallel):
    tmp, src, env, _, _ = parallel
    out = tmp / "out"
    before_samples = _samples(out / "attrface_shards")
    before_stats = {p: p.read_bytes() for a in CHUNK_ASSETS for p in (out / a).glob("chunk-*/_stats.json")}
    assert len(before_stats) == 4 * len(CHUNK_ASSETS)
    registered = sorted(p.name for p in (out / "_chunks").glob("*.json"))
    assert registered == [f"chunk-{i:05d}.json" for i in range(4)]
    for photo in ADDED:  # ordered between and before the registered photos: no registered chunk may move
        shutil.copy(photo, src / photo.name)

    log = _execute(env, "-j", "build_dataset")
    import dagster as dg

    meta = _instance(env).get_latest_materialization_event(dg.AssetKey("raw_images")).asset_materialization.metadata
    assert meta["new_chunks"].value == NEW_CHUNKS
    assert meta["computed_partitions"].value == 5 and meta["partitions"].value == 9
    for chunk in ("chunk-00000", "chunk-00003"):
        assert f"raw_images {chunk}: complete, reusing" in log
    # Old partitions of every asset untouched (their completion markers were not rewritten); new ones complete.
    assert {p: p.read_bytes() for p in before_stats} == before_stats
    for asset in CHUNK_ASSETS:
        assert len(list((out / asset).glob("chunk-*/_stats.json"))) == 9, asset
    members = [json.loads((out / "_chunks" / f"{c}.json").read_text())["members"] for c in NEW_CHUNKS]
    assert sorted(Path(p).name for m in members for p in m) == sorted(p.name for p in ADDED)

    # Published: every old sample byte-identical and in the same split, plus exactly the new chunks' passing pairs.
    after = _samples(out / "attrface_shards")
    assert {k: after.get(k) for k in before_samples} == before_samples
    new_pairs = {r["pair_key"] for c in NEW_CHUNKS
                 for r in pq.read_table(out / "qc" / c / "manifest.parquet").to_pylist() if r["passed"]}
    assert set(after) - set(before_samples) == new_pairs and new_pairs
    split_of_photo = {}
    for split, members in after.values():
        split_of_photo.setdefault(json.loads(members["json"])["image_key"], set()).add(split)
    assert split_of_photo["0930e3aa8cae5920"] == split_of_photo["b8781c1f734616a9"]  # obama.jpg joined his group

    # A deleted photo is reported, not re-chunked.
    (src / FIRST[0].name).unlink()
    _execute(env, "-j", "build_dataset")
    meta = _instance(env).get_latest_materialization_event(dg.AssetKey("raw_images")).asset_materialization.metadata
    assert meta["missing_sources"].value == 1 and FIRST[0].name in meta["missing"].value
    assert meta["computed_partitions"].value == 0 and meta["new_chunks"].value == []
