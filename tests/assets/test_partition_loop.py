"""The per-chunk assets' one partition loop: reuse, recompute, resume and model loading, without Dagster."""

import json

import pyarrow as pa
import pytest

from attrface_pipeline.assets.partition_loop import CachedBuilder, run_partitions
from attrface_pipeline.storage import PartitionStore

SCHEMA = pa.schema([("key", pa.string()), ("value", pa.int64())])
PARTS = ["chunk-00000", "chunk-00001"]


class Counter:
    """A compute that records which partitions it ran, writes one per-item record each, and can crash midway."""

    def __init__(self, crash_on: str | None = None):
        self.ran: list[str] = []
        self.crash_on = crash_on

    def __call__(self, partition: str, store: PartitionStore):
        self.ran.append(partition)
        rows = []
        for i in range(3):
            record = store.path("records", f"{i}.json")
            resumed = record.exists()
            if not resumed:
                if partition == self.crash_on and i == 2:
                    raise RuntimeError("killed")
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps({"value": i * 10}))
            rows.append({"key": f"{partition}_{i}", "value": json.loads(record.read_text())["value"]})
        return rows, {"items": len(rows)}


def _run(root, compute, *, fingerprint="cfg-a", model=None, resume=None, upstream=None, logs=None):
    return run_partitions("thing", PARTS, data_root=root, fingerprint=fingerprint, schema=SCHEMA, compute=compute,
                          upstream=upstream, resume=resume, model=model, log=(logs if logs is not None else []).append)


def test_computes_then_reuses_with_identical_bytes(tmp_path):
    builds, logs = [], []
    model = CachedBuilder(lambda: builds.append(1) or "model", lambda m: f"loaded {m}")
    compute = Counter()
    first = _run(tmp_path, compute, model=model, logs=logs)
    assert compute.ran == PARTS and builds == [1] and "thing: loaded model" in logs  # built once for both
    assert [r.computed for r in first] == [True, True] and [r.rows_computed for r in first] == [3, 3]
    stats = first[0].stats
    assert stats["partition"] == "chunk-00000" and stats["items"] == 3 and stats["fingerprint"] == "cfg-a"
    assert isinstance(stats["seconds"], float)
    manifests = {p: PartitionStore(tmp_path, "thing", p).manifest_path.read_bytes() for p in PARTS}

    again, logs = Counter(), []
    model = CachedBuilder(lambda: builds.append(1) or "model")
    second = _run(tmp_path, again, model=model, logs=logs)
    assert again.ran == [] and not model.built and builds == [1]  # nothing to do: no model built
    assert [r.computed for r in second] == [False, False] and [r.seconds for r in second] == [0.0, 0.0]
    assert f"thing chunk-00000: complete, reusing {tmp_path / 'thing' / 'chunk-00000'}" in logs
    assert [r.rows() for r in second] == [r.rows() for r in first]
    assert [r.stats for r in second] == [r.stats for r in first]

    # Recomputed from scratch (marker gone, per-item work gone): the same manifest bytes.
    for p in PARTS:
        store = PartitionStore(tmp_path, "thing", p)
        store.invalidate()
        for f in store.path("records").glob("*.json"):
            f.unlink()
    _run(tmp_path, Counter())
    assert {p: PartitionStore(tmp_path, "thing", p).manifest_path.read_bytes() for p in PARTS} == manifests


def test_config_or_upstream_change_recomputes_only_what_it_touches(tmp_path):
    up = {p: PartitionStore(tmp_path, "up", p) for p in PARTS}
    for p, store in up.items():
        store.write_manifest([], SCHEMA)
        store.complete({}, f"upstream-{p}-v1")
    _run(tmp_path, Counter(), upstream="up")
    assert PartitionStore(tmp_path, "thing", PARTS[0]).fingerprint() == "cfg-aupstream"  # config + upstream[:8]

    up["chunk-00001"].complete({}, "upstreaX-changed")
    compute = Counter()
    _run(tmp_path, compute, upstream="up")
    assert compute.ran == ["chunk-00001"]

    compute = Counter()
    results = _run(tmp_path, compute, upstream="up", fingerprint=lambda p: f"cfg-{p[-1]}")  # per-partition
    assert compute.ran == PARTS and results[1].stats["fingerprint"] == "cfg-1upstreaX"


def test_a_crash_leaves_no_marker_and_resumes_only_under_the_same_fingerprint(tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, Counter(crash_on="chunk-00001"), resume=["images"])
    done, crashed = (PartitionStore(tmp_path, "thing", p) for p in PARTS)
    assert done.read_stats() is not None and crashed.read_stats() is None
    assert sorted(f.name for f in crashed.path("records").glob("*.json")) == ["0.json", "1.json"]

    # Same fingerprint: the finished items are kept (their records untouched), only the rest is computed.
    crashed.path("records", "0.json").write_text(json.dumps({"value": 99}))  # marks the kept record
    compute = Counter()
    _run(tmp_path, compute, resume=["images"])
    assert compute.ran == ["chunk-00001"]
    assert crashed.read_manifest().column("value").to_pylist() == [99, 10, 20]

    # Another fingerprint: per-item work made under the old settings is dropped before computing.
    crashed.invalidate()
    crashed.path("images").mkdir()
    (crashed.path("images") / "old.png").write_bytes(b"x")
    _run(tmp_path, Counter(), resume=["images"], fingerprint="cfg-b")
    assert crashed.read_manifest().column("value").to_pylist() == [0, 10, 20]
    assert not crashed.path("images").exists()
    assert crashed.path("records", "_fingerprint").read_text() == "cfg-b"


def test_without_resume_nothing_is_guarded_and_a_failed_build_is_retried(tmp_path):
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("model missing")
        return "model"

    model = CachedBuilder(flaky)
    with pytest.raises(OSError):
        _run(tmp_path, Counter(), model=model)
    assert not model.built
    _run(tmp_path, Counter(), model=model)
    assert model.built and model() == "model" and len(attempts) == 2
    assert not PartitionStore(tmp_path, "thing", PARTS[0]).path("records", "_fingerprint").exists()


def test_cached_builder_closes_what_it_built():
    closed = []

    class Client:
        def close(self):
            closed.append(True)

    unused = CachedBuilder(Client)
    unused.close()
    used = CachedBuilder(Client)
    assert used() is used()
    used.close()
    assert closed == [True]
