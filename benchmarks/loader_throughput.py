"""Loader throughput: samples/s of the training loader (decode + degradation + tensors) against reading the same tars
without decoding (raw member bytes through webdataset, same DataLoader workers, same batch size), in one run (the
ratio is the claim: how much of the raw read rate survives decoding and degrading).

Shards are written to a temp dir from the real sample photos at 512 px (source = the photo, target = its mirror),
cycled to --samples, JPEG q95 as published. Each row is the best of --repeat full epochs, worker start included.

    .venv/bin/python benchmarks/loader_throughput.py [--samples 200] [--workers 2] [--modes single dual] [--json f]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader

from attrface_pipeline.attributes import CELEBA_ATTRIBUTES
from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.images import encode_image, read_rgb
from attrface_pipeline.stages.shards import Sample, write_split
from training.data import LoaderConfig, make_loader, resolve_shards


def _write_shards(work: Path, *, samples: int, shard_size: int) -> Path:
    """``samples`` 512 px pairs cycled from the sample photos, published as train shards under ``work``."""
    photos = sorted(p for p in (PROJECT_ROOT / "data" / "samples" / "faces").rglob("*")
                    if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    pairs = []
    for i, photo in enumerate(photos):
        rgb = cv2.resize(read_rgb(photo), (512, 512), interpolation=cv2.INTER_AREA)
        src, tar = work / f"s{i}.jpg", work / f"t{i}.jpg"
        src.write_bytes(encode_image(rgb, "jpg"))
        tar.write_bytes(encode_image(rgb[:, ::-1].copy(), "jpg"))
        pairs.append((src, tar))
    probs = dict(zip(CELEBA_ATTRIBUTES, np.random.default_rng(0).uniform(0, 1, 40).round(5).tolist()))
    rows = []
    for n in range(samples):
        src, tar = pairs[n % len(pairs)]
        meta = {"key": f"k{n:06d}", "face_key": f"f{n}", "image_key": f"i{n}",
                "attributes": {"probabilities": probs, "states": {"Smiling": "negative"}},
                "edit": {"attribute": "Smiling", "direction": "add"}, "qc": {"identity_similarity": 0.7}}
        rows.append(Sample(f"k{n:06d}", "train", src, tar, meta, "a photo.", "a smiling photo."))
    write_split(rows, work / "shards" / "train", "train", shard_size, log=lambda m: None)
    return work / "shards"


def _raw_loader(shards: Path, *, workers: int, batch_size: int) -> DataLoader:
    """The same tars through the same split and workers, members left as bytes (no decode, no degradation)."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(resolve_shards(str(shards))), wds.split_by_node,
                                wds.split_by_worker, wds.tarfile_to_samples())
    return DataLoader(pipeline, batch_size=batch_size, num_workers=workers, collate_fn=list)


def _best_rate(make, *, repeat: int) -> tuple[float, int]:
    """(samples/s, samples) of the fastest of ``repeat`` full passes over a freshly built loader."""
    best, count = 0.0, 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        count = sum(len(batch["key"]) if isinstance(batch, dict) else len(batch) for batch in make())
        best = max(best, count / (time.perf_counter() - t0))
    return best, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preset", default="train")
    parser.add_argument("--modes", nargs="+", choices=["single", "dual"], default=["single", "dual"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # printed: on a shared box other jobs' load moves every number
    with tempfile.TemporaryDirectory(prefix="attrface-loader-bench-") as tmp:
        shards = _write_shards(Path(tmp), samples=args.samples, shard_size=args.shard_size)
        tars = resolve_shards(str(shards))
        megabytes = sum(Path(t).stat().st_size for t in tars) / 2**20
        raw_rate, _ = _best_rate(partial(_raw_loader, shards, workers=args.workers, batch_size=args.batch_size),
                                 repeat=args.repeat)
        rows = [{"loader": "raw members (no decode)", "samples_per_s": round(raw_rate, 1), "ratio": 1.0}]
        for mode in args.modes:
            cfg = LoaderConfig(shards=str(shards), mode=mode, preset=args.preset, batch_size=args.batch_size,
                               num_workers=args.workers, seed=0)
            rate, count = _best_rate(partial(make_loader, cfg), repeat=args.repeat)
            assert count == args.samples, f"{mode} loader yielded {count} of {args.samples} samples"
            rows.append({"loader": f"{mode} + degrade({args.preset})", "samples_per_s": round(rate, 1),
                         "ratio": round(rate / raw_rate, 4)})
    print(f"{args.samples} samples of 512 px jpg pairs in {len(tars)} shards "
          f"({megabytes:.1f} MB); {args.workers} workers, batch {args.batch_size}, best of {args.repeat}; "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'loader':<28s} {'samples/s':>10s} {'vs raw':>7s}")
    for r in rows:
        print(f"{r['loader']:<28s} {r['samples_per_s']:10.1f} {r['ratio']:7.4f}")
    if args.json:
        args.json.write_text(json.dumps({"samples": args.samples, "workers": args.workers,
                                         "batch_size": args.batch_size, "megabytes": round(megabytes, 1),
                                         "load_average": [load_before, os.getloadavg()[0]],
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
