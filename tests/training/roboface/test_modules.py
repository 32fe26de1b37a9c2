"""Mapper and Remover: shapes, the Remover's identity start, sizes that follow the UNet's dims, and exact
save_pretrained -> from_pretrained round trips."""

import pytest
import torch

from training.roboface.modules import Mapper, Remover


def test_mapper_shapes_and_round_trip(tmp_path):
    torch.manual_seed(0)
    mapper = Mapper(image_dim=48, cross_attention_dim=32, num_tokens=30, depth=2).eval()
    features = torch.randn(3, 50, 48)
    tokens = mapper(features)
    assert tokens.shape == (3, 30, 32)
    # distinct images give distinct tokens, and the tokens are normalised like text-encoder states
    assert not torch.allclose(tokens[0], tokens[1])
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(3, 30), atol=1e-5, rtol=0)
    mapper.save_pretrained(tmp_path / "mapper")
    loaded = Mapper.from_pretrained(tmp_path / "mapper").eval()
    assert loaded.config.num_tokens == 30 and loaded.config.image_dim == 48
    torch.testing.assert_close(loaded(features), tokens, rtol=0, atol=0)


def test_remover_starts_as_identity_and_round_trips(tmp_path):
    torch.manual_seed(0)
    remover = Remover(dim=32, num_tokens=30, depth=2).eval()
    tokens = torch.randn(2, 30, 32)
    torch.testing.assert_close(remover(tokens), tokens, rtol=0, atol=0)
    with torch.no_grad():
        remover.proj_out.weight.normal_(std=0.1)
    out = remover(tokens)
    assert out.shape == tokens.shape and not torch.allclose(out, tokens)
    remover.save_pretrained(tmp_path / "remover")
    loaded = Remover.from_pretrained(tmp_path / "remover").eval()
    torch.testing.assert_close(loaded(tokens), out, rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # positions are per token: N is part of the architecture
        remover(torch.randn(2, 12, 32))


def test_default_sizes_follow_the_real_dims():
    """SD2.1: cross-attention dim 1024; ViT-H/14 image encoder: hidden 1280 -> width 1024, 16 heads of 64."""
    with torch.device("meta"):
        mapper = Mapper(image_dim=1280, cross_attention_dim=1024)
        remover = Remover(dim=1024)
    assert mapper.layers[0].attn.num_heads == 16 and mapper.proj_out.out_features == 1024
    assert remover.blocks.layers[0].self_attn.num_heads == 16
    millions = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (mapper, remover)]
    assert 20 < millions[0] < 40 and 40 < millions[1] < 60, millions
    with pytest.raises(ValueError, match="divisible"):
        Mapper(image_dim=8, cross_attention_dim=100, head_dim=32)  # 3 heads do not divide 100
