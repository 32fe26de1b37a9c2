"""Chunks built per hour against the number of concurrent runs, on a Postgres-backed Dagster instance.

For each concurrency N (default 1, 2, 4): a fresh data root and a fresh Postgres database, then every chunk of the
sources built by `dagster job execute -j build_dataset_chunk` runs, N at a time (the CLI path; a UI backfill with
``max_concurrent_runs: N`` launches the same runs). The baseline is N = 1 in the same invocation. The offline
profile's models are tiny, so on a CPU box this measures the pipeline's orchestration and CPU work as a real
cluster node would see it, with the GPU steps serialized by the ``gpu`` pool (limit 1, as on a one-GPU machine).

    .venv/bin/python benchmarks/scale_out.py [--photos 8] [--chunk-size 2] [--concurrency 1 2 4] [--json out.json]

Needs PostgreSQL's server binaries (``bash scripts/postgres.sh install``); starts a private server on a free port.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAGSTER = str(Path(sys.executable).with_name("dagster"))
ATTRFACE = str(Path(sys.executable).with_name("attrface"))
SCRIPT = str(ROOT / "scripts" / "postgres.sh")


def _photos(count: int) -> list[Path]:
    faces = ROOT / "data" / "samples" / "faces"
    found = sorted(p for sub in ("hq", "lq_real", "whole", "hard") for p in (faces / sub).iterdir()
                   if p.suffix.lower() in (".jpg", ".png"))
    if count > len(found):
        raise SystemExit(f"--photos {count}: only {len(found)} sample photos")
    return found[:count]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_chunk(env: dict, chunk: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([DAGSTER, "job", "execute", "-m", "attrface_pipeline.definitions", "-j",
                           "build_dataset_chunk", "--tags", json.dumps({"dagster/partition": chunk})],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{chunk} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - t0


def measure(work: Path, photos: list[Path], chunk_size: int, concurrency: int, pg: dict) -> dict:
    src, home = work / "photos", work / "dagster_home"
    src.mkdir(parents=True)
    home.mkdir()
    for photo in photos:
        shutil.copy(photo, src / photo.name)
    shutil.copy(ROOT / "dagster_home" / "postgres" / "dagster.yaml", home / "dagster.yaml")
    cfg = work / "attrface.yaml"
    cfg.write_text(json.dumps({"source": {"paths": [str(src)], "chunk_size": chunk_size},
                               "paths": {"data_root": str(work / "out"), "cache_dir": str(ROOT / "data" / "cache")}}))
    env = {**os.environ, **pg, "DAGSTER_HOME": str(home), "ATTRFACE_CONFIG": str(cfg),
           "DAGSTER_PG_DB": f"attrface_bench_{concurrency}"}
    subprocess.run(["bash", SCRIPT, "start"], env={**env, "ATTRFACE_PGDATA": pg["ATTRFACE_PGDATA"]}, check=True,
                   capture_output=True)
    subprocess.run([ATTRFACE, "init-instance"], env=env, check=True, capture_output=True)
    chunks = [f"chunk-{i:05d}" for i in range((len(photos) + chunk_size - 1) // chunk_size)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        per_run = list(pool.map(lambda c: _run_chunk(env, c), chunks))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "chunks": len(chunks), "wall_s": round(wall, 1),
            "mean_run_s": round(sum(per_run) / len(per_run), 1), "chunks_per_hour": round(len(chunks) * 3600 / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--chunk-size", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    photos = _photos(args.photos)
    pgdata = tempfile.mkdtemp(prefix="attrface-pg-bench-")
    port = str(_free_port())
    pg = {"ATTRFACE_PGDATA": pgdata, "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": port,
          "DAGSTER_PG_USER": "attrface", "DAGSTER_PG_PASSWORD": ""}
    rows = []
    try:
        for n in args.concurrency:
            with tempfile.TemporaryDirectory(prefix=f"attrface-scale-{n}-") as work:
                rows.append(measure(Path(work), photos, args.chunk_size, n, pg))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        subprocess.run(["bash", SCRIPT, "stop"], env={**os.environ, **pg}, capture_output=True)
        shutil.rmtree(pgdata, ignore_errors=True)
    base = rows[0]["chunks_per_hour"]
    print(f"\n{os.cpu_count()} CPUs, {len(photos)} photos, chunk_size {args.chunk_size}, Postgres instance")
    print(f"{'concurrent runs':>16} {'chunks':>7} {'wall s':>8} {'s/run':>7} {'chunks/h':>9} {'vs 1 run':>9}")
    for r in rows:
        r["ratio"] = round(r["chunks_per_hour"] / base, 2)
        print(f"{r['concurrency']:>16} {r['chunks']:>7} {r['wall_s']:>8} {r['mean_run_s']:>7} "
              f"{r['chunks_per_hour']:>9} {r['ratio']:>8}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
