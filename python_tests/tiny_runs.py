"""The tiny trainer configuration (digits, 8-channel U-Net) that the trainer and fault tests share."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from varweight_kernels.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dataset="digits", channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(),
            batch_size=16, lr=1e-3, ema_decay=0.9, log_every=2, ckpt_every=3, sample_steps=2, grid_size=4,
            vaw_bins=8, vaw_min_count=2, quiet=True)
TINY_FLAGS = ["--dataset", "digits", "--channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
              "--attn-resolutions", "none", "--batch-size", "16", "--lr", "1e-3", "--ema-decay", "0.9",
              "--log-every", "2", "--ckpt-every", "3", "--sample-steps", "2", "--grid-size", "4",
              "--vaw-bins", "8", "--vaw-min-count", "2", "--quiet"]


def tiny(out, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(out), **kw})


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and least disturbed by other jobs) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def subprocess_env(**extra) -> dict:
    """The environment of a trainer subprocess: one thread, this checkout importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **extra)
