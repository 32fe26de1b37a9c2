"""Training without text encoders: the prompts' embeddings cached once give the loss the live encoders give, step for
step; no text encoder is built in the training process; a prompt missing from the cache is named."""

import pytest
import torch

from training.a2bfr.config import A2BFRTrainConfig
from training.a2bfr.pipeline import A2BFRPipeline
from training.a2bfr.train import train
from training.engine import read_losses
from training.text_cache import TextCacheMissError, TextEmbeddingCache, build_cache, shard_prompts

MSL = 32


@pytest.fixture(scope="module")
def cache(training_zoo, shard_dir, tmp_path_factory):
    pipe = A2BFRPipeline.from_pretrained(training_zoo / "flux", transformer=None, vae=None)
    prompts = shard_prompts(shard_dir)
    folder = tmp_path_factory.mktemp("text_embeddings")

    def encode(batch):
        embeds, pooled, _ = pipe.encode_prompt(prompt=batch, prompt_2=None, device="cpu", max_sequence_length=MSL)
        return embeds, pooled

    summary = build_cache(encode, prompts, folder, meta={"max_sequence_length": MSL, "dtype": "float32"},
                          batch_size=4, log=lambda m: None)
    assert summary["encoded"] == len(prompts) > 10 and "" in prompts
    again = build_cache(encode, prompts, folder, meta={"max_sequence_length": MSL}, log=lambda m: None)
    assert again["encoded"] == 0 and again["cached"] == len(prompts)  # a re-run encodes nothing
    return folder


def _config(tmp_path, zoo, shards, name, text_cache=None):
    return A2BFRTrainConfig.model_validate({
        "model": {"base": str(zoo / "flux"), "farl": str(zoo / "farl"), "resolution": 64,
                  "max_sequence_length": MSL, "lora": {"rank": 4, "alpha": 4}},
        "loss": {"text_dropout": 0.5, "condition_dropout": 0.0},
        "data": {"shards": str(shards), "mode": "dual", "batch_size": 2, "num_workers": 0, "shuffle_buffer": 0},
        "train": {"output_dir": str(tmp_path / name), "max_steps": 3, "checkpoint_every": 3, "seed": 0},
        "samples": {"faces": 1, "steps": 1}, "text_cache": str(text_cache) if text_cache else None})


def test_cached_embeddings_train_like_the_live_encoders(tmp_path, training_zoo, shard_dir, cache, monkeypatch):
    live, _ = train(_config(tmp_path, training_zoo, shard_dir, "live"), log=lambda m: None)
    import transformers

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a text encoder ({type(self).__name__}) was built in a cached-embedding run")

    for cls in (transformers.CLIPTextModel, transformers.T5EncoderModel):
        monkeypatch.setattr(cls, "__init__", refuse)
    cached, _ = train(_config(tmp_path, training_zoo, shard_dir, "cached", cache), log=lambda m: None)
    a, b = read_losses(live.losses_path), read_losses(cached.losses_path)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "diff", "attr", "dual"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)


def test_a_missing_prompt_is_named(cache):
    c = TextEmbeddingCache(cache)
    embeds, pooled, ids = c.encode_prompt(["", ""], "cpu", MSL)
    assert embeds.shape[:2] == (2, MSL) and pooled.shape[0] == 2 and torch.equal(ids, torch.zeros(MSL, 3))
    with pytest.raises(TextCacheMissError, match="'a prompt nobody wrote'"):
        c.lookup(["", "a prompt nobody wrote"])
    with pytest.raises(ValueError, match="holds 32-token embeddings, 64 were asked for"):
        c.encode_prompt([""], "cpu", 64)
    with pytest.raises(FileNotFoundError, match="materialize text_embeddings"):
        TextEmbeddingCache(cache.parent / "nowhere")


def test_cached_gt_latents_train_like_the_encoder(tmp_path, training_zoo, shard_dir, cache, monkeypatch):
    """The GT images' posteriors read from the cache give the losses of encoding them every step (dual and single
    modes), and the VAE encoder then runs on the LQ images only."""
    from diffusers import AutoencoderKL

    from training.latent_cache import LatentCache, LatentCacheMissError, build_latent_cache

    vae = AutoencoderKL.from_pretrained(training_zoo / "flux", subfolder="vae")
    folder = tmp_path / "gt_latents"
    summary = build_latent_cache(lambda x: vae.encode(x).latent_dist.parameters, shard_dir, folder, resolution=64,
                                 meta={"dtype": "float32"}, batch_size=3, log=lambda m: None)
    assert summary["encoded"] == summary["items"] > 10
    encoded = []
    original = AutoencoderKL.encode

    def counting(self, x, *args, **kwargs):
        encoded.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    for mode in ("dual", "single"):
        def config(name, mode=mode, **extra):
            cfg = _config(tmp_path, training_zoo, shard_dir, f"{mode}-{name}", cache)
            return cfg.model_copy(update={"data": cfg.data.model_copy(update={"mode": mode, "lq_from": "random"}),
                                          **extra})

        monkeypatch.setattr(AutoencoderKL, "encode", counting)
        encoded.clear()
        live, _ = train(config("live"), log=lambda m: None)
        calls_live = len(encoded)
        encoded.clear()
        cached, _ = train(config("cached", latent_cache=str(folder)), log=lambda m: None)
        monkeypatch.setattr(AutoencoderKL, "encode", original)
        assert len(encoded) == calls_live - 3  # one GT encode fewer in each of the 3 steps: the LQ's remain
        for ra, rb in zip(read_losses(live.losses_path), read_losses(cached.losses_path), strict=True):
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-7), (mode, ra["step"])
    with pytest.raises(LatentCacheMissError, match="nobody.src"):
        LatentCache(folder).parameters(["nobody.src"])
    with pytest.raises(ValueError, match="holds 64 px faces, the run trains at 128"):
        LatentCache(folder, resolution=128)


# Integrity: every file of a cache is verified when read back (fast: a tiny cache written with build_cache).


def _example(tmp_path):
    from training.text_cache import INDEX_KIND

    files = INDEX_KIND.example(tmp_path)
    return files[0].parent, files


def _flip(path, at=-1):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _read_all(folder):
    from training.text_cache import read_every_entry

    return read_every_entry(folder / "index.json")


@pytest.mark.parametrize("damage", ["flipped", "truncated", "folder", "garbage", "missing"])
def test_a_damaged_part_is_named_with_the_remedy(tmp_path, damage):
    from attrface_pipeline.artifacts import ArtifactError

    folder, files = _example(tmp_path)
    part = files[3]
    assert part.name == "part-00001.safetensors" and _read_all(folder)[0].shape == (5, 3, 2)
    if damage == "flipped":
        _flip(part, len(part.read_bytes()) // 2)
    elif damage == "truncated":
        part.write_bytes(part.read_bytes()[:-7])
    elif damage == "folder":
        part.unlink()
        part.mkdir()
    elif damage == "garbage":
        part.write_bytes(b"\x00garbage" * 50)
    else:
        part.unlink()
    cache = TextEmbeddingCache(folder)  # the index is fine: the part is checked when first opened
    with pytest.raises(ArtifactError, match=rf"^{part}: .*delete {folder} and re-materialize text_embeddings$"):
        _read_all(folder)
    with pytest.raises(ArtifactError, match=str(part)):
        cache.lookup([cache.index[k][1] for k, v in cache.index.items() if v[0] == part.name])


@pytest.mark.parametrize("name", ["index.json", "meta.json"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "old format", "folder"])
def test_a_damaged_index_or_meta_is_named_and_the_writer_rebuilds(tmp_path, name, damage):
    import json

    from attrface_pipeline.artifacts import ArtifactError
    from training.text_cache import EXAMPLE_PROMPTS, build_cache

    folder, _ = _example(tmp_path)
    path = folder / name
    if damage == "garbage":
        path.write_bytes(b"\xff\xfe not json")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "flipped":  # a changed value under the same integrity record: valid JSON, failing its checksum
        data = json.loads(path.read_text())
        if name == "meta.json":
            data["max_sequence_length"] = 4
        else:
            data["_parts"]["part-00000.safetensors"]["bytes"] += 1
        path.write_text(json.dumps(data))
    elif damage == "old format":  # what earlier versions wrote: the payload without its integrity record
        data = json.loads(path.read_text())
        data.pop("_artifact")
        path.write_text(json.dumps(data))
    else:
        path.unlink()
        path.mkdir()
    with pytest.raises(ArtifactError, match=rf"^{path}: .*re-materialize text_embeddings$") as err:
        TextEmbeddingCache(folder)
    assert "\n" not in str(err.value)
    if damage == "old format":
        assert "no integrity record" in str(err.value)

    log = []

    def encode(batch):
        codes = torch.tensor([[float(len(p)), 1.0] for p in batch])
        return codes[:, None, :].repeat(1, 3, 1), codes[:, 0]

    summary = build_cache(encode, EXAMPLE_PROMPTS, folder, meta={"max_sequence_length": 3}, log=log.append,
                          part_size=2)
    assert summary["encoded"] == len(EXAMPLE_PROMPTS) and "rebuilding the cache from scratch" in log[0]
    assert _read_all(folder)[0].shape == (5, 3, 2)


def test_the_writer_reencodes_a_cut_part_and_keeps_the_others(tmp_path):
    from training.text_cache import EXAMPLE_PROMPTS, build_cache

    folder, files = _example(tmp_path)
    before = {p.name: p.read_bytes() for p in files[2:]}
    files[2].write_bytes(files[2].read_bytes()[:10])
    calls = []

    def encode(batch):
        calls.append(list(batch))
        codes = torch.tensor([[float(len(p)), float(sum(map(ord, p)) % 97)] for p in batch])
        return codes[:, None, :].repeat(1, 3, 1), codes[:, 0] * 0.5

    summary = build_cache(encode, EXAMPLE_PROMPTS, folder, meta={}, log=lambda m: None, part_size=2)
    assert summary["encoded"] == 2 and summary["cached"] == 3 and len(calls) == 1
    assert not files[2].exists()  # replaced by a new part holding the re-encoded entries
    assert all((folder / n).read_bytes() == b for n, b in before.items() if n != files[2].name)
    embeds, pooled = _read_all(folder)
    assert embeds.shape == (5, 3, 2) and pooled.shape == (5,)


def test_a_missing_index_with_meta_present_is_named(tmp_path):
    from attrface_pipeline.artifacts import ArtifactError

    folder, _ = _example(tmp_path)
    (folder / "index.json").unlink()
    with pytest.raises(ArtifactError, match=rf"^{folder / 'index.json'}: the embedding cache index is missing"):
        TextEmbeddingCache(folder)


def _fake_model(root):
    """A diffusers-layout folder of stand-in weight files (the fingerprint reads bytes, never loads them)."""
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "transformer"):
        (root / sub).mkdir(parents=True)
        (root / sub / "model.safetensors").write_bytes(sub.encode() * 100)
    (root / "model_index.json").write_text("{}")
    return root


def test_cache_folders_are_keyed_by_the_weights_content(tmp_path):
    from attrface_pipeline.builders import latent_cache_dir, roboface_text_cache_dir, text_cache_dir
    from attrface_pipeline.config import load_config
    from attrface_pipeline.models.store import model_fingerprint
    from training.text_cache import cache_fingerprint

    flux, sd2 = _fake_model(tmp_path / "flux"), _fake_model(tmp_path / "sd2")

    def dirs():
        cfg = load_config(overrides={"paths": {"data_root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "c")},
                                     "models": {"flux": str(flux), "sd2_controlnet": str(sd2)}})
        return text_cache_dir(cfg), latent_cache_dir(cfg), roboface_text_cache_dir(cfg)

    text, latent, robo = dirs()
    assert dirs() == (text, latent, robo)  # stable
    assert text.parent.name == "text_embeddings" and latent.parent.name == "gt_latents"
    assert robo.name.startswith("sd2-")

    (flux / "text_encoder_2" / "model.safetensors").write_bytes(b"other T5 weights")  # replaced in place
    text2, latent2, robo2 = dirs()
    assert text2 != text and latent2 == latent and robo2 == robo  # the VAE's latents stay valid
    (flux / "transformer" / "model.safetensors").write_bytes(b"another transformer")  # no cache depends on it
    assert dirs() == (text2, latent2, robo2)
    data = bytearray((flux / "vae" / "model.safetensors").read_bytes())
    data[5] ^= 1  # one flipped byte, same size
    (flux / "vae" / "model.safetensors").write_bytes(bytes(data))
    assert dirs()[1] != latent
    (sd2 / "tokenizer" / "model.safetensors").write_bytes(b"another tokenizer")
    assert dirs()[2] != robo

    # a hub spec is named by the spec alone, as before: nothing is downloaded or read to name its cache
    cfg = load_config(overrides={"paths": {"data_root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "c")},
                                 "models": {"flux": "black-forest-labs/FLUX.1-dev"}})
    expected = cache_fingerprint(model_fingerprint("black-forest-labs/FLUX.1-dev"), cfg.a2bfr.max_sequence_length,
                                 _dtype(cfg))
    assert text_cache_dir(cfg).name == expected
    assert not (tmp_path / "c").exists()


def _dtype(cfg):
    from training.roboface.train import weight_dtype

    return weight_dtype(cfg.a2bfr.mixed_precision)
