"""RoboFaceConfig: the paper's facts as defaults, strict keys, stage lookup."""

import pytest
from pydantic import ValidationError

from training.roboface.config import CAPTION_PROMPT, RoboFaceConfig


def test_defaults_are_the_papers():
    cfg = RoboFaceConfig()
    assert cfg.num_tokens == 30 and cfg.dca.mode == "sequential"
    assert (cfg.stage1a.lr, cfg.stage1a.batch_size, cfg.stage1b.lr) == (1e-6, 4, 1e-6)
    assert (cfg.stage2.lr, cfg.stage2.batch_size, cfg.stage2.epochs) == (5e-5, 192, 15)
    assert cfg.caption.prompt == CAPTION_PROMPT and CAPTION_PROMPT.startswith("Provide a detailed yet concise")
    assert cfg.base_model == "tiny/sd2-controlnet" and cfg.image_encoder_subfolder == "image_encoder"
    assert cfg.stage("stage2") is cfg.stage2


def test_strict():
    with pytest.raises(ValidationError, match="extra"):
        RoboFaceConfig(num_token=30)
    with pytest.raises(ValidationError, match="mode"):
        RoboFaceConfig(dca={"mode": "both"})
    with pytest.raises(ValidationError, match="multiple of 8"):
        RoboFaceConfig(resolution=100)
    with pytest.raises(ValueError, match="unknown stage"):
        RoboFaceConfig().stage("stage3")
