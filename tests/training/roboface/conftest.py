"""Fixtures for RoboFace's tests: the tiny SD2 + ControlNet + CLIP-vision pipeline from the offline zoo (through
ModelStore, as the trainer resolves it), two real sample faces with synthetic LQs, and a tiny random LLaVA."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.images import read_rgb

RESOLUTION = 64
ALIGNED_HQ = PROJECT_ROOT / "data" / "samples" / "aligned_hq"
LQ_REAL = PROJECT_ROOT / "data" / "samples" / "lq_real"


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    # Tiny models on a shared 2-core machine: intra-op threads fighting other processes made every op ~50x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    from attrface_pipeline.models.store import ModelStore

    return ModelStore(tmp_path_factory.mktemp("roboface_cache"))


@pytest.fixture(scope="session")
def sd2_base(model_store) -> Path:
    """The tiny SD2-style pipeline folder (vae, unet, text_encoder, tokenizer, controlnet, image_encoder, ...)."""
    return model_store.resolve("tiny/sd2-controlnet")


@pytest.fixture(scope="session")
def tiny_config():
    from training.roboface.config import RoboFaceConfig

    return RoboFaceConfig(resolution=RESOLUTION, device="cpu")


@pytest.fixture(scope="session")
def face_batch() -> dict:
    """Two real aligned FFHQ faces at 64 px, each with an LQ from RoboFace's train degradation: a training.data
    single-mode batch (gt, lq in [-1, 1]; prompt; key)."""
    from training.data import to_tensor
    from training.degradation import degrade

    hq = [cv2.resize(read_rgb(ALIGNED_HQ / f"ffhq_0000{i}.png"), (RESOLUTION, RESOLUTION), interpolation=cv2.INTER_AREA)
          for i in (0, 1)]
    lq = [degrade(h, "train", np.random.default_rng(7 + i))[0] for i, h in enumerate(hq)]
    return {"gt": torch.stack([to_tensor(h) for h in hq]), "lq": torch.stack([to_tensor(x) for x in lq]),
            "prompt": ["a close-up portrait photo of a young woman .", "a portrait of an old man with gray hair ."],
            "key": ["ffhq_00000", "ffhq_00001"]}


@pytest.fixture(scope="session")
def lq_photos() -> list[np.ndarray]:
    """Two real low-quality 512 px face crops (CodeFormer's cropped_faces)."""
    return [read_rgb(LQ_REAL / "0240.png"), read_rgb(LQ_REAL / "gray_Einstein02.png")]


LLAVA_TEMPLATE = (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """A tiny random LlavaForConditionalGeneration (CLIP vision + Qwen2 text) with its LlavaProcessor, saved with
    save_pretrained: what TransformersCaptioner loads for llava-hf/llava-1.5-*-hf."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, Qwen2Config)

    from attrface_pipeline.models.tokenizers import build_qwen2_tokenizer

    out = tmp_path_factory.mktemp("tiny_llava")
    tok = build_qwen2_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    image_token = tok.convert_tokens_to_ids("<image>")
    patch, size = 8, 32
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=size, patch_size=patch),
        text_config=Qwen2Config(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id),
        image_token_index=image_token, image_seq_length=(size // patch) ** 2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out
