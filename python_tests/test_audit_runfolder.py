"""Issue #24 (the 12-04 audit), the run folder's items: --export never lands in the run's own files
and never half-replaces an earlier export; --overwrite deletes only the trainer's exact names; a
failed second train() keeps the first one's lock; index.md never reads through a link or waits on
a FIFO; a finished run stays finished when index.md cannot be written; crafted files are one-line
errors; refused folders are left as they were; DDP, CIFAR and cache races; the installed build
is found past the source tree's egg-info. CPU, digits, tiny U-Net.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from varweight_kernels.training import checkpoint as ck
from varweight_kernels.training.checkpoint import CheckpointError, WriteError, load_checkpoint, save_checkpoint
from varweight_kernels.training.cli import main, parse_config
from varweight_kernels.training.config import TrainError
from varweight_kernels.training.data import load_dataset
from varweight_kernels.training.export import WeightsError, load_pretrained, sidecar_path
from varweight_kernels.training.loop import Callbacks, train
from varweight_kernels.training.run_dir import check_run_folder
from varweight_kernels.training.run_index import write_run_index
from tiny_runs import TINY_FLAGS, one_thread, tiny  # noqa: F401

CKPT = "checkpoints/ckpt_00000002.pt"


class Killed(BaseException):
    """Stands in for kill -9 at a chosen moment (nothing after it runs)."""


class Blocked(BaseException):
    """Raised by ``deadline``: not an OSError, so no ``except OSError`` swallows it."""


def one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO open blocks until a writer comes)."""
    def expired(signum, frame):
        raise Blocked(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def snapshot(folder: Path) -> dict:
    """Every entry and file content below ``folder`` (the lock file aside: a locker may create it)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else "dir")
            for p in sorted(folder.rglob("*")) if p.name != ".varweight-lock"}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished 2-step run (checkpoint at 2) with an EMA export ``ema.pt``."""
    out = tmp_path_factory.mktemp("two") / "run"
    torch.set_num_threads(1)
    train(tiny(out, steps=2, ckpt_every=2))
    assert main(["--out", str(out), "--export", str(out.parent / "ema.pt"), "--quiet"]) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    (dst / ".varweight-lock").unlink(missing_ok=True)
    return dst


# -- 2: --export into the run's own files ---------------------------------------------------------
@pytest.mark.parametrize("target", [CKPT, "checkpoints/extra.pt", "tensorboard/w.pt"])
def test_export_into_the_runs_own_files_is_refused(tmp_path, capsys, two_steps, target):
    out = copy_run(two_steps, tmp_path / "run")
    before = snapshot(out)
    err = one_line_error(capsys, ["--out", str(out), "--export", str(out / target)])
    assert "own files" in err
    assert snapshot(out) == before
    assert main(["--out", str(out), "--resume", "--steps", "3"]) == 0  # nothing quarantined
    assert not (out / (CKPT + ".corrupt")).exists()


def test_export_never_replaces_a_file_it_did_not_write(tmp_path, capsys, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    mine = tmp_path / "mine.pt"
    mine.write_text("my weights")
    assert "not an earlier export" in one_line_error(capsys, ["--out", str(out), "--export", str(mine)])
    notes = tmp_path / "w.pt.json"
    notes.write_text('{"my": "notes"}')
    assert "not a weights sidecar" in one_line_error(capsys, ["--out", str(out), "--export", str(tmp_path / "w.pt")])
    assert mine.read_text() == "my weights" and notes.read_text() == '{"my": "notes"}'
    assert not (tmp_path / "w.pt").exists()
    again = tmp_path / "again.pt"  # an earlier export is replaced
    for _ in range(2):
        assert main(["--out", str(out), "--export", str(again), "--quiet"]) == 0
    load_pretrained(again)


# -- 3: --overwrite deletes the trainer's exact names only -------------------------------------
def test_overwrite_keeps_names_that_only_look_like_the_trainers(tmp_path, capsys, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    lookalikes = ["checkpoints/ckpt_00000020_backup.pt", "checkpoints/ckpt_best.pt", "samples_step_final_for_paper.png",
                  ".tmp-notes.txt", "checkpoints/.tmp-notes.txt"]
    for rel in lookalikes:
        (out / rel).write_text("mine")
    err = one_line_error(capsys, ["--out", str(out), *TINY_FLAGS, "--steps", "1", "--overwrite"])
    assert "did not write" in err and "ckpt_00000020_backup.pt" in err
    assert all((out / rel).read_text() == "mine" for rel in lookalikes)
    assert (out / CKPT).exists()


def test_a_foreign_folder_with_a_config_and_a_checkpoint_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "theirs"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text('{"lr": 0.1}')
    torch.save({"weights": torch.zeros(3)}, out / "checkpoints" / "ckpt_00001000.pt")
    before = snapshot(out)
    for extra, says in ((["--overwrite"], "holds no run"), (["--resume"], "not a varweight checkpoint")):
        assert says in one_line_error(capsys, ["--out", str(out), *TINY_FLAGS, "--steps", "1", *extra])
    assert snapshot(out) == before


def test_a_folder_named_like_a_checkpoint_stops_overwrite_before_anything_goes(tmp_path, capsys, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    (out / "checkpoints" / "ckpt_00000099.pt").mkdir()
    before = snapshot(out)
    err = one_line_error(capsys, ["--out", str(out), *TINY_FLAGS, "--steps", "1", "--overwrite"])
    assert "ckpt_00000099.pt" in err and "folder" in err
    assert snapshot(out) == before


# -- 9: a failed second train() keeps the first one's lock -------------------------------------
def lock_is_free(out: Path) -> bool:
    probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", probe, str(out / ".varweight-lock")]).returncode == 0


def test_a_failed_second_train_keeps_the_first_ones_lock(tmp_path):
    out = tmp_path / "run"
    seen = {}

    class Nested(Callbacks):
        def on_batch(self, step, batch):
            if step == 1:
                with pytest.raises(TrainError, match="in use"):
                    train(tiny(out, steps=2, overwrite=True))
                seen["free"] = lock_is_free(out)

    train(tiny(out, steps=2), Nested())
    assert seen == {"free": False}
    assert lock_is_free(out)  # released when the first train() returned


# -- 10, 17: index.md reads no link and waits on no FIFO ----------------------------------------
def test_index_never_reads_through_a_link(tmp_path, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    secret = tmp_path / "secret"
    secret.write_text("SECRET-LINE\n")
    secret.chmod(0o600)
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"step": 1, "secret_key": 42}) + "\n")
    for name, target in (("DONE", secret), ("metrics.jsonl", record), ("config.json", record)):
        (out / name).unlink()
        (out / name).symlink_to(target)
    assert write_run_index(str(out)) is not None
    index = (out / "index.md").read_text()
    assert "SECRET" not in index and "secret_key" not in index


@pytest.mark.parametrize("name", ["DONE", "metrics.jsonl"])
def test_a_fifo_blocks_neither_export_nor_resume(tmp_path, capsys, two_steps, name):
    out = copy_run(two_steps, tmp_path / "run")
    (out / name).unlink()
    os.mkfifo(out / name)
    with deadline(60):
        assert main(["--out", str(out), "--export", str(tmp_path / "w.pt"), "--quiet"]) == 0
        load_pretrained(tmp_path / "w.pt")
        if name == "metrics.jsonl":  # read back on --resume: refused, not waited on
            assert "FIFO" in one_line_error(capsys, ["--out", str(out), "--resume", "--steps", "3"])
        else:  # only replaced
            assert main(["--out", str(out), "--resume", "--steps", "3"]) == 0
            assert (out / "DONE").read_text() == "step 3\n"


# -- 11: an interrupted --export keeps a good pair --------------------------------------------
def test_an_export_killed_at_any_rename_leaves_a_pair_that_loads(tmp_path, monkeypatch, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    path = tmp_path / "w.pt"
    assert main(["--out", str(out), "--export", str(path), "--quiet"]) == 0  # the good EMA export
    good = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("w.pt")}
    state = load_checkpoint(str(out / CKPT))
    real_replace = os.replace
    for kill_at in range(6):
        for p in tmp_path.iterdir():
            if p.name.startswith("w.pt"):
                p.unlink()
        for name, data in good.items():
            (tmp_path / name).write_bytes(data)
        calls = []

        def replace(src, dst, *a, **kw):
            calls.append(dst)
            if len(calls) > kill_at:
                raise Killed()
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", replace)
        try:
            main(["--out", str(out), "--export", str(path), "--export-weights", "raw", "--quiet"])
        except Killed:
            pass
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        net, meta = load_pretrained(path)  # the old pair or the new one, never a mismatch
        key = "ema" if meta["which"] == "ema" else "model"
        assert all(torch.equal(v, state[key][k]) for k, v in net.state_dict().items()), kill_at
        if len(calls) <= kill_at:
            assert meta["which"] == "raw"
            break
    else:
        pytest.fail("the export never finished")


# -- 12: index.md failing after DONE --------------------------------------------------------------
def test_a_failed_index_write_does_not_fail_a_finished_run(tmp_path, monkeypatch, capsys):
    real = ck.atomic_write_bytes

    def no_index(path, *args, **kw):
        if os.path.basename(str(path)) == "index.md":
            raise WriteError(str(path), "No space left on device (disk full or file-size limit)")
        return real(path, *args, **kw)

    monkeypatch.setattr(ck, "atomic_write_bytes", no_index)
    out = tmp_path / "run"
    assert train(tiny(out, steps=1))["status"] == "done"
    assert (out / "DONE").read_text() == "step 1\n"
    assert "index.md" in capsys.readouterr().err


# -- 16: crafted files are one-line errors ------------------------------------------------------
@pytest.mark.parametrize("damage", ["metrics not utf-8", "metrics a folder", "DONE a folder"])
def test_resume_over_crafted_run_files_is_one_line(tmp_path, capsys, two_steps, damage):
    out = copy_run(two_steps, tmp_path / "run")
    if damage == "metrics not utf-8":
        with open(out / "metrics.jsonl", "ab") as fh:
            fh.write(b'{"step": 2, "note": "\xff\xfe"}\n')
    else:
        name = "metrics.jsonl" if damage == "metrics a folder" else "DONE"
        (out / name).unlink()
        (out / name).mkdir()
    err = one_line_error(capsys, ["--out", str(out), "--resume", "--steps", "3"])
    assert ("metrics.jsonl" if "metrics" in damage else "DONE") in err


@pytest.mark.parametrize("damage", ["perm out of range", "perm not a permutation", "log_accum keys missing",
                                    "log_accum a string"])
def test_a_rewrapped_checkpoint_with_bad_data_is_one_line(tmp_path, capsys, two_steps, damage):
    out = copy_run(two_steps, tmp_path / "run")
    state = load_checkpoint(str(out / CKPT))
    data = state["ranks"][0]["data"]
    if damage == "perm out of range":
        data["perm"][0] = 10 ** 6
    elif damage == "perm not a permutation":
        data["perm"][0] = data["perm"][1]
    elif damage == "log_accum keys missing":
        del state["log_accum"]["wloss"]
    else:
        state["log_accum"]["loss"] = "1.0"
    save_checkpoint(state, str(out / CKPT))  # a valid checksum around bad data
    err = one_line_error(capsys, ["--out", str(out), "--resume", "--steps", "4"])
    assert "does not fit" in err and CKPT in err


@pytest.mark.parametrize("network", [{"base_channels": 2 ** 22}, {"channel_mults": [1e9]}])
def test_a_sidecar_naming_a_huge_network_is_refused_before_allocating(tmp_path, two_steps, network):
    path = tmp_path / "ema.pt"
    shutil.copy(two_steps.parent / "ema.pt", path)
    meta = json.loads(Path(sidecar_path(str(two_steps.parent / "ema.pt"))).read_text())
    meta["network"].update(network)
    Path(sidecar_path(str(path))).write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="does not describe|does not fit") as err:
        load_pretrained(path)
    assert "\n" not in str(err.value)


# -- 20: leftovers and advice ------------------------------------------------------------------
def test_a_refused_out_is_left_as_it_was(tmp_path, capsys, two_steps):
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    one_line_error(capsys, ["--out", str(foreign), *TINY_FLAGS, "--steps", "1"])
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    out = copy_run(two_steps, tmp_path / "run")  # a run, without --resume or --overwrite
    before = snapshot(out)
    one_line_error(capsys, ["--out", str(out), *TINY_FLAGS, "--steps", "1"])
    assert snapshot(out) == before and not (out / ".varweight-lock").exists()  # copy_run removed it


def test_after_a_failure_before_the_first_checkpoint_the_advice_works(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    class Boom(Callbacks):
        def on_batch(self, step, batch):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(tiny(out, steps=4), Boom())
    argv = ["--out", str(out), *TINY_FLAGS, "--steps", "4"]
    for extra in ([], ["--resume"]):
        err = one_line_error(capsys, argv + extra)
        assert "before its first checkpoint" in err and "--overwrite" in err, err
    assert main(argv + ["--overwrite"]) == 0


def test_random_bytes_in_a_checkpoint_are_called_corrupt(tmp_path):
    path = tmp_path / "ckpt_00000001.pt"
    for seed in range(8):
        path.write_bytes(random.Random(seed).randbytes(3000))
        with pytest.raises(CheckpointError, match="corrupt") as err:
            load_checkpoint(str(path))
        assert "pickled" not in str(err.value)


def test_negative_numbers_in_scientific_notation_are_values():
    assert parse_config(["--vaw-logsnr-range", "-1.2e1", "12"]).vaw_logsnr_range == (-12.0, 12.0)
    assert parse_config(["--vaw-logsnr-range", "-1.5E+1", "1e1"]).vaw_logsnr_range == (-15.0, 10.0)


# -- 21: races ------------------------------------------------------------------------------------
def test_rank1_does_not_see_rank0s_write_probe(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / ".varweight-lock").touch()
    (out / "checkpoints" / ".write-test-abcd1234").touch()  # rank 0 in check_writable, meanwhile
    check_run_folder(tiny(out, steps=1).validate(), main_rank=False)


def test_cifar_batch_files_are_read_once_and_those_bytes_unpickled(tmp_path, monkeypatch):
    import builtins

    import torchvision.datasets as tvd

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    files, batches = [], []
    for j in range(2):
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        blob = pickle.dumps({"data": data, "labels": [0, 1, 2]})
        (folder / f"data_batch_{j}").write_bytes(blob)
        files.append([f"data_batch_{j}", hashlib.md5(blob).hexdigest()])
        batches.append(data)
    monkeypatch.setattr(tvd.CIFAR10, "train_list", files)
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [])
    opened = []
    real_open, real_os_open = builtins.open, os.open

    def counting(opener):
        def wrapped(path, *args, **kw):
            if os.path.basename(str(path)).startswith("data_batch_"):
                opened.append(os.path.basename(str(path)))
            return opener(path, *args, **kw)
        return wrapped

    monkeypatch.setattr(builtins, "open", counting(real_open))
    monkeypatch.setattr(os, "open", counting(real_os_open))
    images, classes = load_dataset("cifar10", root=str(tmp_path))
    monkeypatch.undo()
    assert sorted(opened) == ["data_batch_0", "data_batch_1"], opened
    assert classes == 10 and torch.equal(images, torch.from_numpy(np.vstack(batches).reshape(-1, 3, 32, 32)))


def test_the_digits_classifier_cache_never_writes_through_a_planted_name(tmp_path):
    from varweight_kernels.evaluation import digits_classifier as dc

    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "cache" / dc.WEIGHTS_FILENAME
    target.parent.mkdir()
    (target.parent / (target.name + f".tmp{os.getpid()}")).symlink_to(victim)  # the old guessable name
    dc.save_classifier(dc.DigitsNet(), 0.5, target)
    assert victim.read_text() == "precious"
    assert dc.load_classifier(target)[1] == 0.5


# -- 22: the installed build past the source tree's egg-info ------------------------------------
def test_the_installed_build_is_found_past_the_source_egg_info(tmp_path, monkeypatch):
    """The loader's search, with a fake source tree (its ``varweight.egg-info`` first on the path,
    as from the repository root) and a fake non-editable install; a real ``pip install .`` into a
    fresh environment compiles the extension (minutes), so it is not run here."""
    from varweight_kernels.backends.extension import CPU_MODULE, installed_library

    src, site = tmp_path / "src", tmp_path / "site"
    egg = src / "varweight.egg-info"
    egg.mkdir(parents=True)
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: varweight\nVersion: 0.1\n")
    (egg / "SOURCES.txt").write_text("setup.py\nvarweight_kernels/__init__.py\n")
    dist = site / "varweight-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: varweight\nVersion: 0.1\n")
    so = site / "varweight_kernels" / "_C.cpython-311-x86_64-linux-gnu.so"
    so.parent.mkdir()
    so.write_bytes(b"\x7fELF")
    (dist / "RECORD").write_text(f"varweight_kernels/{so.name},,\nvarweight-0.1.dist-info/RECORD,,\n")
    monkeypatch.setattr(sys, "path", [str(src), str(site)])
    assert installed_library(CPU_MODULE) == str(so)
