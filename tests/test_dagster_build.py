"""Integration: the real `dagster job execute` CLI on the shipped sample photos, in a temp DAGSTER_HOME."""

import hashlib
import re
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from attrface_pipeline.config import PROJECT_ROOT, A2BFRConfig
from attrface_pipeline.images import read_rgb
from attrface_pipeline.stages.shards import read_back

pytestmark = pytest.mark.slow
EXPECTED_FACES = 23  # per-photo counts checked by eye; see tests/stages/test_align_detect.py
DAGSTER = str(Path(sys.executable).with_name("dagster"))


def _execute(env, *extra):
    cmd = [DAGSTER, "job", "execute", "-m", "attrface_pipeline.definitions", *extra]
    proc = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((PROJECT_ROOT / "dagster_home" / "dagster.yaml").read_text())
    cfg = tmp / "attrface.yaml"
    cfg.write_text(json.dumps({"paths": {"data_root": str(tmp / "out"), "cache_dir": str(tmp / "cache")}}))
    env = {**os.environ, "DAGSTER_HOME": str(home), "ATTRFACE_CONFIG": str(cfg)}
    # `make demo`: build_dataset through the attrface command, which ends with the summary
    proc = subprocess.run([sys.executable, "-m", "attrface_pipeline.cli", "demo", "-c", str(cfg)], env=env,
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return tmp, env, proc.stdout + proc.stderr


def test_build_dataset_materializes_every_chunk(build):
    import dagster as dg

    tmp, env, log = build
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        instance = dg.DagsterInstance.get()
        for asset in ("raw_images", "faces", "face_attributes", "edit_prompts", "edits", "qc"):
            assert instance.get_materialized_partitions(dg.AssetKey(asset)) == {"chunk-00000", "chunk-00001"}
        for asset in ("attrface_shards", "dataset_card"):
            assert instance.get_latest_materialization_event(dg.AssetKey(asset)) is not None
        def latest(asset):
            return instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata

        meta, attr_meta, prompt_meta = latest("faces"), latest("face_attributes"), latest("edit_prompts")
        edit_meta, qc_meta = latest("edits"), latest("qc")
        checks = {name: instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("qc"), name)]) for name in
            ("attribute_pass_rate", "identity_pass_rate", "similarity_pass_rate", "overall_pass_rate")}
    finally:
        del os.environ["DAGSTER_HOME"]
    assert meta["faces_ok"].value == EXPECTED_FACES
    # the demo's closing summary: what was built, where, and the next commands
    assert f"-> {EXPECTED_FACES} aligned faces ->" in log and "AttrFace built in" in log
    assert f"in {tmp / 'out' / 'attrface_shards'}" in log and "make train-a2bfr" in log and "make evaluate" in log
    assert meta["preview"].value.startswith("![preview](data:image/png;base64,")
    assert "faces: 8/8 images" in log  # progress is logged

    ok_rows = []
    for chunk in ("chunk-00000", "chunk-00001"):
        part = tmp / "out" / "faces" / chunk
        assert json.loads((part / "_stats.json").read_text())["fingerprint"]
        ok_rows += [r for r in pq.read_table(part / "manifest.parquet").to_pylist() if r["status"] == "ok"]
        for row in ok_rows:
            assert "." not in row["face_key"] and len(row["transform"]) == 6 and len(row["landmarks5"]) == 10
    assert len(ok_rows) == EXPECTED_FACES
    assert all((tmp / "out" / "faces").glob(f"chunk-*/{r['aligned_path']}") for r in ok_rows)
    assert not list((tmp / "out").rglob("*.tmp"))

    # attributes and prompts for every aligned face (offline profile: tiny FaRL, template verbalizer)
    attrs = [r for f in sorted((tmp / "out" / "face_attributes").glob("chunk-*/manifest.parquet"))
             for r in pq.read_table(f).to_pylist()]
    assert sorted(r["face_key"] for r in attrs) == sorted(r["face_key"] for r in ok_rows)
    assert all(len(r["probabilities"]) == 40 and 0 <= min(r["probabilities"]) for r in attrs)
    assert attr_meta["faces"].value == EXPECTED_FACES
    assert attr_meta["distribution_chart"].value.startswith("![attribute distribution](data:image/png;base64,")
    prompts = [r for f in sorted((tmp / "out" / "edit_prompts").glob("chunk-*/manifest.parquet"))
               for r in pq.read_table(f).to_pylist()]
    assert sorted(r["face_key"] for r in prompts) == sorted(r["face_key"] for r in ok_rows)
    assert all(r["backend"] == "template" and r["source_prompt"].startswith("A close-up") for r in prompts)
    assert prompt_meta["targets"].value == sum(len(r["targets"]) for r in prompts) > 0

    # one FlowEdit image per face x target, at the offline edit resolution, with its parameters recorded
    edit_rows = [r for f in sorted((tmp / "out" / "edits").glob("chunk-*/manifest.parquet"))
                 for r in pq.read_table(f).to_pylist()]
    assert len(edit_rows) == prompt_meta["targets"].value == edit_meta["pairs"].value
    assert len({r["pair_key"] for r in edit_rows}) == len(edit_rows)
    for r in edit_rows[:10]:
        part = tmp / "out" / "edits" / next(p for p in ("chunk-00000", "chunk-00001")
                                              if (tmp / "out" / "edits" / p / r["edit_path"]).exists())
        assert read_rgb(part / r["edit_path"]).shape == (r["resolution"], r["resolution"], 3)
        assert json.loads(r["params"])["n_max"] == 7 and "." not in r["pair_key"]
    assert edit_meta["seconds_per_pair"].value > 0 and edit_meta["peak_memory_mb"].value > 0
    assert edit_meta["preview"].value.startswith("![source | edit](data:image/png;base64,")

    # every pair scored; the checks ran and are recorded (offline floor 0: the run is green whatever the rates)
    qc_rows = [r for f in sorted((tmp / "out" / "qc").glob("chunk-*/manifest.parquet"))
               for r in pq.read_table(f).to_pylist()]
    assert sorted(r["pair_key"] for r in qc_rows) == sorted(r["pair_key"] for r in edit_rows)
    assert qc_meta["pairs"].value == len(qc_rows) and 0 <= qc_meta["overall_pass_rate"].value <= 1
    assert qc_meta["score_histograms"].value.startswith("![QC score histograms](data:image/png;base64,")
    assert all(len(c) == 1 for c in checks.values()), checks
    statuses = {name: next(iter(c.values())).status.value for name, c in checks.items()}
    # offline qc.gate leaves the (random) attribute check out: not executed (skipped), never "passed"
    assert statuses == {"attribute_pass_rate": "PLANNED", "identity_pass_rate": "SUCCEEDED",
                        "similarity_pass_rate": "SUCCEEDED", "overall_pass_rate": "SUCCEEDED"}, statuses

    # published: the offline VAE keeps faces, so identity/similarity (real measures) pass and shards are non-empty
    pub = tmp / "out" / "attrface_shards"
    stats = json.loads((pub / "_stats.json").read_text())
    passed = [r for r in qc_rows if r["passed"]]
    assert qc_meta["overall_pass_rate"].value >= 0.5 and stats["qc_passed"] == len(passed)
    published = {}
    for split in ("train", "test"):
        sizes = json.loads((pub / split / "sizes.json").read_text())
        for shard in sizes:
            samples = read_back(pub / split / shard)
            assert len(samples) == sizes[shard]
            for sample in samples:
                assert set(sample) == {"__key__", "src.jpg", "tar.jpg", "json", "src.txt", "tar.txt"}
                published[sample["__key__"]] = (split, json.loads(sample["json"]))
    assert set(published) == {r["pair_key"] for r in passed}
    assert {s for s, _ in published.values()} == {"train", "test"}
    by_image = {}
    for split, meta in published.values():
        by_image.setdefault(meta["image_key"], set()).add(split)
        assert meta["provenance"]["editor"] == "tiny/sd3" and "beta" in meta["edit"]["flowedit"]
        assert len(meta["attributes"]["probabilities"]) == 40 and meta["qc"]["pass_identity"]
    assert all(len(splits) == 1 for splits in by_image.values())  # no source photo in both splits
    identity = stats["identity_split"]  # identity-disjoint: Obama and Rose Leslie appear in two photos each
    assert identity["faces"] == EXPECTED_FACES and identity["identity_matches"] >= 2
    assert identity["cross_split_identity_matches"] == 0 and identity["split_groups"] < identity["identity_clusters"]
    card = (pub / "README.md").read_text()
    assert card.startswith("---\n") and "path: train/*.tar" in card and "0.6387" in card
    assert "random" in card and (pub / "attribute_distribution.png").exists()
    assert "identity-disjoint" in card and "of which 0 cross the split" in card


def test_benchmark_sets_materialize_with_previews(build):
    """build_benchmarks after the build: the test split, the aligned HQ folder and the real LQ photos."""
    import dagster as dg

    tmp, env, _ = build
    _execute(env, "-j", "build_benchmarks")
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        instance = dg.DagsterInstance.get()
        meta = {a: instance.get_latest_materialization_event(dg.AssetKey(a)).asset_materialization.metadata
                for a in ("attrface_test", "celeba_test_levels", "real_lq")}
    finally:
        del os.environ["DAGSTER_HOME"]
    for name in ("attrface_test", "celeba_test_levels"):
        psnr = meta[name]["mean_psnr_db"].value
        # Dagster stores JSON metadata with sorted keys: compare values in level order, not key order.
        assert set(psnr) == {"train", "partial_ood", "ood"} and psnr["train"] > psnr["partial_ood"] > psnr["ood"]
        assert meta[name]["preview"].value.startswith("![GT | train | partial_ood | ood](data:image/png;base64,")
    assert meta["celeba_test_levels"]["faces"].value == 8 and meta["real_lq"]["faces"].value >= 10
    test_split = json.loads((tmp / "out" / "attrface_shards" / "_stats.json").read_text())["splits"]["test"]
    assert meta["attrface_test"]["faces"].value == test_split["samples"]
    rows = pq.read_table(tmp / "out" / "benchmarks" / "real_lq" / "manifest.parquet").to_pylist()
    assert {r["level"] for r in rows} == {"real"} and all(r["gt_path"] == "" for r in rows)


def _published_digests(pub: Path) -> dict[str, str]:
    """sha256 of every published shard, index and sizes file (not _stats.json, whose timings differ)."""
    return {str(f.relative_to(pub)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(pub.rglob("*")) if f.is_file() and f.suffix in (".tar", ".parquet", ".json")
            and f.name != "_stats.json"}


def test_rerun_is_idempotent_and_resumes_a_partial_partition(build):
    tmp, env, _ = build
    pub = tmp / "out" / "attrface_shards"
    published_before = _published_digests(pub)
    assert any(name.endswith(".tar") for name in published_before)
    part = tmp / "out" / "faces" / "chunk-00000"
    manifest_before = (part / "manifest.parquet").read_bytes()
    # Simulate a crash mid-partition: completion marker gone, one image's record not yet written.
    (part / "_stats.json").unlink()
    victim = sorted((part / "records").glob("*.json"))[0]
    victim.unlink()
    # And a partition recomputed whole by the partition loop.
    (tmp / "out" / "edit_prompts" / "chunk-00000" / "_stats.json").unlink()
    log = _execute(env, "-j", "build_dataset_chunk", "--tags", json.dumps({"dagster/partition": "chunk-00000"}))
    stats = json.loads((part / "_stats.json").read_text())
    assert stats["images_resumed"] == stats["images"] - 1  # only the missing image was processed again
    assert (part / "manifest.parquet").read_bytes() == manifest_before
    assert "raw_images chunk-00000: complete, reusing" in log
    assert "edit_prompts chunk-00000: 9 rows in" in log and "edits chunk-00000: complete, reusing" in log
    # Publishing again from the resumed and recomputed partitions gives the same bytes.
    _execute(env, "-j", "publish_dataset")
    assert _published_digests(pub) == published_before


def test_blocking_qc_check_stops_downstream(build):
    """With an SSIM threshold no edit can meet, the overall pass rate falls below the floor: the blocking check
    fails the qc step and nothing downstream of it runs."""
    import dagster as dg

    from attrface_pipeline.assets.qc import qc
    from attrface_pipeline.assets.resources import AttrFaceConfig

    tmp, _, _ = build
    ran = []

    @dg.asset(deps=[qc], partitions_def=qc.partitions_def, backfill_policy=dg.BackfillPolicy.multi_run(1))
    def publish_probe() -> None:
        ran.append(True)

    settings = {"paths": {"data_root": str(tmp / "out"), "cache_dir": str(tmp / "cache")},
                "qc": {"min_ssim": 0.9999, "min_pass_rate": 0.5}}
    result = dg.materialize([qc, publish_probe], partition_key="chunk-00000", raise_on_error=False,
                            resources={"attrface": AttrFaceConfig(settings=settings)},
                            instance=dg.DagsterInstance.ephemeral())
    assert not result.success and not ran
    overall = next(c for c in result.get_asset_check_evaluations() if c.check_name == "overall_pass_rate")
    assert not overall.passed and overall.metadata["floor"].value == 0.5
    assert overall.metadata["pass_rate"].value < 0.5


def test_train_a2bfr_on_the_published_samples(build):
    """The offline train job on the sample build: tiny Flux, Pipes + accelerate subprocess, curve and grid in the UI;
    a second run finds the run folder complete and resumes nothing."""
    import dagster as dg

    tmp, env, _ = build
    log = _execute(env, "-j", "train_a2bfr")
    assert "accelerate.commands.launch" in log
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        instance = dg.DagsterInstance.get()
        meta = instance.get_latest_materialization_event(dg.AssetKey("a2bfr_lora")).asset_materialization.metadata
    finally:
        del os.environ["DAGSTER_HOME"]
    steps = A2BFRConfig().max_steps  # the offline default
    assert meta["steps"].value == steps and meta["resumed_from"].value is None
    assert meta["loss_curve"].value.startswith("![") and "data:image/png;base64," in meta["samples"].value
    final = Path(meta["checkpoint"].value)
    assert (final / "pytorch_lora_weights.safetensors").is_file() and final.is_relative_to(tmp / "out")
    losses = [json.loads(line) for line in (final.parent / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == list(range(1, steps + 1)) and all(np.isfinite(r["loss"]) for r in losses)
    again = _execute(env, "-j", "train_a2bfr")
    assert "resuming from" in again and f"checkpoint-{steps:06d}" in again  # the finished run, nothing retrained


def test_eval_report_on_the_sample_build(build):
    """The evaluate job after the benchmark sets and both trainings: the trained tiny models, the baselines, every
    cell a number or n/a with a reason; tables and grids in the asset's metadata."""
    import dagster as dg

    tmp, env, _ = build
    for job in ("build_benchmarks", "train_a2bfr", "train_roboface"):  # reused when an earlier test built them
        _execute(env, "-j", job)
    _execute(env, "-j", "evaluate")
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        instance = dg.DagsterInstance.get()
        meta = instance.get_latest_materialization_event(dg.AssetKey("eval_report")).asset_materialization.metadata
    finally:
        del os.environ["DAGSTER_HOME"]
    md = meta["report"].value
    assert "A²BFR (published)" in md and "RoboFace (published)" in md and "#### attrface_test · ood" in md
    assert {m["name"]: m["unavailable"] for m in meta["methods"].value} == {
        "a2bfr": "", "roboface": "", "bicubic": "", "identity": ""}
    assert any(k.startswith("grid_attrface_test") for k in meta) and meta["grid_real_lq_real"].value.startswith("![")
    res = pq.read_table(tmp / "out" / "eval" / "results.parquet").to_pylist()
    assert all(np.isfinite(r["value"]) or r["note"] for r in res)
    by = {(r["set"], r["level"], r["method"], r["table"], r["metric"]): r for r in res}
    for method in ("a2bfr", "roboface", "bicubic"):
        for metric in ("psnr", "ssim", "lpips", "ids", "fid"):
            assert np.isfinite(by[("celeba_test_levels", "ood", method, "restoration", metric)]["value"])
    for metric in ("lpips", "cp_ids"):  # both models take prompts: restored again under the target prompt
        assert np.isfinite(by[("attrface_test", "train", "a2bfr", "attribute", metric)]["value"])
        assert np.isfinite(by[("attrface_test", "train", "roboface", "attribute", metric)]["value"])
    assert "no VLM judge configured" in by[("attrface_test", "train", "a2bfr", "attribute", "aa")]["note"]
    record = json.loads((tmp / "out" / "eval" / "report.json").read_text())
    assert record["weights"]["lpips"]["spec"] == "tiny/lpips" and record["profile"] == "offline"
    html = (tmp / "out" / "eval" / "report.html").read_text()
    assert "(published)" in html and "data:image/png;base64," in html


def test_reproduce_offline_partitions_and_the_papers_tables(build):
    """`dagster job execute -j reproduce` on the sample build: every selected experiment is a materialized partition
    of the training and evaluation assets, and the report has every paper table, its rows and columns, each cell a
    number or n/a with its reason; a second name of one config (A²BFR attrface = full) shows that run's numbers."""
    import dagster as dg

    from attrface_pipeline.definitions import defs
    from training.eval.paper import PAPER_TABLES

    tmp, env, _ = build
    log = _execute(env, "-j", "reproduce")
    assert "reproduce: build_dataset, build_benchmarks, a2bfr_experiment[full], a2bfr_experiment[baseline], " \
           "roboface_experiment[full], roboface_experiment[no_remover], reproduce_report" in log
    assert defs.get_assets_def("a2bfr_lora").partitions_def.get_partition_keys() == [
        "full", "baseline", "+aal", "+sdt", "ffhq_only", "attrface"]
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        instance = dg.DagsterInstance.get()
        for asset, chosen in (("a2bfr_lora", {"full", "baseline"}), ("a2bfr_eval", {"full", "baseline"}),
                              ("roboface_model", {"full", "no_remover"}), ("roboface_eval", {"full", "no_remover"})):
            assert instance.get_materialized_partitions(dg.AssetKey(asset)) == chosen, asset
        meta = instance.get_latest_materialization_event(dg.AssetKey("paper_report")).asset_materialization.metadata
        baselines = instance.get_latest_materialization_event(dg.AssetKey("baseline_eval")).asset_materialization
    finally:
        del os.environ["DAGSTER_HOME"]
    assert {m["name"]: m["unavailable"] for m in baselines.metadata["methods"].value} == {
        "bicubic": "", "identity": "", "restore_then_edit": ""}
    md = meta["tables"].value
    for table in PAPER_TABLES:
        assert f"#### {table.title}" in md, table.id
    assert "#### RoboFace Tab. 10 · complexity" in md and "| A²BFR (black-forest-labs/FLUX.1-dev) | 17.1882 |" in md
    assert meta["loss_curves"].value.startswith("![") and meta["metrics_by_level"].value.startswith("![")
    sections = {s.split("\n", 1)[0]: s for s in md.split("#### ")[1:]}
    tab4 = next(s for t, s in sections.items() if t.startswith("A²BFR Tab. 4"))
    rows = {line.split(" | ")[0].strip("| ").split(" [")[0]: line for line in tab4.splitlines()
            if line.startswith("| ")}
    assert {r for r in rows if "(published)" not in r} == {"Method", "full", "baseline", "+aal", "+sdt"}
    assert {"Baseline (published)", "+AAL (published)", "Ours (published)"} <= set(rows)
    assert "(+" in rows["full"] or "(−" in rows["full"]  # the delta to the baseline experiment
    assert "attrface (= full: same run)" in sections[next(t for t in sections if t.startswith("A²BFR Tab. 5"))]
    assert "| CodeFormer (published) |" in md and "Offline profile: every row of ours comes from tiny" in md
    training = sections[next(t for t in sections if t.startswith("A²BFR · training"))]
    baseline = next(line for line in training.splitlines() if line.startswith("| baseline ")).split(" | ")
    assert float(baseline[4]) > 0.1  # its trained LoRA differs from full's (L2 ~4e-4 after 20 steps, ~20 after 150)
    for title, body in sections.items():  # every cell: a number, or n/a with a footnote saying why
        lines = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
        for line in lines:
            if "(published)" in line.split(" | ")[0]:
                continue  # the papers' cells, as printed (text columns too)
            for cell in line.strip("|").split(" | ")[1:]:
                cell = cell.strip()
                assert cell in ("—", "∞", "(reference)") or cell.startswith("n/a [") or cell[0].isdigit() \
                    or cell[0] in "+−", (title, cell)
        for note in re.findall(r"n/a \[(\d+)\]", body):
            assert re.search(rf"^\[{note}\] \S", body, re.M), (title, note)
