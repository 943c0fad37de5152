"""The VAW step as a ``torch.library`` custom op with autograd and a fake implementation.

``torch.ops.varweight.vaw_step`` runs one training step on the chosen backend: it returns the
weighted mean and the per-sample weights, and updates the state tensors in place. It is one
opaque op to ``torch.compile``, so ``torch.compile(fullgraph=True)`` traces through a call of
the module without a graph break. Backward is ``grad * w / B`` for ``loss``; ``lam`` and the
state get no gradient.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from . import reference
from .backends import resolve_backend

STATE_NAMES = ("M", "Q", "Z", "C", "weight", "step", "nonfinite")


def distributed_world() -> int:
    """World size when torch.distributed is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def sync_moments(moments: torch.Tensor) -> None:
    """Sum the packed (n, s, q, nonfinite) buffer over all ranks with one all_reduce."""
    if moments.device.type == "cpu" or dist.get_backend() != "gloo":
        dist.all_reduce(moments)
        return
    # gloo cannot reduce CUDA tensors: round-trip through the host.
    host = moments.cpu()
    dist.all_reduce(host)
    moments.copy_(host)


def run_step(loss: torch.Tensor, lam: torch.Tensor, M: torch.Tensor, Q: torch.Tensor, Z: torch.Tensor,
             C: torch.Tensor, weight: torch.Tensor, step_count: torch.Tensor, nonfinite: torch.Tensor,
             params: List[float], training: bool, sync: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step on the resolved backend, with the DDP all_reduce between its two phases."""
    impl = resolve_backend(backend, loss.device)
    if training and sync and distributed_world() > 1:
        out, w, moments = impl.forward_moments(loss, lam, weight, params[0], params[1], True)
        sync_moments(moments)
        impl.update(moments, M, Q, Z, C, weight, step_count, nonfinite, params)
        return out, w
    return impl.step(loss, lam, M, Q, Z, C, weight, step_count, nonfinite, params, training)


vaw_step = torch.library.custom_op(
    "varweight::vaw_step", run_step, mutates_args=("M", "Q", "Z", "C", "weight", "step_count", "nonfinite"))


@vaw_step.register_fake
def _vaw_step_fake(loss, lam, M, Q, Z, C, weight, step_count, nonfinite, params, training, sync, backend):
    return loss.new_empty(()), torch.empty(loss.shape, dtype=torch.float32, device=loss.device)


class VAWFunction(torch.autograd.Function):
    """Autograd wrapper of the step: forward runs the step, backward is ``grad * w / B``."""

    @staticmethod
    def forward(ctx, loss, lam, M, Q, Z, C, weight, step_count, nonfinite, params, training, sync, backend):
        # torch.compile sees the registered op; eager calls skip its dispatch layers (about 60 us).
        step = torch.ops.varweight.vaw_step if torch.compiler.is_compiling() else run_step
        out, w = step(loss.detach(), lam, M, Q, Z, C, weight, step_count, nonfinite, params, training, sync, backend)
        ctx.save_for_backward(w)
        ctx.loss_dtype = loss.dtype
        # Eager: the backend's own backward (one launch where it has one); compiled: torch ops.
        ctx.backend_impl = None if torch.compiler.is_compiling() else resolve_backend(backend, loss.device)
        ctx.mark_non_differentiable(w)
        return out, w

    @staticmethod
    def backward(ctx, grad_out, grad_w):
        (w,) = ctx.saved_tensors
        impl = getattr(ctx, "backend_impl", None)
        if impl is None or torch.compiler.is_compiling():
            grad_loss = reference.scale_grad(grad_out, w, ctx.loss_dtype)
        else:
            grad_loss = impl.backward(grad_out, w, ctx.loss_dtype)
        return (grad_loss,) + (None,) * 12


def vaw(loss: torch.Tensor, lam: torch.Tensor, state: Sequence[torch.Tensor], params: Sequence[float],
        training: bool = True, sync: bool = True, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Functional form: ``state`` holds (M, Q, Z, C, weight, step, nonfinite); returns (out, w)."""
    if not torch.compiler.is_compiling() and not (training and sync and distributed_world() > 1):
        native = resolve_backend(backend, loss.device).differentiable_step
        if native is not None:
            return native(loss, lam, *state, params, training)
    return VAWFunction.apply(loss, lam, *state, params, training, sync, backend)
