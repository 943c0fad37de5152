"""Backend resolver: which backend runs for tensors on a device.

``"auto"`` picks the fastest backend that can run for the input's device (order:
:func:`.registry.auto_order`); an explicit request that cannot run raises ``RuntimeError`` with the
reason, never a silent fallback. Backend modules are imported only when first asked for.
"""
from __future__ import annotations

import importlib
import platform
from typing import Dict, List, Optional

import torch

from .base import Backend, triton_interpret
from .registry import BACKEND_NAMES, SPECS, auto_order

__all__ = ["Backend", "BACKEND_NAMES", "available_backends", "backend_reason", "cpu_name", "get_backend",
           "machine_reason", "resolve_backend"]

_INSTANCES: Dict[str, Backend] = {}
_RESOLVED: Dict[tuple, Backend] = {}


def get_backend(name: str) -> Backend:
    """The one instance of backend ``name`` (its module imported on first use)."""
    spec = SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKEND_NAMES))}")
    impl = _INSTANCES.get(name)
    if impl is None:
        impl = getattr(importlib.import_module(spec.module), spec.cls)()
        impl.name = name
        _INSTANCES[name] = impl
    return impl


def backend_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``; otherwise the reason it cannot."""
    return get_backend(name).device_reason(torch.device(device))


def _local_devices() -> List[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def machine_reason(name: str) -> Optional[str]:
    """None when backend ``name`` runs on some device of this machine; otherwise why it cannot."""
    reasons = [backend_reason(name, device) for device in _local_devices()]
    return None if any(r is None for r in reasons) else reasons[-1]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows): the one reader
    behind the benchmark reports and the run pins' machine fingerprint."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        for candidate in auto_order(device.type):
            if backend_reason(candidate, device) is None:
                return get_backend(candidate)
        raise RuntimeError(f"no VAW backend can run on device {device}")
    reason = backend_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"VAW backend {name!r} cannot run on {device}: {reason}")
    return get_backend(name)
