"""What a ``--resume`` may change: the fields that leave the training trajectory alone, those it
changes only with ``--allow-trajectory-change``, and the diff that names the rest."""
from __future__ import annotations

from dataclasses import fields
from typing import List

from .schema import TrainConfig, format_value

__all__ = ["RESUME_MUTABLE", "TRAJECTORY_FIELDS", "config_diff"]

# Fields that may change between a run and its --resume (they do not alter the trajectory).
RESUME_MUTABLE = frozenset({
    "preset", "out", "resume", "overwrite", "allow_trajectory_change", "quiet", "data_root", "download",
    "steps", "log_every", "ckpt_every", "keep_ckpts", "max_nonfinite", "backend", "sampler", "sample_steps",
    "rho", "sample_every", "grid_size", "analysis_batches", "fid_every", "fid_steps", "fid_samples", "fid_weights",
    "sample_only", "num_samples",
    "export", "export_weights",
})
# Fields a --resume changes only with --allow-trajectory-change: the arithmetic differs (bf16
# autocast, compiled kernels, another device), so the run departs from its unbroken trajectory.
TRAJECTORY_FIELDS = frozenset({"amp", "compile", "device"})


def config_diff(saved: TrainConfig, new: TrainConfig, ignore=RESUME_MUTABLE) -> List[str]:
    """Fields (outside ``ignore``) whose values differ, as 'name: saved -> new' strings."""
    out = []
    for f in fields(TrainConfig):
        if f.name in ignore:
            continue
        a, b = getattr(saved, f.name), getattr(new, f.name)
        if a != b:
            out.append(f"{f.name}: {format_value(a)} -> {format_value(b)}")
    return out
