"""Per-stream random number generators.

Every source of randomness in training has its own ``torch.Generator``, seeded from
``derive_seed(seed, stream, rank)`` (a SHA-256 hash, stable across processes and Python
versions, unlike ``hash()``). The trainer's generators (``STREAMS``, checkpointed per rank):
"data" (shuffling, flips), "levels" (noise levels), "noise" (the Gaussian noise), "weighting"
(any randomness a weighting needs). Seeds drawn once elsewhere: "init" (parameter init, through
the global RNG), "dropout" (the global RNG after init), "analysis" (the per-sample dump) and
"sample" (sampler noise, :func:`sample_generator`). A consumer never draws from another stream,
so changing, e.g., the weighting cannot shift the noise a run sees.

Checkpoints written before the unused "init" and "sample" generators were dropped from
``STREAMS`` hold their states too; ``set_rng_states`` ignores them.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Mapping, Union

import torch

__all__ = ["STREAMS", "derive_seed", "make_generators", "sample_generator", "get_rng_states", "set_rng_states"]

STREAMS = ("data", "levels", "noise", "weighting")


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


def sample_generator(seed: int, rank: int = 0) -> torch.Generator:
    """The sampler's noise: a fresh CPU generator of the "sample" stream. Every grid, FID batch,
    ``--sample-only`` and ``export.generate_pretrained`` draws from this one definition, which is
    what makes the exported samples bit-for-bit those of ``--sample-only``."""
    return torch.Generator().manual_seed(derive_seed(seed, "sample", rank))


def get_rng_states(generators: Mapping[str, torch.Generator]) -> Dict[str, torch.Tensor]:
    """``{stream: state}`` with each state a CPU uint8 tensor (checkpoint-safe)."""
    return {name: g.get_state().clone() for name, g in generators.items()}


def set_rng_states(generators: Mapping[str, torch.Generator], states: Mapping[str, torch.Tensor]) -> None:
    """Restore states saved by ``get_rng_states``; a missing stream raises ``KeyError``, a saved
    stream that is not in ``generators`` (an old checkpoint's "init" and "sample") is ignored."""
    for name, g in generators.items():
        if name not in states:
            raise KeyError(f"no saved RNG state for stream {name!r}")
        g.set_state(states[name].cpu().to(torch.uint8))
