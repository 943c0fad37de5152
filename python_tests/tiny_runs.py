"""The tiny trainer configuration (digits, 8-channel U-Net) that the trainer and fault tests share,
the bitwise comparison of two runs, a fabricated CIFAR-10 folder, and the loader of a script."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from varweight_kernels.training.checkpoint import load_checkpoint
from varweight_kernels.training.config import TrainConfig
from varweight_kernels.training.run_dir import TIMING_FIELDS

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


def read_metrics(out) -> list:
    with open(Path(out) / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def strip_timing(records) -> list:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.is_floating_point() else flat


def assert_tree_equal(a, b, path="state"):
    """Bitwise equality of two checkpoint trees (the config is allowed to differ: steps, resume...)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(_bits(a), _bits(b)), path  # bitwise: a NaN equals only the same NaN
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            if path == "state" and k == "config":
                continue
            assert_tree_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def assert_runs_equal(out_a, out_b, step):
    a = load_checkpoint(str(Path(out_a) / "checkpoints" / f"ckpt_{step:08d}.pt"))
    b = load_checkpoint(str(Path(out_b) / "checkpoints" / f"ckpt_{step:08d}.pt"))
    assert_tree_equal(a, b)
    assert strip_timing(read_metrics(out_a)) == strip_timing(read_metrics(out_b))
    with np.load(Path(out_a) / "binstats.npz") as za, np.load(Path(out_b) / "binstats.npz") as zb:
        assert za.files == zb.files
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k], err_msg=k)


def write_fake_cifar10(folder: Path, data_of: Callable[[int], np.ndarray], monkeypatch) -> None:
    """An extracted ``cifar-10-batches-py/`` at ``folder``: batch ``i`` (five train, one test) holds
    ``data_of(i)`` (uint8, (n, 3072)) with labels 0, 1, ...; its MD5s are registered with torchvision
    for the test, so the loader reads it as it reads the published files."""
    import torchvision.datasets as tvd

    folder.mkdir(parents=True)
    names = [f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        data = data_of(i)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": [k % 10 for k in range(len(data))]}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(k) for k in range(10)]}, fh)
    md5 = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in names + ["batches.meta"]}
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[n, md5[n]] for n in names[:5]])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", dict(tvd.CIFAR10.meta, md5=md5["batches.meta"]))


def load_script(path: str):
    """A script of the checkout (``benchmarks/compare.py``) as a module, its folder importable."""
    folder = str((ROOT / path).parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"_script_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
