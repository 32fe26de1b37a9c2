import io
import shutil
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from attrface_pipeline.stages.ingest import (chunk_sources, decode_image, ingest_chunk, ingest_file, list_sources,
                                             sample_key)

LIMITS = dict(min_side=64, max_pixels=80_000_000)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression-bomb shape) with no real pixel data."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


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
