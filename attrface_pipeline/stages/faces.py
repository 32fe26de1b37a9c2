"""Per-partition face extraction: detect -> filter -> align -> write crops, resumable image by image.

For each source image one small JSON record (``records/<image_key>.json``) is written atomically after its crops;
a re-run skips images whose record exists, so a crash loses at most the image in flight. The manifest is built
from the records at the end.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from attrface_pipeline.images import EXTENSIONS, encode_image
from attrface_pipeline.stages.align import align_face, transform_points
from attrface_pipeline.stages.detect import FaceDetector, face_rejection
from attrface_pipeline.stages.ingest import QuarantineError, load_rgb
from attrface_pipeline.storage import PartitionStore, atomic_write_bytes, atomic_write_json

FACE_SCHEMA = pa.schema(
    [
        ("face_key", pa.string()),
        ("image_key", pa.string()),
        ("face_index", pa.int32()),
        ("source_path", pa.string()),
        ("status", pa.string()),  # ok | rejected
        ("reason", pa.string()),
        ("detector", pa.string()),
        ("score", pa.float32()),
        ("bbox", pa.list_(pa.float32(), 4)),
        ("landmarks5", pa.list_(pa.float32(), 10)),
        ("aligned_landmarks5", pa.list_(pa.float32(), 10)),
        ("transform", pa.list_(pa.float32(), 6)),
        ("eye_distance", pa.float32()),
        ("face_size", pa.float32()),
        ("aligned_path", pa.string()),  # relative to the partition dir; "" when rejected
    ]
)


@dataclass
class FaceThresholds:
    min_score: float
    min_face_size: float
    min_eye_distance: float


@dataclass
class AlignSpec:
    size: int = 512
    image_format: str = "png"
    jpeg_quality: int = 95


def face_key(image_key: str, index: int) -> str:
    return f"{image_key}_{index:02d}"


def _record_path(store: PartitionStore, image_key: str) -> Path:
    return store.path("records", f"{image_key}.json")


def process_image(
    image: np.ndarray, image_key: str, source_path: str, detector: FaceDetector, thresholds: FaceThresholds,
    align: AlignSpec, store: PartitionStore,
) -> dict:
    """Detect, filter and align the faces of one image; writes crops, returns the image record."""
    faces = sorted(detector.detect(image), key=lambda f: (f.bbox[0], f.bbox[1]))  # stable left-to-right indices
    rows = []
    for index, face in enumerate(faces):
        reason = face_rejection(face, min_score=thresholds.min_score, min_face_size=thresholds.min_face_size,
                                min_eye_distance=thresholds.min_eye_distance)
        key = face_key(image_key, index)
        row = {
            "face_key": key, "image_key": image_key, "face_index": index, "source_path": source_path,
            "status": "rejected" if reason else "ok", "reason": reason, "detector": detector.name,
            "score": face.score, "bbox": [float(v) for v in face.bbox],
            "landmarks5": [float(v) for v in face.landmarks5.reshape(-1)],
            "aligned_landmarks5": None, "transform": None, "eye_distance": face.eye_distance,
            "face_size": face.size, "aligned_path": "",
        }
        if not reason:
            try:
                crop, matrix = align_face(image, face.landmarks5, size=align.size)
            except ValueError as e:  # degenerate landmarks: keep the record, say why
                row.update(status="rejected", reason=f"alignment_failed: {e}")
            else:
                rel = f"aligned/{key}{EXTENSIONS[align.image_format]}"
                atomic_write_bytes(store.path(rel), encode_image(crop, align.image_format, align.jpeg_quality))
                row.update(
                    aligned_path=rel, transform=[float(v) for v in matrix.reshape(-1)],
                    aligned_landmarks5=[float(v) for v in transform_points(face.landmarks5, matrix).reshape(-1)],
                )
        rows.append(row)
    record = {"image_key": image_key, "source_path": source_path, "status": "ok", "reason": "", "faces": rows}
    atomic_write_json(_record_path(store, image_key), record)
    return record


def extract_faces(
    sources: Iterable[dict], detector: FaceDetector, thresholds: FaceThresholds, align: AlignSpec,
    store: PartitionStore, *, min_side: int, max_pixels: int, log_every: int = 4, log=print,
) -> tuple[list[dict], dict]:
    """Run :func:`process_image` over the ok rows of a raw_images manifest; returns (face rows, stats)."""
    sources = [s for s in sources if s["status"] == "ok"]
    records, resumed, detect_seconds = [], 0, 0.0
    for i, src in enumerate(sources, 1):
        path = _record_path(store, src["key"])
        if path.exists():
            records.append(json.loads(path.read_text()))
            resumed += 1
            continue
        try:
            image, digest = load_rgb(src["source_path"], min_side=min_side, max_pixels=max_pixels)
            failure = "" if digest == src["sha256"] else "source_changed: file differs from the ingested version"
        except (QuarantineError, OSError) as e:
            failure = f"unreadable: {e}"
        if failure:
            record = {"image_key": src["key"], "source_path": src["source_path"], "status": "failed",
                      "reason": failure, "faces": []}
            records.append(record)  # not persisted: a re-run retries it
            continue
        t0 = time.perf_counter()
        records.append(process_image(image, src["key"], src["source_path"], detector, thresholds, align, store))
        detect_seconds += time.perf_counter() - t0
        if i % log_every == 0 or i == len(sources):
            log(f"faces: {i}/{len(sources)} images, {sum(len(r['faces']) for r in records)} detections")
    rows = [f for r in records for f in r["faces"]]
    stats = {
        "images": len(sources),
        "images_resumed": resumed,
        "images_failed": sum(r["status"] != "ok" for r in records),
        "images_without_faces": sum(r["status"] == "ok" and not r["faces"] for r in records),
        "detections": len(rows),
        "faces_ok": sum(f["status"] == "ok" for f in rows),
        "rejections": dict(Counter(f["reason"].split(":")[0] for f in rows if f["status"] != "ok")),
        "failures": dict(Counter(r["reason"].split(":")[0] for r in records if r["status"] != "ok")),
        "detect_seconds": round(detect_seconds, 3),
    }
    return rows, stats

