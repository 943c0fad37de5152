"""Issue #24 items 1, 5, 13 and 18: resumes that end where they start, transient read errors,
backend changes, and the FID loaders (CPU, digits; the CIFAR FID tests use fake weights).

- 1: no code runs from the Inception weights (--fid-weights, the hub cache, a download) or from
  the reference-statistics cache; a wrong --fid-weights stops the trainer before its first step.
- 5: a resume at the last step keeps the off-cadence final metrics record (--resume of a
  finished run, kill -9 after the last checkpoint, SIGTERM in the last step).
- 13: a checkpoint that cannot be read now (EIO, EMFILE, out of memory) is one line and left
  alone, never quarantined; under DDP rank 0 picks the file and every rank loads that one.
- 18: a --backend change on --resume is bitwise in everything README "Reliability" says, and
  the one thing it excepts (``weighted_loss``, a log value) stays within float32 rounding.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import socket
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from varweight_kernels import available_backends
from varweight_kernels.evaluation import FIDEvaluator
from varweight_kernels.evaluation import fid as fid_mod
from varweight_kernels.training import loop
from varweight_kernels.training.checkpoint import list_checkpoints, load_checkpoint
from varweight_kernels.training.cli import main
from varweight_kernels.training.distributed import DistInfo
from varweight_kernels.training.loop import Callbacks, train
from varweight_kernels.training.state import read_resume_point
from test_evaluation import fake_inception_weights  # noqa: F401 (a fixture)
from test_hardening import Payload, copy_run
from tiny_runs import (ROOT, TINY_FLAGS, assert_runs_equal, assert_tree_equal, one_thread, read_metrics,  # noqa: F401
                       strip_timing, subprocess_env, tiny)

STEPS = 5  # off the log cadence (TINY logs every 2 steps): the run ends with a "final" record


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


# -- 1: the FID loaders -------------------------------------------------------------------------------
IMAGES = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def evil_weights(path: Path, marker: Path) -> Path:
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload(marker)}, path)
    return path


def cifar_evaluator(tmp_path, **kw) -> FIDEvaluator:
    return FIDEvaluator("cifar10", cache_dir=tmp_path / "cache", reference_images=IMAGES, num_samples=4,
                        batch_size=4, **kw)


def score_warnings(ev: FIDEvaluator):
    """``ev.score(IMAGES)`` and the RuntimeWarnings it gave (or the exception it raised)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            result = ev.score(IMAGES)
        except Exception as exc:
            result = exc
    return result, [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]


def test_a_planted_pickle_as_fid_weights_never_runs(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    ev = cifar_evaluator(tmp_path, weights_path=evil_weights(tmp_path / "inception.pth", marker))
    result, _ = score_warnings(ev)
    assert not marker.exists()
    assert type(result).__name__ == "FIDWeightsError", result
    msg = str(result)
    assert len(msg.splitlines()) == 1 and "inception.pth" in msg and "sha256" in msg and "not loaded" in msg, msg


def test_a_planted_pickle_in_the_hub_cache_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "PAYLOAD_RAN"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    evil_weights(tmp_path / "hub" / "checkpoints" / fid_mod.INCEPTION_FILENAME, marker)
    result, msgs = score_warnings(cifar_evaluator(tmp_path))
    assert not marker.exists()
    assert result is None and len(msgs) == 1, (result, msgs)
    assert fid_mod.INCEPTION_FILENAME in msgs[0] and "sha256" in msgs[0], msgs


def test_a_download_that_is_not_the_published_file_is_never_kept(tmp_path, monkeypatch):
    marker = tmp_path / "PAYLOAD_RAN"
    payload = evil_weights(tmp_path / "served.pth", marker).read_bytes()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(fid_mod.urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))
    result, msgs = score_warnings(cifar_evaluator(tmp_path))
    assert not marker.exists()
    assert result is None and len(msgs) == 1 and "sha256" in msgs[0], (result, msgs)
    assert not any((tmp_path / "hub" / "checkpoints").iterdir())  # neither the file nor a .part


@pytest.mark.slow
def test_a_planted_statistics_cache_never_runs(tmp_path, monkeypatch, fake_inception_weights):
    """torch-fidelity's .pt cache (torch.load(weights_only=False)) is never read; ours is an npz
    read with allow_pickle=False, and a planted one is recomputed."""
    marker = tmp_path / "PAYLOAD_RAN"
    digest = hashlib.sha256(fake_inception_weights.read_bytes()).hexdigest()
    monkeypatch.setattr(fid_mod, "INCEPTION_SHA256", digest, raising=False)  # the fake stands in for the real file
    cache = tmp_path / "cache" / "fidelity_cache"
    cache.mkdir(parents=True)
    stem = f"cifar10-train-n{len(IMAGES)}-{fake_inception_weights.stem}-inception-v3-compat"
    torch.save(Payload(marker), cache / f"{stem}-stat-fid-2048.pt")  # where torch-fidelity cached them
    for what in ("2048", "logits_unbiased"):
        torch.save(Payload(marker), cache / f"{stem}-features-{what}.pt")
    ours = cache / f"cifar10-train-n{len(IMAGES)}-inception-v3-compat-{digest[:8]}-stat-fid-2048.npz"
    np.savez(ours, mu=np.array([Payload(marker)], dtype=object), sigma=np.zeros((1, 1)))
    ev = cifar_evaluator(tmp_path, weights_path=fake_inception_weights)
    result, msgs = score_warnings(ev)
    assert not marker.exists()
    assert isinstance(result, dict) and np.isfinite(result["fid"]) and not msgs, (result, msgs)
    with np.load(ours, allow_pickle=False) as z:  # replaced by the real statistics
        assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048)
    again = cifar_evaluator(tmp_path, weights_path=fake_inception_weights).score(IMAGES)
    assert again == result  # read back from the npz: the same value


@pytest.mark.parametrize("kind", ["pickle-with-code", "other-weights"])
def test_a_wrong_fid_weights_file_stops_the_trainer_before_its_first_step(tmp_path, capsys, monkeypatch,
                                                                          fake_inception_weights, kind):
    marker = tmp_path / "PAYLOAD_RAN"
    weights = (evil_weights(tmp_path / "inception.pth", marker) if kind == "pickle-with-code"
               else fake_inception_weights)
    monkeypatch.setattr(loop, "load_data", lambda cfg: IMAGES.repeat(8, 1, 1, 1))  # no CIFAR download here
    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(["--out", str(out), *TINY_FLAGS, "--dataset", "cifar10", "--steps", "2", "--fid-every", "1",
               "--fid-samples", "2", "--fid-weights", str(weights)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--fid-weights" in err and weights.name in err and "sha256" in err, err
    assert not marker.exists()
    assert not list_checkpoints(str(out / "checkpoints"))  # not one step was trained


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


# -- 13: a transient read error on --resume -----------------------------------------------------------
NEWEST = f"ckpt_{STEPS:08d}.pt"


def failing_load(error: BaseException, name: str = NEWEST):
    """torch.load that raises ``error`` when it opens the file ``name`` (the newest checkpoint)."""
    real = torch.load

    def load(source, *args, **kwargs):
        if os.path.basename(_path_of(source)) == name:
            raise error
        return real(source, *args, **kwargs)
    return load


def _path_of(source) -> str:
    """The file torch.load reads: a path, or the path behind an open file (checkpoints are read
    from a handle opened as a regular file)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    try:
        return os.readlink(f"/proc/self/fd/{source.fileno()}")
    except (AttributeError, OSError, ValueError):
        return ""


def checkpoint_names(out) -> list:
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"),
                                   OSError(errno.EMFILE, "Too many open files"), MemoryError()],
                         ids=["EIO", "EMFILE", "MemoryError"])
def test_a_transient_read_error_on_resume_quarantines_nothing(tmp_path, capsys, monkeypatch, unbroken, error):
    out = copy_run(unbroken, tmp_path / "run")
    (out / "DONE").unlink()
    names = checkpoint_names(out)
    with monkeypatch.context() as m:
        m.setattr(torch, "load", failing_load(error))
        capsys.readouterr()
        assert main(["--out", str(out), "--resume"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert NEWEST in err and "cannot be read" in err and "left as it is" in err, err
    assert checkpoint_names(out) == names  # nothing quarantined, nothing removed
    assert main(["--out", str(out), "--resume"]) == 0  # the cause gone, the newest one resumes
    assert_final_record_kept(unbroken, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resume_worker(rank, world, port, runs):
    """On every rank, read_resume_point of each run in ``runs``: ``(out, error on rank 1 or "")``.
    Writes ``<out>/rank<r>.json``: the checkpoint the rank resumes from, or its error."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for out, rank1_error in runs:
            if rank == 1 and rank1_error:
                torch.load = failing_load(OSError(errno.EIO, "Input/output error"))
            try:
                found = {"path": os.path.basename(read_resume_point(tiny(out, steps=STEPS, resume=True),
                                                                    DistInfo()).path)}
            except Exception as exc:
                found = {"error": f"{type(exc).__name__}: {exc}"}
            with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
                json.dump(found, fh)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_resume_from_the_same_checkpoint(tmp_path, unbroken):
    """Rank 1 alone cannot read the newest file: every rank stops (before, rank 1 took the older one
    while rank 0 took the newest). A corrupt newest file: quarantined once, every rank takes the older."""
    transient = copy_run(unbroken, tmp_path / "transient")
    corrupt = copy_run(unbroken, tmp_path / "corrupt")
    newest = corrupt / "checkpoints" / NEWEST
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    mp.spawn(_resume_worker, args=(2, _free_port(), [(str(transient), "EIO"), (str(corrupt), "")]), nprocs=2,
             join=True)
    seen = [json.loads((transient / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all("error" in s for s in seen), seen
    assert all("rank 1" in s["error"] and NEWEST in s["error"] and "cannot be read" in s["error"] for s in seen), seen
    assert checkpoint_names(transient) == checkpoint_names(unbroken)
    seen = [json.loads((corrupt / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen == [{"path": "ckpt_00000003.pt"}] * 2, seen
    assert checkpoint_names(corrupt) == ["ckpt_00000003.pt", NEWEST + ".corrupt"]


# -- 18: what a --backend change keeps bitwise ---------------------------------------------------------
@pytest.mark.skipif("cpp" not in available_backends(), reason="needs the compiled cpp backend to change to")
@pytest.mark.parametrize("first,then", [("cpp", "reference"), ("reference", "cpp")])
def test_a_backend_change_on_resume_is_bitwise_but_weighted_loss(tmp_path, first, then):
    """VAW's weighted mean is summed per bin in float64 by cpp, per sample in float32 by the
    reference: the last bit of ``weighted_loss`` (and of the checkpoint's running sum of it) may
    differ; parameters, every state, binstats and every other metric are bitwise."""
    kw = dict(weighting="vaw", steps=7)  # records 2, 4, 6, 7 (final); before the README said: all bitwise
    train(tiny(tmp_path / "ref", backend=first, **kw))
    out = tmp_path / "run"
    train(tiny(out, backend=first, **{**kw, "steps": 3}))
    train(tiny(out, backend=then, resume=True, **kw))
    for step in (6, 7):
        a = load_checkpoint(str(tmp_path / "ref" / "checkpoints" / f"ckpt_{step:08d}.pt"))
        b = load_checkpoint(str(out / "checkpoints" / f"ckpt_{step:08d}.pt"))
        wa, wb = a["log_accum"].pop("wloss"), b["log_accum"].pop("wloss")
        assert wa == pytest.approx(wb, rel=1e-6, abs=0)
        assert_tree_equal(a, b)
    ref, run = strip_timing(read_metrics(tmp_path / "ref")), strip_timing(read_metrics(out))
    assert [r["weighted_loss"] for r in ref] == pytest.approx([r["weighted_loss"] for r in run], rel=1e-6, abs=0)
    assert ([{k: v for k, v in r.items() if k != "weighted_loss"} for r in ref]
            == [{k: v for k, v in r.items() if k != "weighted_loss"} for r in run])
    assert len(ref) == 4
    a, b = binstats(tmp_path / "ref"), binstats(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_readme_states_what_a_backend_change_keeps_bitwise():
    """The claim the test above checks, where users read it (it used to promise bitwise metrics)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Reliability"):]
    section = section[:section.index("\n## ", 1)]
    assert "`--backend`" in section and "`weighted_loss`" in section
