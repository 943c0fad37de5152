"""Backend registry: each backend declares its name, the devices it runs on and why it cannot run.

``"auto"`` picks the fastest backend that can run for the input's device; an explicit request
that cannot run raises ``RuntimeError`` with the reason, never a silent fallback.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import reference

BACKEND_NAMES = ("reference", "cpp", "triton", "cuda")
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Backend:
    """One implementation of the two phases of a step (see :mod:`varweight_kernels.reference`)."""

    name = ""
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

    def forward_moments(self, loss, lam, weight, lmin: float, scale: float, training: bool):
        raise NotImplementedError

    def update(self, moments, M, Q, Z, C, weight, step, nonfinite, params: Sequence[float]) -> None:
        raise NotImplementedError

    # Optional: the whole step as one op with its autograd formula registered natively (same
    # signature and result as ``step``, but ``out`` carries the gradient). Eager calls use it to
    # skip Python autograd; None means the step goes through ``ops.VAWFunction``.
    differentiable_step: Optional[Callable] = None

    def backward(self, grad_out: torch.Tensor, w: torch.Tensor, loss_dtype: torch.dtype) -> torch.Tensor:
        """Gradient of ``out`` w.r.t. ``loss``: ``grad * w / B`` in float32, in the loss dtype."""
        return reference.scale_grad(grad_out, w, loss_dtype)

    def step(self, loss, lam, M, Q, Z, C, weight, step, nonfinite, params: Sequence[float], training: bool):
        """Whole step without distributed sync; backends override it with a fused path."""
        out, w, moments = self.forward_moments(loss, lam, weight, params[0], params[1], training)
        if moments is not None:
            self.update(moments, M, Q, Z, C, weight, step, nonfinite, params)
        return out, w


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda")

    def forward_moments(self, loss, lam, weight, lmin, scale, training):
        return reference.forward_moments(loss, lam, weight, lmin, scale, training)

    def update(self, moments, M, Q, Z, C, weight, step, nonfinite, params):
        reference.update(moments, M, Q, Z, C, weight, step, nonfinite, params)


_FACTORIES: Dict[str, Callable[[], Backend]] = {"reference": ReferenceBackend}
_INSTANCES: Dict[str, Backend] = {}
_RESOLVED: Dict[tuple, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make a backend known to the registry (called by the backend modules on import)."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)
    _RESOLVED.clear()


def _load_backend_module(name: str) -> None:
    # Imported lazily, and only the one asked for, so that ``import varweight_kernels`` stays
    # cheap and the reference never pays for loading (or JIT-building) an extension.
    if name in _FACTORIES:
        return
    if name in ("cpp", "cuda"):
        from . import cpp_backend  # noqa: F401  (registers "cpp" and "cuda")
    elif name == "triton":
        from . import triton_vaw  # noqa: F401  (registers "triton")


def get_backend(name: str) -> Backend:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKEND_NAMES))}")
    _load_backend_module(name)
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def backend_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``; otherwise the reason it cannot."""
    return get_backend(name).device_reason(torch.device(device))


def _local_devices() -> List[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def machine_reason(name: str) -> Optional[str]:
    """None when backend ``name`` runs on some device of this machine; otherwise why it cannot."""
    reasons = [backend_reason(name, device) for device in _local_devices()]
    return None if any(r is None for r in reasons) else reasons[-1]


def available_backends() -> List[str]:
    """Backends that can run on some device of this machine, in the spec's order."""
    return [name for name in BACKEND_NAMES if machine_reason(name) is None]


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend to run for tensors on ``device``: auto's best pick, or the explicit one if it can run."""
    # Called every step: one dict lookup. Only an explicit "triton" depends on TRITON_INTERPRET
    # (it decides whether triton runs on CPU tensors), so only that key reads the environment.
    key = (name, device, triton_interpret()) if name == "triton" else (name, device)
    impl = _RESOLVED.get(key)
    if impl is None:
        impl = _RESOLVED[key] = _resolve(name, torch.device(device))
    return impl


def _resolve(name: str, device: torch.device) -> Backend:
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if backend_reason(candidate, device) is None:
                return get_backend(candidate)
        raise RuntimeError(f"no VAW backend can run on device {device}")
    reason = backend_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"VAW backend {name!r} cannot run on {device}: {reason}")
    return get_backend(name)
