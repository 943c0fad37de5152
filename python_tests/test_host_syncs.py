"""Reads and copies the trainer does not need (issue 25, item 6): --resume, --sample-only and
--export read and checksum the checkpoint once; save_checkpoint holds one serialised copy."""
from __future__ import annotations

import importlib.util
import os

import pytest

from varweight_kernels.training import checkpoint as ckpt
from varweight_kernels.training.cli import main
from varweight_kernels.training.loop import train
from varweight_kernels.training.run_dir import checkpoint_dir
from tiny_runs import ROOT, one_thread, subprocess_env, tiny  # noqa: F401


def _counting_reads(monkeypatch) -> list:
    reads = []
    real = ckpt.load_checkpoint
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda path: reads.append(path) or real(path))
    return reads


def test_resume_and_sample_only_read_the_checkpoint_once(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny(out, steps=3))
    reads = _counting_reads(monkeypatch)
    assert main(["--out", str(out), "--resume", "--steps", "4", "--quiet"]) == 0
    assert len(reads) == 1, reads  # the CLI's config and the restored state come from one read
    reads.clear()
    assert main(["--out", str(out), "--sample-only", "--num-samples", "2", "--quiet"]) == 0
    assert len(reads) == 1, reads


def test_a_checkpoint_changed_since_the_config_was_read_is_read_again(tmp_path, monkeypatch):
    from varweight_kernels.training.state import read_latest_good, saved_config

    out = tmp_path / "run"
    train(tiny(out, steps=3))
    folder = checkpoint_dir(str(out))
    saved_config(str(out))
    path = ckpt.list_checkpoints(folder)[0][1]
    ckpt.save_checkpoint(ckpt.load_checkpoint(path), path)  # rewritten in between: a new file
    reads = _counting_reads(monkeypatch)
    assert read_latest_good(folder, warn=print, quarantine=False)[0] == path
    assert reads == [path]
    reads.clear()
    read_latest_good(folder, warn=print, quarantine=False)  # the peeked state is taken once
    assert reads == [path]


def _host_syncs_benchmark():
    spec = importlib.util.spec_from_file_location("_bench_host_syncs", ROOT / "benchmarks" / "host_syncs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from Linux's /proc")
def test_save_checkpoint_holds_one_serialised_copy():
    """The peak memory a save adds, in units of the state's size (benchmarks/host_syncs.py): it
    was 2 (the serialised state, a bytearray copy of it, then the serialised wrapper), it is 1."""
    assert _host_syncs_benchmark().save_peak(env=subprocess_env()) < 1.5
