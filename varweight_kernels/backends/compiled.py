"""The compiled backends: "cpp" (C++ CPU kernels) and "cuda" (CUDA kernels).

Both call the ops ``torch.ops.varweight_ext.*`` registered by the extension (see
:mod:`.extension` for how it is found, version-checked and, on a mismatch, rebuilt just in time).
The fused ``step`` is one dispatcher call that bins, gathers, reduces and updates the state.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import extension
from .base import Backend, fused_kernels_requested

# Import-time check: loads (or JIT-builds) the extension once, warning once on a mismatch.
EXTENSION = extension.status()
CPU_ISAS = ("scalar", "avx2", "avx512")


def _op(name: str):
    return getattr(getattr(torch.ops, extension.NAMESPACE), name).default


if EXTENSION.cpu_reason is None:
    _FORWARD_MOMENTS = _op("forward_moments")
    _UPDATE = _op("update")
    _STEP = _op("step")
    _WEIGHTED_STEP = _op("weighted_step")
    _SCALE_GRAD = _op("scale_grad")
else:
    _FORWARD_MOMENTS = _UPDATE = _STEP = _WEIGHTED_STEP = _SCALE_GRAD = None


class _CompiledBackend(Backend):
    def forward_moments(self, loss, lam, weight, lmin, bin_scale, training):
        out, w, moments = _FORWARD_MOMENTS(loss, lam, weight, float(lmin), float(bin_scale), bool(training))
        return out, w, (moments if training else None)

    def update(self, moments, M, Q, Z, C, weight, step, nonfinite, params):
        _UPDATE(moments, M, Q, Z, C, weight, step, nonfinite, params)

    def step(self, loss, lam, M, Q, Z, C, weight, step, nonfinite, params, training):
        return _STEP(loss, lam, M, Q, Z, C, weight, step, nonfinite, params, training)

    def backward(self, grad_out, w, loss_dtype):
        return _SCALE_GRAD(grad_out, w, loss_dtype)

    def autograd_step(self, loss, lam, M, Q, Z, C, weight, step, nonfinite, params, training):
        return _WEIGHTED_STEP(loss, lam, M, Q, Z, C, weight, step, nonfinite, params, training)


class CppBackend(_CompiledBackend):
    devices = ("cpu",)

    def unavailable_reason(self) -> Optional[str]:
        return EXTENSION.cpu_reason


class CudaBackend(_CompiledBackend):
    devices = ("cuda",)

    def __init__(self) -> None:
        self._code_reasons: Dict[int, Optional[str]] = {}  # device index -> why the library has no code for it
        if fused_kernels_requested() and EXTENSION.cuda_reason is None:
            self.fused = True

    @property
    def fused(self) -> bool:
        """Whether a training step runs the one-launch fused kernel (K <= 64, float32 lam, vector-aligned
        inputs; today's kernels otherwise) and backward the vectorised one. The switch lives in the
        CUDA library, so the native autograd step and torch.compile follow it too."""
        return EXTENSION.cuda_reason is None and bool(torch.ops.varweight_ext.cuda_fused_kernels(-1))

    @fused.setter
    def fused(self, enable: bool) -> None:
        if EXTENSION.cuda_reason is not None:
            raise RuntimeError(f"the cuda backend is unavailable: {EXTENSION.cuda_reason}")
        torch.ops.varweight_ext.cuda_fused_kernels(int(bool(enable)))

    def unavailable_reason(self) -> Optional[str]:
        if EXTENSION.cuda_reason is not None:
            return EXTENSION.cuda_reason
        if not torch.cuda.is_available():
            return "needs a CUDA device (torch.cuda.is_available() is False)"
        return None

    def device_reason(self, device: torch.device) -> Optional[str]:
        reason = super().device_reason(device)
        if reason is None:
            index = torch.cuda.current_device() if device.index is None else device.index
            if index not in self._code_reasons:
                self._code_reasons[index] = _missing_code_reason(torch.cuda.get_device_capability(index))
            reason = self._code_reasons[index]
        return reason


def _missing_code_reason(capability: Tuple[int, int]) -> Optional[str]:
    """Why the built CUDA library cannot run on a device of ``capability`` (None when it can), so
    that auto falls back instead of failing at the first launch."""
    path = extension.find_library(extension.CUDA_MODULE)
    if path is None:  # loaded from elsewhere: nothing to read, the launch will tell
        return None
    with open(path, "rb") as f:
        entries = extension.fatbin_entries(f.read())
    if extension.runs_on_capability(entries, capability):
        return None
    built = ", ".join(f"sm_{arch}" for arch in sorted({arch for _, arch, _ in entries})) or "no architecture"
    major, minor = capability
    return (f"the CUDA library was built for {built}, with no code for this device (compute capability "
            f"{major}.{minor}); rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" pip install --no-build-isolation .")


def cpu_isa(request: str = "") -> str:
    """The instruction set of the C++ CPU pass, as in use after the call.

    ``""`` only asks. ``"auto"`` (the default) is the widest this CPU has, used for batches of
    1024 samples and more (smaller ones run the scalar pass); ``"scalar"``, ``"avx2"`` and
    ``"avx512"`` choose one for every batch (an unknown name or one the CPU lacks raises). Every
    choice gives bitwise the same result, so this is for tests and benchmarks, not for tuning.
    """
    if EXTENSION.cpu_reason is not None:
        raise RuntimeError(f"the cpp backend is unavailable: {EXTENSION.cpu_reason}")
    return torch.ops.varweight_ext.cpu_isa(request)


def build_info() -> Optional[str]:
    """The torch version the loaded C++ library was compiled against (None when not loaded)."""
    if EXTENSION.cpu_reason is not None:
        return None
    marker = torch.ops.varweight_ext.build_info()
    prefix = extension.MARKER_PREFIX.decode()
    hexed = marker[len(prefix):] if marker.startswith(prefix) else ""
    try:
        return bytes.fromhex(hexed[1:]).decode() if hexed.startswith("1") else None
    except ValueError:
        return None
