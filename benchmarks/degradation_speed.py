"""Degradation speed: images/s per core of ``training.degradation.degrade`` per preset at 512 px, against a plain
cv2.resize down + up of the same images in the same run (the ratio is the claim; the goal is >= 50 img/s/core for
``train``).

One process, cv2.setNumThreads(1) (numpy's element-wise work is single-threaded anyway), so CPU seconds are one
core's seconds: img/s/core = images / process CPU time, which stays honest on a shared machine; wall-clock img/s is
printed beside it. Images are the real sample photos resized to --size, cycled, each with its own seed.

    .venv/bin/python benchmarks/degradation_speed.py [--images 300] [--size 512] [--presets train ood] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.images import read_rgb
from training.degradation import PRESETS, degrade_seeded


def _measure(fn: Callable[[np.ndarray, int], object], images: list[np.ndarray], n: int) -> dict:
    fn(images[0], 0)  # warm-up: lazily built tables, first-call allocations
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(images[i % len(images)], i)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"images": n, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "img_s_core": round(n / cpu, 1),
            "img_s_wall": round(n / wall, 1), "ms_per_img": round(1e3 * cpu / n, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="degradations per preset")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    photos = sorted(p for p in (PROJECT_ROOT / "data" / "samples" / "faces").rglob("*")
                    if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    images = [cv2.resize(read_rgb(p), (args.size, args.size), interpolation=cv2.INTER_AREA) for p in photos]
    small = (args.size // 4, args.size // 4)

    def baseline(img: np.ndarray, seed: int) -> np.ndarray:
        # the cheapest stand-in for a degradation: x4 area down, bicubic back up
        down = cv2.resize(img, small, interpolation=cv2.INTER_AREA)
        return cv2.resize(down, (args.size, args.size), interpolation=cv2.INTER_CUBIC)

    base = _measure(baseline, images, args.images)
    rows = []
    for name in args.presets:
        row = {"preset": name,
               **_measure(lambda img, seed, name=name: degrade_seeded(img, name, seed), images, args.images)}
        row["ratio_to_resize"] = round(row["img_s_core"] / base["img_s_core"], 4)
        rows.append(row)
    print(f"{args.images} images per preset, {args.size} px, {len(photos)} sample photos, cv2 threads 1; "
          f"baseline cv2.resize x4 down (area) + up (bicubic): {base['img_s_core']} img/s/core "
          f"({base['ms_per_img']} ms)")
    print(f"{'preset':>12s} {'img/s/core':>10s} {'ms/img':>7s} {'img/s wall':>10s} {'vs resize':>9s}")
    for r in rows:
        print(f"{r['preset']:>12s} {r['img_s_core']:10.1f} {r['ms_per_img']:7.2f} {r['img_s_wall']:10.1f} "
              f"{r['ratio_to_resize']:9.4f}")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "baseline": base, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
