"""A²BFR restore step for step as the official inference (MediaX-SJTU/A2BFR ``infer.py`` + OminiControl's
``generate``), on the tiny zoo Flux and a real LQ face: each cause that changed every output, against hand-computed
expectations. ``benchmarks/a2bfr_parity.py`` runs the official code itself side by side."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import save_file

from attrface_pipeline.config import PROJECT_ROOT
from training.a2bfr.model import add_condition_lora
from training.a2bfr.pipeline import A2BFRPipeline, LoraFileError, check_lora_file, device_generator
from training.a2bfr.restore import A2BFRRestorer

LQ = PROJECT_ROOT / "data" / "samples" / "lq_real" / "0240.png"  # a real LQ face, 512²
STEPS, TOKENS = 3, 32


@pytest.fixture(scope="module")
def lora_state(training_zoo):
    """Random adapter weights (rank 8) on the published targets, in diffusers' key layout."""
    from diffusers import FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(training_zoo / "flux", subfolder="transformer")
    add_condition_lora(transformer, rank=8, alpha=4.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory, lora_state):
    """The release layout: one default.safetensors, alpha stored per module (alpha 4, rank 8)."""
    path = tmp_path_factory.mktemp("release") / "default.safetensors"
    alphas = {k.split(".lora_A.")[0] + ".alpha": torch.tensor(4.0) for k in lora_state if ".lora_A." in k}
    save_file({**lora_state, **alphas}, str(path))
    return path


def _pipe(training_zoo, dtype=torch.float32):
    return A2BFRPipeline.from_pretrained(training_zoo / "flux", dtype=dtype)


def _lora_layers(pipe):
    from peft.tuners.lora import LoraLayer

    return [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer)]


def _run(pipe, image, generator, **kw):
    kw = {"height": 64, "width": 64, "num_inference_steps": STEPS, **kw}
    return np.asarray(pipe(image, max_sequence_length=TOKENS, generator=generator, progress=False, **kw).images[0])


def test_condition_latent_is_a_posterior_draw_right_after_the_noise(training_zoo):
    pipe = _pipe(training_zoo)
    seen = []
    pipe.transformer.x_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    image = Image.open(LQ)
    _run(pipe, image, device_generator(7, "cpu"))
    noise, cond = seen[0], seen[1]  # the first step: noisy latents, then the condition tokens
    g = device_generator(7, "cpu")
    expected_noise, _ = pipe.prepare_latents(1, 16, 64, 64, torch.float32, "cpu", g)
    # infer.py resizes with PIL's default filter; the pipeline's image_processor preprocesses; then the VAE draws
    pixels = pipe.image_processor.preprocess(image.convert("RGB").resize((64, 64)))
    dist = pipe.vae.encode(pixels).latent_dist
    z = (dist.sample(g) - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert torch.equal(noise, expected_noise)
    assert torch.equal(cond, pipe._pack_latents(z, *z.shape))
    mean = (dist.mode() - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert not torch.allclose(cond, pipe._pack_latents(mean, *mean.shape))  # a draw, not the mean
    seen.clear()
    _run(pipe, image, device_generator(7, "cpu"), condition_latent="mean")  # the deterministic option
    assert torch.equal(seen[1], pipe._pack_latents(mean, *mean.shape))


def test_the_seed_draws_what_seed_everything_draws(training_zoo):
    """The official code calls torch.manual_seed(seed) and draws from the default generator (generator=None)."""
    pipe = _pipe(training_zoo)
    image = Image.open(LQ)
    torch.manual_seed(11)
    official = _run(pipe, image, None)
    assert np.array_equal(_run(pipe, image, device_generator(11, "cpu")), official)
    assert not np.array_equal(_run(pipe, image, device_generator(12, "cpu")), official)


def test_bf16_timesteps_are_rounded_in_the_official_order(training_zoo):
    pipe = _pipe(training_zoo, torch.bfloat16)
    seen = []
    pipe.transformer.time_text_embed.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    _run(pipe, Image.open(LQ), device_generator(0, "cpu"), num_inference_steps=28)  # the official 28
    main = seen[0::2]  # per step: the noisy stream's temb, then the condition's (t = 0)
    assert all(torch.equal(c, torch.zeros_like(c)) for c in seen[1::2])
    timesteps = pipe.scheduler.timesteps
    official = [(t.expand(1).to(torch.bfloat16) / 1000).to(torch.bfloat16) * 1000 for t in timesteps]
    before = [(t.expand(1) / 1000).to(torch.bfloat16) * 1000 for t in timesteps]
    assert all(torch.equal(a, b) for a, b in zip(main, official))
    assert any(not torch.equal(a, b) for a, b in zip(official, before))  # the order matters in bf16


def test_lora_scale_is_the_recorded_one_and_the_release_runs_at_one(training_zoo, release, lora_state, tmp_path):
    import json

    # diffusers' own loader applies a file that stores alpha at alpha / rank ...
    stock = FluxPipeline.from_pretrained(training_zoo / "flux")
    stock.load_lora_weights(str(release.parent), weight_name=release.name, adapter_name="deblurring")
    stock.set_adapters("deblurring")
    assert {float(m.scaling["deblurring"]) for m in _lora_layers(stock)} == {4.0 / 8}
    # ... OminiControl's specify_lora runs the condition at 1, whatever alpha says: so does load_a2bfr_lora
    pipe = _pipe(training_zoo)
    assert pipe.load_a2bfr_lora(release) == {}
    assert pipe.adapter_name == "deblurring" and pipe.lora_scale == 1.0
    assert {m.scaling["deblurring"] for m in _lora_layers(pipe)} == {1.0}
    # ours: the recorded lora_scale, set after set_adapters (which would reset it to alpha / rank)
    ours = tmp_path / "ours"
    ours.mkdir()
    save_file(lora_state, str(ours / "pytorch_lora_weights.safetensors"))
    (ours / "a2bfr_config.json").write_text(json.dumps({"lora_scale": 0.25, "condition_attends": "all"}))
    scaled = _pipe(training_zoo)
    scaled.load_a2bfr_lora(ours)
    assert {m.scaling["default"] for m in _lora_layers(scaled)} == {0.25}
    # scale s adds s times the adapter's product to the base layer's output
    layer = scaled.transformer.x_embedder
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = layer(x) - layer.get_base_layer()(x)
        product = layer.lora_B["default"](layer.lora_A["default"](x))
    torch.testing.assert_close(delta, 0.25 * product, rtol=1e-5, atol=1e-6)
    assert _pipe(training_zoo).load_a2bfr_lora(ours, lora_scale=2.0) is not None


def test_any_multiple_of_16_and_bf16_on_cpu(training_zoo, release):
    pipe = _pipe(training_zoo, torch.bfloat16)
    pipe.load_a2bfr_lora(release)
    out = _run(pipe, Image.open(LQ), device_generator(0, "cpu"), width=48, height=64)
    assert out.shape == (64, 48, 3) and out.dtype == np.uint8 and out.std() > 0
    with pytest.raises(ValueError, match="multiples of 16"):
        _run(pipe, Image.open(LQ), None, width=50)


def test_the_restorer_is_the_pipeline_and_batches_keep_each_crops_noise(training_zoo, release):
    restorer = A2BFRRestorer.load(training_zoo / "flux", release, width=64, height=64, steps=STEPS,
                                  max_sequence_length=TOKENS, seed=5)
    a = np.asarray(Image.open(LQ).convert("RGB"))
    b = np.asarray(Image.open(PROJECT_ROOT / "data" / "samples" / "lq_real" / "0342.png").convert("RGB"))
    direct = _run(restorer.pipe, Image.fromarray(a), device_generator(5, "cpu"))
    alone = restorer.restore_native([a])[0]
    assert np.array_equal(alone, direct)
    restorer.batch_size = 2
    together = restorer.restore_native([b, a])
    assert np.abs(together[1].astype(int) - alone.astype(int)).max() <= 1  # same noise; batched kernels round
    same_size = restorer([a[:256, :256]])[0]
    assert same_size.shape == (256, 256, 3)
    assert restorer.settings()["official_path"] and restorer.settings()["lora_scale"] == 1.0


def test_weight_files_are_checked_before_loading(training_zoo, release, tmp_path):
    transformer = _pipe(training_zoo).transformer
    assert set(check_lora_file(release, transformer).values()) == {8}
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(release.read_bytes()[: release.stat().st_size // 2])
    with pytest.raises(LoraFileError, match=r"cut\.safetensors: not a readable safetensors file"):
        check_lora_file(cut, transformer)
    other = tmp_path / "dca.safetensors"  # a RoboFace part: no lora keys
    save_file({"down_blocks.0.attn.to_k_impl.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(LoraFileError, match="not a Flux LoRA"):
        check_lora_file(other, transformer)
    wide = tmp_path / "wide.safetensors"  # a LoRA for a bigger Flux (FLUX.1-dev's x_embedder is 64 -> 3072)
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(8, 64),
               "transformer.x_embedder.lora_B.weight": torch.zeros(3072, 8)}, str(wide))
    with pytest.raises(LoraFileError, match="expects a 64->32 layer, the file holds 64->3072"):
        check_lora_file(wide, transformer)
    with pytest.raises(LoraFileError, match="cut.safetensors"):
        _pipe(training_zoo).load_a2bfr_lora(cut)
