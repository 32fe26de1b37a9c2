"""training.restore_faces on real photos with the project's dlib detector: paste-back, auto mode, batch over files."""

import hashlib
import json
import shutil

import cv2
import numpy as np
import pytest

from attrface_pipeline.artifacts import file_sha256
from attrface_pipeline.builders import align_spec, build_detector
from attrface_pipeline.config import PROJECT_ROOT, PipelineConfig
from attrface_pipeline.images import encode_image, read_rgb
from attrface_pipeline.stages.align import align_face
from attrface_pipeline.stages.ingest import load_rgb
from training.restore_faces import (RestoreOptions, center_face, list_inputs, looks_aligned, paste_back,
                                   restore_folder, restore_photo)

GROUP_PHOTO = PROJECT_ROOT / "data/samples/faces/whole/02.png"  # 4 faces, RGBA
PORTRAIT = PROJECT_ROOT / "data/samples/faces/hq/obama.jpg"
ALIGNED = PROJECT_ROOT / "data/samples/aligned_hq/ffhq_00002.png"
MAGENTA = (255, 0, 255)


class MemoDetector:
    """The real detector, run once per distinct image (dlib's CNN costs seconds per photo on 2 cores)."""

    def __init__(self, detector):
        self.inner, self.name, self.calls, self._seen = detector, detector.name, 0, {}

    def detect(self, image):
        key = hashlib.sha1(image.tobytes()).hexdigest() + str(image.shape)
        if key not in self._seen:
            self.calls += 1
            self._seen[key] = self.inner.detect(image)
        return self._seen[key]


@pytest.fixture(scope="module")
def cfg():
    return PipelineConfig()  # the offline profile: dlib's CNN detector, FFHQ 512 alignment


@pytest.fixture(scope="module")
def detector(cfg):
    return MemoDetector(build_detector(cfg))


@pytest.fixture(scope="module")
def group(detector):
    rgb = load_rgb(GROUP_PHOTO, min_side=1, max_pixels=10**8)[0]
    return rgb, detector.detect(rgb)


def identity(crops):
    return [c.copy() for c in crops]


def flat(crops):
    return [np.full_like(c, MAGENTA) for c in crops]


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def footprint(shape, matrices, size) -> np.ndarray:
    """Photo pixels any aligned crop maps to (the most paste_back may touch)."""
    mask = np.zeros(shape[:2], np.uint8)
    for m in matrices:
        mask |= cv2.warpAffine(np.ones((size, size), np.uint8), cv2.invertAffineTransform(m), shape[1::-1],
                               flags=cv2.INTER_NEAREST, borderValue=0)
    return cv2.dilate(mask, np.ones((5, 5), np.uint8)).astype(bool)  # a margin for the linear warp's edge


def test_identity_restore_returns_the_photo(group, detector, cfg):
    rgb, faces = group
    out, report = restore_photo(rgb, identity, detector=detector, align_spec=align_spec(cfg), input_kind="photo")
    assert report.faces == len(faces) == 4 and not report.aligned_input
    assert out.shape == rgb.shape and out.dtype == np.uint8
    for x0, y0, x1, y1 in (np.round(b).astype(int) for b in report.boxes):
        assert psnr(out[y0:y1, x0:x1], rgb[y0:y1, x0:x1]) > 35  # measured 54-56 dB: two bilinear warps only


def test_flat_restore_changes_exactly_the_face_regions(group, detector, cfg):
    rgb, faces = group
    size = align_spec(cfg).size
    out, report = restore_photo(rgb, flat, detector=detector, align_spec=align_spec(cfg))
    assert report.faces == 4
    matrices = [align_face(rgb, f.landmarks5, size)[1] for f in faces]
    inside = footprint(rgb.shape, matrices, size)
    changed = (out != rgb).any(-1)
    assert not changed[~inside].any()  # bit-identical away from the faces
    assert np.array_equal(out[~inside], rgb[~inside])
    for f in faces:  # the face itself is painted over (the mask is fully opaque there)
        cx, cy = f.landmarks5[2].round().astype(int)
        assert tuple(out[cy, cx]) == MAGENTA
    assert 0.05 < changed.mean() < inside.mean()


def test_paste_back_feathers_and_clips(group, cfg):
    rgb, faces = group
    crop, matrix = align_face(rgb, faces[0].landmarks5, 512)
    out = paste_back(rgb, np.zeros_like(crop), matrix, feather=0.05)
    cx, cy = faces[0].landmarks5[2].round().astype(int)
    row = out[cy, :, 1].astype(int) - rgb[cy, :, 1]
    diffs = np.unique(np.abs(row[row != 0]))
    assert len(diffs) > 5  # a soft edge, not a hard cut
    far = paste_back(rgb, crop, matrix + np.array([[0, 0, 1e5], [0, 0, 1e5]]))  # crop maps outside the photo
    assert np.array_equal(far, rgb)


def test_looks_aligned(detector, cfg):
    aligned = read_rgb(ALIGNED)
    assert looks_aligned(aligned, detector, align_spec(cfg))
    portrait = load_rgb(PORTRAIT, min_side=1, max_pixels=10**8)[0]
    assert not looks_aligned(portrait, detector, align_spec(cfg))  # not square
    # a square crop around the unaligned face (its dlib box is x 353-615, y 131-393): one face, but off the FFHQ
    # template (mean landmark error 0.22 of the side)
    cx, cy = 484, 262
    square = np.ascontiguousarray(portrait[max(0, cy - 350) : cy + 350, max(0, cx - 350) : cx + 350])
    square = cv2.resize(square, (512, 512), interpolation=cv2.INTER_AREA)
    assert square.shape[0] == square.shape[1] and len(detector.detect(square)) == 1
    assert not looks_aligned(square, detector, align_spec(cfg))


def test_aligned_input_is_restored_whole(detector, cfg):
    aligned = cv2.resize(read_rgb(ALIGNED), (384, 384), interpolation=cv2.INTER_AREA)  # any size: resized to 512
    seen = []

    def restore(crops):
        seen.extend(c.shape for c in crops)
        return flat(crops)

    out, report = restore_photo(aligned, restore, detector=detector, align_spec=align_spec(cfg))
    assert report.aligned_input and report.faces == 1 and seen == [(512, 512, 3)]
    assert out.shape == aligned.shape and (out == MAGENTA).all()
    with pytest.raises(ValueError, match="must be square"):
        restore_photo(aligned[:300], restore, detector=detector, align_spec=align_spec(cfg), input_kind="aligned")


def test_photo_without_faces_comes_back_unchanged(detector, cfg):
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), (0, 0), 3)
    out, report = restore_photo(noise, flat, detector=detector, align_spec=align_spec(cfg))
    assert report.faces == 0 and np.array_equal(out, noise)


def test_only_center_face_and_upscale(group, detector, cfg):
    rgb, faces = group
    h, w = rgb.shape[:2]
    nearest = min(faces, key=lambda f: np.hypot((f.bbox[0] + f.bbox[2]) / 2 - w / 2,
                                                (f.bbox[1] + f.bbox[3]) / 2 - h / 2))
    assert center_face(faces, rgb.shape) == [nearest] and center_face([], rgb.shape) == []
    out, report = restore_photo(rgb, flat, detector=detector, align_spec=align_spec(cfg), input_kind="photo",
                                only_center_face=True, upscale=2)
    assert report.faces == 1 and report.boxes == [[float(v) for v in nearest.bbox]]
    assert out.shape == (2 * h, 2 * w, 3)
    cx, cy = (2 * nearest.landmarks5[2]).round().astype(int)  # the face lands at twice its coordinates
    assert tuple(out[cy, cx]) == MAGENTA
    others = [f for f in faces if f is not nearest]
    for f in others:  # left alone: only resized
        ox, oy = (2 * f.landmarks5[2]).round().astype(int)
        assert tuple(out[oy, ox]) != MAGENTA
    with pytest.raises(ValueError, match="bg_upsampler"):
        restore_photo(rgb, flat, detector=detector, align_spec=align_spec(cfg), bg_upsampler="realesrgan")


class NativeFlat:
    """A restorer with its own output size (as A²BFR: restore_native at width x height), here 64 x 48."""

    def restore_native(self, crops):
        return [np.full((64, 48, 3), MAGENTA, np.uint8) for _ in crops]

    def __call__(self, crops):
        return flat(crops)


def test_restore_folder_layout_records_and_resume(tmp_path, detector, cfg):
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    aligned = cv2.resize(read_rgb(ALIGNED), (256, 256), interpolation=cv2.INTER_AREA)
    (src / "sub" / "face.png").write_bytes(encode_image(aligned, "png"))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (src / "tiny.png").write_bytes(encode_image(np.full((1, 1, 3), 90, np.uint8), "png"))  # too small to detect in
    blank = np.full((200, 300, 3), 90, np.uint8)
    (src / "blank.png").write_bytes(encode_image(blank, "png"))
    shutil.copy(GROUP_PHOTO, src / "group.png")
    (src / "notes.txt").write_text("not an image")
    inputs = list_inputs(src, out)
    assert [name for _, name in inputs] == ["blank.png", "broken.jpg", "group.png", "sub/face.png", "tiny.png"]
    messages = []
    run = dict(detector=detector, align_spec=align_spec(cfg), settings={"model": "flat"}, progress=False,
               log=messages.append)
    summary = restore_folder(inputs, out, NativeFlat(), options=RestoreOptions(suffix="v1"), **run)
    assert (summary["restored"], summary["failed"], summary["faces"]) == (4, 1, 5)
    failed = dict(summary["failures"])
    assert list(failed) == ["broken.jpg"] and failed["broken.jpg"].startswith("unreadable: ")
    records = {r["name"]: r for r in map(json.loads, (out / "restore_log.jsonl").read_text().splitlines())}
    assert records["group.png"]["faces"] == 4 and records["group.png"]["status"] == "ok"
    assert records["sub/face.png"]["aligned_input"]
    assert records["tiny.png"]["status"] == "ok" and records["tiny.png"]["reason"].startswith("no face found")
    assert all("seconds" in r for r in records.values())
    assert records["group.png"]["input_sha256"] == file_sha256(src / "group.png")  # re-runs decide by content
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "restored_imgs/group_v1.png" in files and "restored_imgs/blank_v1.png" in files
    assert "restored_faces/sub/face_00_v1.png" in files and not any("restored_imgs/sub" in f for f in files)
    assert [f for f in files if f.startswith("restored_faces/group")] == [
        f"restored_faces/group_{i:02d}_v1.png" for i in range(4)]
    assert read_rgb(out / "restored_faces/group_00_v1.png").shape == (64, 48, 3)  # the restorer's own size
    assert read_rgb(out / "cropped_faces/group_00.png").shape == (512, 512, 3)
    assert read_rgb(out / "cmp/group_00.png").shape[0] == 64
    assert np.array_equal(read_rgb(out / "restored_imgs/blank_v1.png"), blank)  # no face: written unchanged
    assert any("no face found" in m for m in messages) and any("broken.jpg" in m for m in messages)
    assert json.loads((out / "settings.json").read_text())["settings"]["options"]["suffix"] == "v1"
    assert not list(out.rglob(".*"))  # no temp files left behind
    # a re-run skips what is done and retries what failed; other settings are refused; --overwrite redoes all
    again = restore_folder(inputs, out, NativeFlat(), options=RestoreOptions(suffix="v1"), **run)
    assert (again["skipped"], again["restored"], again["failed"]) == (4, 0, 1)
    with pytest.raises(ValueError, match="other settings.*suffix"):
        restore_folder(inputs, out, NativeFlat(), options=RestoreOptions(suffix="v2"), **run)
    redo = restore_folder(inputs, out, NativeFlat(), options=RestoreOptions(suffix="v2"), overwrite=True, **run)
    assert (redo["skipped"], redo["restored"]) == (0, 4)


def test_list_inputs_rules(tmp_path):
    photo = tmp_path / "a.png"
    shutil.copy(ALIGNED, photo)
    assert list_inputs(photo) == [(photo, "a.png")]
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "old.png").write_bytes(b"")
    assert list_inputs(tmp_path, tmp_path / "outdir") == [(photo, "a.png")]  # outputs inside the input: skipped
    with pytest.raises(FileNotFoundError):
        list_inputs(tmp_path / "missing")
