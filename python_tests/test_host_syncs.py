"""Reads and copies the trainer does not need (issue 25, item 6): --resume, --sample-only and
--export read and checksum the checkpoint once; save_checkpoint holds one serialised copy."""
from __future__ import annotations

import subprocess
import sys

from varweight_kernels.training import checkpoint as ckpt
from varweight_kernels.training.cli import main
from varweight_kernels.training.loop import train
from varweight_kernels.training.run_dir import checkpoint_dir
from tiny_runs import one_thread, subprocess_env, tiny  # noqa: F401


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


SAVE_PEAK = """
import os, resource, tempfile, torch
from varweight_kernels.training.checkpoint import save_checkpoint
n = 64 << 20
state = {"w": torch.ones(n // 4)}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
save_checkpoint(state, os.path.join(tempfile.mkdtemp(), "c.pt"))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / n)
"""


def test_save_checkpoint_holds_one_serialised_copy():
    """The peak memory a save adds, in units of the state's size: it was 2 (the serialised state,
    a bytearray copy of it, then the serialised wrapper), it is 1."""
    proc = subprocess.run([sys.executable, "-c", SAVE_PEAK], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout) < 1.5, proc.stdout
