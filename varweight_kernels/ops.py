"""The VAW step as a functional op, an autograd Function and a ``torch.library`` custom op.

:func:`vaw` is the one place that decides how a call runs, with the backend resolved once:

* under ``torch.compile``: :class:`VAWFunction` around the custom op ``torch.ops.varweight.vaw_step``
  (one opaque node with a fake implementation, so ``fullgraph=True`` traces without a break);
* training under DDP (``sync`` and world > 1): :class:`VAWFunction` running the two phases with one
  ``all_reduce`` of the moments between them;
* otherwise the backend's native autograd step when it has one (the compiled backends), else
  :class:`VAWFunction` around the backend's fused ``step``.

Backward is ``grad * w / B`` for ``loss``; ``lam`` and the state get no gradient.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import reference
from .backends import Backend, resolve_backend
from .config import as_kernel_params

STATE_NAMES = ("M", "Q", "Z", "C", "weight", "step", "nonfinite")


def sync_moments(moments: torch.Tensor) -> None:
    """Sum the packed (n, s, q, nonfinite) buffer over all ranks with one all_reduce."""
    if moments.device.type == "cpu" or dist.get_backend() != "gloo":
        dist.all_reduce(moments)
        return
    # gloo cannot reduce CUDA tensors: round-trip through the host.
    host = moments.cpu()
    dist.all_reduce(host)
    moments.copy_(host)


def _splits_for_ddp(training: bool, sync: bool) -> bool:
    return training and sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _run(impl: Backend, loss, lam, state, params: Sequence[float], training: bool, split: bool):
    """One step on ``impl``: the fused step, or (``split``) the two phases around the all_reduce."""
    if not split:
        return impl.step(loss, lam, *state, params, training)
    named = as_kernel_params(params)
    out, w, moments = impl.forward_moments(loss, lam, state[4], named.lmin, named.bin_scale, True)
    sync_moments(moments)
    impl.update(moments, *state, params)
    return out, w


@torch.library.custom_op("varweight::vaw_step", mutates_args=("M", "Q", "Z", "C", "weight", "step_count",
                                                              "nonfinite"))
def _vaw_step_op(loss: torch.Tensor, lam: torch.Tensor, M: torch.Tensor, Q: torch.Tensor, Z: torch.Tensor,
                 C: torch.Tensor, weight: torch.Tensor, step_count: torch.Tensor, nonfinite: torch.Tensor,
                 params: List[float], training: bool, sync: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """What ``torch.compile`` sees: one step on the named backend, state updated in place."""
    impl = resolve_backend(backend, loss.device)
    return _run(impl, loss, lam, (M, Q, Z, C, weight, step_count, nonfinite), params, training,
                _splits_for_ddp(training, sync))


@_vaw_step_op.register_fake
def _vaw_step_fake(loss, lam, M, Q, Z, C, weight, step_count, nonfinite, params, training, sync, backend):
    return loss.new_empty(()), torch.empty(loss.shape, dtype=torch.float32, device=loss.device)


class VAWFunction(torch.autograd.Function):
    """Autograd wrapper of the step: forward runs it, backward is ``grad * w / B``.

    ``backend`` is a backend name or an already resolved :class:`~varweight_kernels.backends.Backend`.
    """

    @staticmethod
    def forward(ctx, loss, lam, M, Q, Z, C, weight, step_count, nonfinite, params, training, sync,
                backend: Union[str, Backend]):
        state = (M, Q, Z, C, weight, step_count, nonfinite)
        if torch.compiler.is_compiling():
            name = backend.name if isinstance(backend, Backend) else backend
            out, w = torch.ops.varweight.vaw_step(loss.detach(), lam, *state, list(params), training, sync, name)
            ctx.impl = None  # compiled: backward in torch ops
        else:
            impl = backend if isinstance(backend, Backend) else resolve_backend(backend, loss.device)
            out, w = _run(impl, loss.detach(), lam, state, params, training,
                          _splits_for_ddp(training, sync))
            ctx.impl = impl
        ctx.save_for_backward(w)
        ctx.loss_dtype = loss.dtype
        ctx.mark_non_differentiable(w)
        return out, w

    @staticmethod
    def backward(ctx, grad_out, grad_w):
        (w,) = ctx.saved_tensors
        if ctx.impl is None or torch.compiler.is_compiling():
            grad_loss = reference.scale_grad(grad_out, w, ctx.loss_dtype)
        else:
            grad_loss = ctx.impl.backward(grad_out, w, ctx.loss_dtype)
        return (grad_loss,) + (None,) * 12


def vaw(loss: torch.Tensor, lam: torch.Tensor, state: Sequence[torch.Tensor], params: Sequence[float],
        training: bool = True, sync: bool = True, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Functional form: ``state`` holds (M, Q, Z, C, weight, step, nonfinite); returns (out, w).

    ``params`` is a :class:`~varweight_kernels.config.KernelParams` or the same ten floats as a
    list (the compiled ops parse a plain list fastest).
    """
    if torch.compiler.is_compiling():
        return VAWFunction.apply(loss, lam, *state, params, training, sync, backend)
    impl = resolve_backend(backend, loss.device)
    split = _splits_for_ddp(training, sync)
    if not (loss.requires_grad and torch.is_grad_enabled()):  # nothing to differentiate: no autograd node
        return _run(impl, loss, lam, state, params, training, split)
    if impl.autograd_step is not None and not split:
        return impl.autograd_step(loss, lam, *state, params, training)
    return VAWFunction.apply(loss, lam, *state, params, training, sync, impl)
