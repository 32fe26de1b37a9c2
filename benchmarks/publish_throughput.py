"""Publish throughput: MB/s writing WebDataset shards (tar + fsync + index), against `dd` writing the same number of
bytes to the same disk in the same run (the ratio is the claim).

Samples are made from the real sample photos at 512 px (source = the photo, 'edit' = its mirror), cycled to
--samples. As in the pipeline, each image is encoded once in the published format where it is made (``edits``), so
publishing copies bytes; the encode cost that moved to ``edits`` is printed beside it (per pair). ``--reencode``
also times the old path (decode a PNG master, re-encode both images of every sample) as the baseline of the same
run. Output goes under <data_root>/bench/ and is removed after.

    .venv/bin/python benchmarks/publish_throughput.py [--samples 400] [--shard-size 100] [--workers 1 2 4]
        [--repeats 3] [--reencode] [--json out.json]
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
from attrface_pipeline.images import EXTENSIONS, encode_image, read_rgb
from attrface_pipeline.stages.shards import Sample, write_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="publishes per setting; the median is reported")
    parser.add_argument("--reencode", action="store_true", help="also time decoding + re-encoding every image")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = load_config().paths.data_root / "bench" / "publish"
    shutil.rmtree(work, ignore_errors=True)
    (work / "images").mkdir(parents=True)
    photos = sorted(p for p in (PROJECT_ROOT / "data" / "samples" / "faces").rglob("*")
                    if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    ext = EXTENSIONS[args.format]
    images, encode_s = [], 0.0
    for i, photo in enumerate(photos):
        rgb = cv2.resize(read_rgb(photo), (512, 512), interpolation=cv2.INTER_AREA)
        pair = []
        for name, img in ((f"s{i}", rgb), (f"t{i}", rgb[:, ::-1].copy())):
            (work / "images" / f"{name}.png").write_bytes(encode_image(img, "png"))  # the old path's master
            t0 = time.perf_counter()
            data = encode_image(img, args.format)  # what edits now writes, once
            encode_s += time.perf_counter() - t0
            (work / "images" / f"{name}{ext}").write_bytes(data)
            pair.append(work / "images" / f"{name}{ext}")
        images.append(pair)
    encode_ms_per_pair = 1000 * encode_s / len(images)

    def samples_from(suffix: str) -> list[Sample]:
        out = []
        for n in range(args.samples):
            src, tar = (p.with_suffix(suffix) for p in images[n % len(images)])
            meta = {"key": f"k{n:06d}", "face_key": f"f{n}", "image_key": f"i{n}",
                    "edit": {"attribute": "Smiling", "direction": "add"}, "qc": {"identity_similarity": 0.7}}
            out.append(Sample(f"k{n:06d}", "train", src, tar, meta, "a photo.", "a smiling photo."))
        return out

    samples = samples_from(ext)
    rows = []
    try:
        write_split(samples, work / "warm", "train", args.shard_size, args.format, log=lambda m: None)  # page cache
        for workers in args.workers:
            times = []
            for _ in range(args.repeats):
                shutil.rmtree(work / "train", ignore_errors=True)
                t0 = time.perf_counter()
                stats = write_split(samples, work / "train", "train", args.shard_size, args.format,
                                    log=lambda m: None, workers=workers)
                times.append(time.perf_counter() - t0)
            seconds = sorted(times)[len(times) // 2]
            mb = stats["bytes"] / 2**20
            rows.append({"path": "encoded once", "workers": workers, "samples": args.samples,
                         "shards": len(stats["shards"]), "megabytes": round(mb, 1), "seconds": round(seconds, 2),
                         "mb_s": round(mb / seconds, 1), "samples_per_s": round(args.samples / seconds, 1)})
        if args.reencode:  # the old publish: decode each PNG master and encode both images of every sample
            masters = samples_from(".png")
            t0 = time.perf_counter()
            for s in masters:
                for path in (s.source_path, s.edit_path):
                    encode_image(read_rgb(path), args.format)
            transcode = time.perf_counter() - t0
            seconds = rows[0]["seconds"] + transcode
            rows.append({"path": "re-encode (old)", "workers": 1, "samples": args.samples,
                         "shards": rows[0]["shards"], "megabytes": rows[0]["megabytes"], "seconds": round(seconds, 2),
                         "mb_s": round(rows[0]["megabytes"] / seconds, 1),
                         "samples_per_s": round(args.samples / seconds, 1)})
        dd_times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run(["dd", "if=/dev/zero", f"of={work / 'dd.bin'}", "bs=1M", f"count={max(int(mb), 1)}",
                            "conv=fsync", "status=none"], check=True)
            dd_times.append(time.perf_counter() - t0)
        dd_mb_s = round(max(int(mb), 1) / sorted(dd_times)[len(dd_times) // 2], 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.samples} samples of 512 px {args.format} pairs -> {rows[0]['shards']} shards, "
          f"{rows[0]['megabytes']} MB; dd (same disk, fsync): {dd_mb_s} MB/s; encoding moved to edits: "
          f"{encode_ms_per_pair:.1f} ms per pair (source + edit)")
    print(f"{'path':>16s} {'workers':>7s} {'MB/s':>7s} {'samples/s':>10s} {'vs dd':>7s}")
    for r in rows:
        r["ratio_to_dd"] = round(r["mb_s"] / dd_mb_s, 4)
        print(f"{r['path']:>16s} {r['workers']:7d} {r['mb_s']:7.1f} {r['samples_per_s']:10.1f} "
              f"{r['ratio_to_dd']:7.4f}")
    if args.json:
        args.json.write_text(json.dumps({"dd_mb_s": dd_mb_s, "encode_ms_per_pair": round(encode_ms_per_pair, 2),
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
