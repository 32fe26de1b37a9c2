"""Orchestration overhead of ``build_dataset``: wall time outside the steps' own compute, per executor and chunk size.

Sources are distinct variants of the shipped sample photos (mirror, crops, scales: new content hashes, so ingest
keeps them all), ~200 faces with the default ``--variants 8``. For each executor (``ATTRFACE_EXECUTOR``) and
``--chunk-size``: a fresh SQLite DAGSTER_HOME and data root, then the real CLI,
``dagster job execute -m attrface_pipeline.definitions -j build_dataset``, timed from the shell. The steps' compute
is the union of their STEP_START..STEP_SUCCESS intervals in the run's event log (two steps running at once count
once); overhead = wall - compute: interpreter and code-location start, one process per step, event-log writes.
The partition loops' own "seconds" (metadata) are shown beside it.

    .venv/bin/python benchmarks/orchestration_overhead.py [--variants 8] [--executors spawn multiprocess in_process]
        [--chunk-size 8 32] [--json out.json]

The offline profile's tiny models; the shared model cache data/cache (generated on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DAGSTER = str(Path(sys.executable).with_name("dagster"))

from attrface_pipeline.images import encode_image, read_rgb  # noqa: E402

VARIANTS = ("original", "mirror", "crop90", "scale80", "mirror_crop90", "crop80", "mirror_scale80", "scale90",
            "mirror_crop80", "crop95", "mirror_scale90", "scale70")


def _variant(rgb, name: str):
    if "mirror" in name:
        rgb = rgb[:, ::-1]
    for op in name.split("_"):
        if op.startswith("crop"):
            f = int(op[4:]) / 100
            h, w = rgb.shape[:2]
            dh, dw = int(h * (1 - f) / 2), int(w * (1 - f) / 2)
            rgb = rgb[dh:h - dh, dw:w - dw]
        elif op.startswith("scale"):
            f = int(op[5:]) / 100
            rgb = cv2.resize(rgb, (max(1, int(rgb.shape[1] * f)), max(1, int(rgb.shape[0] * f))),
                             interpolation=cv2.INTER_AREA)
    return rgb.copy()


def make_sources(out: Path, variants: int) -> int:
    faces = ROOT / "data" / "samples" / "faces"
    photos = sorted(p for sub in ("hq", "lq_real", "whole", "hard") for p in (faces / sub).iterdir()
                    if p.suffix.lower() in (".jpg", ".png"))
    out.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        rgb = read_rgb(photo)
        for name in VARIANTS[:variants]:
            (out / f"{photo.stem}_{name}.png").write_bytes(encode_image(_variant(rgb, name), "png"))
    return len(photos) * variants


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _run_record(home: Path) -> dict:
    """Step intervals and partition-loop seconds of the one run in ``home``'s instance."""
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        run = instance.get_runs(limit=1)[0]
        starts, intervals, seconds = {}, [], {}
        for record in instance.all_logs(run.run_id):
            event = record.dagster_event
            if event is None:
                continue
            if event.event_type == dg.DagsterEventType.STEP_START:
                starts[event.step_key] = record.timestamp
            elif event.event_type == dg.DagsterEventType.STEP_SUCCESS:
                intervals.append((starts[event.step_key], record.timestamp))
            elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                meta = event.event_specific_data.materialization.metadata
                if "seconds" in meta:  # a step over several partitions reports the same figure for each
                    seconds[event.step_key] = float(meta["seconds"].value)
        return {"status": run.status.value, "steps": len(intervals), "step_union_s": _union(intervals),
                "step_sum_s": sum(b - a for a, b in intervals), "partition_seconds": sum(seconds.values())}


def measure(work: Path, sources: Path, executor: str, chunk_size: int) -> dict:
    home, data = work / "dagster_home", work / "out"
    shutil.rmtree(work, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text((ROOT / "dagster_home" / "dagster.yaml").read_text())
    cfg = work / "attrface.yaml"
    cfg.write_text(json.dumps({"paths": {"data_root": str(data), "cache_dir": str(ROOT / "data" / "cache")},
                               "source": {"paths": [str(sources)], "chunk_size": chunk_size}}))
    env = {**os.environ, "DAGSTER_HOME": str(home), "ATTRFACE_CONFIG": str(cfg), "ATTRFACE_EXECUTOR": executor}
    t0 = time.perf_counter()
    proc = subprocess.run([DAGSTER, "job", "execute", "-m", "attrface_pipeline.definitions", "-j", "build_dataset"],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{executor} chunk_size {chunk_size} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    faces = sum(pq.read_table(m, columns=["status"]).column("status").to_pylist().count("ok")
                for m in (data / "faces").glob("*/manifest.parquet"))
    record = _run_record(home)
    overhead = wall - record["step_union_s"]
    return {"executor": executor, "chunk_size": chunk_size, "faces": faces,
            "chunks": len(list((data / "faces").glob("*/manifest.parquet"))), "wall_s": round(wall, 1),
            "step_compute_s": round(record["step_union_s"], 1),
            "partition_seconds": round(record["partition_seconds"], 1),
            "overhead_s": round(overhead, 1), "overhead_pct": round(100 * overhead / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=int, default=8, help=f"variants per sample photo (1..{len(VARIANTS)})")
    ap.add_argument("--executors", nargs="+", default=["spawn", "multiprocess", "in_process"])
    ap.add_argument("--chunk-size", type=int, nargs="+", default=[8])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    (ROOT / "data" / "build").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-", dir=ROOT / "data" / "build") as tmp:
        sources = Path(tmp) / "photos"
        photos = make_sources(sources, args.variants)
        print(f"{photos} source photos ({args.variants} variants of each sample photo)")
        for chunk_size in args.chunk_size:
            for executor in args.executors:
                rows.append(measure(Path(tmp) / "run", sources, executor, chunk_size))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'executor':>12s} {'chunk':>5s} {'faces':>5s} {'wall s':>7s} {'steps s':>7s} {'overhead':>9s}")
    for r in rows:
        print(f"{r['executor']:>12s} {r['chunk_size']:5d} {r['faces']:5d} {r['wall_s']:7.1f} "
              f"{r['step_compute_s']:7.1f} {r['overhead_s']:6.1f} s {r['overhead_pct']:4.1f} %")
    if args.json:
        args.json.write_text(json.dumps({"photos": photos, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
