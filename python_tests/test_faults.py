"""Fault tolerance of checkpoints and the trainer (CPU, digits, tiny U-Net).

kill -9 in the middle of a save, truncated / bit-flipped / code-carrying checkpoints, SIGTERM
mid-run, unwritable --out, a full disk (RLIMIT_FSIZE), and runs of non-finite losses. After
every recoverable fault, --resume must finish with exactly the parameters of an unbroken run.
"""
from __future__ import annotations

import json
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from varweight_kernels.training import checkpoint as ck
from varweight_kernels.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from varweight_kernels.training.config import TrainConfig
from varweight_kernels.training.cli import main
from varweight_kernels.training.loop import Callbacks, train
from tiny_runs import ROOT, TINY, TINY_FLAGS, assert_runs_equal, one_thread, subprocess_env  # noqa: F401

TINY = {**TINY, "weighting": "vaw"}
TINY_FLAGS = [*TINY_FLAGS, "--weighting", "vaw"]


def tiny(out, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(out), **kw})


def cli(*args) -> list:
    return [sys.executable, str(ROOT / "train_cifar.py"), *TINY_FLAGS, *args]


def assert_same_run(out_a, out_b, step):
    """Parameters, optimizer, RNG states, counters, metrics and binstats: bitwise."""
    assert_runs_equal(out_a, out_b, step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Unbroken 8-step run (checkpoints at 3, 6, 8)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train(tiny(out, steps=8, keep_ckpts=3))
    torch.set_num_threads(n)
    return out


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A run stopped at step 6 (checkpoints 3 and 6): the base that the corruption tests damage."""
    out = tmp_path_factory.mktemp("six") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train(tiny(out, steps=6))
    torch.set_num_threads(n)
    return out


# -- the checkpoint format -----------------------------------------------------------------------
def test_checkpoint_roundtrip_and_plain_data_only(tmp_path):
    state = {"step": 3, "w": torch.randn(5), "cfg": {"a": [1, 2.5, "x", None, True]}, "rng": torch.Generator().get_state()}
    path = tmp_path / "ckpt_00000003.pt"
    save_checkpoint(state, str(path))
    back = load_checkpoint(str(path))
    assert back["step"] == 3 and torch.equal(back["w"], state["w"]) and back["cfg"] == state["cfg"]
    wrapper = torch.load(path, weights_only=True)
    assert wrapper["format"] == ck.FORMAT_NAME and wrapper["format_version"] == ck.FORMAT_VERSION
    assert len(wrapper["sha256"]) == 64
    with pytest.raises(TypeError, match="checkpoints hold only"):
        save_checkpoint({"bad": object()}, str(tmp_path / "ckpt_00000004.pt"))
    assert not (tmp_path / "ckpt_00000004.pt").exists()
    # a future format version is refused, naming the file
    wrapper["format_version"] = 99
    torch.save(wrapper, tmp_path / "ckpt_00000005.pt")
    with pytest.raises(CheckpointError, match=r"ckpt_00000005\.pt.*format version 99"):
        load_checkpoint(str(tmp_path / "ckpt_00000005.pt"))


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _evil(path):
    marker = path.parent / "PAYLOAD_RAN"
    torch.save({"step": 6, "model": _Payload(str(marker))}, path)


def _evil_raw_pickle(path):
    marker = path.parent / "PAYLOAD_RAN"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))


@pytest.mark.parametrize("damage", [_truncate, _flip, _evil, _evil_raw_pickle],
                         ids=["truncated", "flipped-bytes", "pickle-with-code", "raw-pickle-with-code"])
def test_bad_latest_checkpoint_falls_back_to_previous(tmp_path, capsys, reference, six_steps, damage):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    bad = out / "checkpoints" / "ckpt_00000006.pt"
    damage(bad)
    with pytest.raises(CheckpointError, match="ckpt_00000006.pt"):
        load_checkpoint(str(bad))
    capsys.readouterr()
    assert main(["--out", str(out), "--resume", "--steps", "8"]) == 0
    err = capsys.readouterr().err
    assert "ckpt_00000006.pt" in err and "Traceback" not in err
    assert not (out / "checkpoints" / "PAYLOAD_RAN").exists(), "the pickled payload ran"
    assert (out / "checkpoints" / "ckpt_00000006.pt.corrupt").exists()  # quarantined, never retried
    # resumed from step 3 and replayed 4..8 exactly
    assert_same_run(reference, out, 8)


def test_no_good_checkpoint_stops_with_clear_error(tmp_path, capsys, six_steps):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    _truncate(out / "checkpoints" / "ckpt_00000006.pt")
    _flip(out / "checkpoints" / "ckpt_00000003.pt")
    capsys.readouterr()
    assert main(["--out", str(out), "--resume", "--steps", "8"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    last = err[-1]
    assert last.startswith("error:") and "no good checkpoint" in last
    assert "ckpt_00000006.pt" in last and "ckpt_00000003.pt" in last


def test_other_state_version_is_refused(tmp_path, capsys, six_steps):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    for step in (3, 6):
        path = out / "checkpoints" / f"ckpt_{step:08d}.pt"
        state = load_checkpoint(str(path))
        state["version"] = 2
        save_checkpoint(state, str(path))
    capsys.readouterr()
    assert main(["--out", str(out), "--resume", "--steps", "8"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ckpt_00000006.pt" in err[0] and "version 2" in err[0], err
    assert list_checkpoints(str(out / "checkpoints"))[0][0] == 6  # refused, not quarantined


# -- crashes and signals ---------------------------------------------------------------------
def _wait_for(pred, timeout, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_kill9_during_save_then_resume(tmp_path, reference):
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    proc = subprocess.Popen(cli("--out", str(out), "--steps", "8"), env=subprocess_env(**{ck.SAVE_SLEEP_ENV: "3"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        saving_6 = lambda: (ckdir / "ckpt_00000003.pt").exists() and any(  # noqa: E731
            p.name.startswith(".tmp-ckpt_00000006.pt") for p in ckdir.iterdir())
        assert _wait_for(saving_6, 240, proc), proc.stderr.read() if proc.poll() is not None else "timeout"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [s for s, _ in list_checkpoints(str(ckdir))] == [3]  # the half-written one never became a checkpoint
    assert main(["--out", str(out), "--resume"]) == 0
    assert not any(p.name.startswith(".tmp-") for p in ckdir.iterdir())
    assert_same_run(reference, out, 8)


def test_sigterm_mid_run_checkpoints_and_resumes_bitwise(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli("--out", str(out), "--steps", "30"), env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: (out / "metrics.jsonl").exists(), 240, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    lines = [line for line in stdout.strip().splitlines() if line]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "--resume" in lines[0], stdout
    stopped = list_checkpoints(str(out / "checkpoints"))[0][0]
    assert 2 <= stopped < 30 and f"step {stopped}" in lines[0]
    assert not (out / "DONE").exists()
    assert main(["--out", str(out), "--resume"]) == 0
    train(tiny(tmp_path / "ref", steps=30))
    assert_same_run(tmp_path / "ref", out, 30)


# -- the disk --------------------------------------------------------------------------------
def test_unwritable_out_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    t0 = time.time()
    r = subprocess.run(cli("--out", str(blocker / "run"), "--steps", "1000"), env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0] and str(blocker) in err[0], r.stderr
    assert r.stdout.strip() == ""
    assert time.time() - t0 < 100


@pytest.fixture
def file_size_limit():
    """Set RLIMIT_FSIZE in this process (writes past it fail with EFBIG instead of SIGXFSZ)."""
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)

    def set_limit(n):
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, old[1]))

    yield set_limit
    resource.setrlimit(resource.RLIMIT_FSIZE, old)
    signal.signal(signal.SIGXFSZ, old_sig)


def test_full_disk_keeps_previous_checkpoint(tmp_path, file_size_limit):
    first = tmp_path / "ckpt_00000001.pt"
    save_checkpoint({"step": 1, "w": torch.zeros(10)}, str(first))
    file_size_limit(64 * 1024)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint({"step": 2, "w": torch.zeros(100000)}, str(tmp_path / "ckpt_00000002.pt"))
    msg = str(info.value)
    assert "ckpt_00000002.pt" in msg and "disk full" in msg and "intact" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt"]  # no temp file left
    assert load_checkpoint(str(first))["step"] == 1


def _limit_child_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec: writes fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))


def test_trainer_full_disk_during_save_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(cli("--out", str(out), "--steps", "4"), env=subprocess_env(), capture_output=True, text=True,
                       timeout=240, preexec_fn=_limit_child_file_size)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "could not write checkpoint" in err[0] and "ckpt_00000003.pt" in err[0], r.stderr
    assert list_checkpoints(str(out / "checkpoints")) == []
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())


# -- non-finite losses -----------------------------------------------------------------------
class NaNFrom(Callbacks):
    """From step ``start`` (0-based) on, every per-sample loss is NaN."""

    def __init__(self, start: int) -> None:
        self.start = start

    def on_terms(self, step, terms):
        if step < self.start:
            return terms
        return terms._replace(loss=terms.loss * float("nan"), mse=terms.mse * float("nan"))


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, capsys):
    nan_from_4th = NaNFrom(3)  # steps 4.. (1-based) get NaN losses
    out = tmp_path / "run"
    res = train(tiny(out, steps=5, max_nonfinite=5), nan_from_4th)
    assert res["skipped_steps"] == 2
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert recs[-1]["skipped_steps"] == 2 and recs[-1]["nonfinite"] == 1 and recs[-2]["nonfinite"] == 1
    s3 = load_checkpoint(str(out / "checkpoints" / "ckpt_00000003.pt"))
    s5 = load_checkpoint(str(out / "checkpoints" / "ckpt_00000005.pt"))
    for k, v in s3["model"].items():  # the skipped steps did not touch the weights
        assert torch.equal(v, s5["model"][k]), k
    # now too many in a row: a clear one-line error, the last good checkpoint intact
    out2 = tmp_path / "run2"
    capsys.readouterr()
    rc = main(["--out", str(out2), *TINY_FLAGS, "--steps", "20", "--max-nonfinite", "4"], callbacks=nan_from_4th)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "4 consecutive non-finite losses" in err[0], err
    assert "ckpt_00000006.pt" in err[0]
    state = load_checkpoint(str(out2 / "checkpoints" / "ckpt_00000006.pt"))
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out2 / "DONE").exists()
