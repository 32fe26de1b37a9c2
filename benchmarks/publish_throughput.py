"""Publish throughput: MB/s writing WebDataset shards (JPEG encode + tar + fsync + index), against `dd` writing the
same number of bytes to the same disk in the same run (the ratio is the claim).

Samples are made from the real sample photos at 512 px (source = the photo, 'edit' = its mirror), cycled to
--samples, so the JPEG work matches a real publish. Output goes under <data_root>/bench/ and is removed after.

    .venv/bin/python benchmarks/publish_throughput.py [--samples 400] [--shard-size 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import cv2

from attrface_pipeline.config import PROJECT_ROOT, load_config
from attrface_pipeline.images import encode_image, read_rgb
from attrface_pipeline.stages.shards import Sample, write_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = load_config().paths.data_root / "bench" / "publish"
    shutil.rmtree(work, ignore_errors=True)
    (work / "images").mkdir(parents=True)
    photos = sorted(p for p in (PROJECT_ROOT / "data" / "samples" / "faces").rglob("*")
                    if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    pairs = []
    for i, photo in enumerate(photos):
        rgb = cv2.resize(read_rgb(photo), (512, 512), interpolation=cv2.INTER_AREA)
        src, tar = work / "images" / f"s{i}.png", work / "images" / f"t{i}.png"
        src.write_bytes(encode_image(rgb, "png"))
        tar.write_bytes(encode_image(rgb[:, ::-1].copy(), "png"))
        pairs.append((src, tar))
    samples = []
    for n in range(args.samples):
        src, tar = pairs[n % len(pairs)]
        meta = {"key": f"k{n:06d}", "face_key": f"f{n}", "image_key": f"i{n}",
                "edit": {"attribute": "Smiling", "direction": "add"}, "qc": {"identity_similarity": 0.7}}
        samples.append(Sample(f"k{n:06d}", "train", src, tar, meta, "a photo.", "a smiling photo."))
    rows = []
    try:
        for workers in args.workers:
            shutil.rmtree(work / "train", ignore_errors=True)
            t0 = time.perf_counter()
            stats = write_split(samples, work / "train", "train", args.shard_size, args.format, log=lambda m: None,
                                workers=workers)
            seconds = time.perf_counter() - t0
            mb = stats["bytes"] / 2**20
            rows.append({"workers": workers, "samples": args.samples, "shards": len(stats["shards"]),
                         "megabytes": round(mb, 1), "seconds": round(seconds, 2), "mb_s": round(mb / seconds, 1),
                         "samples_per_s": round(args.samples / seconds, 1)})
        t0 = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={work / 'dd.bin'}", "bs=1M", f"count={max(int(mb), 1)}",
                        "conv=fsync", "status=none"], check=True)
        dd_mb_s = round(max(int(mb), 1) / (time.perf_counter() - t0), 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.samples} samples of 512 px {args.format} pairs -> {rows[0]['shards']} shards, "
          f"{rows[0]['megabytes']} MB; dd (same disk, fsync): {dd_mb_s} MB/s")
    print(f"{'workers':>7s} {'MB/s':>7s} {'samples/s':>10s} {'vs dd':>7s}")
    for r in rows:
        r["ratio_to_dd"] = round(r["mb_s"] / dd_mb_s, 4)
        print(f"{r['workers']:7d} {r['mb_s']:7.1f} {r['samples_per_s']:10.1f} {r['ratio_to_dd']:7.4f}")
    if args.json:
        args.json.write_text(json.dumps({"dd_mb_s": dd_mb_s, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
