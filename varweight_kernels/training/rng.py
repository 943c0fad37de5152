"""Per-stream random number generators.

Every source of randomness in training has its own ``torch.Generator``, seeded from
``derive_seed(seed, stream, rank)`` (a SHA-256 hash, stable across processes and Python
versions, unlike ``hash()``). Streams (``STREAMS``, the trainer's): "init" (parameter init,
via the global RNG), "data" (shuffling, flips), "levels" (noise levels), "noise" (the Gaussian
noise), "sample" (sampling for evaluation), "weighting" (any randomness a weighting needs). A
consumer never draws from another stream, so changing, e.g., the weighting cannot shift the
noise a run sees.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Mapping, Union

import torch

__all__ = ["STREAMS", "derive_seed", "make_generators", "get_rng_states", "set_rng_states"]

STREAMS = ("init", "data", "levels", "noise", "sample", "weighting")


def derive_seed(seed: int, stream: str, rank: int = 0) -> int:
    """A 63-bit seed determined by ``(seed, stream, rank)`` only."""
    digest = hashlib.sha256(f"varweight|{int(seed)}|{stream}|{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generators(seed: int, rank: int = 0, device: Union[str, torch.device] = "cpu",
                    streams=STREAMS) -> Dict[str, torch.Generator]:
    """One seeded ``torch.Generator`` per stream on ``device``.

    Generators on a CUDA device produce different numbers from CPU ones for the same seed;
    pass ``device="cpu"`` to get device-independent draws (callers then move tensors)."""
    device = torch.device(device)
    gens = {}
    for name in streams:
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(seed, name, rank))
        gens[name] = g
    return gens


def get_rng_states(generators: Mapping[str, torch.Generator]) -> Dict[str, torch.Tensor]:
    """``{stream: state}`` with each state a CPU uint8 tensor (checkpoint-safe)."""
    return {name: g.get_state().clone() for name, g in generators.items()}


def set_rng_states(generators: Mapping[str, torch.Generator], states: Mapping[str, torch.Tensor]) -> None:
    """Restore states saved by ``get_rng_states``; a missing stream raises ``KeyError``."""
    for name, g in generators.items():
        if name not in states:
            raise KeyError(f"no saved RNG state for stream {name!r}")
        g.set_state(states[name].cpu().to(torch.uint8))
