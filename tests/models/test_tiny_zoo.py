"""Round trips of every tiny checkpoint: save (generator) -> the real loader -> run."""

import json

import numpy as np
import pytest
import torch

from attrface_pipeline.models import tiny


def test_generation_is_deterministic(tmp_path, tiny_zoo):
    tiny.generate("farl", tmp_path / "farl")
    a = (tiny_zoo / "farl" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (tmp_path / "farl" / "diffusion_pytorch_model.safetensors").read_bytes() == a
    assert json.loads((tiny_zoo / "farl" / tiny.DONE_MARKER).read_text())["name"] == "farl"


def test_sd3_pipeline_round_trip(tiny_zoo):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_zoo / "sd3", local_files_only=True)
    assert pipe.vae_scale_factor == 2 and pipe.transformer.config.joint_attention_dim == 64
    out = pipe("a photo of a human face", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
               max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_sd3_vae_returns_a_recognisable_face(tiny_zoo, samples):
    """The offline SD3 VAE is fitted on the sample faces: encode -> decode keeps identity (dlib's real
    descriptor) and structure, so offline QC measures the editor, not VAE noise."""
    import cv2

    from attrface_pipeline.images import read_rgb
    from attrface_pipeline.stages.align import align_face
    from attrface_pipeline.stages.checks import DlibScorer, identity_scores, structure_ssim
    from attrface_pipeline.stages.detect import DlibDetector
    from attrface_pipeline.stages.flowedit import FlowEditor

    image = read_rgb(samples / "hq" / "obama.jpg")
    crop = align_face(image, DlibDetector().detect(image)[0].landmarks5, 512)[0]
    crop = cv2.resize(crop, (128, 128), interpolation=cv2.INTER_AREA)
    editor = FlowEditor.from_pretrained(tiny_zoo / "sd3")
    back = editor.decode_latents(editor.encode_images([crop]))[0]
    assert structure_ssim(crop, back) > 0.8
    assert identity_scores(DlibScorer(), [crop], [back])[0]["distance"] < 0.45


def test_flux_pipeline_round_trip(tiny_zoo):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_zoo / "flux", local_files_only=True)
    out = pipe("a photo of a human face", height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
               max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_sd2_controlnet_round_trip_with_image_encoder(tiny_zoo):
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_zoo / "sd2-controlnet", local_files_only=True)
    control = Image.new("RGB", (64, 64), (120, 100, 90))
    out = pipe("a photo of a human face", image=control, height=64, width=64, num_inference_steps=2,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    pixels = pipe.feature_extractor(images=control, return_tensors="pt").pixel_values
    embeds = pipe.image_encoder(pixels).image_embeds
    assert pixels.shape == (1, 3, 224, 224) and embeds.shape == (1, 32)


def test_qwen3_round_trip_chat_template_and_generate(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_zoo / "qwen3")
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo / "qwen3", local_files_only=True)
    assert model.config.head_dim >= 32 and model.config.model_type == "qwen3"
    prompt = tok.apply_chat_template([{"role": "user", "content": "describe the face"}], tokenize=False,
                                     add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1] and int(out.max()) < model.config.vocab_size


def test_farl_round_trip(tiny_zoo):
    from attrface_pipeline.models.farl import FaRLAttributeModel

    model = FaRLAttributeModel.from_pretrained(tiny_zoo / "farl").eval()
    with torch.no_grad():
        probs = model(torch.randn(2, 3, 224, 224))
    assert probs.shape == (2, 40) and bool(((probs > 0) & (probs < 1)).all())


def test_insightface_pack_loads_through_insightface(tiny_zoo, samples):
    pytest.importorskip("insightface")
    from insightface.model_zoo import get_model

    from attrface_pipeline.stages.align import align_face
    from attrface_pipeline.stages.detect import InsightFaceDetector
    from attrface_pipeline.stages.ingest import load_rgb

    rec = get_model(str(tiny_zoo / "insightface" / "w600k_tiny.onnx"), providers=["CPUExecutionProvider"])
    assert type(rec).__name__ == "ArcFaceONNX"
    image = load_rgb(samples / "hq" / "obama.jpg", min_side=64, max_pixels=10**8)[0]
    crop, _ = align_face(image, np.array([[380, 420], [520, 420], [450, 500], [395, 580], [505, 580.0]]),
                         size=112, template="arcface")
    feat = rec.get_feat(crop[:, :, ::-1])
    assert feat.shape == (1, 512) and np.isfinite(feat).all()

    detector = InsightFaceDetector(tiny_zoo / "insightface", det_size=160, min_score=0.9, max_side=320)
    assert detector.model_file.name == "det_tiny.onnx"
    faces = detector.detect(image)  # random weights: any number of boxes, but in the real output format
    for face in faces:
        assert face.landmarks5.shape == (5, 2) and face.bbox.shape == (4,) and 0.9 <= face.score <= 1.0
