"""A compact DDPM/EDM-style U-Net: ``UNet(...)(x, c_noise)``.

GroupNorm + SiLU residual blocks with a noise-embedding injection, self-attention at chosen
resolutions, strided-conv downsampling, nearest+conv upsampling, skip connections, and a
zero-initialised output convolution (the network outputs 0 at init, so EDM's preconditioned
denoiser starts at ``c_skip * x``).

Noise embedding of ``c_noise`` (shape (B,), float):
- ``"fourier"``: random-frequency Fourier features (frequencies ~ N(0, 16^2), a fixed buffer),
  suited to EDM's ``c_noise = ln(sigma)/4`` (order-1 values).
- ``"positional"``: the transformer sinusoidal embedding (DDPM), suited to integer timesteps
  ``c_noise = t`` in ``[0, T)``.

Parameter init draws only from the global torch RNG (the trainer seeds it from the "init"
stream), so construction is deterministic given ``torch.manual_seed``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "checked_inputs", "num_groups", "FourierEmbedding", "PositionalEmbedding"]


def num_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """GroupNorm group count: at most 32 groups, at least ``min_group_size`` channels per group
    where possible, and always a divisor of ``channels``."""
    g = max(1, min(max_groups, channels // min_group_size))
    while channels % g:
        g -= 1
    return g


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def checked_inputs(x: torch.Tensor, c_noise, in_channels: int) -> torch.Tensor:
    """Validate ``x`` as (B, in_channels, H, W) and return ``c_noise`` as a (B,) tensor on
    ``x``'s device (a scalar is broadcast to the batch), so every network accepts the same input."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must be (B, {in_channels}, H, W), got {tuple(x.shape)}")
    c_noise = torch.as_tensor(c_noise, device=x.device)
    if c_noise.dim() == 0:
        c_noise = c_noise.expand(x.shape[0])
    c_noise = c_noise.reshape(-1)
    if c_noise.shape[0] != x.shape[0]:
        raise ValueError(f"c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}")
    return c_noise


class FourierEmbedding(nn.Module):
    """``[cos(2 pi f c), sin(2 pi f c)]`` with fixed random frequencies ``f ~ N(0, scale^2)``."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"FourierEmbedding needs an even channel count, got {num_channels}")
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        x = c.float()[:, None] * (2 * math.pi * self.freqs.float()[None, :])
        return torch.cat([x.cos(), x.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding ``[cos(c w_k), sin(c w_k)]``, ``w_k = max_positions^(-k/half)``."""

    def __init__(self, num_channels: int, max_positions: int = 10000) -> None:
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"PositionalEmbedding needs an even channel count, got {num_channels}")
        half = num_channels // 2
        freqs = torch.exp(-math.log(max_positions) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        x = c.float()[:, None] * self.freqs[None, :]
        return torch.cat([x.cos(), x.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int, head_channels: int = 64) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        while channels % self.heads:
            self.heads -= 1
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        # (B, heads, HW, d)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """``UNet(in_channels, image_size, ...)``; ``forward(x, c_noise)`` with ``x`` (B, C, H, W)
    and ``c_noise`` (B,) float; returns a tensor shaped like ``x``.

    ``image_size`` must be divisible by ``2 ** (len(channel_mults) - 1)``; attention runs at
    every feature resolution listed in ``attn_resolutions`` (plus the middle block).
    """

    def __init__(self, in_channels: int, image_size: int, base_channels: int = 128,
                 channel_mults: Sequence[int] = (1, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16, 8), dropout: float = 0.0,
                 embedding: str = "fourier") -> None:
        super().__init__()
        channel_mults = tuple(int(m) for m in channel_mults)
        if in_channels < 1 or base_channels < 2 or base_channels % 2 or not channel_mults or num_res_blocks < 1:
            raise ValueError("UNet needs in_channels >= 1, an even base_channels >= 2, non-empty channel_mults "
                             f"and num_res_blocks >= 1; got in_channels={in_channels}, base_channels={base_channels}, "
                             f"channel_mults={channel_mults}, num_res_blocks={num_res_blocks}")
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(f"image_size={image_size} must be divisible by {factor} for channel_mults={channel_mults}")
        if embedding not in ("fourier", "positional"):
            raise ValueError(f"embedding must be 'fourier' or 'positional', got {embedding!r}")
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.embedding_kind = embedding
        attn_resolutions = {int(r) for r in attn_resolutions}

        emb_ch = 4 * base_channels
        self.noise_emb = (FourierEmbedding(base_channels) if embedding == "fourier"
                          else PositionalEmbedding(base_channels))
        self.emb_mlp = nn.Sequential(nn.Linear(base_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                out = base_channels * mult
                self.down.append(nn.ModuleList([ResBlock(ch, out, emb_ch, dropout),
                                                AttnBlock(out) if res in attn_resolutions else nn.Identity()]))
                ch = out
                skips.append(ch)
            if level != len(channel_mults) - 1:
                self.down.append(Downsample(ch))
                res //= 2
                skips.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_ch, dropout)
        self.mid_attn = AttnBlock(ch)
        self.mid2 = ResBlock(ch, ch, emb_ch, dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                self.up.append(nn.ModuleList([ResBlock(ch + skips.pop(), out, emb_ch, dropout),
                                              AttnBlock(out) if res in attn_resolutions else nn.Identity()]))
                ch = out
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2
        assert not skips
        self.norm_out = _norm(ch)
        self.conv_out = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        c_noise = checked_inputs(x, c_noise, self.in_channels)
        emb = self.emb_mlp(self.noise_emb(c_noise).to(x.dtype))
        emb = F.silu(emb)

        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            if isinstance(block, Downsample):
                h = block(h)
            else:
                h = block[1](block[0](h, emb))
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block[1](block[0](torch.cat([h, hs.pop()], dim=1), emb))
        return self.conv_out(F.silu(self.norm_out(h)))
