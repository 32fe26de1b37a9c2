"""Stage II with RoboFace's additions off (``dca.implicit`` and ``dca.use_remover`` off, no caption dropout, the
caption = the prompt) is a plain ControlNet training step: the one diffusers' ``examples/controlnet/
train_controlnet.py`` runs, written out here by hand on the same tiny SD2 + ControlNet, with the same latents
sample, noise, timesteps and target, for epsilon and v-prediction. It computes no implicit tokens (CLIP, Mapper
and Remover never run) and trains the ControlNet alone; a model trained so restores as any other."""

import json

import pytest
import torch
import torch.nn.functional as F

from training.roboface.model import RoboFace, save_fn

SEED = 5


@pytest.fixture(scope="module")
def plain_cfg(tiny_config):
    dca = tiny_config.dca.model_copy(update={"implicit": False, "use_remover": False})
    stage2 = tiny_config.stage2.model_copy(update={"caption_dropout": 0.0})
    return tiny_config.model_copy(update={"dca": dca, "stage2": stage2})


@pytest.fixture(scope="module")
def pair(plain_cfg, sd2_base):
    """(our bundle, the reference's stock UNet and ControlNet): the same weights, a ControlNet moved off its zero
    initialisation so that gradients reach every one of its layers."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    model = RoboFace.from_pretrained(sd2_base, config=plain_cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    controlnet = ControlNetModel.from_pretrained(sd2_base, subfolder="controlnet")
    controlnet.load_state_dict(model.controlnet.state_dict(), strict=True)
    unet = UNet2DConditionModel.from_pretrained(sd2_base, subfolder="unet").requires_grad_(False)
    return model, unet, controlnet


def plain_controlnet_step(vae, unet, text_encoder, tokenizer, controlnet, scheduler, batch: dict,
                          generator: torch.Generator) -> torch.Tensor:
    """diffusers' ControlNet training step: VAE posterior sample x scaling factor, Gaussian noise, uniform integer
    timesteps, add_noise, the prompt's text states, ControlNet on the control image in [0, 1], its residuals into
    the UNet, MSE to the noise (epsilon) or the velocity (v_prediction), mean over everything."""
    with torch.no_grad():
        latents = vae.encode(batch["gt"]).latent_dist.sample(generator=generator) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    ids = tokenizer(list(batch["prompt"]), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = text_encoder(ids)[0]
    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=states, controlnet_cond=(batch["lq"] + 1) / 2,
                           return_dict=False)
    pred = unet(noisy, timesteps, states, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_stage2_without_additions_is_the_plain_controlnet_step(pair, face_batch, prediction):
    from diffusers import DDPMScheduler

    model, unet, controlnet = pair
    scheduler = DDPMScheduler.from_config({**model.scheduler_config, "prediction_type": prediction})
    model.noise_scheduler = scheduler
    model.freeze_for("stage2").train()
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(type(mod).__name__),
                                         with_kwargs=True)
             for m in (model.image_encoder, model.mapper, model.remover)]
    try:
        model.zero_grad(set_to_none=True)
        ours = model(face_batch, "stage2", generator=torch.Generator().manual_seed(SEED))["loss"]
        ours.backward()
    finally:
        for h in hooks:
            h.remove()
    assert calls == []  # no implicit tokens: CLIP, Mapper and Remover never ran

    controlnet.zero_grad(set_to_none=True)
    ref = plain_controlnet_step(model.vae, unet, model.text_encoder, model.tokenizer, controlnet, scheduler,
                                face_batch, torch.Generator().manual_seed(SEED))
    ref.backward()
    assert abs(ours.item() - ref.item()) / abs(ref.item()) < 1e-5
    a, b = _grads(model.controlnet), _grads(controlnet)
    assert set(a) == set(b) == {n for n, _ in controlnet.named_parameters()}
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-4
    assert sum(g.abs().sum().item() for g in b.values()) > 0


def test_implicit_off_trains_and_saves_the_controlnet_alone(pair, tiny_config, sd2_base, face_batch, tmp_path):
    from training.roboface.restore import load_restorer

    model = pair[0]
    model.freeze_for("stage2")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}  # what the engine optimizes and saves
    assert trained == {f"controlnet.{n}" for n, _ in model.controlnet.named_parameters()}
    full = RoboFace.from_pretrained(sd2_base, config=tiny_config).freeze_for("stage2")
    assert any(n.startswith("dca.") for n, p in full.named_parameters() if p.requires_grad)

    # the deliverable keeps its layout (the unused branches at their initial weights) and restores
    folder = tmp_path / "final"
    save_fn("stage2")(model, folder)
    (folder / "config.json").write_text(json.dumps({"model": model.config.model_dump(mode="json")}))
    restorer = load_restorer(sd2_base, folder)
    assert restorer.model.config.dca.implicit is False
    lq = ((face_batch["lq"][:1].permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype("uint8")
    out = restorer.restore(list(lq), "a face", steps=2, guidance=1.0)
    assert out[0].shape == lq[0].shape
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.cat([model.encode_text(["a face"]), model.stage2_tokens(face_batch["lq"][:1])], 1)
    with torch.no_grad():
        torch.testing.assert_close(
            restorer.model.predict(noisy, torch.tensor([500]), context, control=(face_batch["lq"][:1] + 1) / 2),
            model.predict(noisy, torch.tensor([500]), context, control=(face_batch["lq"][:1] + 1) / 2))
