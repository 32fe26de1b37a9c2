"""One bad sample or shard never stops a run unasked: the loaders' ``bad_samples`` policy, the engine's counts,
and checkpoints that refuse to resume on other data (real shards from the sample photos, real training runs)."""

import json
import shutil

import pytest
import torch

from training.data import BadSampleError, LoaderConfig, data_fingerprint, make_loader
from training.engine import ResumeMismatchError, TooManyBadSamplesError, Trainer, TrainSettings, read_losses


def _copy(shard_dir, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(shard_dir, dst)
    return dst / "train"


def _cfg(shards, **kw):
    return LoaderConfig(**{"shards": str(shards), "mode": "single", "resolution": 32, "batch_size": 4,
                           "num_workers": 0, "shuffle_buffer": 0, **kw})


def _keys_and_records(cfg):
    keys, records = [], []
    for batch in make_loader(cfg):
        keys += batch.get("key", [])
        records += batch["bad_samples"]
    return keys, records


def test_truncated_and_foreign_shards_are_skipped_and_recorded(shard_dir, tmp_path):
    train = _copy(shard_dir, tmp_path)
    shards = sorted(train.glob("*.tar"))
    good_keys, _ = _keys_and_records(_cfg(train))
    assert len(good_keys) == 18
    cut = shards[1]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # cut mid-way
    shards[4].write_bytes(b"this is not a tar archive at all" * 40)  # a foreign file named .tar
    keys, records = _keys_and_records(_cfg(train))
    assert 12 <= len(keys) < 18  # every other shard's samples, and the cut shard's first ones
    assert {r["shard"] for r in records} == {cut.name, shards[4].name}
    assert all(r["reason"] for r in records)
    with pytest.raises(BadSampleError, match=rf"shard {cut.name}|shard {shards[4].name}"):
        list(make_loader(_cfg(train, bad_samples="raise")))
    # across DataLoader workers the records still arrive
    keys2, records2 = _keys_and_records(_cfg(train, num_workers=2))
    assert sorted(keys2) == sorted(keys) and {r["shard"] for r in records2} == {cut.name, shards[4].name}


def test_invalid_json_names_shard_and_key(shard_dir, tmp_path):
    import webdataset as wds

    train = _copy(shard_dir, tmp_path)
    shard = sorted(train.glob("*.tar"))[0]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    bad_key = samples[1]["__key__"]
    with wds.TarWriter(str(shard), encoder=False) as writer:
        for s in samples:
            s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            if s["__key__"] == bad_key:
                s["json"] = b"{not json"
            writer.write(s)
    keys, records = _keys_and_records(_cfg(train, mode="dual"))
    assert bad_key not in keys and len(keys) == 17
    assert records == [{"shard": shard.name, "key": bad_key, "reason": records[0]["reason"]}]
    assert "not valid JSON" in records[0]["reason"]
    with pytest.raises(BadSampleError, match=rf"{shard.name}, sample '{bad_key}': its json member is not valid JSON"):
        list(make_loader(_cfg(train, mode="dual", bad_samples="raise")))


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, gt):
        return (gt.mean(dim=(2, 3)) - self.w).square().mean()


def _trainer(out, cfg, **settings):
    data = {"data_fingerprint": data_fingerprint(cfg)}
    return Trainer(TrainSettings(output_dir=str(out), optimizer="adamw", lr=0.1, checkpoint_every=2,
                                 **{"max_steps": 4, **settings}),
                   model=Head(), loader_factory=lambda epoch: make_loader(cfg.model_copy(update={"seed": epoch})),
                   step_fn=lambda m, b: {"loss": m(b["gt"])}, save_fn=lambda m, folder: None, config=data,
                   log=lambda m: None)


def test_training_counts_bad_samples_and_stops_past_the_limit(shard_dir, tmp_path):
    train = _copy(shard_dir, tmp_path)
    shards = sorted(train.glob("*.tar"))
    shards[2].write_bytes(b"garbage" * 100)
    cfg = _cfg(train)
    result = _trainer(tmp_path / "run", cfg, max_bad_fraction=0.2).fit()
    state = json.loads((result.final_dir / "trainer_state.json").read_text())
    assert state["bad_samples"]["count"] >= 1 and state["bad_samples"]["by_shard"] == {
        shards[2].name: state["bad_samples"]["count"]}
    assert read_losses(result.losses_path)[-1]["bad_samples"] == state["bad_samples"]["count"]
    for shard in shards[:4]:
        shard.write_bytes(b"garbage" * 100)
    with pytest.raises(TooManyBadSamplesError, match=r"samples read so far could not be read .* worst shards: "):
        _trainer(tmp_path / "run2", cfg, max_bad_fraction=0.01, max_steps=40).fit()


def test_resuming_on_other_data_is_refused_with_what_changed(shard_dir, tmp_path):
    train = _copy(shard_dir, tmp_path)
    cfg = _cfg(train)
    _trainer(tmp_path / "run", cfg, max_steps=2).fit()
    replaced = sorted(train.glob("*.tar"))[3]
    other = sorted(train.glob("*.tar"))[0]
    shutil.copy(other, replaced)  # the same name, other content
    shutil.copy(other.with_suffix(".parquet"), replaced.with_suffix(".parquet"))
    with pytest.raises(ResumeMismatchError, match=rf"(?s)training data differ.*{replaced.name}.*accept_data_change"):
        _trainer(tmp_path / "run", cfg, max_steps=4).fit()
    resumed = _trainer(tmp_path / "run", cfg, max_steps=4, accept_data_change=True).fit()
    assert resumed.resumed_from == 2 and resumed.step == 4
