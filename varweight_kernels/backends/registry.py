"""The backends as plain data: the one place a backend's name is written.

A leaf module: it imports nothing of the package, so the resolver and every backend can import
it and nothing imports a backend back. The resolver loads a backend's module only when that
backend is first asked for, so ``import varweight_kernels`` never builds or loads an extension.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple


class BackendSpec(NamedTuple):
    """A backend: its name, where its class lives, and its rank in ``auto``'s order per device type."""

    name: str
    module: str
    cls: str
    auto_rank: Dict[str, int]  # device type -> position in auto's order (lower is tried first)


BACKENDS: Tuple[BackendSpec, ...] = (
    BackendSpec("reference", "varweight_kernels.backends.reference", "ReferenceBackend", {"cpu": 1, "cuda": 2}),
    BackendSpec("cpp", "varweight_kernels.backends.compiled", "CppBackend", {"cpu": 0}),
    BackendSpec("triton", "varweight_kernels.backends.triton", "TritonBackend", {"cuda": 1}),
    # Fastest on CUDA tensors in eager steps at every size measured on an H200 (benchmarks/RESULTS.md;
    # replayed from a CUDA graph, triton is as fast at B = 1024).
    BackendSpec("cuda", "varweight_kernels.backends.compiled", "CudaBackend", {"cuda": 0}),
)

BACKEND_NAMES: Tuple[str, ...] = tuple(spec.name for spec in BACKENDS)
SPECS: Dict[str, BackendSpec] = {spec.name: spec for spec in BACKENDS}


def auto_order(device_type: str) -> Tuple[str, ...]:
    """The backends ``auto`` tries for tensors on ``device_type``, fastest first."""
    ranked = sorted((spec.auto_rank[device_type], spec.name) for spec in BACKENDS if device_type in spec.auto_rank)
    return tuple(name for _, name in ranked) or ("reference",)
