"""Issue #24 items 1, 5, 13 and 18: resumes that end where they start, transient read errors,
backend changes, and the FID loaders (CPU, digits; the CIFAR FID tests use fake weights).

- 5: a resume at the last step keeps the off-cadence final metrics record (--resume of a
  finished run, kill -9 after the last checkpoint, SIGTERM in the last step).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from varweight_kernels.training.checkpoint import list_checkpoints
from varweight_kernels.training.loop import Callbacks, train
from tiny_runs import (ROOT, TINY_FLAGS, assert_runs_equal, one_thread, read_metrics, strip_timing,  # noqa: F401
                       subprocess_env, tiny)

STEPS = 5  # off the log cadence (TINY logs every 2 steps): the run ends with a "final" record


def copy_run(src, dst) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    (dst / ".varweight-lock").unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """A finished 5-step run (checkpoints 3 and 5; records at 2, 4 and the final 5)."""
    out = tmp_path_factory.mktemp("unbroken") / "run"
    torch.set_num_threads(1)
    train(tiny(out, steps=STEPS))
    assert read_metrics(out)[-1].get("final") and read_metrics(out)[-1]["step"] == STEPS
    return out


def binstats(out) -> dict:
    with np.load(Path(out) / "binstats.npz") as z:
        return {k: z[k] for k in z.files}


def assert_final_record_kept(unbroken, out):
    assert_runs_equal(unbroken, out, STEPS)  # the final record and bin snapshot included
    assert read_metrics(out)[-1]["step"] == STEPS and read_metrics(out)[-1].get("final")
    assert (out / "DONE").is_file()


# -- 5: a resume at the last step -------------------------------------------------------------------
def test_resume_of_a_finished_run_keeps_its_final_record(tmp_path, unbroken):
    out = copy_run(unbroken, tmp_path / "run")
    before = read_metrics(out)
    train(tiny(out, steps=STEPS, resume=True))
    assert read_metrics(out) == before  # not rewritten: even the timing fields are the first run's
    assert_final_record_kept(unbroken, out)


def test_kill9_after_the_last_checkpoint_keeps_the_final_record(tmp_path, unbroken):
    out = tmp_path / "run"
    last = out / "checkpoints" / f"ckpt_{STEPS:08d}.pt"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_cifar.py"), *TINY_FLAGS, "--out", str(out),
                             "--steps", str(STEPS)], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while proc.poll() is None and not last.exists() and time.time() - t0 < 240:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert last.exists(), proc.stderr.read()
    if proc.returncode == 0:  # it finished before the kill: leave what a kill after the checkpoint leaves
        (out / "DONE").unlink()
    assert not (out / "DONE").exists()
    train(tiny(out, steps=STEPS, resume=True))
    assert_final_record_kept(unbroken, out)


class SigtermIn(Callbacks):
    """Sends this process SIGTERM during the forward pass of step ``at`` (0-based)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_batch(self, step, batch):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_in_the_last_step_keeps_the_final_record(tmp_path, unbroken):
    out = tmp_path / "run"
    assert train(tiny(out, steps=STEPS), SigtermIn(STEPS - 1))["status"] == "interrupted"
    assert [s for s, _ in list_checkpoints(str(out / "checkpoints"))] == [STEPS, 3]
    assert train(tiny(out, steps=STEPS, resume=True))["status"] == "done"
    assert_final_record_kept(unbroken, out)


def test_a_resume_that_continues_still_drops_the_final_record(tmp_path, unbroken):
    """The other side of keep_final: steps follow, so the interval is logged again (bitwise)."""
    out = copy_run(unbroken, tmp_path / "run")
    train(tiny(out, steps=8, resume=True))
    train(tiny(tmp_path / "ref", steps=8))
    assert_runs_equal(tmp_path / "ref", out, 8)
    assert [r["step"] for r in read_metrics(out)] == [2, 4, 6, 8]
