import io
import os
import shutil
import socket
import struct
import threading
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from attrface_pipeline.stages import ingest
from attrface_pipeline.stages.ingest import (ContentIndex, HashCache, QuarantineError, Reason, chunk_sources,
                                             decode_image, ingest_chunk, ingest_file, keys_digest, list_sources,
                                             load_rgb, sample_key)

LIMITS = dict(min_side=64, max_pixels=80_000_000)
REASONS = {r.value for r in Reason}


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression-bomb shape) with no real pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _png_chunk(b"IEND", b""))


def make_bad_files(folder, samples):
    """The malformed-input suite, built from a real face photo. Returns {file name: expected reason or ''}."""
    face = Image.open(samples / "hq" / "obama.jpg").convert("RGB")
    jpeg = io.BytesIO()
    face.save(jpeg, "JPEG", quality=90)
    data = jpeg.getvalue()
    expected = {}

    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    expected["truncated.jpg"] = "truncated"
    (folder / "zero.jpg").write_bytes(b"")
    expected["zero.jpg"] = "not_an_image"
    (folder / "text.jpg").write_text("this is not an image, just text renamed to .jpg\n")
    expected["text.jpg"] = "not_an_image"
    face.convert("CMYK").save(folder / "cmyk.jpg", "JPEG")
    expected["cmyk.jpg"] = ""
    gray16 = (np.asarray(face.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")  # 16-bit greyscale PNG
    expected["gray16.png"] = ""
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "one_pixel.png")
    expected["one_pixel.png"] = "too_small"
    rotated = face.rotate(90, expand=True)  # stored turned 90 deg CCW; EXIF 6 says "rotate 90 CW to display"
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "exif_rotated.jpg", "JPEG", exif=exif.tobytes())
    expected["exif_rotated.jpg"] = ""
    (folder / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    expected["bomb.png"] = "decompression_bomb"
    face.convert("P").save(folder / "palette.png")
    expected["palette.png"] = ""
    rgba = face.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    expected["rgba.png"] = ""
    shutil.copy(samples / "hq" / "obama.jpg", folder / "copy_a.jpg")
    shutil.copy(samples / "hq" / "obama.jpg", folder / "copy_b.jpg")
    expected["copy_a.jpg"] = ""
    expected["copy_b.jpg"] = "duplicate"
    return expected


def test_malformed_inputs_are_quarantined_with_reasons(tmp_path, samples):
    expected = make_bad_files(tmp_path, samples)
    paths = list_sources([str(tmp_path)], [".jpg", ".png"])
    records = {r.source_path.rsplit("/", 1)[1]: r for r in ingest_chunk(paths, **LIMITS)}
    assert set(records) == set(expected)
    for name, reason in expected.items():
        rec = records[name]
        assert rec.reason == reason, (name, rec.reason, rec.detail)
        assert rec.status == ("ok" if not reason else "quarantined")
        if reason and reason != "not_an_image":
            assert rec.detail


def test_exif_orientation_applied_and_modes_converted(tmp_path, samples):
    make_bad_files(tmp_path, samples)
    upright = np.asarray(Image.open(samples / "hq" / "obama.jpg").convert("RGB"))
    rgb, info = decode_image((tmp_path / "exif_rotated.jpg").read_bytes(), **LIMITS)
    assert info["orientation"] == 6 and rgb.shape == upright.shape
    assert np.abs(rgb.astype(int) - upright.astype(int)).mean() < 8  # same picture after JPEG round trip
    gray, info = decode_image((tmp_path / "gray16.png").read_bytes(), **LIMITS)
    assert info["mode"].startswith("I;16") and gray.dtype == np.uint8 and gray.shape[2] == 3
    assert 30 < gray.mean() < 220  # scaled into 8 bits, not clipped to white
    cmyk, _ = decode_image((tmp_path / "cmyk.jpg").read_bytes(), **LIMITS)
    assert np.abs(cmyk.astype(int) - upright.astype(int)).mean() < 25
    rgba, _ = decode_image((tmp_path / "rgba.png").read_bytes(), **LIMITS)
    assert rgba.mean() > upright.mean()  # half-transparent over white gets lighter


def test_real_rgba_sample_is_accepted(samples):
    rec = ingest_file(str(samples / "hard" / "32bit.png"), **LIMITS)
    assert rec.status == "ok" and rec.mode == "RGBA" and rec.key == sample_key(rec.sha256) and "." not in rec.key


def test_list_sources_folder_glob_and_list_file(tmp_path, samples):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two photos\n{samples / 'hq' / 'obama.jpg'}\n\n{samples / 'whole' / '02.png'}\n")
    assert [p.rsplit("/", 1)[1] for p in list_sources([str(listing)], [".jpg"])] == ["obama.jpg", "02.png"]
    by_glob = list_sources([str(samples / "whole" / "*.jpg")], [".jpg"])
    assert by_glob and all(p.endswith(".jpg") for p in by_glob)
    folder = list_sources([str(samples)], [".jpg", ".png"])
    assert folder == list_sources([str(samples)], [".png", ".jpg"])  # stable order
    assert len(folder) == len(set(folder)) == 16
    with pytest.raises(FileNotFoundError, match="not a folder"):
        list_sources([str(tmp_path / "missing")], [".jpg"])


def test_chunking_is_contiguous_and_complete():
    paths = [f"/x/{i:03d}.jpg" for i in range(17)]
    chunks = chunk_sources(paths, 8)
    assert list(chunks) == ["chunk-00000", "chunk-00001", "chunk-00002"]
    assert [p for c in chunks.values() for p in c] == paths
    with pytest.raises(ValueError):
        chunk_sources(paths, 0)


def test_raw_images_asset_runs_green_on_malformed_inputs(tmp_path, samples):
    """The whole bad-input suite through the real Dagster asset: the run succeeds, every file is accounted for."""
    import dagster as dg

    from attrface_pipeline.assets.ingest import raw_images
    from attrface_pipeline.assets.resources import AttrFaceConfig

    src = tmp_path / "src"
    src.mkdir()
    expected = make_bad_files(src, samples)
    settings = {"source": {"paths": [str(src)], "chunk_size": 100}, "paths": {"data_root": str(tmp_path / "out")}}
    result = dg.materialize(
        [raw_images], partition_key="chunk-00000", resources={"attrface": AttrFaceConfig(settings=settings)},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    meta = result.asset_materializations_for_node("raw_images")[0].metadata
    assert meta["sources"].value == len(expected)
    assert meta["quarantined"].value == sum(1 for r in expected.values() if r)
    manifest = pq.read_table(tmp_path / "out" / "raw_images" / "chunk-00000" / "manifest.parquet").to_pylist()
    assert {m["source_path"].rsplit("/", 1)[1]: m["reason"] for m in manifest} == expected
    assert (tmp_path / "out" / "raw_images" / "chunk-00000" / "_stats.json").exists()


# --- Any bytes: every file is decoded or quarantined with a reason, never a crash (issue 9) -------------------------

FORMATS = {  # name -> (Pillow format, save options); EXIF where the format carries it, so cuts and flips reach it
    "png": ("PNG", {}),  # no eXIf chunk: getexif() then reads the chunks after IDAT, the reported crash
    "png_exif": ("PNG", {"exif": True}),
    "jpeg": ("JPEG", {"quality": 90, "exif": True}),
    "jpeg_progressive": ("JPEG", {"quality": 90, "progressive": True}),
    "webp": ("WEBP", {"quality": 80, "exif": True}),
    "webp_lossless": ("WEBP", {"lossless": True}),
    "tiff": ("TIFF", {"exif": True}),
    "tiff_lzw": ("TIFF", {"compression": "tiff_lzw"}),
    "gif": ("GIF", {}),
    "bmp": ("BMP", {}),
}
SMALL = dict(min_side=16, max_pixels=80_000_000)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    if options.get("exif") is True:  # a plain orientation tag; bytes are used as given
        exif = Image.Exif()
        exif[0x0112] = 6
        options["exif"] = exif.tobytes()
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def small_face(samples) -> Image.Image:
    face = Image.open(samples / "hq" / "obama.jpg").convert("RGB")
    face.thumbnail((128, 128))  # small: hundreds of decodes stay well under a second each format
    return face


@pytest.fixture(scope="module")
def encoded(small_face) -> dict[str, bytes]:
    return {name: _encode(small_face, fmt, **dict(options)) for name, (fmt, options) in FORMATS.items()}


def _cut_points(size: int) -> list[int]:
    """Cuts inside the signature and headers, then spread over the whole file up to its last bytes."""
    spread = [int(size * f) for f in np.linspace(0.1, 0.995, 10)]
    return sorted({c for c in [1, 2, 4, 8, 12, 16, 24, 33, 50, 64, 100, *spread, size - 1] if 0 < c < size})


def _flipped(data: bytes, rng: np.random.Generator, count: int, within: int) -> bytes:
    out = bytearray(data)
    for pos in rng.integers(0, min(within, len(data)), count):
        out[pos] ^= int(rng.integers(1, 256))
    return bytes(out)


def assert_accounted_for(path, limits=SMALL):
    """ingest_file gives a verdict (ok, or quarantined with a known reason and a detail); load_rgb agrees."""
    rec = ingest_file(str(path), **limits)  # must not raise, whatever the file holds
    assert rec.status in ("ok", "quarantined"), rec
    if rec.status == "ok":
        assert rec.reason == "" and rec.width > 0 and rec.height > 0 and rec.key
    else:
        assert rec.reason in REASONS and rec.detail, rec
    try:
        rgb, digest = load_rgb(path, **limits)
    except QuarantineError as q:
        assert (q.reason.value, q.detail) == (rec.reason, rec.detail), (path, rec)
    else:
        assert rec.status == "ok" and digest == rec.sha256 and rgb.shape == (rec.height, rec.width, 3), (path, rec)
    return rec


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt tags it skips
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_cut_and_corrupted_files_never_raise(name, encoded, tmp_path):
    data = encoded[name]
    assert assert_accounted_for(_write(tmp_path / f"whole.{name}", data)).status == "ok"
    rng = np.random.default_rng(sorted(FORMATS).index(name))
    half = len(data) // 2
    variants = {f"cut{c}": data[:c] for c in sorted({*_cut_points(len(data)), half})}
    for i in range(32):  # half in the first 64 bytes (signature, header), half anywhere
        variants[f"flip{i}"] = _flipped(data, rng, count=int(rng.choice([1, 4, 32])), within=64 if i % 2 else len(data))
    verdicts = {}
    for label, variant in variants.items():
        verdicts[label] = assert_accounted_for(_write(tmp_path / f"{label}.{name}", variant)).reason
    # Half a file has lost pixel data (or, in a TIFF, the directory written after it): never a good photo.
    assert verdicts[f"cut{half}"] != "", verdicts


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_rgb_png_cut_in_half_is_quarantined_as_truncated(samples, tmp_path):
    """The reported case: getexif() read the PNG's remaining chunks outside the guarded block and raised."""
    face = Image.open(samples / "hq" / "ffhq_00000.png").convert("RGB")
    data = _encode(face, "PNG")
    rec = ingest_file(str(_write(tmp_path / "half.png", data[: len(data) // 2])), **LIMITS)
    assert (rec.status, rec.reason) == ("quarantined", "truncated") and "truncated" in rec.detail
    with pytest.raises(QuarantineError, match="truncated"):
        load_rgb(tmp_path / "half.png", **LIMITS)


def _exif_block(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian TIFF/EXIF block with raw IFD entries (tag, type, count, 4 value bytes)."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", t, ty, n) + v[:4].ljust(4, b"\0")
                                                      for t, ty, n, v in entries)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def _patched(data: bytes, offset: int, fmt: str, *values) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def _png_ihdr(png: bytes, width: int, height: int, fix_crc: bool = True) -> bytes:
    ihdr = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF) if fix_crc else png[29:33]
    return png[:16] + ihdr + crc + png[33:]


def _jpeg_sof(jpeg: bytes, width: int, height: int) -> bytes:
    at = min(i for i in (jpeg.find(b"\xff\xc0"), jpeg.find(b"\xff\xc2")) if i >= 0)
    return _patched(jpeg, at + 5, ">HH", height, width)


def _tiff_tag(tiff: bytes, tag: int, value: int) -> bytes:
    ifd = struct.unpack_from("<I", tiff, 4)[0]
    for i in range(struct.unpack_from("<H", tiff, ifd)[0]):
        at = ifd + 2 + 12 * i
        if struct.unpack_from("<H", tiff, at)[0] == tag:
            kind = struct.unpack_from("<H", tiff, at + 2)[0]
            return _patched(tiff, at + 8, "<H" if kind == 3 else "<I", min(value, 0xFFFF) if kind == 3 else value)
    raise AssertionError(f"tag {tag} not in the TIFF")


def lying_files(face: Image.Image, encoded: dict[str, bytes]) -> dict[str, tuple[bytes, str | None]]:
    """{file name: (bytes, expected reason, or None for "any verdict")}: headers that lie about the data."""
    png, jpeg, gif, bmp, tiff = (encoded[k] for k in ("png", "jpeg", "gif", "bmp", "tiff"))
    plain_png, lossy_webp = _encode(face, "PNG"), _encode(face, "WEBP", quality=80)  # no EXIF: VP8 header first
    files = {
        "png_ihdr_huge.png": (_png_ihdr(plain_png, 100_000, 100_000), "decompression_bomb"),
        "png_ihdr_huge_bad_crc.png": (_png_ihdr(plain_png, 100_000, 100_000, fix_crc=False), None),
        "png_ihdr_zero.png": (_png_ihdr(plain_png, 0, 0), None),
        "png_ihdr_bigger_than_data.png": (_png_ihdr(plain_png, 4000, 3000), None),
        "png_ihdr_smaller_than_data.png": (_png_ihdr(plain_png, 64, 64), None),
        "png_chunk_claims_2gb.png": (png[:33] + struct.pack(">I", 0x7FFFFFFF) + b"tEXt" + b"x" * 32 + png[33:], None),
        "jpeg_sof_zero.jpg": (_jpeg_sof(jpeg, 0, 0), None),
        "jpeg_sof_huge.jpg": (_jpeg_sof(jpeg, 65535, 65535), "decompression_bomb"),
        "jpeg_sof_bigger_than_data.jpg": (_jpeg_sof(jpeg, 4000, 3000), None),
        "jpeg_sof_tiny.jpg": (_jpeg_sof(jpeg, 8, 8), None),
        "jpeg_progressive_sof_huge.jpg": (_jpeg_sof(encoded["jpeg_progressive"], 60000, 60000), "decompression_bomb"),
        "gif_screen_huge.gif": (_patched(gif, 6, "<HH", 65535, 65535), "decompression_bomb"),
        "gif_screen_zero.gif": (_patched(gif, 6, "<HH", 0, 0), None),
        "gif_frame_beyond_screen.gif": (_patched(gif, gif.index(b"\x2c\0\0\0\0") + 5, "<HH", 60000, 60000), None),
        "bmp_huge.bmp": (_patched(bmp, 18, "<ii", 100_000, 100_000), "decompression_bomb"),
        "bmp_negative_height.bmp": (_patched(bmp, 18, "<ii", face.width, -face.height), None),
        "bmp_zero_width.bmp": (_patched(bmp, 18, "<ii", 0, face.height), None),
        "tiff_width_huge.tif": (_tiff_tag(tiff, 256, 4_000_000_000), "decompression_bomb"),
        "tiff_strip_offset_beyond_file.tif": (_tiff_tag(tiff, 273, 10**9), None),
        "tiff_strip_bytes_huge.tif": (_tiff_tag(tiff, 279, 0x7FFFFFFF), None),
        "webp_vp8_dims_huge.webp": (_patched(lossy_webp, 26, "<HH", 0x3FFF, 0x3FFF), None),
        "webp_riff_size_lies.webp": (_patched(encoded["webp"], 4, "<I", 0x7FFFFFF0), None),
        # Wrong extension: the content decides, not the name.
        "png_named.jpg": (plain_png, ""),
        "jpeg_named.gif": (jpeg, ""),
        "bmp_named.png": (bmp, ""),
        "ico_named.jpg": (_encode(face, "ICO"), "unsupported_format"),
        "tga_named.png": (_encode(face, "TGA"), "unsupported_format"),
        "zip_named.jpg": (b"PK\x03\x04" + bytes(200), "not_an_image"),
        "html_named.png": (b"<!doctype html><html><body>404</body></html>", "not_an_image"),
    }
    # EXIF that lies: orientation of the wrong type or count, out of range, garbage, offsets past the block.
    for label, entries in {
        "ascii": [(0x0112, 2, 4, b"abc\0")],
        "two_shorts": [(0x0112, 3, 2, struct.pack("<HH", 6, 6))],
        "nine": [(0x0112, 3, 1, struct.pack("<H", 9))],
        "zero": [(0x0112, 3, 1, struct.pack("<H", 0))],
        "offset_past_end": [(0x0112, 3, 100, struct.pack("<I", 10**6))],
        "rational": [(0x0112, 5, 1, struct.pack("<I", 8))],
    }.items():
        files[f"jpeg_exif_orientation_{label}.jpg"] = (_encode(face, "JPEG", exif=_exif_block(entries)), None)
    files["jpeg_exif_garbage.jpg"] = (_encode(face, "JPEG", exif=b"Exif\0\0II*\0" + bytes(range(256)) * 4), None)
    far_ifd = b"Exif\0\0II*\0" + struct.pack("<I", 2**31)
    files["jpeg_exif_ifd_offset_huge.jpg"] = (_encode(face, "JPEG", exif=far_ifd), None)
    files["png_exif_garbage.png"] = (_encode(face, "PNG", exif=b"Exif\0\0MM\0*" + bytes(64)), None)
    return files


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lying_headers_and_mismatched_formats_never_raise(small_face, encoded, tmp_path):
    for name, (data, expected) in lying_files(small_face, encoded).items():
        rec = assert_accounted_for(_write(tmp_path / name, data))
        if expected is not None:
            assert rec.reason == expected, (name, rec)
        if name.startswith(("jpeg_exif_orientation_ascii", "jpeg_exif_orientation_nine", "jpeg_exif_orientation_zero")):
            assert rec.status == "ok" and rec.orientation == 1, (name, rec)  # junk means "as stored"
            assert (rec.width, rec.height) == small_face.size


def test_guarding_keeps_good_exif_orientation(small_face, tmp_path):
    """Guarding must not over-quarantine: a PNG's eXIf orientation is still read and applied."""
    png = _encode(small_face, "PNG", exif=True)
    rec = assert_accounted_for(_write(tmp_path / "exif.png", png))
    assert (rec.status, rec.orientation, rec.width, rec.height) == ("ok", 6, small_face.height, small_face.width)


# --- Every listed path is accounted for: links, loops, FIFOs, folders named like images (issue 9) -----------------

def make_odd_files(src, samples) -> dict[str, str]:
    """Entries named like images that are not image files. Returns {name: expected reason}."""
    shutil.copy(samples / "hq" / "obama.jpg", src / "good.jpg")
    expected = {"good.jpg": ""}
    (src / "dangling.jpg").symlink_to(src / "gone.jpg")
    expected["dangling.jpg"] = "broken_link"
    (src / "loop_a.jpg").symlink_to(src / "loop_b.jpg")
    (src / "loop_b.jpg").symlink_to(src / "loop_a.jpg")
    expected["loop_a.jpg"] = expected["loop_b.jpg"] = "broken_link"
    (src / "folder.jpg").mkdir()  # tests run as root: a folder is the real file that cannot be read as an image
    expected["folder.jpg"] = "not_a_file"
    os.mkfifo(src / "pipe.jpg")  # opening it for reading would block forever without O_NONBLOCK
    expected["pipe.jpg"] = "not_a_file"
    (src / "null.png").symlink_to("/dev/null")  # a character device behind a link
    expected["null.png"] = "not_a_file"
    (src / "same_as_good.png").symlink_to(src / "good.jpg")  # followed: the same photo under another name
    expected["same_as_good.png"] = "duplicate"
    return expected


def _in_thread(fn, timeout=30.0):
    """Run ``fn`` where a blocking open cannot hang the test run: fail instead."""
    result = []
    worker = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "ingest blocked (a FIFO opened for reading?)"
    return result[0]


def test_odd_files_are_listed_and_quarantined_not_dropped(tmp_path, samples):
    src = tmp_path / "src"
    src.mkdir()
    expected = make_odd_files(src, samples)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(src / "socket.jpg"))
        expected["socket.jpg"] = "not_a_file"
    except OSError:  # path too long for AF_UNIX on some machines: the other kinds still run
        pass
    paths = list_sources([str(src)], [".jpg", ".png"])
    assert {os.path.basename(p) for p in paths} == set(expected)
    records = _in_thread(lambda: ingest_chunk(paths, **LIMITS))
    by_name = {os.path.basename(r.source_path): r for r in records}
    for name, reason in expected.items():
        rec = by_name[name]
        assert (rec.reason, rec.status) == (reason, "quarantined" if reason else "ok"), (name, rec)
        assert rec.detail if reason else not rec.detail
        if reason not in ("", "duplicate"):
            _in_thread(lambda name=name: assert_accounted_for(src / name, LIMITS))  # load_rgb: the same verdict
    assert "gone.jpg" in by_name["dangling.jpg"].detail and "loop" in by_name["loop_a.jpg"].detail
    assert "FIFO" in by_name["pipe.jpg"].detail and "directory" in by_name["folder.jpg"].detail
    sock.close()
    # A glob and a single-file spec account for them the same way.
    assert {os.path.basename(p) for p in list_sources([str(src / "*.jpg")], [".jpg"])} == {
        n for n in expected if n.endswith(".jpg")}
    assert list_sources([str(src / "dangling.jpg")], [".jpg"]) == [str(src / "dangling.jpg")]


def test_a_folder_the_scan_cannot_open_is_accounted_for(tmp_path, samples, monkeypatch):
    """As root no permission bit stops a read, so the refusal is simulated where the OS would report it."""
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    shutil.copy(samples / "hq" / "obama.jpg", src / "locked" / "inside.jpg")
    shutil.copy(samples / "hq" / "obama.jpg", src / "outside.jpg")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    paths = list_sources([str(src)], [".jpg"])
    assert [os.path.basename(p) for p in paths] == ["locked", "outside.jpg"]
    rec = ingest_file(paths[0], **LIMITS)
    assert (rec.status, rec.reason) == ("quarantined", "unreadable") and "could not list" in rec.detail


# --- Content keys are unique over the whole build, whatever order partitions run in (issue 9) ---------------------

def _two_chunks(src, samples) -> dict[str, list[str]]:
    """chunk-00000: a, b, c; chunk-00001: d (= a, under another name), e, f (= e, in the same chunk)."""
    hq = samples / "hq"
    for name, photo in [("a.jpg", "obama.jpg"), ("b.png", "ffhq_00000.png"), ("c.jpg", "rose_leslie2.jpg"),
                        ("d_copy_of_a.jpg", "obama.jpg"), ("e.jpg", "alex_lacamoire1.jpg"),
                        ("f_copy_of_e.jpg", "alex_lacamoire1.jpg")]:
        shutil.copy(hq / photo, src / name)
    return chunk_sources(list_sources([str(src)], [".jpg", ".png"]), 3)  # two chunks, as the sample partitions


def _verdicts(records) -> dict[str, tuple[str, str]]:
    return {os.path.basename(r.source_path): (r.reason, r.detail) for r in records}


def test_duplicates_across_chunks_keep_the_first_copy_in_source_order(tmp_path, samples, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    chunks = _two_chunks(src, samples)
    assert [len(c) for c in chunks.values()] == [3, 3]
    index = ContentIndex(chunks, manifest=lambda chunk: None, cache=HashCache(tmp_path / "cache"))
    # Run the chunks last to first: each still sees only (and all of) the chunks before it.
    runs = {c: ingest_chunk(chunks[c], **LIMITS, earlier=index.earlier(c)) for c in reversed(list(chunks))}
    got = {name: v for records in runs.values() for name, v in _verdicts(records).items()}
    assert got["a.jpg"] == got["b.png"] == got["c.jpg"] == got["e.jpg"] == ("", "")
    assert got["d_copy_of_a.jpg"] == ("duplicate", f"same content as {src}/a.jpg (the first copy in source order)")
    assert got["f_copy_of_e.jpg"][0] == "duplicate" and str(src / "e.jpg") in got["f_copy_of_e.jpg"][1]
    published = [r.key for records in runs.values() for r in records if r.status == "ok"]
    assert len(published) == len(set(published)) == 4
    forward = ContentIndex(chunks, manifest=lambda chunk: None, cache=HashCache(None))
    assert {c: _verdicts(ingest_chunk(chunks[c], **LIMITS, earlier=forward.earlier(c))) for c in chunks} == {
        c: _verdicts(r) for c, r in runs.items()}  # the same verdicts in source order

    # The hash cache answers for unchanged files (no read at all), and re-hashes a file that changed.
    monkeypatch.setattr(ingest, "read_source", lambda path: pytest.fail(f"{path} read despite the cache"))
    cached = ContentIndex(chunks, manifest=lambda chunk: None, cache=HashCache(tmp_path / "cache"))
    assert cached.earlier("chunk-00001") == index.earlier("chunk-00001")
    monkeypatch.undo()
    before = keys_digest(index.earlier("chunk-00001"))
    shutil.copy(samples / "hq" / "kit_with_rose.jpg", src / "a.jpg")
    changed = ContentIndex(chunks, manifest=lambda c: None, cache=HashCache(tmp_path / "cache")).earlier("chunk-00001")
    assert sample_key(ingest.hashlib.sha256((src / "a.jpg").read_bytes()).hexdigest()) in changed
    assert keys_digest(changed) != before  # so the partition's fingerprint moves


def test_content_index_prefers_a_matching_manifest(tmp_path, samples, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    chunks = _two_chunks(src, samples)
    rows = [{"key": r.key, "source_id": r.source_id} for r in ingest_chunk(chunks["chunk-00000"], **LIMITS)]
    monkeypatch.setattr(ingest, "read_source", lambda path: pytest.fail(f"{path} hashed despite the manifest"))
    index = ContentIndex(chunks, manifest=lambda c: rows if c == "chunk-00000" else None, cache=HashCache(None))
    assert index.earlier("chunk-00001") == {r["key"]: r["source_id"] for r in rows}
    monkeypatch.undo()
    stale = ContentIndex(chunks, manifest=lambda c: rows[:1], cache=HashCache(None))  # lists other paths: hashed
    assert stale.earlier("chunk-00001") == index.earlier("chunk-00001")


def _materialize(partition: str, settings: dict):
    import dagster as dg

    from attrface_pipeline.assets.ingest import raw_images
    from attrface_pipeline.assets.resources import AttrFaceConfig

    return dg.materialize([raw_images], partition_key=partition, instance=dg.DagsterInstance.ephemeral(),
                          resources={"attrface": AttrFaceConfig(settings=settings)})


def test_raw_images_duplicates_across_chunks_whatever_the_partition_order(tmp_path, samples):
    src = tmp_path / "src"
    src.mkdir()
    _two_chunks(src, samples)

    def build(out, order):
        settings = {"source": {"paths": [str(src)], "chunk_size": 3}, "paths": {"data_root": str(out)}}
        for partition in order:
            assert _materialize(partition, settings).success
        return {p: pq.read_table(out / "raw_images" / p / "manifest.parquet").to_pylist() for p in order}

    backwards = build(tmp_path / "out1", ["chunk-00001", "chunk-00000"])  # nothing upstream yet: files hashed
    forwards = build(tmp_path / "out2", ["chunk-00000", "chunk-00001"])  # the upstream manifest is read
    assert backwards == forwards
    rows = {os.path.basename(r["source_path"]): r for m in forwards.values() for r in m}
    assert rows["d_copy_of_a.jpg"]["reason"] == "duplicate"
    assert "same content as src/a.jpg" in rows["d_copy_of_a.jpg"]["detail"]  # the source id of the first copy
    assert rows["d_copy_of_a.jpg"]["source_id"] == "src/d_copy_of_a.jpg"
    assert sorted(r["reason"] for r in rows.values()) == ["", "", "", "", "duplicate", "duplicate"]
    assert (tmp_path / "out1" / "raw_images" / "_hash_cache" / "chunk-00000.json").exists()

    # An upstream change re-runs the chunk: chunk 0 rebuilt with other content for a.jpg, then d is no copy.
    shutil.rmtree(tmp_path / "out2" / "raw_images" / "chunk-00000")
    shutil.copy(samples / "hq" / "kit_with_rose.jpg", src / "a.jpg")
    rebuilt = build(tmp_path / "out2", ["chunk-00000", "chunk-00001"])
    assert [r["reason"] for r in rebuilt["chunk-00001"]] == ["", "", "duplicate"]


# --- max_pixels is ours, above or below Pillow's own 89.5 MP bomb limit (issue 9) ---------------------------------

def test_max_pixels_above_pillows_limit_is_honoured_on_a_header(tmp_path):
    """A header claiming 10000x9500 = 95 MP (above Pillow's 89.5 MP warning limit): the verdict is ours."""
    path = _write(tmp_path / "claims_95mp.png", _png_header_only(10000, 9500))
    default_limit = Image.MAX_IMAGE_PIXELS
    roomy = ingest_file(str(path), min_side=64, max_pixels=200_000_000)
    assert roomy.status == "quarantined" and roomy.reason != "decompression_bomb", roomy  # no pixel data behind it
    tight = ingest_file(str(path), min_side=64, max_pixels=80_000_000)
    assert tight.reason == "decompression_bomb" and tight.detail == "10000x9500 exceeds max_pixels=80000000"
    huge = _write(tmp_path / "claims_400mp.png", _png_header_only(20000, 20000))  # above twice Pillow's limit
    assert ingest_file(str(huge), min_side=64, max_pixels=500_000_000).reason != "decompression_bomb"
    assert ingest_file(str(huge), min_side=64, max_pixels=80_000_000).detail.endswith("max_pixels=80000000")
    assert Image.MAX_IMAGE_PIXELS == default_limit  # Pillow's global is put back for everyone else
    # Threads decoding at once do not restore it under each other, and each gets its own verdict.
    from concurrent.futures import ThreadPoolExecutor

    limits = [200_000_000, 80_000_000] * 8
    with ThreadPoolExecutor(4) as pool:
        reasons = list(pool.map(lambda m: ingest_file(str(path), min_side=64, max_pixels=m).reason, limits))
    assert reasons == [roomy.reason, "decompression_bomb"] * 8 and Image.MAX_IMAGE_PIXELS == default_limit


def test_a_real_95_megapixel_photo_passes_when_max_pixels_allows_it(tmp_path):
    """A real 10000x9500 PNG (one grey level, ~0.4 MB on disk, ~1 GB while decoded, ~2 s)."""
    path = tmp_path / "95mp.png"
    Image.new("L", (10000, 9500), 128).save(path, compress_level=1)
    rec = ingest_file(str(path), min_side=64, max_pixels=200_000_000)
    assert (rec.status, rec.width, rec.height) == ("ok", 10000, 9500), rec
    rec = ingest_file(str(path), min_side=64, max_pixels=80_000_000)
    assert (rec.reason, rec.detail) == ("decompression_bomb", "10000x9500 exceeds max_pixels=80000000")
