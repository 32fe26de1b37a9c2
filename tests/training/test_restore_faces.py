"""training.restore_faces on real photos with the project's dlib detector: paste-back, auto mode, batch over files."""

import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from attrface_pipeline.builders import align_spec, build_detector
from attrface_pipeline.config import PROJECT_ROOT, PipelineConfig
from attrface_pipeline.images import encode_image, read_rgb
from attrface_pipeline.stages.align import align_face
from attrface_pipeline.stages.ingest import load_rgb
from training.restore_faces import expand_io, looks_aligned, paste_back, restore_paths, restore_photo

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


def test_restore_paths_over_a_folder(tmp_path, detector, cfg):
    src, dst = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    aligned = cv2.resize(read_rgb(ALIGNED), (256, 256), interpolation=cv2.INTER_AREA)
    (src / "sub" / "face.png").write_bytes(encode_image(aligned, "png"))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    blank = np.full((200, 300, 3), 90, np.uint8)
    (src / "blank.png").write_bytes(encode_image(blank, "png"))
    (src / "notes.txt").write_text("not an image")
    inputs, outputs = expand_io(src, dst)
    assert [p.relative_to(src).as_posix() for p in inputs] == ["blank.png", "broken.jpg", "sub/face.png"]
    assert outputs == [dst / "blank.png", dst / "broken.jpg", dst / "sub" / "face.png"]
    messages = []
    records = restore_paths(inputs, outputs, flat, detector=detector, align_spec=align_spec(cfg), progress=False,
                            log=messages.append)
    by_name = {Path(r["path"]).name: r for r in records}
    assert by_name["broken.jpg"]["error"].startswith("unreadable: ") and not (dst / "broken.jpg").exists()
    assert by_name["blank.png"]["error"] == "" and by_name["blank.png"]["faces"] == 0
    assert np.array_equal(read_rgb(dst / "blank.png"), blank)  # no face: written unchanged
    assert by_name["face.png"]["aligned_input"] and by_name["face.png"]["faces"] == 1
    assert (read_rgb(dst / "sub" / "face.png") == MAGENTA).all()
    assert any("no face found" in m for m in messages) and any("broken.jpg" in m for m in messages)
    assert not list(dst.rglob(".*"))  # no temp files left behind


def test_expand_io_file_and_folder_rules(tmp_path):
    photo = tmp_path / "a.png"
    shutil.copy(ALIGNED, photo)
    assert expand_io(photo, tmp_path / "b.jpg") == ([photo], [tmp_path / "b.jpg"])
    (tmp_path / "outdir").mkdir()
    assert expand_io(photo, tmp_path / "outdir") == ([photo], [tmp_path / "outdir" / "a.png"])
    with pytest.raises(ValueError, match="is the input"):
        expand_io(photo, photo)
    (tmp_path / "outdir" / "old.png").write_bytes(b"")
    inputs, _ = expand_io(tmp_path, tmp_path / "outdir")  # outputs inside the input folder are not inputs
    assert inputs == [photo]
    with pytest.raises(FileNotFoundError):
        expand_io(tmp_path / "missing", tmp_path / "x")
