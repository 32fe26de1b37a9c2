"""Benchmark sets on real sample faces: fixed seeds give the same bytes whatever the order; levels get harder."""

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.images import read_rgb
from attrface_pipeline.stages.ingest import decode_image
from attrface_pipeline.storage import atomic_write_bytes
from training.degradation import PRESETS
from training.eval import benchmark_sets as bs

ALIGNED = PROJECT_ROOT / "data" / "samples" / "aligned_hq"
REAL_LQ = PROJECT_ROOT / "data" / "samples" / "lq_real"
LEVELS = {name: PRESETS[name] for name in ("train", "partial_ood", "ood")}


def _decode(data: bytes) -> np.ndarray:
    return decode_image(data, min_side=16, max_pixels=80_000_000)[0]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def _items(files):
    small = [bs.BenchItem(key=i.key, gt=cv2.resize(i.gt, (96, 96), interpolation=cv2.INTER_AREA), origin=i.origin)
             for i in bs.folder_items(files, decode=_decode)]
    return small


def test_folder_set_is_byte_identical_whatever_the_order_and_levels_get_harder(tmp_path):
    files = bs.list_images([ALIGNED], [".png"])
    assert len(files) == 8
    a = bs.write_degraded_set(_items(files), tmp_path / "a", name="celeba_test_levels", presets=LEVELS, seed=0,
                              resolution=None, write=atomic_write_bytes)
    b = bs.write_degraded_set(_items(files[::-1]), tmp_path / "b", name="celeba_test_levels", presets=LEVELS,
                              seed=0, resolution=None, write=atomic_write_bytes)
    assert len(a) == 8 * 3 and _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert sorted(json.dumps(r, sort_keys=True) for r in a) == sorted(json.dumps(r, sort_keys=True) for r in b)
    psnr = bs.level_psnr(a)
    assert list(psnr) == ["train", "partial_ood", "ood"] and psnr["train"] > psnr["partial_ood"] > psnr["ood"]
    row = a[0]
    assert read_rgb(tmp_path / "a" / row["lq_path"]).shape == (96, 96, 3) and json.loads(row["degradation"])
    c = bs.write_degraded_set(_items(files[:2]), tmp_path / "c", name="celeba_test_levels", presets=LEVELS, seed=1,
                              resolution=None, write=atomic_write_bytes)
    assert _digests(tmp_path / "c")[f"lq/train/{c[0]['key']}.png"] != _digests(tmp_path / "a")[
        f"lq/train/{c[0]['key']}.png"]  # another seed, another LQ


def test_attrface_items_read_pairs_and_swap_for_tar(tmp_path):
    from webdataset import TarWriter

    faces = [read_rgb(f) for f in sorted(ALIGNED.glob("*.png"))[:2]]
    shard_dir = tmp_path / "test"
    shard_dir.mkdir()
    with open(shard_dir / "attrface-test-000000.tar", "wb") as f:
        writer = TarWriter(f, encoder=False)
        for i, (src, tar) in enumerate([(faces[0], faces[1]), (faces[1], faces[0])]):
            enc = lambda x: cv2.imencode(".png", x[..., ::-1])[1].tobytes()  # noqa: E731
            meta = {"edit": {"attribute": "Smiling", "direction": "add"}}
            writer.write({"__key__": f"k{i}", "src.png": enc(src), "tar.png": enc(tar),
                          "json": json.dumps(meta).encode(), "src.txt": b"a face", "tar.txt": b"a smiling face"})
        writer.close()
    items = list(bs.attrface_items(shard_dir))
    assert [i.key for i in items] == ["k0", "k1"] and np.array_equal(items[0].gt, faces[0])
    assert items[0].attribute == "Smiling" and items[0].target_prompt == "a smiling face"
    swapped = list(bs.attrface_items(shard_dir, lq_from="tar"))
    assert np.array_equal(swapped[0].gt, faces[1]) and swapped[0].source_prompt == "a smiling face"
    rows = bs.write_degraded_set(items, tmp_path / "out", name="attrface_test", presets=LEVELS, seed=0,
                                 resolution=None, write=atomic_write_bytes)
    assert {r["tar_path"] for r in rows} == {"tar/k0.png", "tar/k1.png"}
    with pytest.raises(FileNotFoundError, match="publish the dataset first"):
        list(bs.attrface_items(tmp_path / "empty"))


def test_real_lq_faces_are_aligned_by_the_detector(dlib_detector):
    files = bs.list_images([REAL_LQ], [".png"])[:3]
    faces, failures = bs.align_real_faces(files, detector=dlib_detector, decode=_decode, size=128,
                                          reject=lambda face: "" if face.size >= 48 else "too_small")
    assert len(faces) + len(failures) >= 3 and len(faces) >= 2
    assert all(crop.shape == (128, 128, 3) and "_" in key for key, crop, _ in faces)
    as_is, none_lost = bs.align_real_faces(files, detector=None, decode=_decode, size=128, reject=lambda f: "",
                                           align="as_is")
    assert len(as_is) == 3 and not none_lost and as_is[0][1].shape == (512, 512, 3)


def test_bad_photos_are_failure_rows_never_the_end_of_a_set(dlib_detector, tmp_path):
    good = bs.list_images([REAL_LQ], [".png"])[0]
    strip = tmp_path / "strip.png"  # dlib's filter window cannot fit a 16 px high image
    strip.write_bytes(cv2.imencode(".png", np.full((16, 2000, 3), 128, np.uint8))[1].tobytes())
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:300])
    faces, failures = bs.align_real_faces([strip, broken, good], detector=dlib_detector, decode=_decode, size=128,
                                          reject=lambda face: "")
    reasons = {Path(f["origin"]).name: f["reason"] for f in failures}
    assert reasons["strip.png"].startswith(("detector_failed", "no_face")) and "broken.png" in reasons
    assert reasons["broken.png"].startswith("undecodable") and len(faces) >= 1
    rows: list[dict] = []
    items = list(bs.folder_items([broken, good], decode=_decode, failures=rows))
    assert len(items) == 1 and rows[0]["reason"].startswith("undecodable")
