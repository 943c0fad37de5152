"""Tests of the paper's U-Net (``PaperUNet``, ``build_unet("paper")``) against the facts of
shared/PAPER_UNET.md: the expected state dict and the functional reference below are written
from those facts, not read off the module."""
import math

import pytest
import torch
import torch.nn.functional as F

from varweight_kernels.training.formulations import make_formulation
from varweight_kernels.training.paper_unet import PaperAttnBlock, PaperResBlock, PaperUNet
from varweight_kernels.training.unet import UNet, build_unet

PAPER_PARAMETERS = 50_020_099
EPS = 1e-5  # GroupNorm eps of every norm in the paper's net


# ---------------------------------------------------------------------------- expected state dict
def _norm_entries(name, ch):
    return [(f"{name}.weight", (ch,)), (f"{name}.bias", (ch,))]


def _conv_entries(name, in_ch, out_ch, k, bias=True):
    return [(f"{name}.weight", (out_ch, in_ch, k, k))] + ([(f"{name}.bias", (out_ch,))] if bias else [])


def _res_entries(name, in_ch, out_ch, time_dim):
    entries = (_norm_entries(f"{name}.conv_1.0", in_ch) + _conv_entries(f"{name}.conv_1.2", in_ch, out_ch, 3)
               + _norm_entries(f"{name}.norm_2", out_ch) + _conv_entries(f"{name}.conv_2", out_ch, out_ch, 3)
               + [(f"{name}.time_proj.weight", (out_ch, time_dim)), (f"{name}.time_proj.bias", (out_ch,))])
    if in_ch != out_ch:
        entries += _conv_entries(f"{name}.skip.0", in_ch, out_ch, 1, bias=False)
    return entries


def _attn_entries(name, ch):
    return _norm_entries(f"{name}.norm", ch) + [e for part in ("q", "k", "v", "proj")
                                                 for e in _conv_entries(f"{name}.{part}", ch, ch, 1)]


def expected_state_dict(in_ch=3, C=128, time_dim=512, n_freqs=128):
    """Name -> shape of the paper checkpoint, in the order PAPER_UNET.md lists the modules."""
    e = [("fourier.freqs", (n_freqs,)),
         ("time_mlp.net.0.weight", (time_dim, 2 * n_freqs)), ("time_mlp.net.0.bias", (time_dim,)),
         ("time_mlp.net.2.weight", (time_dim, time_dim)), ("time_mlp.net.2.bias", (time_dim,))]
    e += _conv_entries("init_conv", in_ch, C, 3)
    e += _res_entries("res_1_1", C, C, time_dim) + _res_entries("res_1_2", C, C, time_dim)
    e += _conv_entries("down_1.conv", C, C, 3)
    e += _res_entries("res_2_1", C, 2 * C, time_dim) + _res_entries("res_2_2", 2 * C, 2 * C, time_dim)
    e += _attn_entries("attn_2", 2 * C) + _conv_entries("down_2.conv", 2 * C, 2 * C, 3)
    e += _res_entries("res_3_1", 2 * C, 4 * C, time_dim) + _res_entries("res_3_2", 4 * C, 4 * C, time_dim)
    e += _attn_entries("attn_3", 4 * C) + _conv_entries("down_3.conv", 4 * C, 4 * C, 3)
    e += _res_entries("mid_1", 4 * C, 4 * C, time_dim) + _res_entries("mid_2", 4 * C, 4 * C, time_dim)
    e += _conv_entries("up_3.conv", 4 * C, 4 * C, 3)
    e += _res_entries("res_4_1", 8 * C, 4 * C, time_dim) + _res_entries("res_4_2", 4 * C, 4 * C, time_dim)
    e += _conv_entries("up_2.conv", 4 * C, 4 * C, 3)
    e += _res_entries("res_5_1", 6 * C, 2 * C, time_dim) + _res_entries("res_5_2", 2 * C, 2 * C, time_dim)
    e += _conv_entries("up_1.conv", 2 * C, 2 * C, 3)
    e += _res_entries("res_6_1", 3 * C, C, time_dim) + _res_entries("res_6_2", C, C, time_dim)
    e += _conv_entries("final_conv", C, in_ch, 3)
    return e


# ---------------------------------------------------------------------------- functional reference
def ref_res(sd, name, x, t):
    """Residual block from functional ops and the block's weights (``sd`` keyed by full name)."""
    h = F.conv2d(F.silu(F.group_norm(x, 32, sd[f"{name}.conv_1.0.weight"], sd[f"{name}.conv_1.0.bias"], EPS)),
                 sd[f"{name}.conv_1.2.weight"], sd[f"{name}.conv_1.2.bias"], padding=1)
    h = h + (t @ sd[f"{name}.time_proj.weight"].T + sd[f"{name}.time_proj.bias"])[:, :, None, None]
    h = F.conv2d(F.silu(F.group_norm(h, 32, sd[f"{name}.norm_2.weight"], sd[f"{name}.norm_2.bias"], EPS)),
                 sd[f"{name}.conv_2.weight"], sd[f"{name}.conv_2.bias"], padding=1)
    skip = F.conv2d(x, sd[f"{name}.skip.0.weight"]) if f"{name}.skip.0.weight" in sd else x
    return h + skip


def ref_attn(sd, name, x):
    B, C, H, W = x.shape
    h = F.group_norm(x, 32, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"], EPS)
    q, k, v = (F.conv2d(h, sd[f"{name}.{p}.weight"], sd[f"{name}.{p}.bias"]).reshape(B, C, H * W) for p in "qkv")
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)  # over keys j
    out = torch.einsum("bij,bcj->bci", weights, v).reshape(B, C, H, W)
    return x + F.conv2d(out, sd[f"{name}.proj.weight"], sd[f"{name}.proj.bias"])


def ref_forward(sd, x, sigma):
    """The whole paper net from its facts: the net's own input is raw sigma, ``c = log(sigma)/4``."""
    c = sigma.log() / 4
    phase = 2 * math.pi * c[:, None] * sd["fourier.freqs"][None, :]
    emb = torch.cat([phase.sin(), phase.cos()], dim=1)
    t = F.linear(F.silu(F.linear(emb, sd["time_mlp.net.0.weight"], sd["time_mlp.net.0.bias"])),
                 sd["time_mlp.net.2.weight"], sd["time_mlp.net.2.bias"])

    def conv3(name, h, stride=1):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=1)

    def up(name, h):
        return conv3(name, F.interpolate(h, scale_factor=2, mode="nearest"))

    h = conv3("init_conv", x)
    h1 = ref_res(sd, "res_1_2", ref_res(sd, "res_1_1", h, t), t)
    h = conv3("down_1.conv", h1, stride=2)
    h2 = ref_attn(sd, "attn_2", ref_res(sd, "res_2_2", ref_res(sd, "res_2_1", h, t), t))
    h = conv3("down_2.conv", h2, stride=2)
    h3 = ref_attn(sd, "attn_3", ref_res(sd, "res_3_2", ref_res(sd, "res_3_1", h, t), t))
    h = conv3("down_3.conv", h3, stride=2)
    h = ref_res(sd, "mid_2", ref_res(sd, "mid_1", h, t), t)
    for level, skip in ((4, h3), (5, h2), (6, h1)):
        h = torch.cat([up(f"up_{7 - level}.conv", h), skip], dim=1)
        h = ref_res(sd, f"res_{level}_2", ref_res(sd, f"res_{level}_1", h, t), t)
    return conv3("final_conv", h)


def small_net(seed=0, in_channels=1, image_size=8, base_channels=32):
    torch.manual_seed(seed)
    return build_unet("paper", in_channels, image_size, base_channels=base_channels)


@pytest.fixture(scope="module")
def paper_net():
    torch.manual_seed(0)
    return build_unet("paper", 3, 32)


# ---------------------------------------------------------------------------- the full-size net
def test_parameter_count_and_state_dict_names_and_shapes(paper_net):
    assert sum(p.numel() for p in paper_net.parameters() if p.requires_grad) == PAPER_PARAMETERS
    got = [(name, tuple(t.shape)) for name, t in paper_net.state_dict().items()]
    expected = expected_state_dict()
    assert len(expected) == 186
    assert got == expected
    assert [name for name, _ in paper_net.named_buffers()] == ["fourier.freqs"]


def test_strict_load_of_a_paper_checkpoint_and_forward_shape(paper_net):
    g = torch.Generator().manual_seed(1)
    checkpoint = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in expected_state_dict()}
    net = PaperUNet(3, 32)
    net.load_state_dict(checkpoint, strict=True)
    assert all(torch.equal(net.state_dict()[name], value) for name, value in checkpoint.items())
    x = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = net(x, torch.tensor([0.3]))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_freqs_are_the_first_draw_of_the_seeded_torch_rng(paper_net):
    torch.manual_seed(0)
    assert torch.equal(paper_net.fourier.freqs, torch.randn(128) * 16)


# ---------------------------------------------------------------------------- blocks vs functional ops
def test_residual_block_matches_functional_ops():
    torch.manual_seed(2)
    block = PaperResBlock(32, 64, time_dim=48)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 32, 6, 5, generator=g), torch.randn(2, 48, generator=g)
    sd = {f"res.{k}": v for k, v in block.state_dict().items()}
    assert "res.skip.0.weight" in sd and "res.skip.0.bias" not in sd
    with torch.no_grad():
        torch.testing.assert_close(block(x, t), ref_res(sd, "res", x, t), rtol=1e-5, atol=1e-5)


def test_attention_block_matches_functional_ops():
    torch.manual_seed(4)
    block = PaperAttnBlock(64)
    x = torch.randn(2, 64, 4, 3, generator=torch.Generator().manual_seed(5))
    sd = {f"attn.{k}": v for k, v in block.state_dict().items()}
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, ref_attn(sd, "attn", x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)  # the attention branch is not zero-initialised


def test_whole_forward_matches_functional_reference_with_raw_sigma():
    net = small_net(seed=6, in_channels=3, image_size=16)
    g = torch.Generator().manual_seed(7)
    x, sigma = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0.002, 0.7, 80.0])
    with torch.no_grad():
        expected = ref_forward(net.state_dict(), x, sigma)
        torch.testing.assert_close(net.forward_from_sigma(x, sigma), expected, rtol=1e-4, atol=1e-5)
        # The trainer's EDM conditioning input is ln(sigma)/4, the paper net's own c.
        torch.testing.assert_close(net(x, make_formulation("edm").c_noise(sigma)), expected, rtol=1e-4, atol=1e-5)
        # Each sample depends only on its own sigma.
        torch.testing.assert_close(net.forward_from_sigma(x[1:2], sigma[1:2]), expected[1:2], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- init, training, builder
def test_init_is_deterministic_per_seed_and_output_not_zero():
    a, b, c = small_net(seed=8), small_net(seed=8), small_net(seed=9)
    for (name_a, ta), (name_b, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert name_a == name_b and torch.equal(ta, tb)
    assert not torch.equal(a.fourier.freqs, c.fourier.freqs)
    assert not torch.equal(a.final_conv.weight, c.final_conv.weight)
    with torch.no_grad():
        assert a(torch.randn(2, 1, 8, 8), torch.zeros(2)).abs().min() > 0  # no zero-initialised output


def test_forward_backward_on_8x8_digits_reaches_every_parameter():
    net = small_net(seed=10)
    assert sum(p.numel() for p in net.parameters()) < 4_000_000
    g = torch.Generator().manual_seed(11)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    edm = make_formulation("edm")
    sigma = edm.sample_levels(4, g)
    loss = edm.loss(net, x0, sigma, torch.randn(x0.shape, generator=g)).loss.mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert not net.fourier.freqs.requires_grad


def test_build_unet_ddpm_is_todays_unet():
    kw = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
              embedding="positional")
    torch.manual_seed(12)
    built = build_unet("ddpm", 1, 8, **kw)
    torch.manual_seed(12)
    direct = UNet(1, 8, **kw)
    assert type(built) is UNet and built.embedding_kind == "positional"
    assert list(built.state_dict()) == list(direct.state_dict())
    assert all(torch.equal(t, direct.state_dict()[name]) for name, t in built.state_dict().items())


@pytest.mark.parametrize("arch,kw,message", [
    ("adm", {}, "unknown U-Net arch"),
    ("paper", {"embedding": "fourier"}, "bad arguments for arch 'paper'"),
    ("ddpm", {"base_chanels": 16}, "bad arguments for arch 'ddpm'"),
    ("paper", {"base_channels": 48}, "multiple of 32"),
    ("paper", {"base_channels": 16}, "multiple of 32"),
])
def test_build_unet_rejects_bad_arch_and_arguments(arch, kw, message):
    with pytest.raises(ValueError, match=message):
        build_unet(arch, 1, 8, **kw)


@pytest.mark.parametrize("in_channels,image_size", [(1, 12), (1, 4), (0, 8)])
def test_paper_net_rejects_bad_shapes(in_channels, image_size):
    with pytest.raises(ValueError):
        build_unet("paper", in_channels, image_size, base_channels=32)
