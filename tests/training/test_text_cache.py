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
