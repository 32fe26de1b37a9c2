"""Training loaders: tiny real shards (sample faces at 64 px) read in single, dual and folder mode."""

import json

import cv2
import numpy as np
import pytest
import torch

from attrface_pipeline.attributes import ADD, CELEBA_ATTRIBUTES
from training.data import (ImagesNotFoundError, LoaderConfig, ShardFormatError, ShardsNotFoundError, collate,
                           make_dataset, make_loader, resolve_shards)

from tests.training.conftest import PER_SHARD, SHARDS, SIZE


@pytest.fixture(scope="session")
def metas(shard_dir):
    import webdataset as wds

    urls = resolve_shards(str(shard_dir), split="train")
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def _cfg(shard_dir, **kw):
    base = {"shards": shard_dir, "preset": "train", "batch_size": 4, "num_workers": 0, "seed": 7}
    return LoaderConfig(**{**base, **kw})


def _by_key(loader, field):
    return {k: v for batch in loader for k, v in zip(batch["key"], batch[field])}


def _decoded(data):
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _as_uint8(t):
    return ((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def test_single_mode_keys_shapes_and_sides(shard_dir, metas):
    batches = list(make_loader(_cfg(shard_dir, resolution=32, lq_from="tar")))
    assert sum(len(b["key"]) for b in batches) == SHARDS * PER_SHARD
    b = batches[0]
    assert set(b) == {"key", "gt", "lq", "prompt", "lq_from", "degradation", "bad_samples"}
    assert b["gt"].shape == b["lq"].shape == (4, 3, 32, 32) and b["gt"].dtype == torch.float32
    assert -1 <= b["lq"].min() and b["lq"].max() <= 1 and b["gt"].min() < 0 < b["gt"].max()
    assert b["lq_from"] == ["tar"] * 4
    assert b["prompt"] == [metas[k]["tar.txt"].decode() for k in b["key"]]
    assert b["degradation"][0]["preset"] == "train" and json.dumps(b["degradation"])  # plain JSON per sample
    native = next(iter(make_loader(_cfg(shard_dir, lq_from="src", shuffle_buffer=0))))  # stored size, stored order
    assert native["gt"].shape == (4, 3, SIZE, SIZE)
    assert np.array_equal(_as_uint8(native["gt"][0]), _decoded(metas[native["key"][0]]["src.jpg"]))
    sides = _by_key(make_loader(_cfg(shard_dir, lq_from="random")), "lq_from")
    assert set(sides.values()) == {"src", "tar"}
    assert sides == _by_key(make_loader(_cfg(shard_dir, lq_from="random", num_workers=2)), "lq_from")


def test_dual_mode_one_lq_for_both_targets(shard_dir, metas):
    loader = make_loader(_cfg(shard_dir, mode="dual", lq_from="src", resolution=48))
    b = next(iter(loader))
    assert {"gt_src", "gt_tar", "lq", "prompt_src", "prompt_tar", "attr_index", "attr_probs_src", "attr_probs_tar",
            "attribute", "direction", "key", "degradation", "lq_from", "bad_samples"} == set(b)
    assert b["gt_src"].shape == b["gt_tar"].shape == b["lq"].shape == (4, 3, 48, 48)
    assert b["attr_index"].dtype == torch.int64 and b["attr_probs_src"].shape == b["attr_probs_tar"].shape == (4, 40)
    for i, key in enumerate(b["key"]):
        meta = json.loads(metas[key]["json"])
        index = CELEBA_ATTRIBUTES.index(meta["edit"]["attribute"])
        assert b["attr_index"][i] == index and b["direction"][i] == meta["edit"]["direction"]
        expected = torch.tensor([meta["attributes"]["probabilities"][a] for a in CELEBA_ATTRIBUTES])
        assert torch.equal(b["attr_probs_src"][i], expected)
        changed = (b["attr_probs_tar"][i] != b["attr_probs_src"][i]).nonzero().flatten().tolist()
        assert changed in ([index], [])  # only the flipped attribute, set to its intended state
        assert b["attr_probs_tar"][i, index] == (1.0 if meta["edit"]["direction"] == ADD else 0.0)
        assert b["prompt_src"][i] == metas[key]["src.txt"].decode()
        assert b["prompt_tar"][i] == metas[key]["tar.txt"].decode()
    # The one LQ is the source GT's: identical to single mode's LQ (same seed, epoch, key) for both targets.
    single = make_loader(_cfg(shard_dir, mode="single", lq_from="src", resolution=48))
    single_lq, single_gt = _by_key(single, "lq"), _by_key(single, "gt")
    for i, key in enumerate(b["key"]):
        assert torch.equal(b["lq"][i], single_lq[key]) and torch.equal(b["gt_src"][i], single_gt[key])
    tar_lq = _by_key(make_loader(_cfg(shard_dir, mode="dual", lq_from="tar", resolution=48)), "lq")
    assert not torch.equal(tar_lq[b["key"][0]], b["lq"][0])


def test_same_seed_same_batches_other_epoch_other_lq(shard_dir):
    cfg = _cfg(shard_dir, num_workers=2, batch_size=3)
    first, again = list(make_loader(cfg)), list(make_loader(cfg))
    assert [b["key"] for b in first] == [b["key"] for b in again]
    assert all(torch.equal(x["lq"], y["lq"]) for x, y in zip(first, again))
    assert [x["degradation"] for x in first] == [y["degradation"] for y in again]
    lq0 = {k: v for b in first for k, v in zip(b["key"], b["lq"])}
    lq1 = _by_key(make_loader(cfg, epoch=1), "lq")
    assert lq0.keys() == lq1.keys() and all(not torch.equal(lq0[k], lq1[k]) for k in lq0)
    # The LQ depends on (seed, epoch, key) only, not on the worker that made it or the sample order.
    serial = _by_key(make_loader(_cfg(shard_dir, num_workers=0, shuffle_buffer=0)), "lq")
    assert all(torch.equal(lq0[k], serial[k]) for k in lq0)


def test_every_sample_once_per_epoch_across_workers_and_nodes(shard_dir, metas, monkeypatch):
    cfg = _cfg(shard_dir, num_workers=2, batch_size=2)
    seen = []
    for rank in range(3):  # webdataset's split_by_node reads RANK/WORLD_SIZE (inherited by the forked workers)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        node = [k for b in make_loader(cfg) for k in b["key"]]
        assert len(node) == 2 * PER_SHARD  # 6 shards / 3 nodes / 2 workers = one shard per worker
        seen += node
    assert sorted(seen) == sorted(metas)


def test_resampled_is_infinite_and_cut_to_the_epoch(shard_dir, metas):
    cfg = _cfg(shard_dir, num_workers=2, batch_size=2, resampled=True, epoch_samples=40)
    keys = [k for b in make_loader(cfg) for k in b["key"]]
    assert len(keys) == 40 and set(keys) <= set(metas) and len(set(keys)) < len(keys)  # with replacement
    assert keys == [k for b in make_loader(cfg) for k in b["key"]]  # deterministic draws
    with pytest.raises(ValueError, match="epoch_samples"):
        LoaderConfig(shards=str(shard_dir), resampled=True)


def test_missing_or_empty_folder_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(ShardsNotFoundError, match=r"nowhere.*build_dataset.*make demo"):
        make_dataset(_cfg(tmp_path / "nowhere"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ShardsNotFoundError, match=r"empty/train.*build_dataset"):
        make_dataset(_cfg(tmp_path / "empty"))
    with pytest.raises(ShardsNotFoundError, match="attrface-train-000001.tar"):
        make_dataset(_cfg(str(tmp_path / "attrface-train-{000000..000001}.tar")))
    with pytest.raises(ImagesNotFoundError, match="nothing_here"):
        make_dataset(LoaderConfig(mode="folder", images=tmp_path / "nothing_here"))


def test_missing_member_names_shard_key_and_member(shard_dir, metas, tmp_path):
    import webdataset as wds

    broken = tmp_path / "attrface-train-000000.tar"
    with wds.TarWriter(str(broken), encoder=False) as writer:
        for key in sorted(metas)[:2]:
            writer.write({k: v for k, v in metas[key].items() if k in {"__key__", "src.jpg", "src.txt", "json"}})
        writer.write({"__key__": "zzz_garbled", "src.jpg": b"not a jpeg", "src.txt": b"a face."})
    first = sorted(metas)[0]
    assert next(iter(make_loader(_cfg(broken, lq_from="src", batch_size=1, shuffle_buffer=0))))["key"] == [first]
    strict = {"shuffle_buffer": 0, "bad_samples": "raise"}
    with pytest.raises(ShardFormatError, match="sample 'zzz_garbled': member src.jpg is not a decodable image"):
        list(make_loader(_cfg(broken, lq_from="src", **strict)))
    with pytest.raises(ShardFormatError, match=rf"attrface-train-000000.tar, sample '{first}' lacks member tar.jpg"):
        next(iter(make_loader(_cfg(broken, mode="dual", **strict))))
    with pytest.raises(ShardFormatError, match=r"lacks member tar.jpg .*, tar.txt, which mode 'single'"):  # in workers
        next(iter(make_loader(_cfg(broken, lq_from="random", num_workers=1, **strict))))
    # skip (the default): the garbled sample is dropped and its record rides with the batch
    batches = list(make_loader(_cfg(broken, lq_from="src", shuffle_buffer=0, batch_size=8)))
    assert [len(b["key"]) for b in batches] == [2]
    (record,) = batches[0]["bad_samples"]
    assert record["shard"] == broken.name and record["key"] == "zzz_garbled"
    assert "not a decodable image" in record["reason"]


def test_folder_loader_on_hq_images(samples):
    cfg = LoaderConfig(mode="folder", images=samples / "hq", prompt="a photo of a face.", resolution=64, batch_size=3,
                       num_workers=2, seed=3)
    batches = list(make_loader(cfg))
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 7 == len(set(keys)) and "ffhq_00000" in keys
    b = batches[0]
    assert set(b) == {"key", "gt", "lq", "prompt", "lq_from", "degradation", "bad_samples"}
    assert b["gt"].shape == b["lq"].shape == (3, 3, 64, 64) and b["prompt"] == ["a photo of a face."] * 3
    again = _by_key(make_loader(cfg.model_copy(update={"num_workers": 0})), "lq")
    assert all(torch.equal(v, again[k]) for batch in batches for k, v in zip(batch["key"], batch["lq"]))


def test_config_is_strict_and_collate_refuses_mixed_sizes():
    with pytest.raises(ValueError, match="extra"):
        LoaderConfig(shards="x", batch=4)
    with pytest.raises(ValueError, match="images"):
        LoaderConfig(mode="folder")
    with pytest.raises(ValueError, match="resolution"):
        collate([{"gt": torch.zeros(3, 8, 8)}, {"gt": torch.zeros(3, 16, 16)}])


@pytest.mark.timeout(60)
def test_workers_start_after_the_parent_used_opencv_threads(shard_dir):
    """Forked workers must not touch the OpenCV thread pool they inherit (cv2.setNumThreads there used to hang)."""
    big = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    for _ in range(5):
        cv2.resize(big, (512, 512), interpolation=cv2.INTER_AREA)
    for _ in range(2):  # the hang needed an earlier forked DataLoader too
        assert sum(len(b["key"]) for b in make_loader(_cfg(shard_dir, num_workers=2))) == SHARDS * PER_SHARD


def test_presets_from_yaml_and_unknown_names_fail_before_workers(shard_dir, tmp_path):
    (tmp_path / "presets.yaml").write_text("mild:\n  base: train\n  stage2: {jpeg_quality: [90, 95]}\n")
    b = next(iter(make_loader(_cfg(shard_dir, preset="mild", presets_file=tmp_path / "presets.yaml"))))
    assert b["degradation"][0]["preset"] == "mild" and b["lq"].shape == (4, 3, SIZE, SIZE)
    with pytest.raises(KeyError, match="no_such_preset"):
        make_loader(_cfg(shard_dir, preset="no_such_preset", num_workers=2))


def test_data_fingerprint_sees_a_relabelled_shard_of_the_same_size(shard_dir, tmp_path):
    """A shard replaced by other bytes of the same size (and the same parquet index) is other data: its content
    hash is in the fingerprint, so resuming on it is refused."""
    import shutil

    from training.data import data_fingerprint

    root = tmp_path / "attrface_shards"
    shutil.copytree(shard_dir, root)
    cfg = _cfg(str(root))
    before = data_fingerprint(cfg)
    assert set(before) == {"split", "shards"} and len(before["shards"]) == SHARDS
    assert all({"bytes", "sha256", "index_sha256"} <= set(e) for e in before["shards"].values())
    assert data_fingerprint(cfg) == before  # stable (and memoized)

    shards = sorted((root / "train").glob("*.tar"))
    a, b = shards[0], shards[1]
    same_size = a.stat().st_size == b.stat().st_size
    if same_size:  # two shards' labels swapped: each name now holds the other's samples
        data_a, data_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(data_b)
        b.write_bytes(data_a)
    else:
        data = bytearray(a.read_bytes())
        data[len(data) // 2] ^= 0x01
        a.write_bytes(bytes(data))
    after = data_fingerprint(cfg)
    assert after["shards"][a.name]["bytes"] == before["shards"][a.name]["bytes"]
    assert after["shards"][a.name]["index_sha256"] == before["shards"][a.name]["index_sha256"]
    assert after["shards"][a.name]["sha256"] != before["shards"][a.name]["sha256"]
    assert after != before


def test_data_fingerprint_sees_one_flipped_byte(shard_dir, tmp_path):
    import shutil

    from training.data import data_fingerprint

    root = tmp_path / "attrface_shards"
    shutil.copytree(shard_dir, root)
    cfg = _cfg(str(root))
    before = data_fingerprint(cfg)
    shard = sorted((root / "train").glob("*.tar"))[-1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    after = data_fingerprint(cfg)
    changed = [name for name in before["shards"] if before["shards"][name] != after["shards"][name]]
    assert changed == [shard.name]
