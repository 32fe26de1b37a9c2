"""The offline zoo: deterministic tiny random checkpoints in the real on-disk formats.

Each generator writes a directory that the *same* loader reads for the real model (``from_pretrained`` with
``local_files_only``, or insightface's ONNX loader), so every loading path runs offline. Weights are random:
outputs are meaningless, shapes and formats are real. Sizes follow ENVIRONMENT.md's measured recipes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

DONE_MARKER = "attrface_tiny.json"
SEED = 20261122
# Bump when a generator changes: cached tiny models of another version are regenerated, and assets built with
# them recompute (their fingerprints include it). 2: the SD3 VAE is fitted on the sample faces.
ZOO_VERSION = 2


def _seeded(offset: int) -> None:
    torch.manual_seed(SEED + offset)


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None, quant_conv: bool):
    """4-level AutoencoderKL (8x downsampling like the real ones) with few channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def _face_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None):
    """A 2-level AutoencoderKL (x2 downsampling) fitted briefly on the sample faces.

    ARCHITECTURE.md: a random VAE turns every face into noise, so offline identity/structure checks would reject
    everything. This one is small enough to fit in well under a minute on 2 CPU cores and then returns a
    recognisable face (the diffusion transformer stays random). Its downsampling factor is 2, not the real 8:
    with 8x and these widths, a minute of fitting still gives a blur.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=512, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )
    fit_vae_on_faces(vae)
    return vae


VAE_FIT = {"steps": 300, "batch": 16, "crop": 48, "lr": 3e-3, "image_size": 96}


def fit_vae_on_faces(vae, steps: int = VAE_FIT["steps"]) -> float:
    """Deterministic reconstruction fit (L1 + tiny KL) on random crops of data/samples/faces; returns eval L1."""
    import cv2

    from attrface_pipeline.config import SAMPLES_DIR
    from attrface_pipeline.images import read_rgb

    size, crop = VAE_FIT["image_size"], VAE_FIT["crop"]
    images = []
    for path in sorted((SAMPLES_DIR / "faces").rglob("*")):
        if path.suffix.lower() not in {".jpg", ".jpeg", ".png"}:
            continue
        rgb = read_rgb(path)
        side = min(rgb.shape[:2])
        top, left = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
        rgb = cv2.resize(rgb[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_AREA)
        images.append(torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1.0)
    data = torch.stack(images)
    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(vae.parameters(), lr=VAE_FIT["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=VAE_FIT["lr"], total_steps=steps, pct_start=0.1)
    vae.train()
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (VAE_FIT["batch"],), generator=g)]
        i, j = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=g))
        x = x[:, :, i:i + crop, j:j + crop]
        posterior = vae.encode(x).latent_dist
        loss = (vae.decode(posterior.mode()).sample - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    with torch.no_grad():
        return float((vae.decode(vae.encode(data).latent_dist.mode()).sample - data).abs().mean())


def _clip_text(tokenizer, hidden: int, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5_encoder(tokenizer, d_model: int = 64):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        d_ff=d_model * 2,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def make_sd3(out: Path) -> None:
    """StableDiffusion3Pipeline: SD3 transformer, 16-channel VAE fitted on the sample faces, 2 CLIP-with-projection
    + T5 encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from attrface_pipeline.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    _seeded(1)
    transformer = SD3Transformer2DModel(
        sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=128,
    )
    vae = _face_vae(16, scaling_factor=1.5305, shift_factor=0.0609)
    text_encoder, text_encoder_2 = _clip_text(clip_tok, 32, 32), _clip_text(clip_tok, 32, 32)
    text_encoder_3 = _t5_encoder(t5_tok, 64)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(out)


def make_flux(out: Path) -> None:
    """FluxPipeline: Flux transformer (1 double + 2 single blocks), 16-channel VAE, CLIP + T5 encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from attrface_pipeline.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    _seeded(2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = _vae(16, scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=_clip_text(clip_tok, 32, None),
        tokenizer=clip_tok, text_encoder_2=_t5_encoder(t5_tok, 64), tokenizer_2=t5_tok,
    )
    pipe.save_pretrained(out)


def make_sd2_controlnet(out: Path) -> None:
    """StableDiffusionControlNetPipeline (SD2-style UNet + ControlNet from it) with a CLIP image encoder."""
    from diffusers import (ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from attrface_pipeline.models.farl import CLIP_MEAN, CLIP_STD
    from attrface_pipeline.models.tokenizers import build_clip_tokenizer

    clip_tok = build_clip_tokenizer()
    _seeded(3)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    )
    controlnet = ControlNetModel.from_unet(unet)
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         image_size=224, patch_size=32, projection_dim=32)
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")
    pipe = StableDiffusionControlNetPipeline(
        vae=_vae(4, scaling_factor=0.18215, shift_factor=None, quant_conv=True),
        text_encoder=_clip_text(clip_tok, 32, None),
        tokenizer=clip_tok, unet=unet, controlnet=controlnet, scheduler=scheduler, safety_checker=None,
        feature_extractor=processor, image_encoder=vision, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)


def make_qwen3(out: Path) -> None:
    """Qwen3ForCausalLM (head_dim 32, as vLLM's CPU attention requires) with a ChatML tokenizer."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from attrface_pipeline.models.tokenizers import build_qwen2_tokenizer

    tok = build_qwen2_tokenizer()
    _seeded(4)
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    config = Qwen3Config(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=eos[1], eos_token_id=eos[0], pad_token_id=eos[1], torch_dtype="bfloat16",
    )
    if len(tok) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens, more than the model's vocab {config.vocab_size}")
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[1], do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def make_farl(out: Path) -> None:
    """FaRL-architecture attribute model (ViT + facer head), 40 CelebA outputs."""
    from attrface_pipeline.models.farl import FaRLAttributeModel

    _seeded(5)
    FaRLAttributeModel(image_size=224, patch_size=16, width=64, layers=2, heads=2, num_classes=40).save_pretrained(out)


class _TinyArcFace(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.PReLU(8), torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.PReLU(16),
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(16 * 16, 512),
        )

    def forward(self, x):
        return self.body(x)


class _TinySCRFD(torch.nn.Module):
    """SCRFD output layout: per stride 8/16/32, scores (1, HW*2, 1), boxes (1, HW*2, 4), keypoints (1, HW*2, 10)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, 8), torch.nn.ReLU())
        self.down = torch.nn.ModuleList([torch.nn.Conv2d(8, 8, 3, 2, 1), torch.nn.Conv2d(8, 8, 3, 2, 1)])
        self.heads = torch.nn.ModuleList([torch.nn.Conv2d(8, 2 * (1 + 4 + 10), 1) for _ in range(3)])

    def forward(self, x):
        feats = [self.stem(x)]
        for conv in self.down:
            feats.append(torch.relu(conv(feats[-1])))
        scores, boxes, kps = [], [], []
        for feat, head in zip(feats, self.heads):
            out = head(feat).permute(0, 2, 3, 1)
            scores.append(torch.sigmoid(out[..., :2].reshape(1, -1, 1)))
            boxes.append(torch.relu(out[..., 2:10]).reshape(1, -1, 4))
            kps.append(out[..., 10:].reshape(1, -1, 10))
        return (*scores, *boxes, *kps)


def make_insightface(out: Path) -> None:
    """An insightface-style pack: SCRFD-layout detector ``det_tiny.onnx`` + ArcFace-shaped ``w600k_tiny.onnx``."""
    out.mkdir(parents=True, exist_ok=True)
    _seeded(6)
    torch.onnx.export(
        _TinyArcFace().eval(), torch.zeros(1, 3, 112, 112), str(out / "w600k_tiny.onnx"), input_names=["data"],
        output_names=["fc1"], dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}}, dynamo=False,
    )
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    torch.onnx.export(
        _TinySCRFD().eval(), torch.zeros(1, 3, 640, 640), str(out / "det_tiny.onnx"), input_names=["input"],
        output_names=names, dynamic_axes={"input": {2: "height", 3: "width"}, **{n: {1: "anchors"} for n in names}},
        dynamo=False,
    )


def _he(*shape: int) -> torch.Tensor:
    """He-scaled normal conv weight, so activations keep their scale through a deep random ReLU net."""
    return torch.randn(*shape) * (2.0 / math.prod(shape[1:])) ** 0.5


def make_lpips(out: Path) -> None:
    """LPIPS v0.1 (AlexNet): torchvision's ``alexnet-owt-7be5be79.pth`` (``features.*`` only; the loader ignores the
    classifier) and PerceptualSimilarity's ``alex.pth`` (``lin{i}.model.1.weight``, (1, C, 1, 1), non-negative)."""
    _seeded(7)
    features = {}
    for index, (cin, cout, k) in zip((0, 3, 6, 8, 10), ((3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3),
                                                          (256, 256, 3))):
        features[f"features.{index}.weight"] = _he(cout, cin, k, k)
        features[f"features.{index}.bias"] = 0.1 * torch.randn(cout)
    torch.save(features, out / "alexnet-owt-7be5be79.pth")
    lins = {f"lin{i}.model.1.weight": 0.1 * torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(lins, out / "alex.pth")


def _fid_inception_convs() -> list[tuple[str, int, int, int, int]]:
    """(name, in, out, kh, kw) of the 94 conv+BN units of pytorch-fid's Inception-v3 (torchvision key names)."""
    def block(name, units):
        return [(f"{name}.{branch}", *shape) for branch, *shape in units]

    def a(cin, pool):
        return [("branch1x1", cin, 64, 1, 1), ("branch5x5_1", cin, 48, 1, 1), ("branch5x5_2", 48, 64, 5, 5),
                ("branch3x3dbl_1", cin, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3),
                ("branch3x3dbl_3", 96, 96, 3, 3), ("branch_pool", cin, pool, 1, 1)]

    def c(c7):
        return [("branch1x1", 768, 192, 1, 1), ("branch7x7_1", 768, c7, 1, 1), ("branch7x7_2", c7, c7, 1, 7),
                ("branch7x7_3", c7, 192, 7, 1), ("branch7x7dbl_1", 768, c7, 1, 1), ("branch7x7dbl_2", c7, c7, 7, 1),
                ("branch7x7dbl_3", c7, c7, 1, 7), ("branch7x7dbl_4", c7, c7, 7, 1),
                ("branch7x7dbl_5", c7, 192, 1, 7), ("branch_pool", 768, 192, 1, 1)]

    def e(cin):
        return [("branch1x1", cin, 320, 1, 1), ("branch3x3_1", cin, 384, 1, 1), ("branch3x3_2a", 384, 384, 1, 3),
                ("branch3x3_2b", 384, 384, 3, 1), ("branch3x3dbl_1", cin, 448, 1, 1),
                ("branch3x3dbl_2", 448, 384, 3, 3), ("branch3x3dbl_3a", 384, 384, 1, 3),
                ("branch3x3dbl_3b", 384, 384, 3, 1), ("branch_pool", cin, 192, 1, 1)]

    return [
        ("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3),
        *block("Mixed_5b", a(192, 32)), *block("Mixed_5c", a(256, 64)), *block("Mixed_5d", a(288, 64)),
        *block("Mixed_6a", [("branch3x3", 288, 384, 3, 3), ("branch3x3dbl_1", 288, 64, 1, 1),
                            ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3)]),
        *block("Mixed_6b", c(128)), *block("Mixed_6c", c(160)), *block("Mixed_6d", c(160)),
        *block("Mixed_6e", c(192)),
        *block("Mixed_7a", [("branch3x3_1", 768, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3),
                            ("branch7x7x3_1", 768, 192, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7),
                            ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)]),
        *block("Mixed_7b", e(1280)), *block("Mixed_7c", e(2048)),
    ]


def make_fid_inception(out: Path) -> None:
    """pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``: every conv/BN key of the real file plus the 1008-way
    ``fc``; BN running variances positive."""
    _seeded(8)
    state = {}
    for name, cin, cout, kh, kw in _fid_inception_convs():
        state[f"{name}.conv.weight"] = _he(cout, cin, kh, kw)
        state[f"{name}.bn.weight"] = 1 + 0.1 * torch.randn(cout)
        state[f"{name}.bn.bias"] = 0.1 * torch.randn(cout)
        state[f"{name}.bn.running_mean"] = 0.1 * torch.randn(cout)
        state[f"{name}.bn.running_var"] = 0.5 + torch.rand(cout)
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = 0.01 * torch.randn(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, out / "pt_inception-2015-12-05-6726825d.pth")


GENERATORS: dict[str, Callable[[Path], None]] = {
    "sd3": make_sd3,
    "flux": make_flux,
    "sd2-controlnet": make_sd2_controlnet,
    "qwen3": make_qwen3,
    "farl": make_farl,
    "insightface": make_insightface,
    "lpips": make_lpips,
    "fid-inception": make_fid_inception,
}


def generate(name: str, out: str | Path) -> Path:
    """Write tiny model ``name`` into ``out`` (created) and mark it complete."""
    out = Path(out)
    try:
        generator = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; choose from {sorted(GENERATORS)}") from None
    out.mkdir(parents=True, exist_ok=True)
    generator(out)
    marker = {"name": name, "seed": SEED, "version": ZOO_VERSION, "torch": torch.__version__}
    (out / DONE_MARKER).write_text(json.dumps(marker, indent=2))
    return out
