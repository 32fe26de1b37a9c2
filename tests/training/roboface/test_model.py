"""The RoboFace bundle on the tiny SD2 + ControlNet + CLIP pipeline: loading through ModelStore/from_pretrained,
batches of both loader modes, and save -> load round trips (bundle, folder per stage, plain diffusers ControlNet)."""

import pytest
import torch

from training.roboface.attention import dca_processors
from training.roboface.model import PARTS, STAGE_PARTS, RoboFace, build_roboface, save_fn, stage1a_loss



@pytest.fixture()
def model(tiny_config, model_store, sd2_base):
    torch.manual_seed(0)
    return build_roboface(tiny_config, model_store)


def test_bundle_components(model, tiny_config):
    assert model.config.num_tokens == 30
    assert len(dca_processors(model.unet)) == 4 and len(dca_processors(model.controlnet)) == 2
    tokens = model.implicit_tokens(torch.zeros(2, 3, 64, 64))
    assert tokens.shape == (2, 30, model.unet.config.cross_attention_dim)
    # an untrained Remover is the identity on the Mapper's tokens
    with torch.no_grad():
        mapped = model.mapper_tokens(torch.zeros(2, 3, 64, 64))
    torch.testing.assert_close(tokens, mapped, rtol=0, atol=0)
    assert model.encode_text(["a face", ""]).shape[:2] == (2, model.tokenizer.model_max_length)


def test_losses_accept_dual_mode_batches(model, face_batch):
    dual = {"gt_src": face_batch["gt"], "lq": face_batch["lq"], "prompt_src": face_batch["prompt"]}
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    with torch.no_grad():
        same = stage1a_loss(model, dual, generator=g())["loss"], stage1a_loss(model, face_batch, generator=g())["loss"]
    assert torch.equal(*same)
    with torch.no_grad():
        a = model(dual, "stage2", generator=g())["loss"]
        b = model({**face_batch, "caption": ["something else entirely", "another caption"]}, "stage2",
                  generator=g())["loss"]
    assert torch.isfinite(a) and not torch.equal(a, b)  # the caption is the stage-II text
    with pytest.raises(ValueError, match="unknown stage"):
        model(face_batch, "stage3")


def _perturb(model, seed=9):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("mapper.", "remover.", "controlnet.", "dca.")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _outputs(model, batch):
    with torch.no_grad():
        tokens = model.implicit_tokens(batch["lq"])
        context = torch.cat([model.encode_text(batch["prompt"]), tokens], 1)
        noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        pred = model.predict(noisy, torch.tensor([100, 900]), context, control=(batch["lq"] + 1) / 2)
    return tokens, pred


def test_save_load_round_trip(model, face_batch, tiny_config, sd2_base, tmp_path):
    _perturb(model)
    expected = _outputs(model, face_batch)
    folder = model.save(tmp_path / "trained")
    assert {p.name for p in folder.iterdir()} == {"mapper", "remover", "controlnet", "dca.safetensors",
                                                  "roboface.json"}
    # a new bundle from the base + the trained folder
    fresh = RoboFace.from_pretrained(sd2_base, config=tiny_config, trained=folder)
    for a, b in zip(expected, _outputs(fresh, face_batch)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # load() into an existing bundle
    other = RoboFace.from_pretrained(sd2_base, config=tiny_config)
    assert not torch.equal(_outputs(other, face_batch)[1], expected[1])
    assert other.load(folder) == list(PARTS)
    for a, b in zip(expected, _outputs(other, face_batch)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # the saved ControlNet is a plain diffusers checkpoint
    from diffusers import ControlNetModel

    plain = ControlNetModel.from_pretrained(folder / "controlnet")
    assert set(plain.state_dict()) == set(model.controlnet.state_dict())


def test_stage_deliverables_and_mismatch_errors(model, tiny_config, sd2_base, tmp_path):
    save_fn("stage1a")(model, tmp_path / "s1a")
    assert sorted(p.name for p in (tmp_path / "s1a").iterdir()) == ["mapper", "roboface.json"]
    save_fn("stage1b")(model, tmp_path / "s1b")
    assert {p.name for p in (tmp_path / "s1b").iterdir()} == {"mapper", "remover", "roboface.json"}
    assert STAGE_PARTS["stage2"] == PARTS
    model.save(tmp_path / "s2")
    other = tiny_config.model_copy(update={"dca": tiny_config.dca.model_copy(update={"mode": "parallel"})})
    with pytest.raises(ValueError, match="dca mode"):
        RoboFace.from_pretrained(sd2_base, config=other, trained=tmp_path / "s2")
    with pytest.raises(ValueError, match="num_tokens"):
        RoboFace.from_pretrained(sd2_base, config=tiny_config.model_copy(update={"num_tokens": 8}),
                                 trained=tmp_path / "s1a")


def test_stage_two_ablation_switches(tiny_config, model_store, sd2_base, face_batch):
    """no_remover: stage II attends the Mapper's tokens; no_explicit: every caption is empty."""
    from training.roboface.model import build_roboface

    cfg = tiny_config.model_copy(update={"dca": tiny_config.dca.model_copy(update={"use_remover": False,
                                                                                   "explicit": False})})
    model = build_roboface(cfg, model_store)
    with torch.no_grad():
        model.remover.proj_out.weight.normal_()  # a live Remover, so that skipping it shows
        lq = face_batch["lq"].to(model.device)
        torch.testing.assert_close(model.stage2_tokens(lq), model.mapper_tokens(lq))
        assert (model.implicit_tokens(lq) - model.mapper_tokens(lq)).abs().max() > 1e-3
    assert model.stage2_captions(["a smiling woman", "a man"]) == ["", ""]
    assert build_roboface(tiny_config, model_store).stage2_captions(["a man"]) == ["a man"]
