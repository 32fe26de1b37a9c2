"""RoboFaceRestorer end to end on real low-quality sample faces with the tiny SD2 + ControlNet + CLIP pipeline and a
tiny random LLaVA as the captioner: both stages, the caption of the stage-I result, the user prompt replacing it,
and the CFG pair batched in one UNet call per step."""

import numpy as np
import pytest
import torch

from training.roboface.captioner import TransformersCaptioner
from training.roboface.model import build_roboface
from training.roboface.pipeline import RoboFaceRestorer

STEPS = 4


@pytest.fixture(scope="module")
def model(tiny_config, model_store, sd2_base):
    torch.manual_seed(0)
    model = build_roboface(tiny_config, model_store).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a "trained" DCA branch and ControlNet output, so stage II really uses them
        for name, p in model.named_parameters():
            if name.startswith("dca.") or "zero_conv" in name or "controlnet_down_blocks" in name \
                    or "controlnet_mid_block" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def captioner(tiny_llava):
    return TransformersCaptioner(tiny_llava, "tiny-llava", max_tokens=10)


class _Calls:
    """Batch sizes of every forward call of a module."""

    def __init__(self, module):
        self.sizes = []
        self.handle = module.register_forward_pre_hook(lambda m, args, kwargs: self.sizes.append(
            (args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True)


def test_restore_end_to_end(model, captioner, lq_photos):
    restorer = RoboFaceRestorer(model, captioner)
    unet_calls, cn_calls = _Calls(model.unet), _Calls(model.controlnet)
    try:
        result = restorer.restore_detailed(lq_photos, steps=STEPS, guidance=5.0, seed=3)
    finally:
        unet_calls.handle.remove()
        cn_calls.handle.remove()
    n = len(lq_photos)
    assert len(result.images) == n
    for out, lq in zip(result.images, lq_photos):
        assert out.shape == lq.shape == (512, 512, 3) and out.dtype == np.uint8
        assert out.std() > 1 and not np.array_equal(out, lq)
    assert all(s.shape == (64, 64, 3) for s in result.stage1)
    # stage II's text is the caption of the stage-I restoration
    assert result.captions == captioner.caption(result.stage1)
    # stage I: one UNet call per step on the N crops; stage II: CFG pair as one batch of 2N through both networks
    assert unet_calls.sizes == [n] * STEPS + [2 * n] * STEPS
    assert cn_calls.sizes == [2 * n] * STEPS
    # deterministic for a seed, and each crop's noise is its own
    again = restorer.restore(lq_photos, steps=STEPS, guidance=5.0, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, result.images))
    alone = restorer.restore(lq_photos[:1], steps=STEPS, guidance=5.0, seed=3)[0]
    assert np.abs(alone.astype(int) - result.images[0]).max() <= 1
    # rgb input contract of restore_photo's restore_fn
    with pytest.raises(ValueError, match="uint8"):
        restorer.restore([lq_photos[0].astype(np.float32)], steps=1)
    assert restorer.restore([], steps=1) == []


class _NoCaption:
    name, model_id, prompt = "never", "never", ""

    def caption(self, images):
        raise AssertionError("a user prompt replaces the caption: the captioner must not run")


def test_prompt_replaces_the_caption(model, lq_photos):
    restorer = RoboFaceRestorer(model, _NoCaption())
    a = restorer.restore_detailed(lq_photos[:1], "a smiling young woman with blond hair", steps=STEPS, seed=0)
    b = restorer.restore_detailed(lq_photos[:1], "an old man with a gray beard", steps=STEPS, seed=0)
    assert a.captions == ["a smiling young woman with blond hair"]
    assert np.array_equal(a.stage1[0], b.stage1[0])  # stage I has no text
    assert not np.array_equal(a.images[0], b.images[0])  # stage II follows the prompt
    plain = restorer.restore_detailed(lq_photos[:1], "an old man with a gray beard", steps=STEPS, seed=0,
                                      guidance=1.0)
    assert not np.array_equal(plain.images[0], b.images[0])  # guidance 1: no unconditional branch
