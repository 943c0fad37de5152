"""The trainer's networks and ``build_unet``, the one way the trainer builds them.

``"ddpm"``: :class:`~.ddpm_unet.UNet`, a compact DDPM/EDM-style U-Net (our improved recipe's
network); ``"paper"``: :class:`~.paper_unet.PaperUNet`, the network of the paper's code, with its
state-dict names. Both take ``forward(x, c_noise)``.
"""
from __future__ import annotations

import inspect

from torch import nn

from .ddpm_unet import FourierEmbedding, PositionalEmbedding, UNet, checked_inputs, num_groups
from .paper_unet import PaperUNet
from .registry import ARCHITECTURES

__all__ = ["UNet", "PaperUNet", "build_unet", "ARCHITECTURES", "checked_inputs", "num_groups", "FourierEmbedding",
           "PositionalEmbedding"]

NETWORKS = {"ddpm": UNet, "paper": PaperUNet}  # one per name of registry.ARCHITECTURES


def build_unet(arch: str, in_channels: int, image_size: int, **kw) -> nn.Module:
    """The network named by ``arch``: "ddpm" is :class:`UNet` (``kw`` are its keyword arguments),
    "paper" is :class:`~.paper_unet.PaperUNet` (``kw``: ``base_channels``). Both take
    ``forward(x, c_noise)``. Raises ``ValueError`` for an unknown arch or keyword argument."""
    if arch not in NETWORKS:
        raise ValueError(f"unknown U-Net arch {arch!r}; choose one of {ARCHITECTURES}")
    network = NETWORKS[arch]
    try:
        inspect.signature(network).bind(in_channels, image_size, **kw)
    except TypeError as exc:
        raise ValueError(f"bad arguments for arch {arch!r} ({network.__name__}): {exc}") from None
    return network(in_channels, image_size, **kw)
