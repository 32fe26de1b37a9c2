"""FlowEdit on the tiny random SD3 (CPU): algebraic properties, a direct reference step, batching, resume."""

import json

import cv2
import numpy as np
import pytest
import torch

from attrface_pipeline.images import encode_image, read_rgb
from attrface_pipeline.stages.align import template_points
from attrface_pipeline.stages.edits import EditPair, EditSpec, pair_seed, run_edits
from attrface_pipeline.stages.flowedit import FlowEditor, FlowEditParams, flowedit, guided
from attrface_pipeline.stages.regions import region_mask
from attrface_pipeline.storage import PartitionStore

SIZE = 64
SRC, TAR = "A close-up portrait photo of a young woman.", "A close-up portrait photo of a young smiling woman."


@pytest.fixture(scope="module")
def editor(tiny_zoo):
    return FlowEditor.from_pretrained(tiny_zoo / "sd3")


@pytest.fixture(scope="module")
def faces(samples):
    paths = [p for p in sorted((samples / "hq").iterdir()) if p.suffix in {".jpg", ".png"}][:3]
    return [cv2.resize(read_rgb(p), (SIZE, SIZE), interpolation=cv2.INTER_AREA) for p in paths]


def P(**kw):
    return FlowEditParams(**{"steps": 8, "n_max": 6, "max_sequence_length": 32, **kw})


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0, "schedule", "map"])
def test_same_prompt_leaves_the_source_latent(editor, faces, beta):
    """tar == src and equal guidance => every delta is 0 => the output latent is the source latent, for any beta.
    (With different src/tar guidance scales the two velocities differ even for one prompt: CFG amplification.)"""
    x = editor.encode_images(faces[:2])
    kw, maps = {"src_guidance": 5.0, "tar_guidance": 5.0}, None
    if beta == "schedule":
        kw["beta_schedule"] = tuple(np.linspace(0, 1, 8))
    elif beta == "map":
        kw["beta"] = 0.7
        maps = torch.rand(2, 1, *x.shape[2:], generator=torch.Generator().manual_seed(0))
    else:
        kw["beta"] = beta
    z = editor.edit_latents(x, [SRC, TAR], [SRC, TAR], P(**kw), [1, 2], beta_maps=maps)
    torch.testing.assert_close(z, x, atol=1e-5, rtol=0)


def test_n_max_zero_leaves_the_source_unchanged(editor, faces):
    x = editor.encode_images(faces[:1])
    calls = editor.transformer_calls
    z = editor.edit_latents(x, [SRC], [TAR], P(n_max=0), [0])
    assert torch.equal(z, x) and editor.transformer_calls == calls
    out, timing = editor.edit(faces[:1], [SRC], [TAR], P(n_max=0), [0])
    assert np.array_equal(out[0], editor.decode_latents(x)[0]) and timing.transformer_calls == 0


def test_edit_is_deterministic_and_batch_independent(editor, faces):
    seeds = [pair_seed(0, f"k{i}") for i in range(3)]
    a, _ = editor.edit(faces, [SRC] * 3, [TAR] * 3, P(), seeds)
    b, _ = editor.edit(faces, [SRC] * 3, [TAR] * 3, P(), seeds)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    alone, _ = editor.edit(faces[1:2], [SRC], [TAR], P(), seeds[1:2])  # same pair, other batch neighbours
    assert np.abs(alone[0].astype(int) - a[1].astype(int)).max() <= 1
    other, _ = editor.edit(faces[:1], [SRC], [TAR], P(), [seeds[0] + 1])
    assert not np.array_equal(other[0], a[0])
    z = editor.edit_latents(editor.encode_images(faces[:1]), [SRC], [TAR], P(), seeds[:1])
    assert z.dtype == torch.float32


def test_one_step_matches_a_direct_unbatched_computation(editor, faces):
    """n_max = 1: only the last step runs. Recompute it with four separate transformer calls."""
    params = P(steps=4, n_max=1, src_guidance=2.0, tar_guidance=7.0, beta=0.3)
    x = editor.encode_images(faces[:1])
    got = editor.edit_latents(x, [SRC], [TAR], params, [123])

    sigmas, timesteps = editor.schedule(4)
    s, t = float(sigmas[3]), timesteps[3]
    eps = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(123))[None]
    z_src = (1 - s) * x + s * eps
    z_tar = 0.7 * z_src + 0.3 * z_src  # z == x_src before the first step, so z_tar == z_src

    def v(latent, prompt):
        e, p = editor.embed(prompt, 32)
        return editor.pipe.transformer(hidden_states=latent, timestep=t.expand(1), encoder_hidden_states=e,
                                       pooled_projections=p, return_dict=False)[0]

    with torch.no_grad():
        v_src = v(z_src, "") + 2.0 * (v(z_src, SRC) - v(z_src, ""))
        v_tar = v(z_tar, "") + 7.0 * (v(z_tar, TAR) - v(z_tar, ""))
    expected = x + (0.0 - s) * (v_tar - v_src)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - x).abs().max() > 1e-3  # the step did something


def test_n_avg_and_n_min_paths(editor, faces):
    x = editor.encode_images(faces[:2])
    for params in (P(n_avg=3), P(n_min=2), P(n_min=2, n_avg=2), P(n_max=2, n_min=4)):
        calls = editor.transformer_calls
        z = editor.edit_latents(x, [SRC, SRC], [TAR, TAR], params, [5, 6])
        assert editor.transformer_calls - calls == params.transformer_calls()
        assert torch.isfinite(z).all() and z.shape == x.shape and not torch.equal(z, x)
    assert P(n_min=2).sample_evaluations() == 4 * 4 + 2 * 2
    plain = editor.edit_latents(x, [SRC, SRC], [TAR, TAR], P(), [5, 6])
    sampled = editor.edit_latents(x, [SRC, SRC], [TAR, TAR], P(n_min=2), [5, 6])
    assert not torch.allclose(plain, sampled)


def test_edit_mask_confines_the_edit(editor, faces):
    x = editor.encode_images(faces[:1])
    mask = torch.zeros(1, 1, *x.shape[2:])
    mask[..., :4, :] = 1.0
    z = editor.edit_latents(x, [SRC], [TAR], P(), [0], edit_masks=mask)
    assert torch.equal(z[..., 4:, :], x[..., 4:, :]) and not torch.equal(z[..., :4, :], x[..., :4, :])


def test_prompt_embedding_cache_is_bounded(tiny_zoo):
    small = FlowEditor.from_pretrained(tiny_zoo / "sd3")
    small.max_cached_prompts = 2
    first = small.embed("one", 32)
    small.embed("two", 32)
    small.embed("three", 32)
    assert len(small._embeds) == 2 and ("one", 32) not in small._embeds
    torch.testing.assert_close(small.embed("one", 32)[0], first[0])  # recomputed identically


def test_params_are_validated():
    with pytest.raises(ValueError):
        FlowEditParams(steps=10, n_max=11)
    with pytest.raises(ValueError):
        FlowEditParams(steps=4, beta_schedule=(0.1, 0.2))
    with pytest.raises(ValueError):
        FlowEditParams(beta=1.5)
    assert guided(torch.tensor(1.0), torch.tensor(3.0), 2.0) == 5.0


def test_single_pair_interface(editor, faces):
    out = flowedit(editor.pipe, faces[0], SRC, TAR, P(), torch.Generator().manual_seed(7))
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


def test_region_masks_follow_the_landmarks():
    lm = template_points("ffhq", 512)
    eyes, mouth, hair = (region_mask(lm, 512, r, 64) for r in ("eyes", "mouth", "hair"))
    at = lambda m, p: m[int(p[1] / 8), int(p[0] / 8)]  # noqa: E731
    assert at(eyes, lm[0]) > 0.5 > at(eyes, lm[3]) and at(mouth, lm[3]) > 0.5 > at(mouth, lm[0])
    assert hair[1, 32] > 0.9 and at(hair, lm[2]) < 0.1
    assert region_mask(lm, 512, None, 64).min() == 1.0


def test_run_edits_resumes_pair_by_pair(editor, samples, tmp_path):
    crop = read_rgb(next(p for p in sorted((samples / "hq").iterdir()) if p.suffix in {".jpg", ".png"}))
    crop = cv2.resize(crop, (128, 128))
    lm = tuple(template_points("ffhq", 128).reshape(-1))
    pairs = [EditPair(f"f_00_{a}_add", "f_00", "f", a, "add", SRC, f"{SRC} {a}", "crop.png", lm, "template")
             for a in ("Eyeglasses", "Smiling", "Bangs")]
    store = PartitionStore(tmp_path, "edits", "chunk-00000")
    spec = EditSpec(resolution=SIZE, params=P(), batch_size=2, region_masks=True, beta_map="outside_region",
                    model_id="tiny/sd3")
    rows, stats = run_edits(pairs, editor, spec, store, lambda rel: crop, log=lambda m: None)
    assert stats["pairs_edited"] == 3 and [r["pair_key"] for r in rows] == [p.pair_key for p in pairs]
    assert json.loads(rows[0]["params"])["beta_map"] == "outside_region"
    assert rows[0]["seed"] == pair_seed(0, pairs[0].pair_key)
    first = read_rgb(store.path(rows[1]["edit_path"])).astype(int)
    store.path("records", f"{pairs[1].pair_key}.json").unlink()  # as if the run died after this image
    rows2, stats2 = run_edits(pairs, editor, spec, store, lambda rel: crop, log=lambda m: None)
    assert stats2["pairs_resumed"] == 2 and stats2["pairs_edited"] == 1
    # same seed, same result (up to one grey level: it ran in a batch of 1 this time, of 2 before)
    assert np.abs(read_rgb(store.path(rows2[1]["edit_path"])).astype(int) - first).max() <= 1


def test_edits_are_encoded_once_in_the_published_format(editor, samples, tmp_path):
    """The edit and (once per face) the source at the edit's resolution, as JPEG q95 where they are made; the
    optional PNG master is the same pixels."""
    crop = read_rgb(next(p for p in sorted((samples / "hq").iterdir()) if p.suffix in {".jpg", ".png"}))
    crop = cv2.resize(crop, (2 * SIZE, 2 * SIZE))
    lm = tuple(template_points("ffhq", 2 * SIZE).reshape(-1))
    pairs = [EditPair(f"f_00_{a}_add", "f_00", "f", a, "add", SRC, f"{SRC} {a}", "crop.png", lm, "template")
             for a in ("Eyeglasses", "Smiling", "Bangs")]
    store = PartitionStore(tmp_path, "edits", "chunk-00000")
    spec = EditSpec(resolution=SIZE, params=P(), batch_size=2, image_format="jpg", jpeg_quality=95,
                    lossless_master=True)
    rows, _ = run_edits(pairs, editor, spec, store, lambda rel: crop, log=lambda m: None)
    assert {r["source_image"] for r in rows} == {"sources/f_00.jpg"}
    assert sorted(p.name for p in store.path("sources").iterdir()) == ["f_00.jpg"]  # once per face
    small = cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert store.path("sources/f_00.jpg").read_bytes() == encode_image(small, "jpg", 95)
    for r in rows:
        assert r["edit_path"] == f"images/{r['pair_key']}.jpg" and r["master_path"] == f"masters/{r['pair_key']}.png"
        master = read_rgb(store.path(r["master_path"]))
        assert master.shape == (SIZE, SIZE, 3)
        assert store.path(r["edit_path"]).read_bytes() == encode_image(master, "jpg", 95)


def test_a_fixed_batch_pads_and_drops_the_padding(editor, faces):
    """With a compiled transformer every call has the batch size it was compiled for: a short batch is padded
    with its last pair, and the padding's outputs are dropped; the real pairs' edits do not change."""
    alone, _ = editor.edit(faces[:2], [SRC] * 2, [TAR] * 2, P(), [3, 4])
    editor.fixed_batch = 3
    try:
        calls = editor.transformer_calls
        padded, timing = editor.edit(faces[:2], [SRC] * 2, [TAR] * 2, P(), [3, 4])
    finally:
        editor.fixed_batch = None
    assert len(padded) == 2 and timing.transformer_calls == editor.transformer_calls - calls
    for a, b in zip(alone, padded):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_fp8_without_float8_hardware_is_a_clear_error(editor):
    from attrface_pipeline.stages.flowedit import float8_problem, quantize_transformer

    cpu = torch.device("cpu")
    assert "compute capability >= 8.9" in float8_problem(cpu)
    with pytest.raises(RuntimeError, match="edit.quantize: fp8 is not available: float8 needs an NVIDIA GPU"):
        quantize_transformer(editor.pipe.transformer, "fp8", cpu)
    assert quantize_transformer(editor.pipe.transformer, "none", cpu) is editor.pipe.transformer
    with pytest.raises(ValueError, match="expected one of"):
        quantize_transformer(editor.pipe.transformer, "int4", cpu)
