"""Decoupled cross-attention on the tiny SD2 UNet and its ControlNet: equivalence with the stock networks when the
implicit branch is zero, the documented equations layer by layer, installation on exactly the cross-attention
layers, and save/load of the branches."""

import copy

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from training.roboface.attention import (DecoupledCrossAttnProcessor, cross_attention_layers, install_dca,
                                         load_dca, read_dca_metadata, save_dca, set_dca_mode)

N = 30


@pytest.fixture(scope="module")
def unet(sd2_base):
    return UNet2DConditionModel.from_pretrained(sd2_base, subfolder="unet").eval()


@pytest.fixture(scope="module")
def controlnet(sd2_base):
    return ControlNetModel.from_pretrained(sd2_base, subfolder="controlnet").eval()


@pytest.fixture(scope="module")
def inputs(unet):
    g = torch.Generator().manual_seed(0)
    dim = unet.config.cross_attention_dim
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([10, 700]),
            "text": torch.randn(2, 77, dim, generator=g), "implicit": torch.randn(2, N, dim, generator=g),
            "control": torch.rand(2, 3, 64, 64, generator=g)}


def _randomise(branches, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in branches.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _layer_outputs(model, run):
    """{layer name: output} of every cross-attention layer during ``run()``."""
    outs, hooks = {}, []
    for name, attn in cross_attention_layers(model).items():
        hooks.append(attn.register_forward_hook(lambda m, a, o, name=name: outs.__setitem__(name, o.detach())))
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in hooks:
            h.remove()
    return outs, result


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_zero_branch_equals_stock_unet_layer_by_layer(unet, inputs, mode):
    dca_unet = copy.deepcopy(unet)
    install_dca(dca_unet, N, mode)
    x = inputs
    stock_layers, stock = _layer_outputs(unet, lambda: unet(x["sample"], x["t"], x["text"]).sample)
    context = torch.cat([x["text"], x["implicit"]], dim=1)
    dca_layers, out = _layer_outputs(dca_unet, lambda: dca_unet(x["sample"], x["t"], context).sample)
    assert set(stock_layers) == set(dca_layers) and len(stock_layers) == 4
    for name in stock_layers:
        torch.testing.assert_close(dca_layers[name], stock_layers[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(out, stock, rtol=0, atol=0)


def test_zero_branch_equals_stock_controlnet(controlnet, inputs):
    dca_net = copy.deepcopy(controlnet)
    install_dca(dca_net, N, "sequential")
    x = inputs
    with torch.no_grad():
        down, mid = controlnet(x["sample"], x["t"], x["text"], controlnet_cond=x["control"], return_dict=False)
        context = torch.cat([x["text"], x["implicit"]], dim=1)
        down2, mid2 = dca_net(x["sample"], x["t"], context, controlnet_cond=x["control"], return_dict=False)
    for a, b in zip([*down, mid], [*down2, mid2]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_text_mask_is_honoured(unet, inputs):
    """A mask over [text ; implicit] masks the text part as the stock UNet masks the text alone."""
    dca_unet = copy.deepcopy(unet)
    install_dca(dca_unet, N, "sequential")
    x = inputs
    text_mask = torch.ones(2, 77)
    text_mask[:, 20:] = 0
    with torch.no_grad():
        stock = unet(x["sample"], x["t"], x["text"], encoder_attention_mask=text_mask).sample
        unmasked = unet(x["sample"], x["t"], x["text"]).sample
        full_mask = torch.cat([text_mask, torch.ones(2, N)], dim=1)
        out = dca_unet(x["sample"], x["t"], torch.cat([x["text"], x["implicit"]], 1),
                       encoder_attention_mask=full_mask).sample
    assert not torch.allclose(stock, unmasked, atol=1e-4)  # the mask matters
    torch.testing.assert_close(out, stock, rtol=0, atol=0)


def _manual_attention(attn, query_input, context, to_k, to_v):
    b, h = query_input.shape[0], attn.heads
    q, k, v = attn.to_q(query_input), to_k(context), to_v(context)
    split = lambda t: t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // h) ** 0.5).softmax(-1)
    return (weights @ split(v)).transpose(1, 2).reshape(b, -1, v.shape[-1])


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_layer_computes_the_documented_equation(unet, mode):
    """For one layer, by hand: a_text = to_out(Attn(q(n), text)); u = n + a_text (sequential) or n (parallel);
    output = a_text + to_out_impl(Attn(q(u), implicit)) -- the block's residual then gives h2 = h1 + CA_impl."""
    attn = copy.deepcopy(next(iter(cross_attention_layers(unet).values())))
    branches = install_dca(_Holder(attn), N, mode)
    _randomise(branches)
    branch = next(iter(branches.values()))
    g = torch.Generator().manual_seed(3)
    n = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    text = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    implicit = torch.randn(2, N, attn.to_k.in_features, generator=g)
    with torch.no_grad():
        out = attn(n, encoder_hidden_states=torch.cat([text, implicit], 1))
        a_text = attn.to_out[0](_manual_attention(attn, n, text, attn.to_k, attn.to_v))
        u = n + a_text if mode == "sequential" else n
        a_impl = branch.to_out_impl(_manual_attention(attn, u, implicit, branch.to_k_impl, branch.to_v_impl))
        stock_text = AttnProcessor2_0()(attn, n, encoder_hidden_states=text)
    torch.testing.assert_close(a_text, stock_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, a_text + a_impl, atol=1e-5, rtol=1e-5)
    assert a_impl.abs().mean() > 1e-2  # the implicit branch is really in play


class _Holder(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn


def test_sequential_and_parallel_differ_when_the_branch_is_live(unet, inputs):
    dca_unet = copy.deepcopy(unet)
    branches = install_dca(dca_unet, N, "sequential")
    _randomise(branches)
    x = inputs
    context = torch.cat([x["text"], x["implicit"]], 1)
    with torch.no_grad():
        stock = unet(x["sample"], x["t"], x["text"]).sample
        seq = dca_unet(x["sample"], x["t"], context).sample
        set_dca_mode(dca_unet, "parallel")
        par = dca_unet(x["sample"], x["t"], context).sample
        stock_tokens = unet(x["sample"], x["t"], x["implicit"]).sample
        tokens_alone = dca_unet(x["sample"], x["t"], x["implicit"]).sample
    assert (seq - par).abs().max() > 1e-3
    assert (seq - stock).abs().max() > 1e-3 and (par - stock).abs().max() > 1e-3
    # stage I's form: the N tokens alone are attended like text (stock K/V), the live branch unused
    torch.testing.assert_close(tokens_alone, stock_tokens, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["unet", "controlnet"])
def test_installed_on_every_cross_attention_layer_and_no_self_attention(request, which):
    model = copy.deepcopy(request.getfixturevalue(which))
    stock_keys = set(model.state_dict())
    branches = install_dca(model, N, "sequential")
    attentions = {name: m for name, m in model.named_modules() if isinstance(m, Attention)}
    cross = {name for name, m in attentions.items() if m.is_cross_attention}
    assert cross and cross == {name for name in attentions if name.endswith("attn2")}
    for name, m in attentions.items():
        is_dca = isinstance(m.processor, DecoupledCrossAttnProcessor)
        assert is_dca == (name in cross), name
        if not is_dca:
            assert isinstance(m.processor, AttnProcessor2_0), name
    assert len(branches) == len(cross)
    # the branches start as copies of the text K/V with a zero output projection, and train
    for name in cross:
        attn, branch = attentions[name], branches[name.replace(".", "__")]
        assert torch.equal(branch.to_k_impl.weight, attn.to_k.weight)
        assert torch.equal(branch.to_v_impl.weight, attn.to_v.weight)
        assert not branch.to_out_impl.weight.any() and not branch.to_out_impl.bias.any()
        assert branch.to_k_impl.weight.data_ptr() != attn.to_k.weight.data_ptr()
    assert all(p.requires_grad for p in branches.parameters())
    # the network's own state dict stays the stock one: its save_pretrained is a plain diffusers checkpoint
    assert set(model.state_dict()) == stock_keys
    with pytest.raises(ValueError, match="already has"):
        install_dca(model, N)


def test_too_few_tokens_is_an_error(unet, inputs):
    dca_unet = copy.deepcopy(unet)
    install_dca(dca_unet, N, "sequential")
    with pytest.raises(ValueError, match="implicit tokens"):
        dca_unet(inputs["sample"], inputs["t"], inputs["implicit"][:, 1:])


def test_dca_weights_round_trip(unet, tmp_path):
    model = copy.deepcopy(unet)
    branches = install_dca(model, N, "parallel")
    _randomise(branches, seed=5)
    path = save_dca(tmp_path / "dca.safetensors", branches, num_tokens=N, mode="parallel")
    fresh = install_dca(copy.deepcopy(unet), N, "parallel")
    meta = load_dca(path, fresh)
    assert meta == {"num_tokens": N, "mode": "parallel"} == read_dca_metadata(path)
    for (ka, a), (kb, b) in zip(branches.state_dict().items(), fresh.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    with pytest.raises(RuntimeError):  # strict: a branch set of another network does not load
        load_dca(path, install_dca(copy.deepcopy(unet).down_blocks[0], N))


def test_ablations_order_and_text_only(unet, inputs):
    """RoboFace Tab. 6 / Tab. 5: implicit-first is the stock network at a zero branch and another network when it
    is live; with the implicit branch off the layer is the stock text cross-attention whatever the tokens."""
    x = inputs
    context = torch.cat([x["text"], x["implicit"]], 1)
    with torch.no_grad():
        stock = unet(x["sample"], x["t"], x["text"]).sample
    first = copy.deepcopy(unet)
    branches = install_dca(first, N, "sequential", order="implicit_first")
    with torch.no_grad():
        torch.testing.assert_close(first(x["sample"], x["t"], context).sample, stock, rtol=0, atol=0)
    _randomise(branches)
    text_first = copy.deepcopy(unet)
    text_branches = install_dca(text_first, N, "sequential")
    text_branches.load_state_dict(branches.state_dict())
    off = copy.deepcopy(unet)
    off_branches = install_dca(off, N, "sequential", use_implicit=False)
    off_branches.load_state_dict(branches.state_dict())
    with torch.no_grad():
        a = first(x["sample"], x["t"], context).sample
        b = text_first(x["sample"], x["t"], context).sample
        c = off(x["sample"], x["t"], context).sample
    assert (a - b).abs().max() > 1e-3 and (a - stock).abs().max() > 1e-3
    torch.testing.assert_close(c, stock, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown DCA order"):
        install_dca(copy.deepcopy(unet), N, "sequential", order="sideways")
