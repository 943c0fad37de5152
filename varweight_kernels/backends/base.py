"""What every backend implements: the two phases of a step (see :mod:`varweight_kernels.reference`).

A backend module subclasses :class:`Backend`; the resolver (``varweight_kernels.backends``) finds
the class through :mod:`.registry` and sets its ``name``.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import torch

from .. import reference
from ..config import KernelParams, as_kernel_params


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton for its interpreter (then triton runs on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


FUSED_KERNELS_ENV = "VARWEIGHT_FUSED_KERNELS"


def env_flag(name: str) -> bool:
    """A yes/no environment switch of this package: unset, "", "0", "false", "no", "off" are no."""
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def fused_kernels_requested() -> bool:
    """Whether ``VARWEIGHT_FUSED_KERNELS`` asks the triton and cuda backends for their one-launch
    training step (read when the backend is constructed; off by default until measured on a GPU)."""
    return env_flag(FUSED_KERNELS_ENV)


class Backend:
    """One implementation of a step. ``forward_moments`` and ``update`` are the two phases that a
    distributed step all-reduces between; ``step`` is both at once (backends fuse it)."""

    name = ""  # set by the resolver from the registry
    devices: Tuple[str, ...] = ()

    def unavailable_reason(self) -> Optional[str]:
        """None when the backend is installed and usable on some device here, else why not."""
        return None

    def device_reason(self, device: torch.device) -> Optional[str]:
        """None when the backend runs on ``device``, else why not."""
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if device.type not in self.devices:
            return f"backend {self.name!r} runs on {'/'.join(self.devices)} tensors, not on {device.type}"
        return None

    def forward_moments(self, loss, lam, weight, lmin: float, bin_scale: float, training: bool):
        """``(out, w, moments)``; moments (float64 ``[n(K), s(K), q(K), nonfinite]``) only in training."""
        raise NotImplementedError

    def update(self, moments, M, Q, Z, C, weight, step, nonfinite, params: KernelParams) -> None:
        """SPEC steps 6-7 in place from the (summed) moments; ``params`` may be a plain sequence."""
        raise NotImplementedError

    def step(self, loss, lam, M, Q, Z, C, weight, step, nonfinite, params: KernelParams, training: bool):
        """The whole step without distributed sync; backends override it with a fused path."""
        params = as_kernel_params(params)
        out, w, moments = self.forward_moments(loss, lam, weight, params.lmin, params.bin_scale, training)
        if moments is not None:
            self.update(moments, M, Q, Z, C, weight, step, nonfinite, params)
        return out, w

    def backward(self, grad_out: torch.Tensor, w: torch.Tensor, loss_dtype: torch.dtype) -> torch.Tensor:
        """Gradient of ``out`` w.r.t. ``loss``: ``grad * w / B`` in float32, in the loss dtype."""
        return reference.scale_grad(grad_out, w, loss_dtype)

    # Optional: ``step`` as one op whose autograd formula is registered natively (same arguments and
    # result, but ``out`` carries the gradient), so an eager call skips Python autograd.
    autograd_step: Optional[Callable] = None
