"""Publishing: WebDataset shards from real face crops, read back by webdataset and by HF datasets."""

import hashlib
import json

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from attrface_pipeline.images import encode_image, read_rgb
from attrface_pipeline.stages import shards
from attrface_pipeline.stages.review import ACCEPT, REJECT, ReviewStore, review_filter
from attrface_pipeline.stages.shards import (DuplicateSampleKeyError, Sample, check_unique_keys, read_back, split_of,
                                            verify_published_keys, write_split)

MEMBERS = {"src.jpg", "tar.jpg", "json", "src.txt", "tar.txt"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, samples):
    """Seven pairs made of real photos: source = the face at 128 px, 'edit' = a mirrored copy (a stand-in)."""
    tmp = tmp_path_factory.mktemp("pairs")
    photos = [p for p in sorted((samples / "hq").iterdir()) if p.suffix in {".jpg", ".png"}]
    out = []
    for i, photo in enumerate(photos[:7]):
        rgb = cv2.resize(read_rgb(photo), (128, 128), interpolation=cv2.INTER_AREA)
        src, tar = tmp / f"src{i}.jpg", tmp / f"tar{i}.jpg"
        src.write_bytes(encode_image(rgb, "jpg"))
        tar.write_bytes(encode_image(rgb[:, ::-1].copy(), "jpg"))
        key = f"face{i:02d}_00_Smiling_add"
        meta = {"key": key, "face_key": f"face{i:02d}_00", "image_key": f"img{i:02d}",
                "edit": {"attribute": "Smiling", "direction": "add"}, "qc": {"identity_similarity": 0.7}}
        out.append(Sample(key, "train", src, tar, meta, f"photo {i}.", f"photo {i}, smiling."))
    return out


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_shards_read_back_with_webdataset_and_hf_datasets(pairs, tmp_path):
    import webdataset as wds

    stats = write_split(pairs, tmp_path / "train", "train", shard_size=3, log=lambda m: None)
    assert stats["samples"] == 7 and stats["shards"] == [f"attrface-train-00000{i}.tar" for i in range(3)]
    assert json.loads((tmp_path / "train" / "sizes.json").read_text()) == dict(zip(stats["shards"], [3, 3, 1]))
    urls = [str(tmp_path / "train" / s) for s in stats["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in got] == sorted(p.key for p in pairs)
    for s in got:
        assert MEMBERS <= set(s) and json.loads(s["json"])["edit"]["attribute"] == "Smiling"
    assert read_rgb_bytes(got[0]["src.jpg"]).shape == (128, 128, 3)

    from datasets import load_dataset

    hf = load_dataset("webdataset", data_files={"train": urls}, split="train",
                      cache_dir=str(tmp_path / "hf_cache"))
    assert len(hf) == 7 and {"src.jpg", "tar.jpg", "json", "src.txt", "tar.txt"} <= set(hf.column_names)
    assert hf[0]["json"]["edit"]["direction"] == "add" and hf[0]["src.jpg"].size == (128, 128)
    index = pq.read_table(tmp_path / "train" / "attrface-train-000000.parquet")
    assert index.column("key").to_pylist() == [s["__key__"] for s in got[:3]]


def read_rgb_bytes(data: bytes):
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def test_republishing_is_byte_identical_and_drops_stale_shards(pairs, tmp_path):
    write_split(pairs, tmp_path / "a", "train", shard_size=2, log=lambda m: None)
    first = _digest(tmp_path / "a")
    write_split(list(reversed(pairs)), tmp_path / "a", "train", shard_size=2, log=lambda m: None)  # order-free
    assert _digest(tmp_path / "a") == first
    write_split(pairs, tmp_path / "b", "train", shard_size=2, log=lambda m: None, workers=2)  # in processes
    assert _digest(tmp_path / "b") == first
    write_split(pairs[:3], tmp_path / "a", "train", shard_size=2, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == ["attrface-train-000000.tar",
                                                                      "attrface-train-000001.tar"]


def test_a_crash_mid_shard_leaves_no_visible_shard(pairs, tmp_path, monkeypatch):
    real = shards.sample_members
    calls = []

    def dying(sample, *a, **k):
        calls.append(sample.key)
        if len(calls) == 5:
            raise RuntimeError("disk gone")
        return real(sample, *a, **k)

    monkeypatch.setattr(shards, "sample_members", dying)
    with pytest.raises(RuntimeError):
        write_split(pairs, tmp_path / "t", "train", shard_size=3, log=lambda m: None)
    names = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert names == ["attrface-train-000000.parquet", "attrface-train-000000.tar"]  # shard 1 never appeared
    assert len(read_back(tmp_path / "t" / "attrface-train-000000.tar")) == 3
    assert not (tmp_path / "t" / "sizes.json").exists()  # the split is not marked complete


def test_split_is_stable_and_by_group():
    keys = [f"img{i:04d}" for i in range(2000)]
    test = [k for k in keys if split_of(k, 0.1) == "test"]
    assert 150 < len(test) < 250 and test == [k for k in keys if split_of(k, 0.1) == "test"]
    assert split_of("img0001", 0.1, "other-salt") in ("train", "test")
    with pytest.raises(ValueError, match="dot"):
        Sample("a.b", "train", None, None, {}, "", "")


def test_review_store_and_publishing_rule(tmp_path):
    store = ReviewStore(tmp_path / "review.sqlite")
    store.decide("p1", ACCEPT, "ana")
    store.decide("p2", REJECT, "ana")
    store.decide("p2", ACCEPT, "ben")  # latest decision wins; history keeps both
    store.decide("p3", REJECT, "ben")
    again = ReviewStore(tmp_path / "review.sqlite").decisions()  # re-opened: persisted
    assert {k: v["decision"] for k, v in again.items()} == {"p1": "accept", "p2": "accept", "p3": "reject"}
    assert again["p2"]["reviewer"] == "ben"
    keys = ["p1", "p2", "p3", "p4"]
    assert [k for k in keys if review_filter("required", again)(k)] == ["p1", "p2"]
    assert [k for k in keys if review_filter("optional", again)(k)] == ["p1", "p2", "p4"]
    assert [k for k in keys if review_filter("off", again)(k)] == keys
    with pytest.raises(ValueError):
        store.decide("p1", "maybe", "ana")
    with pytest.raises(ValueError):
        store.decide("p1", ACCEPT, " ")


def test_a_duplicate_key_is_refused_before_anything_is_written(pairs, tmp_path):
    """The same source photo published twice (e.g. from two chunks) gives two samples with one key."""
    twice = [*pairs, pairs[2]]
    with pytest.raises(DuplicateSampleKeyError, match=pairs[2].key) as caught:
        write_split(twice, tmp_path / "train", "train", shard_size=3, log=lambda m: None)
    assert str(pairs[2].source_path) in str(caught.value) and "raw_images" in str(caught.value)  # where, and the fix
    assert not (tmp_path / "train").exists()  # no shard, no sizes.json
    other_split = Sample(pairs[4].key, "test", pairs[4].source_path, pairs[4].edit_path, pairs[4].meta, "a", "b")
    with pytest.raises(DuplicateSampleKeyError, match=f"{pairs[4].key} in train .*, test"):
        check_unique_keys([*pairs, other_split])  # across splits too
    check_unique_keys(pairs)


def test_published_keys_are_verified_over_all_shards_of_all_splits(pairs, tmp_path):
    out = tmp_path / "pub"
    write_split(pairs[:4], out / "train", "train", shard_size=2, log=lambda m: None)
    assert verify_published_keys(out) == 4
    # Each split alone is clean, yet pairs[3] is in both: only a check over every split sees it.
    write_split(pairs[3:], out / "test", "test", shard_size=2, log=lambda m: None)
    with pytest.raises(DuplicateSampleKeyError, match=f"1 sample key.*{pairs[3].key} in train/attrface-train-000001"
                                                      ".tar, test/attrface-test-000000.tar"):
        verify_published_keys(out)


def test_images_are_copied_into_the_tars_as_encoded(pairs, tmp_path):
    """Encode once: the src/tar members are the bytes ``edits`` wrote, never decoded and re-encoded here."""
    write_split(pairs, tmp_path / "train", "train", shard_size=4, log=lambda m: None)
    got = {s["__key__"]: s for shard in sorted((tmp_path / "train").glob("*.tar")) for s in read_back(shard)}
    for p in pairs:
        assert got[p.key]["src.jpg"] == p.source_path.read_bytes()
        assert got[p.key]["tar.jpg"] == p.edit_path.read_bytes()
    with pytest.raises(ValueError, match="publish.image_format='png'.*Re-materialize edits"):
        write_split(pairs, tmp_path / "png", "train", shard_size=4, image_format="png", log=lambda m: None)


def test_tars_are_the_bytes_webdataset_writes(pairs, tmp_path):
    """Our direct tar writer against webdataset's TarWriter (tarfile) on the same samples: identical bytes, also
    for a name tarfile has to give a PAX header (non-ASCII, long)."""
    from webdataset import TarWriter

    samples = [(p.key, shards.sample_members(p)) for p in pairs[:3]]
    samples.append(("é" * 60 + "_long_key", {"json": b"{}", "src.txt": b"x" * 513}))
    ours = tmp_path / "ours.tar"
    shards._write_tar(ours, samples)
    with (tmp_path / "wds.tar").open("wb") as f:
        writer = TarWriter(f, user="attrface", group="attrface", mode=0o644, mtime=0, encoder=False)
        for key, members in samples:
            writer.write({"__key__": key, **members})
        writer.close()
    assert ours.read_bytes() == (tmp_path / "wds.tar").read_bytes()
