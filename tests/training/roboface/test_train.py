"""RoboFace training end to end on the tiny SD2 + ControlNet + CLIP and the real sample shards (CPU): captions of
the train split, stage I (I-a then I-b) and stage II as engine runs, what each changes, resume, the restore CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.images import read_rgb
from training.engine import read_losses
from training.roboface import model as roboface_model
from training.roboface.captioner import CachedCaptioner, CaptionCache, CaptionResult
from training.roboface.captions import caption_split, read_captions, source_images
from training.roboface.train import RoboFaceTrainConfig, train

RES = 64


class FakeCaptioner:
    """A deterministic captioner: the image's mean colour in words; counts the images it was asked for."""

    name, model_id, prompt = "fake", "fake-1", "describe"

    def __init__(self, fail_first: int = 0):
        self.asked = 0
        self.fail_first = fail_first

    def caption_results(self, images):
        out = []
        for im in images:
            self.asked += 1
            if self.asked <= self.fail_first:
                out.append(CaptionResult("", self.name, self.model_id, error="error: server down"))
            else:
                out.append(CaptionResult(f"a face of mean brightness {int(im.mean())}", self.name, self.model_id))
        return out

    def caption(self, images):
        return [r.text for r in self.caption_results(images)]


def test_captions_of_the_train_split_once_cached_and_retried(shard_dir, tmp_path):
    samples = list(source_images(shard_dir))
    distinct = len({im.tobytes() for _, _, im, _ in samples})
    assert len(samples) == 18 and distinct < len(samples)  # pairs of one photo share their source image
    inner = FakeCaptioner(fail_first=1)
    cached = CachedCaptioner(inner, CaptionCache(tmp_path / "cache"))
    summary = caption_split(shard_dir, tmp_path / "out", cached, batch_size=4, log=lambda m: None)
    assert (summary.samples, summary.images, summary.failed) == (18, distinct, 1)
    assert inner.asked == distinct  # each distinct image captioned once
    table = read_captions(summary.path)
    assert sorted(table) == sorted(k for k, *_ in samples)
    failed = [k for k, r in table.items() if r["error"]]
    assert len({table[k]["caption"] for k in failed}) == 1 and table[failed[0]]["caption"] == ""
    assert failed == [k for k, _, im, _ in samples if im.tobytes() == samples[0][2].tobytes()]  # the first image
    for key, _, image, prompt in samples:
        assert table[key]["source_prompt"] == prompt and prompt.startswith("a portrait of")
        if key not in failed:
            assert table[key]["caption"] == f"a face of mean brightness {int(image.mean())}"
    # a second run asks only for the failed image; the rest comes from the cache
    again = caption_split(shard_dir, tmp_path / "out", cached, batch_size=4, log=lambda m: None)
    assert inner.asked == distinct + 1 and again.failed == 0 and again.cached == distinct - 1
    assert all(r["caption"] for r in read_captions(again.path).values())


def _config(tmp_path, sd2_base, shards, captions=None, **steps) -> RoboFaceTrainConfig:
    counts = {"stage1a": 3, "stage1b": 3, "stage2": 4, **steps}
    return RoboFaceTrainConfig.model_validate({
        "model": {"base_model": str(sd2_base), "resolution": RES,
                  "stage1a": {"lr": 1e-3, "batch_size": 2, "steps": counts["stage1a"]},
                  "stage1b": {"lr": 1e-3, "batch_size": 2, "steps": counts["stage1b"]},
                  "stage2": {"lr": 1e-3, "batch_size": 2, "steps": counts["stage2"], "caption_dropout": 0.0}},
        "data": {"shards": str(shards), "mode": "single", "lq_from": "src", "num_workers": 0, "shuffle_buffer": 0},
        "run": {"output_dir": str(tmp_path / "run"), "checkpoint_every": 2},
        "captions": str(captions) if captions else None,
        "samples": {"faces": 2, "steps": 2},
    })


def _tensors(folder, part):
    if part == "dca":
        return load_file(folder / "dca.safetensors")
    return load_file(next((folder / part).glob("*.safetensors")))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def captions_file(shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("captions")
    return caption_split(shard_dir, out, FakeCaptioner(), log=lambda m: None).path


def test_two_stages_train_their_parts_with_the_captions_and_resume(tmp_path, sd2_base, shard_dir, captions_file,
                                                                   monkeypatch):
    cfg = _config(tmp_path, sd2_base, shard_dir, captions_file)
    results, paths = train(cfg, stage="stage1", log=lambda m: None)
    a, b = results["stage1a"].final_dir, results["stage1b"].final_dir
    assert [r.step for r in results.values()] == [3, 3] and a == tmp_path / "run" / "stage1a" / "final"
    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == ["mapper"]
    assert sorted(p.name for p in b.iterdir() if p.is_dir()) == ["mapper", "remover"]
    assert _same(_tensors(a, "mapper"), _tensors(b, "mapper"))  # I-b keeps I-a's Mapper frozen
    for sub in ("stage1a", "stage1b"):
        assert [r["step"] for r in read_losses(results[sub].losses_path)] == [1, 2, 3]
        assert paths["loss_curves"][sub].is_file()
        for folder in (results[sub].output_dir, results[sub].output_dir / "checkpoints" / "checkpoint-000002"):
            grid = read_rgb(folder / "samples.png")  # LQ | stage I | stage II | GT, one row per face
            assert grid.shape == (2 * RES, 4 * RES, 3)
    assert json.loads((b / "config.json").read_text())["model"].get("stage2") is None  # stage I ignores stage II

    seen = []
    stage2_loss = roboface_model.STAGE_LOSSES["stage2"]

    def spy(model, batch, **kw):
        seen.append((list(batch["key"]), list(batch["caption"])))
        return stage2_loss(model, batch, **kw)

    monkeypatch.setitem(roboface_model.STAGE_LOSSES, "stage2", spy)
    results2, paths2 = train(cfg, stage="stage2", log=lambda m: None)
    final = results2["stage2"].final_dir
    assert results2["stage2"].step == 4 and paths2["final"] == final and paths2["samples"].is_file()
    table = read_captions(captions_file)
    assert len(seen) == 4 and all(c == [table[k]["caption"] for k in keys] for keys, c in seen)
    assert all(c.startswith("a face of mean brightness") for _, caps in seen for c in caps)
    # stage II trains the ControlNet and the DCA branches; the stage-I Mapper and Remover come through unchanged
    assert _same(_tensors(final, "mapper"), _tensors(b, "mapper"))
    assert _same(_tensors(final, "remover"), _tensors(b, "remover"))
    assert not _same(_tensors(final, "controlnet"), _tensors(sd2_base, "controlnet"))
    dca = _tensors(final, "dca")
    assert any(k.endswith("to_out_impl.weight") and dca[k].abs().sum() > 0 for k in dca)  # left zero-init

    # a second run of either stage resumes its finished runs and trains nothing more
    again, _ = train(cfg, stage="stage1", log=lambda m: None)
    assert [r.resumed_from for r in again.values()] == [3, 3]
    assert len(read_losses(again["stage1b"].losses_path)) == 3
    more = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "stage2": cfg.model.stage2.model_copy(update={"steps": 5})})})
    longer, _ = train(more, stage="stage2", log=lambda m: None)  # more steps continue the run
    assert longer["stage2"].resumed_from == 4 and longer["stage2"].step == 5


def test_stage2_needs_stage1(tmp_path, sd2_base, shard_dir):
    with pytest.raises(FileNotFoundError, match="--stage stage1 first"):
        train(_config(tmp_path, sd2_base, shard_dir), stage="stage2", log=lambda m: None)


def test_restore_cli_on_a_real_photo_and_lq_faces(tmp_path, sd2_base, shard_dir):
    from typer.testing import CliRunner

    from attrface_pipeline.cli import app

    cfg = _config(tmp_path, sd2_base, shard_dir, stage1a=1, stage1b=1, stage2=1)
    cfg.samples.faces = 0
    train(cfg, stage="stage1", log=lambda m: None)
    results, _ = train(cfg, stage="stage2", log=lambda m: None)
    photo = PROJECT_ROOT / "data" / "samples" / "faces" / "whole" / "02.png"
    lq = PROJECT_ROOT / "data" / "samples" / "lq_real" / "0240.png"
    runner = CliRunner()
    for src, dst, prompt, faces in ((photo, tmp_path / "out", [], 4),
                                    (lq, tmp_path / "lq", ["--prompt", "an old man"], 1)):
        out = runner.invoke(app, ["restore", "-i", str(src), "-o", str(dst), "--model", "roboface", "--weights",
                                  str(results["stage2"].final_dir), "--base", str(sd2_base), "--steps", "2", *prompt])
        assert out.exit_code == 0, out.output
        assert f"restored {faces} face(s) in 1 image(s)" in out.output
        faces_out = sorted((dst / "restored_faces").glob("*.png"))
        assert len(faces_out) == faces
    restored, original = read_rgb(tmp_path / "out" / "restored_imgs" / photo.name), read_rgb(photo)
    assert restored.shape == original.shape and not np.array_equal(restored, original)
    bad = runner.invoke(app, ["restore", "-i", str(lq), "-o", str(tmp_path / "x"), "--model", "roboface",
                              "--weights", str(results["stage2"].final_dir.parent / "missing"),
                              "--base", str(sd2_base)])
    assert bad.exit_code == 1 and "no such file or folder" in bad.output
    option = runner.invoke(app, ["restore", "-i", str(lq), "-o", str(tmp_path / "x"), "--model", "roboface",
                                 "--weights", str(results["stage2"].final_dir), "--condition-latent", "mean"])
    assert option.exit_code == 2 and "A²BFR option" in option.output
    cut = tmp_path / "cut_run"  # a copy whose DCA weights were cut short: one line naming that file
    shutil.copytree(results["stage2"].final_dir, cut)
    dca = cut / "dca.safetensors"
    dca.write_bytes(dca.read_bytes()[: dca.stat().st_size // 2])
    truncated = runner.invoke(app, ["restore", "-i", str(lq), "-o", str(tmp_path / "y"), "--model", "roboface",
                                    "--weights", str(cut), "--base", str(sd2_base)])
    assert truncated.exit_code == 1 and f"{dca}: not a readable safetensors file" in truncated.output
    as_a2bfr = runner.invoke(app, ["restore", "-i", str(lq), "-o", str(tmp_path / "z"), "--model", "a2bfr",
                                   "--weights", str(results["stage2"].final_dir)])
    assert as_a2bfr.exit_code == 1 and "is a RoboFace run" in as_a2bfr.output and "--model roboface" in as_a2bfr.output


def test_run_folders_follow_what_each_stage_depends_on(tmp_path, shard_dir, captions_file):
    from attrface_pipeline.builders import roboface_train_config
    from attrface_pipeline.config import load_config

    cfg = load_config(overrides={"paths": {"data_root": str(tmp_path)}})

    def run(stage, **kw):
        return roboface_train_config(cfg, shards=str(shard_dir), stage=stage, captions=str(captions_file), **kw)

    s1, s2 = run("stage1"), run("stage2")
    assert s1.stage == "stage1" and s1.model.base_model == cfg.models.sd2_controlnet == "tiny/sd2-controlnet"
    assert s2.stage1_weights() == s1.stage_dir("stage1b") / "final"
    assert (s1.model.stage1a.steps, s2.model.stage2.steps, s2.data.lq_from) == (4, 6, "src")
    # stage-II settings never move stage I; step counts move neither; stage-I settings move both
    assert run("stage1", stage2_lr=1e-2).run.output_dir == s1.run.output_dir
    assert run("stage1", stage1a_steps=40).run.output_dir == s1.run.output_dir
    assert run("stage2", stage2_steps=60).run.output_dir == s2.run.output_dir
    assert run("stage2", stage2_lr=1e-2).run.output_dir != s2.run.output_dir
    assert run("stage1", stage1_lr=1e-2).run.output_dir != s1.run.output_dir
    assert run("stage2", stage1_lr=1e-2).run.output_dir != s2.run.output_dir
    # stage II's length in epochs of the published train split (18 pairs)
    epochs = load_config(overrides={"roboface": {"stage2_steps": None}})
    assert roboface_train_config(epochs, shards=str(shard_dir), stage="stage2").model.stage2.steps == 15 * 18 // 2
    full = roboface_train_config(load_config("full"), shards=str(shard_dir), stage="stage2")
    m = full.model
    assert (m.base_model, m.image_encoder, m.resolution) == ("stabilityai/stable-diffusion-2-1-base",
                                                             "h94/IP-Adapter", 512)
    assert (m.stage1a.lr, m.stage1a.batch_size, m.stage2.lr) == (1e-6, 4, 5e-5)
    assert m.stage2.batch_size * m.stage2.gradient_accumulation_steps == 192 and m.stage2.steps == 2  # 15 x 18/192
    assert m.caption.backend == "vlm" and m.caption.vlm.model == "llava-hf/llava-1.5-13b-hf"
    assert full.run.mixed_precision == "bf16" and full.data.num_workers == 4


def test_a_sample_without_a_caption_is_an_error(tmp_path, sd2_base, shard_dir, captions_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.roboface.train import caption_lookup

    cfg = _config(tmp_path, sd2_base, shard_dir, captions_file)
    lookup = caption_lookup(cfg)
    key = read_captions(captions_file).popitem()[0]
    assert lookup([key], ["the prompt"])[0].startswith("a face of mean brightness")
    with pytest.raises(KeyError, match="re-materialize roboface_captions"):
        lookup(["not-a-key"], [""])
    rows = pq.read_table(captions_file).to_pylist()
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "caption": ""} for r in rows]), empty)
    assert caption_lookup(_config(tmp_path, sd2_base, shard_dir, empty))([key], ["the prompt"]) == ["the prompt"]
    cfg = _config(tmp_path, sd2_base, shard_dir, empty).model_copy(update={"empty_caption": "empty"})
    assert caption_lookup(cfg)([key], ["the prompt"]) == [""]


def test_stage_two_with_cached_text_states_and_no_text_encoder(shard_dir, sd2_base, tmp_path, monkeypatch):
    """Stage II reading the text encoder's states from the cache trains as with the encoder running (same losses),
    and builds no text encoder."""
    import transformers
    from transformers import AutoTokenizer, CLIPTextModel

    from training.roboface.model import clip_text_states
    from training.text_cache import build_cache, shard_prompts

    tokenizer = AutoTokenizer.from_pretrained(sd2_base, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(sd2_base, subfolder="text_encoder").eval()

    def encode(batch):
        states = clip_text_states(tokenizer, encoder, batch)
        return states, states[:, 0]

    cache = tmp_path / "text"
    build_cache(encode, shard_prompts(shard_dir), cache, meta={"max_sequence_length": 77}, batch_size=1,
                log=lambda m: None)
    base = _config(tmp_path, sd2_base, shard_dir, stage2=3)
    train(base, stage="stage1", log=lambda m: None)
    stage2 = base.model_copy(update={"model": base.model.model_copy(update={
        "stage2": base.model.stage2.model_copy(update={"caption_dropout": 0.5})})})
    live, _ = train(stage2.model_copy(update={"run": stage2.run.model_copy(update={
        "output_dir": str(tmp_path / "live")}), "stage1_dir": str(base.stage1_weights())}), stage="stage2",
        log=lambda m: None)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a text encoder was built in a cached run")

    monkeypatch.setattr(transformers.CLIPTextModel, "__init__", refuse)
    cached, _ = train(stage2.model_copy(update={"run": stage2.run.model_copy(update={
        "output_dir": str(tmp_path / "cached")}), "stage1_dir": str(base.stage1_weights()), "text_cache": str(cache)}),
        stage="stage2", log=lambda m: None)
    a, b = read_losses(live["stage2"].losses_path), read_losses(cached["stage2"].losses_path)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-7)
