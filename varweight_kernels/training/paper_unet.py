"""The U-Net of the paper's public code (Sun & Shi 2026): ``PaperUNet(in_channels, image_size)``.

Built from the layer-by-layer facts in ``shared/PAPER_UNET.md``. Its ``state_dict()`` has the
paper checkpoint's names and shapes, so a checkpoint of the paper's code loads with
``load_state_dict(strict=True)``; 50,020,099 trainable parameters for 3 input channels at the
default ``base_channels=128``. It differs from :class:`~.ddpm_unet.UNet` (the DDPM/ADM-like layout):
one skip per level, no attention in the middle, no normalisation before the output conv, a time
MLP without a final activation, GroupNorm(32) with eps 1e-5, and default PyTorch initialisation
everywhere (nothing zero-initialised, so the output is not 0 at init).

Noise conditioning: ``forward(x, c_noise)`` like every network of the trainer. The paper's net
takes raw sigma and computes ``c = ln(sigma) / 4``; EDM's ``c_noise`` is exactly that value, so
it is used as ``c`` directly (``forward_from_sigma`` takes raw sigma instead). The embedding is
``[sin(2 pi c f), cos(2 pi c f)]`` with a fixed buffer ``f ~ N(0, 16^2)`` drawn from the global
torch RNG at construction, like every other initial value (the trainer seeds that RNG).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ddpm_unet import Downsample, Upsample, checked_inputs

__all__ = ["PaperUNet", "PaperResBlock", "PaperAttnBlock", "NORM_GROUPS"]

NORM_GROUPS = 32
"""Every GroupNorm of the paper's net has 32 groups, so all channel counts must divide by 32."""


class SigmaFourierEmbedding(nn.Module):
    """``[sin(2 pi c f), cos(2 pi c f)]`` (sin first) with fixed frequencies ``f ~ N(0, 16^2)``."""

    def __init__(self, num_freqs: int) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_freqs) * 16.0)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        phase = 2 * math.pi * c.float()[:, None] * self.freqs.float()[None, :]
        return torch.cat([phase.sin(), phase.cos()], dim=1)


class TimeMLP(nn.Module):
    """Linear -> SiLU -> Linear, no activation after: each block projects the result itself."""

    def __init__(self, in_features: int, time_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb)


class PaperResBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv3x3, + Linear(time), GroupNorm -> SiLU -> Conv3x3, + skip
    (identity, or a bias-free Conv1x1 where the channel count changes)."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int) -> None:
        super().__init__()
        self.conv_1 = nn.Sequential(nn.GroupNorm(NORM_GROUPS, in_ch), nn.SiLU(),
                                    nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.norm_2 = nn.GroupNorm(NORM_GROUPS, out_ch)
        self.conv_2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.skip = (nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False)) if in_ch != out_ch
                     else nn.Identity())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv_1(x) + self.time_proj(t)[:, :, None, None]
        h = self.conv_2(F.silu(self.norm_2(h)))
        return h + self.skip(x)


class PaperAttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, ``softmax(q^T k / sqrt(C))``, with
    separate Conv1x1 q, k, v and output projection, added to the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(NORM_GROUPS, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, HW, C) per token; the default scale of scaled_dot_product_attention is 1/sqrt(C).
        q, k, v = (conv(h).reshape(B, C, H * W).transpose(1, 2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(out)


class PaperUNet(nn.Module):
    """``PaperUNet(in_channels, image_size, base_channels=128)``; ``forward(x, c_noise)`` with
    ``x`` (B, in_channels, H, W) and ``c_noise = ln(sigma)/4`` of shape (B,) (or a scalar);
    returns a tensor shaped like ``x``.

    Channels C, 2C, 4C at the three levels (the last two with attention), three stride-2
    downsamples, so ``image_size`` must be divisible by 8 (8x8 digits reach 1x1 in the middle).
    ``base_channels`` other than 128 (for small tests) must be a multiple of 32 for GroupNorm(32);
    the embedding then has ``base_channels`` frequencies and the time MLP ``4 * base_channels``
    features, as 128 and 512 do in the paper.
    """

    def __init__(self, in_channels: int, image_size: int, base_channels: int = 128) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"PaperUNet needs in_channels >= 1, got {in_channels}")
        if base_channels < NORM_GROUPS or base_channels % NORM_GROUPS:
            raise ValueError(f"PaperUNet needs base_channels to be a positive multiple of {NORM_GROUPS} "
                             f"(GroupNorm({NORM_GROUPS}) on every layer), got {base_channels}")
        if image_size < 8 or image_size % 8:
            raise ValueError(f"PaperUNet downsamples three times: image_size must be a positive multiple "
                             f"of 8, got {image_size}")
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        c1, c2, c3 = base_channels, 2 * base_channels, 4 * base_channels
        time_dim = 4 * base_channels

        # Registration order follows the paper's state dict, which fixes the order in which
        # initial values are drawn from the RNG.
        self.fourier = SigmaFourierEmbedding(base_channels)
        self.time_mlp = TimeMLP(2 * base_channels, time_dim)
        self.init_conv = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.res_1_1 = PaperResBlock(c1, c1, time_dim)
        self.res_1_2 = PaperResBlock(c1, c1, time_dim)
        self.down_1 = Downsample(c1)
        self.res_2_1 = PaperResBlock(c1, c2, time_dim)
        self.res_2_2 = PaperResBlock(c2, c2, time_dim)
        self.attn_2 = PaperAttnBlock(c2)
        self.down_2 = Downsample(c2)
        self.res_3_1 = PaperResBlock(c2, c3, time_dim)
        self.res_3_2 = PaperResBlock(c3, c3, time_dim)
        self.attn_3 = PaperAttnBlock(c3)
        self.down_3 = Downsample(c3)
        self.mid_1 = PaperResBlock(c3, c3, time_dim)
        self.mid_2 = PaperResBlock(c3, c3, time_dim)
        self.up_3 = Upsample(c3)
        self.res_4_1 = PaperResBlock(c3 + c3, c3, time_dim)
        self.res_4_2 = PaperResBlock(c3, c3, time_dim)
        self.up_2 = Upsample(c3)
        self.res_5_1 = PaperResBlock(c3 + c2, c2, time_dim)
        self.res_5_2 = PaperResBlock(c2, c2, time_dim)
        self.up_1 = Upsample(c2)
        self.res_6_1 = PaperResBlock(c2 + c1, c1, time_dim)
        self.res_6_2 = PaperResBlock(c1, c1, time_dim)
        self.final_conv = nn.Conv2d(c1, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        c_noise = checked_inputs(x, c_noise, self.in_channels)
        t = self.time_mlp(self.fourier(c_noise).to(x.dtype))

        h = self.init_conv(x)
        h1 = self.res_1_2(self.res_1_1(h, t), t)
        h2 = self.attn_2(self.res_2_2(self.res_2_1(self.down_1(h1), t), t))
        h3 = self.attn_3(self.res_3_2(self.res_3_1(self.down_2(h2), t), t))
        h = self.mid_2(self.mid_1(self.down_3(h3), t), t)
        h = self.res_4_2(self.res_4_1(torch.cat([self.up_3(h), h3], dim=1), t), t)
        h = self.res_5_2(self.res_5_1(torch.cat([self.up_2(h), h2], dim=1), t), t)
        h = self.res_6_2(self.res_6_1(torch.cat([self.up_1(h), h1], dim=1), t), t)
        return self.final_conv(h)

    def forward_from_sigma(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The paper's own calling convention, raw sigma (B,): ``forward(x, ln(sigma) / 4)``."""
        return self(x, torch.as_tensor(sigma, device=x.device).float().log() / 4.0)
