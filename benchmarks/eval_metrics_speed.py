"""Evaluation metric throughput: images/s of each metric on the real aligned sample faces, and the report's wall time.

Metrics run through ``training.eval.metrics`` exactly as the report calls them, on --images faces at --size px (the
8 sample FFHQ crops, cycled, each with its own noise). LPIPS and FID Inception are the full published architectures
with random weights from the offline zoo (cost does not depend on weight values); IDS is the QC identity backend
(dlib offline). ``--report`` also builds the three benchmark sets from the samples in a temp folder and times
``run_report`` with the weight-free baselines (the offline profile's metrics; no judge, no pyiqa).

    .venv/bin/python benchmarks/eval_metrics_speed.py [--images 32] [--size 512] [--device auto] [--report]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import sync  # noqa: E402

from attrface_pipeline.config import PROJECT_ROOT, load_config  # noqa: E402
from attrface_pipeline.images import read_rgb  # noqa: E402
from attrface_pipeline.models.device import resolve_device  # noqa: E402
from training.eval import metrics as M  # noqa: E402

ALIGNED = PROJECT_ROOT / "data" / "samples" / "aligned_hq"


def _faces(n: int, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    base = [cv2.resize(read_rgb(p), (size, size), interpolation=cv2.INTER_AREA) for p in sorted(ALIGNED.glob("*.png"))]
    rng = np.random.default_rng(0)
    gts = [base[i % len(base)] for i in range(n)]
    preds = [np.clip(g + rng.normal(0, 12, g.shape), 0, 255).astype(np.uint8) for g in gts]
    return preds, gts


def _rate(fn, n: int, device: torch.device) -> dict:
    fn()  # warm-up (first-call allocations, lazy imports)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": round(seconds, 3), "img_s": round(n / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--report", action="store_true", help="also time the report on sets built from the samples")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from attrface_pipeline.builders import build_eval_scorers

    device = resolve_device(args.device)
    cache = Path(tempfile.mkdtemp(prefix="attrface-evalbench-"))
    cfg = load_config(overrides={"paths": {"cache_dir": str(cache)}, "eval": {"device": str(device)}})
    scorers = build_eval_scorers(cfg, ["lpips", "fid", "ids"])
    preds, gts = _faces(args.images, args.size)
    n = len(preds)
    rows = {
        "psnr": _rate(lambda: M.psnr_batch(preds, gts, device=device), n, device),
        "ssim": _rate(lambda: M.ssim_batch(preds, gts, device=device), n, device),
        "lpips (AlexNet)": _rate(lambda: M.lpips_batch(scorers.lpips, preds, gts), n, device),
        "fid features (Inception-v3, 299²)": _rate(lambda: M.image_features(scorers.fid, preds), n, device),
        f"ids ({scorers.identity.name})": _rate(lambda: M.identity_cosines(scorers.identity, preds, gts), n, device),
    }
    out: dict = {"device": str(device), "torch_threads": torch.get_num_threads(), "size": args.size, "metrics": rows}
    print(f"device {device}, {torch.get_num_threads()} threads, {n} pairs at {args.size}²")
    print(f"{'metric':<36} {'img/s':>8} {'s':>8}")
    for name, r in rows.items():  # PSNR/LPIPS/IDS/SSIM count pairs; FID features count images
        print(f"{name:<36} {r['img_s']:>8} {r['seconds']:>8}")
    if args.report:
        out["report"] = _report_time(cfg, scorers, Path(tempfile.mkdtemp(prefix="attrface-evalreport-")))
        print(f"report (3 sets from the samples, bicubic + identity): {out['report']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def _report_time(cfg, scorers, root: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attrface_pipeline.storage import atomic_write_bytes
    from training.degradation import get_preset
    from training.eval import benchmark_sets as bs
    from training.eval import report as R

    presets = {level: get_preset(level) for level in cfg.benchmarks.levels}
    faces = [read_rgb(p) for p in sorted(ALIGNED.glob("*.png"))]
    items = [bs.BenchItem(key=f"hq{i}", gt=f, origin="sample") for i, f in enumerate(faces)]
    pq.write_table(pa.Table.from_pylist(bs.write_degraded_set(
        items, root / "celeba_test_levels", name="celeba_test_levels", presets=presets, seed=0, resolution=512,
        write=atomic_write_bytes), schema=bs.SCHEMA), root / "celeba_test_levels" / "manifest.parquet")
    real = [(f"real{i}", cv2.resize(read_rgb(p), (512, 512), interpolation=cv2.INTER_CUBIC), p.name)
            for i, p in enumerate(sorted((PROJECT_ROOT / "data" / "samples" / "lq_real").glob("*.png")))]
    pq.write_table(pa.Table.from_pylist(bs.write_real_set(real, root / "real_lq", name="real_lq", resolution=512,
                                                          write=atomic_write_bytes), schema=bs.SCHEMA),
                   root / "real_lq" / "manifest.parquet")
    sets = [R.load_set(root / name, name) for name in ("celeba_test_levels", "real_lq")]
    methods = R.baseline_methods(["bicubic", "identity"], bicubic_factor=cfg.eval.bicubic_factor)
    t0 = time.perf_counter()
    report = R.run_report(sets, methods, scorers, root / "eval", metrics=["psnr", "ssim", "lpips", "ids", "fid"],
                          batch_size=cfg.eval.batch_size, grid_faces=cfg.eval.grid_faces, write=atomic_write_bytes,
                          hq_reference=sets[0], log=lambda m: None)
    return {"faces": sum(len(s.rows) for s in sets), "methods": len(methods), "cells": len(report.results),
            "seconds": round(time.perf_counter() - t0, 2), "restore_seconds": round(report.restore_seconds, 2)}


if __name__ == "__main__":
    main()
