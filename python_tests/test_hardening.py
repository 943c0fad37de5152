"""Issue #16: the trainer and the report as an attacker and a careless user would meet them (CPU, digits).

Crafted config.json / pickles never run code; planted links never redirect a write; the root, the
home folder and folders of foreign files are refused; --overwrite removes only the trainer's
files; one process per run folder; every write failure is one line; --resume refuses flags that
change the trajectory; malformed JSON is one line; a first Ctrl-C during set-up is not "second".
"""
from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from varweight_kernels.experiments.__main__ import main as experiments_main
from varweight_kernels.training import builders
from varweight_kernels.training.checkpoint import (WriteError, atomic_write_bytes, list_checkpoints, load_checkpoint,
                                                   save_checkpoint)
from varweight_kernels.training.cli import main
from varweight_kernels.training.config import RESUME_MUTABLE, ConfigError, TrainConfig
from varweight_kernels.training.data import DatasetUnavailable, load_dataset
from varweight_kernels.training.loop import train
from varweight_kernels.training.run_dir import MetricsLog, lock_run_folder, release_run_folder
from tiny_runs import (ROOT, TINY_FLAGS, assert_runs_equal, assert_tree_equal, one_thread,  # noqa: F401
                       read_metrics, strip_timing, subprocess_env, tiny)


class Payload:
    """Unpickling this creates ``marker``: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished 2-step run, copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("two") / "run"
    torch.set_num_threads(1)
    train(tiny(out, steps=2, ckpt_every=2))
    return out


def copy_run(src, dst) -> Path:
    import shutil
    shutil.copytree(src, dst, symlinks=True)
    (dst / ".varweight-lock").unlink(missing_ok=True)
    return dst


# -- 1: code from a crafted config.json / pickles -----------------------------------------------
def evil_cifar_folder(root: Path, marker: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{j}" for j in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))


def test_planted_cifar_pickles_are_refused_unread(tmp_path):
    marker = tmp_path / "PWNED"
    evil_cifar_folder(tmp_path / "evil", marker)
    with pytest.raises(DatasetUnavailable, match="checksum"):
        load_dataset("cifar10", root=str(tmp_path / "evil"))
    assert not marker.exists()


def test_crafted_config_json_never_runs_code_on_resume(tmp_path, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    marker = tmp_path / "PWNED"
    evil_cifar_folder(tmp_path / "EVIL", marker)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(dataset="cifar10", data_root=str(tmp_path / "EVIL"))
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["--out", str(out), "--resume", "--steps", "3"]) == 0  # the checkpoint's config rules
    assert not marker.exists()
    assert json.loads((out / "config.json").read_text())["dataset"] == "digits"


# -- 2: planted links ------------------------------------------------------------------------
def test_atomic_write_replaces_a_link_and_never_follows_one(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "name").symlink_to(victim)
    atomic_write_bytes(str(tmp_path / "name"), b"new")
    assert victim.read_text() == "precious" and not (tmp_path / "name").is_symlink()
    assert (tmp_path / "name").read_text() == "new"
    log = MetricsLog(str(tmp_path), enabled=True)
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(WriteError, match="metrics.jsonl"):
        log.write({"step": 1})
    assert victim.read_text() == "precious"


def test_links_planted_in_a_run_never_redirect_its_writes(tmp_path, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in ("DONE", "config.json", "binstats.npz", "persample.npz", "persample.npz.tmp.npz",
                 "samples_step00000004.png", "samples.png", "samples.npz"):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(victim)
    assert main(["--out", str(out), "--resume", "--steps", "4"]) == 0
    assert main(["--out", str(out), "--sample-only", "--num-samples", "2"]) == 0
    assert victim.read_text() == "precious"
    (tmp_path / "elsewhere").mkdir()
    import shutil
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").symlink_to(tmp_path / "elsewhere")
    assert main(["--out", str(out), "--overwrite", "--steps", "1"]) == 1
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_report_links_never_redirect_its_writes(tmp_path, two_steps):
    exp = tmp_path / "exp"
    copy_run(two_steps, exp / "runs" / "vaw" / "seed0")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (exp / "report").mkdir()
    (exp / "report" / "summary.csv").symlink_to(victim)
    assert experiments_main(["report", str(exp), "--include-unfinished"]) == 0
    assert victim.read_text() == "precious"


# -- 3, 4: where a run may write, and what --overwrite removes -------------------------------------
def test_root_and_home_are_refused(tmp_path, capsys, monkeypatch):
    assert "filesystem root" in one_line_error(capsys, ["--out", "/", *TINY_FLAGS, "--steps", "1"])
    home = tmp_path / "home"
    (home / "checkpoints").mkdir(parents=True)
    (home / "checkpoints" / "mine.pt").write_text("user data")
    monkeypatch.setenv("HOME", str(home))
    assert "home folder" in one_line_error(capsys, ["--out", str(home), *TINY_FLAGS, "--steps", "1", "--overwrite"])
    assert (home / "checkpoints" / "mine.pt").read_text() == "user data"
    assert sorted(p.name for p in home.iterdir()) == ["checkpoints"]


def test_a_folder_of_foreign_files_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "DONE").write_text("my notes")
    (out / "binstats.npz").write_text("my data")
    for extra in ([], ["--overwrite"]):
        err = one_line_error(capsys, ["--out", str(out), *TINY_FLAGS, "--steps", "1", *extra])
        assert "not empty" in err and "DONE" in err and "binstats.npz" in err
    assert (out / "DONE").read_text() == "my notes" and (out / "binstats.npz").read_text() == "my data"


def test_overwrite_removes_only_the_runs_files(tmp_path, capsys, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "best.pt").write_text("mine too")
    (out / "train.log").write_text("the runner's log")
    err = one_line_error(capsys, ["--out", str(out), *TINY_FLAGS, "--steps", "1", "--overwrite"])
    assert "notes.txt" in err and "checkpoints/best.pt" in err
    assert (out / "notes.txt").exists() and (out / "checkpoints" / "ckpt_00000002.pt").exists()
    (out / "notes.txt").unlink()
    (out / "checkpoints" / "best.pt").unlink()
    run_id = json.loads((out / ".varweight-run").read_text())["run_id"]
    assert main(["--out", str(out), *TINY_FLAGS, "--steps", "1", "--overwrite"]) == 0
    assert (out / "train.log").read_text() == "the runner's log"
    assert json.loads((out / ".varweight-run").read_text())["run_id"] != run_id
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt_00000001.pt"]


def test_a_run_of_an_older_version_still_resumes(tmp_path, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    (out / ".varweight-run").unlink()  # older versions wrote no marker
    assert main(["--out", str(out), "--resume", "--steps", "3"]) == 0
    assert (out / ".varweight-run").exists()


# -- 5: one process per run folder -----------------------------------------------------------
def test_a_second_trainer_on_a_held_folder_fails_at_once(tmp_path, capsys, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               f"fd = os.open({str(out / '.varweight-lock')!r}, os.O_RDWR | os.O_CREAT); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        t0 = time.time()
        for argv in (["--resume", "--steps", "3"], ["--overwrite", *TINY_FLAGS, "--steps", "1"],
                     ["--sample-only"]):
            assert "in use by another" in one_line_error(capsys, ["--out", str(out), *argv])
        assert time.time() - t0 < 30
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    finally:
        holder.send_signal(signal.SIGKILL)  # the OS drops its lock: nothing stale is left
        holder.wait()
    assert main(["--out", str(out), "--resume", "--steps", "3"]) == 0


def test_experiments_run_locks_its_folder(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    lock_run_folder(str(exp))
    try:
        holder_free = subprocess.run([sys.executable, "-m", "varweight_kernels.experiments", "run", "--methods",
                                      "uniform", "--seeds", "0", "--out", str(exp)], env=subprocess_env(),
                                     capture_output=True, text=True, timeout=120)
    finally:
        release_run_folder(str(exp))
    assert holder_free.returncode == 2 and "in use by another" in holder_free.stderr
    assert not (exp / "runs").exists() and not (exp / "experiment.json").exists()


# -- 6: a full disk ----------------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["config.json", "metrics.jsonl", "binstats.npz", "samples_step", "DONE",
                                    "persample.npz", ".varweight-run"])
def test_every_write_failure_is_one_line(tmp_path, capsys, monkeypatch, victim):
    import varweight_kernels.training.checkpoint as ck
    import varweight_kernels.training.run_dir as rd

    real_write, real_open = ck.atomic_write_bytes, os.open

    def full_disk(path, *args, **kw):
        if os.path.basename(str(path)).startswith(victim):
            raise WriteError(str(path), "No space left on device (disk full or file-size limit)")
        return real_write(path, *args, **kw)

    def full_disk_open(path, flags, *args, **kw):
        if os.path.basename(str(path)) == victim and flags & os.O_APPEND:
            raise OSError(28, "No space left on device", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(ck, "atomic_write_bytes", full_disk)
    monkeypatch.setattr(rd.os, "open", full_disk_open)
    out = tmp_path / "run"
    err = one_line_error(capsys, ["--out", str(out), *TINY_FLAGS, "--steps", "2", "--analysis-batches", "1"])
    assert "could not write" in err and victim in err and "No space left" in err


def test_a_full_disk_keeps_the_previous_files(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match="f: No space left on device .disk full"):
        atomic_write_bytes(str(tmp_path / "f"), b"new")
    assert (tmp_path / "f").read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


# -- 7: flags that change the trajectory -------------------------------------------------------
@pytest.mark.parametrize("flag", [["--amp", "bf16"], ["--compile"], ["--device", "cpu"]])
def test_resume_refuses_trajectory_changes_unless_allowed(tmp_path, capsys, two_steps, flag):
    out = copy_run(two_steps, tmp_path / "run")
    config_before = (out / "config.json").read_text()
    err = one_line_error(capsys, ["--out", str(out), "--resume", "--steps", "3", *flag])
    assert "--allow-trajectory-change" in err and flag[0][2:] in err
    assert (out / "config.json").read_text() == config_before
    if flag[0] == "--device":  # the one of them that is cheap to run here
        assert main(["--out", str(out), "--resume", "--steps", "3", *flag, "--allow-trajectory-change"]) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert {"step": 2, "trajectory_change": ["device: 'auto' -> 'cpu'"]} in records
        assert json.loads((out / "config.json").read_text())["allow_trajectory_change"] is False


# -- 11: malformed JSON and checkpoints ----------------------------------------------------------
@pytest.mark.parametrize("bad", [[], None, {"steps": 1e400}, {"channel_mults": 5}, {"steps": 2.5},
                                 {"quiet": 1}, {"lr": True}, {"channel_mults": [1, 2.5]}])
def test_bad_config_values_are_one_line_errors(bad):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("garbage", ["[]", "null", '{"steps": 1e400}', '{"channel_mults": 5}', "{not json"])
def test_a_garbled_config_json_blocks_neither_resume_nor_sample_only(tmp_path, two_steps, garbage):
    out = copy_run(two_steps, tmp_path / "run")
    (out / "config.json").write_text(garbage)
    assert main(["--out", str(out), "--sample-only", "--num-samples", "2"]) == 0
    assert main(["--out", str(out), "--resume", "--steps", "3"]) == 0


def test_a_checkpoint_whose_config_is_a_list_is_one_line(tmp_path, capsys, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    path = out / "checkpoints" / "ckpt_00000002.pt"
    state = load_checkpoint(str(path))
    state["config"] = [1, 2]
    save_checkpoint(state, str(path))
    assert "holds no config" in one_line_error(capsys, ["--out", str(out), "--resume", "--steps", "3"])
    assert "holds no config" in one_line_error(capsys, ["--out", str(out), "--sample-only"])


def test_a_metrics_line_that_is_not_an_object_is_one_line(tmp_path, capsys, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write("[1, 2]\n")
    assert "line 2" in one_line_error(capsys, ["--out", str(out), "--resume", "--steps", "3"])


def test_a_malformed_experiment_json_is_one_line(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "experiment.json").write_text('{"variants": []}')
    assert experiments_main(["run", "--methods", "uniform", "--seeds", "0", "--out", str(exp), "--", "--steps", "1"]) == 2
    (exp / "runs").mkdir()
    assert experiments_main(["report", str(exp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("experiment.json" in line and "'variants'" in line for line in err), err


# -- 13: Ctrl-C ----------------------------------------------------------------------------------
def test_a_first_interrupt_during_set_up_is_not_called_second(tmp_path, capsys, monkeypatch):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(builders, "load_data", interrupted)
    monkeypatch.setattr("varweight_kernels.training.loop.load_data", interrupted)
    assert main(["--out", str(tmp_path / "run"), *TINY_FLAGS, "--steps", "1"]) == 130
    err = capsys.readouterr().err
    assert "second" not in err and "interrupted" in err


# -- what a resume may change, and kill -9 at any moment -------------------------------------------
def finished_run(tmp_path_factory, steps: int) -> Path:
    out = tmp_path_factory.mktemp(f"steps{steps}") / "run"
    torch.set_num_threads(1)
    train(tiny(out, steps=steps))
    return out


@pytest.fixture(scope="module")
def unbroken_six(tmp_path_factory):
    return finished_run(tmp_path_factory, 6)


@pytest.fixture(scope="module")
def first_three(tmp_path_factory):
    return finished_run(tmp_path_factory, 3)


MUTABLE_CHANGES = {"quiet": False, "data_root": "elsewhere", "download": True, "log_every": 4, "ckpt_every": 1,
                   "keep_ckpts": 5, "max_nonfinite": 1, "backend": "reference", "sampler": "heun",
                   "sample_steps": 3, "rho": 5.0, "sample_every": 2, "grid_size": 2, "analysis_batches": 1,
                   "fid_every": 5, "fid_steps": (4, 5), "fid_samples": 8, "fid_weights": "unused.pt", "num_samples": 3}
RUN_MANAGEMENT = {"preset", "out", "resume", "overwrite", "allow_trajectory_change", "sample_only", "steps",
                  "export", "export_weights"}  # --export writes weights and exits: it never trains


def test_every_resume_mutable_field_is_covered():
    assert set(RESUME_MUTABLE) == set(MUTABLE_CHANGES) | RUN_MANAGEMENT


@pytest.mark.parametrize("field,value", sorted(MUTABLE_CHANGES.items()))
def test_resume_with_a_mutable_field_changed_is_bitwise_the_unbroken_run(tmp_path, unbroken_six, first_three,
                                                                        field, value):
    out = copy_run(first_three, tmp_path / "run")
    train(tiny(out, steps=6, resume=True, **{field: value}))
    a = load_checkpoint(str(unbroken_six / "checkpoints" / "ckpt_00000006.pt"))
    b = load_checkpoint(str(out / "checkpoints" / "ckpt_00000006.pt"))
    if field == "log_every":  # what is logged differs by design; the training state does not
        a.pop("log_accum"), b.pop("log_accum")
        assert_tree_equal(a, b)
    elif field in ("fid_every", "fid_steps"):  # adds its scores to metrics.jsonl; the rest is the unbroken run's
        assert_tree_equal(a, b)
        scores = ("fd_digits", "fd_floor", "classifier_acc")
        scored = [{k: v for k, v in r.items() if k not in scores} for r in strip_timing(read_metrics(out))]
        assert [r for r in scored if len(r) > 1] == strip_timing(read_metrics(unbroken_six))
    else:
        assert_runs_equal(unbroken_six, out, 6)


def test_repeated_kill9_at_random_moments_then_resume_is_bitwise(tmp_path):
    rng = random.Random(16)
    out, steps = tmp_path / "run", 40
    argv = [sys.executable, str(ROOT / "train_cifar.py"), *TINY_FLAGS, "--out", str(out), "--steps", str(steps)]
    kills = 0
    for attempt in range(4):
        proc = subprocess.Popen(argv + (["--resume"] if attempt else []), env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target = 3 * (attempt + 1) + rng.randrange(3)
        try:
            def reached():
                found = list_checkpoints(str(out / "checkpoints"))
                return bool(found) and found[0][0] >= target
            while proc.poll() is None and not reached():
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.2))  # mid-step, mid-log or mid-save: anywhere
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()
    assert kills >= 2
    assert main(["--out", str(out), "--resume"]) == 0
    train(tiny(tmp_path / "ref", steps=steps))
    assert_runs_equal(tmp_path / "ref", out, steps)
