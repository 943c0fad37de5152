"""Issue 24, the experiments side: links and escaping labels (4), the runner's own flags and
recorded settings (6), crafted inputs to `report` (15, 17), trainers that die with the runner
(19) and a report that is never half one invocation and half another (20); issue 25 item 5 (no
module of the experiments imports the report back)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from varweight_kernels.experiments import __main__ as cli
from varweight_kernels.experiments import report as report_mod
from varweight_kernels.experiments.report import build_report
from varweight_kernels.experiments.runner import parse_grid, run_experiment
from varweight_kernels.training.config import TrainError
from varweight_kernels.training.run_dir import lock_run_folder, release_run_folder

REPO = Path(__file__).resolve().parents[1]

# A stand-in for train_cifar.py: what it was called with goes to argv.jsonl in its folder; it
# writes a metrics record at --steps and DONE, or with FAKE_SLEEP writes pid and sleeps (on
# SIGTERM: "term", then ends after a second, as the trainer ends after its checkpoint).
FAKE_TRAINER = r'''
import argparse, json, os, signal, sys, time
ap = argparse.ArgumentParser()
ap.add_argument("--out"); ap.add_argument("--seed", type=int); ap.add_argument("--weighting")
ap.add_argument("--steps", type=int, default=10); ap.add_argument("--resume", action="store_true")
args, _ = ap.parse_known_args()
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "argv.jsonl"), "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\n")
if os.environ.get("FAKE_SLEEP"):
    def term(signum, frame):
        open(os.path.join(args.out, "term"), "w").close()
        time.sleep(1.0)
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    with open(os.path.join(args.out, "pid"), "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(float(os.environ["FAKE_SLEEP"]))
    sys.exit(0)
with open(os.path.join(args.out, "metrics.jsonl"), "a") as fh:
    fh.write(json.dumps({"step": args.steps, "loss": 1.0 + args.seed / 10}) + "\n")
open(os.path.join(args.out, "DONE"), "w").write(f"step {args.steps}\n")
'''


@pytest.fixture
def fake_trainer(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAINER)
    return str(path)


def _run(folder: Path, steps=(100, 200), loss=(2.0, 1.0), done=True, extra=None):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as fh:
        for s, v in zip(steps, loss):
            fh.write(json.dumps({"step": s, "loss": v}) + "\n")
        if extra is not None:
            fh.write(extra + "\n")
    if done:
        (folder / "DONE").write_text(f"step {steps[-1]}\n")


def _experiment(root: Path, shift=0.0) -> Path:
    for s in range(3):
        _run(root / "runs" / "uniform" / f"seed{s}", loss=(2.0, 1.0 + s / 10))
        _run(root / "runs" / "vaw" / f"seed{s}", loss=(2.0, 0.9 + s / 10 + (0.01, -0.02, 0.03)[s] + shift))
    return root


def _cli_error(capsys, *argv) -> str:
    """The one-line error of a refused CLI call (exit status 2)."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------
# 4: links and labels that escape the experiment
def test_report_refuses_a_linked_report_folder(tmp_path, capsys):
    exp = _experiment(tmp_path / "exp")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (exp / "report").symlink_to(target)
    assert "is a link" in _cli_error(capsys, "report", str(exp))
    assert list(target.iterdir()) == [] and not (exp / "report.md").exists()


def test_report_refuses_a_linked_run_folder(tmp_path, capsys):
    exp = _experiment(tmp_path / "exp")
    other = tmp_path / "other_run"
    _run(other)
    (other / "index.md").write_text("not yours\n")
    (exp / "runs" / "vaw" / "seed7").symlink_to(other)
    assert "seed7" in _cli_error(capsys, "report", str(exp))
    assert (other / "index.md").read_text() == "not yours\n"
    shutil.rmtree(exp / "runs" / "uniform")
    (exp / "runs" / "uniform").symlink_to(other.parent)  # a linked variant folder
    assert "is a link" in _cli_error(capsys, "report", str(exp))


def test_runner_refuses_linked_folders_and_escaping_labels(tmp_path, fake_trainer, capsys):
    exp, target = tmp_path / "exp", tmp_path / "target"
    target.mkdir()
    (exp / "runs").mkdir(parents=True)
    (exp / "runs" / "uniform").symlink_to(target)
    with pytest.raises(ValueError, match="is a link"):
        run_experiment(str(exp), ["uniform"], [0], trainer=fake_trainer)
    (exp / "runs" / "uniform").unlink()
    (exp / "runs" / "uniform").mkdir()
    (exp / "runs" / "uniform" / "seed0").symlink_to(target)
    with pytest.raises(ValueError, match="is a link"):
        run_experiment(str(exp), ["uniform"], [0], trainer=fake_trainer)
    assert list(target.iterdir()) == []
    err = _cli_error(capsys, "run", "--methods", "..", "--seeds", "0", "--out", str(exp), "--trainer", fake_trainer)
    assert "not a plain folder name" in err and not (exp / "seed0").exists()


def test_report_out_that_is_a_folder_is_refused_before_writing(tmp_path, capsys):
    exp = _experiment(tmp_path / "exp")
    folder = tmp_path / "dest" / "reports"
    folder.mkdir(parents=True)
    assert "is a folder" in _cli_error(capsys, "report", str(exp), "--out", str(folder))
    assert not (folder.parent / "report").exists() and list(folder.iterdir()) == []
    out = build_report(str(exp), out=str(folder / "r.md"))  # a file path works
    assert Path(out["report"]).is_file() and (folder / "report" / "summary.csv").is_file()


# ---------------------------------------------------------------------------------------------
# 6: the runner's own flags, and the settings each run finished with
@pytest.mark.parametrize("flags", [["--seed", "7"], ["--see", "7"], ["--out=/tmp/x"], ["--weighting", "vaw"],
                                   ["--preset", "digits-cpu"], ["--resume"], ["--no-overwrite"]])
def test_passthrough_cannot_set_the_runners_flags(tmp_path, fake_trainer, flags):
    with pytest.raises(ValueError, match="the runner sets itself"):
        run_experiment(str(tmp_path / "exp"), ["uniform"], [0, 1], passthrough=flags, trainer=fake_trainer,
                       dry_run=True)


def test_grid_values_cannot_set_the_runners_flags():
    for spec in ("flip=--out=/x", "lr=1e-3,--seed=3", "seed=1,2", "weighting=vaw"):
        with pytest.raises(ValueError, match="the runner sets itself"):
            parse_grid([spec], ["uniform", "vaw"])
    assert [a.values for a in parse_grid(["vaw.power=-1,1"], ["vaw"])] == [["-1", "1"]]


def test_a_finished_run_with_other_passthrough_flags_is_resumed_not_skipped(tmp_path, fake_trainer):
    exp = tmp_path / "exp"
    argv = exp / "runs" / "uniform" / "seed0" / "argv.jsonl"
    quiet = open(os.devnull, "w")
    res = run_experiment(str(exp), ["uniform"], [0], passthrough=["--steps", "4"], trainer=fake_trainer, stream=quiet)
    assert res["done"] == [str(exp / "runs" / "uniform" / "seed0")]
    res = run_experiment(str(exp), ["uniform"], [0], passthrough=["--steps", "4"], trainer=fake_trainer, stream=quiet)
    assert len(res["skipped"]) == 1 and len(argv.read_text().splitlines()) == 1
    res = run_experiment(str(exp), ["uniform"], [0], passthrough=["--steps", "8"], trainer=fake_trainer, stream=quiet)
    assert not res["skipped"] and len(res["done"]) == 1
    last = json.loads(argv.read_text().splitlines()[-1])
    assert last[-3:] == ["--steps", "8", "--resume"]
    record = json.loads((exp / "experiment.json").read_text())["runs"]["uniform/seed0"]
    assert record == {"preset": None, "flags": [], "passthrough": ["--steps", "8"]}


def test_report_refuses_to_pool_runs_that_finished_with_other_flags(tmp_path, fake_trainer, capsys):
    exp = tmp_path / "exp"
    quiet = open(os.devnull, "w")
    for seeds, steps in (([0, 1], "4"), ([2], "8")):
        run_experiment(str(exp), ["uniform", "vaw"], seeds, passthrough=["--steps", steps], trainer=fake_trainer,
                       stream=quiet)
    err = _cli_error(capsys, "report", str(exp))
    assert "runs/uniform" in err and "seeds 0, 1 with" in err and "seeds 2 with" in err
    run_experiment(str(exp), ["uniform", "vaw"], [0, 1], passthrough=["--steps", "8"], trainer=fake_trainer,
                   stream=quiet)
    assert build_report(str(exp))["summary"]["uniform"]["n"] == 3


# ---------------------------------------------------------------------------------------------
# 15 and 17: crafted inputs end in one line naming the file, never a traceback or a hang
@pytest.mark.parametrize("step", ["[1]", "null", "Infinity", "1e300", "100.0", "true", "-1"])
def test_report_names_a_metrics_step_that_is_not_an_integer(tmp_path, capsys, step):
    exp = _experiment(tmp_path / "exp")
    with open(exp / "runs" / "vaw" / "seed1" / "metrics.jsonl", "a") as fh:
        fh.write(f'{{"step": {step}, "loss": 0.5}}\n')
    err = _cli_error(capsys, "report", str(exp))
    assert "vaw/seed1/metrics.jsonl line 3" in err and "step" in err


def _binstats(folder: Path, **override):
    arrays = {"steps": np.array([100, 200]), "bin_edges": np.linspace(-8, 8, 5), "mean": np.ones((2, 4)),
              "var": np.ones((2, 4)), "count": np.full((2, 4), 10.0)}
    arrays.update(override)
    np.savez(folder / "binstats.npz", **arrays)


@pytest.mark.parametrize("case, words", [
    ("mean_1d", "'mean' has shape (4,)"),
    ("string_array", "holds <U"),
    ("persample_strings", "holds <U"),
    ("persample_lengths", "differ in length"),
    ("metrics_folder", "is a folder"),
    ("metrics_not_utf8", "not UTF-8"),
    ("damaged_npz", "not a readable .npz"),
    ("metrics_link", "is a link"),
])
def test_report_names_the_file_of_crafted_inputs(tmp_path, capsys, case, words):
    exp = _experiment(tmp_path / "exp")
    run = exp / "runs" / "vaw" / "seed2"
    name = {"persample_strings": "persample.npz", "persample_lengths": "persample.npz", "damaged_npz": "binstats.npz"}
    name = name.get(case, "binstats.npz" if case in ("mean_1d", "string_array") else "metrics.jsonl")
    if case == "mean_1d":
        _binstats(run, mean=np.ones(4))
    elif case == "string_array":
        _binstats(run, var=np.full((2, 4), "abc"))
    elif case == "persample_strings":
        np.savez(run / "persample.npz", lam=np.array(["a"] * 40), loss=np.ones(40))
    elif case == "persample_lengths":
        np.savez(run / "persample.npz", lam=np.ones(40), loss=np.ones(39))
    elif case == "metrics_folder":
        (run / "metrics.jsonl").unlink()
        (run / "metrics.jsonl").mkdir()
    elif case == "metrics_not_utf8":
        (run / "metrics.jsonl").write_bytes(b'{"step": 100, "loss": 1.0}\n\xff\xfe{"step": 200}\n')
    elif case == "damaged_npz":
        (run / "binstats.npz").write_bytes(b"PK\x03\x04 not really a zip")
    elif case == "metrics_link":
        secret = tmp_path / "secret.jsonl"
        secret.write_text('{"step": 1, "token": 7}\n')
        (run / "metrics.jsonl").unlink()
        (run / "metrics.jsonl").symlink_to(secret)
    err = _cli_error(capsys, "report", str(exp))
    assert f"vaw/seed2/{name}" in err and words in err, err


@pytest.mark.parametrize("name", ["DONE", "metrics.jsonl"])
def test_a_fifo_in_a_run_does_not_block_the_report(tmp_path, capsys, name):
    exp = _experiment(tmp_path / "exp")
    path = exp / "runs" / "uniform" / "seed0" / name
    path.unlink()
    os.mkfifo(path)

    def hung(signum, frame):
        raise TimeoutError(f"report blocked on the FIFO {name}")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        err = _cli_error(capsys, "report", str(exp))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert f"uniform/seed0/{name} is a FIFO" in err


# ---------------------------------------------------------------------------------------------
# 19: the trainers die with the runner, and hold its lock until they do
def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _wait_for(predicate, seconds: float, what: str):
    end = time.time() + seconds
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _start_runner(tmp_path, fake_trainer):
    exp = tmp_path / "exp"
    env = dict(os.environ, PYTHONPATH=str(REPO), FAKE_SLEEP="60")
    runner = subprocess.Popen([sys.executable, "-m", "varweight_kernels.experiments", "run", "--methods", "uniform",
                               "--seeds", "0", "--out", str(exp), "--trainer", fake_trainer],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = exp / "runs" / "uniform" / "seed0" / "pid"
    _wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, "the trainer to start")
    return exp, runner, int(pid_file.read_text())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_kill_9_of_the_runner_ends_its_trainer_which_holds_the_lock_until_then(tmp_path, fake_trainer):
    exp, runner, trainer = _start_runner(tmp_path, fake_trainer)
    try:
        runner.kill()
        runner.wait(30)
        # the trainer is told (SIGTERM) and, while it checkpoints, the experiment stays locked
        _wait_for(lambda: (exp / "runs" / "uniform" / "seed0" / "term").exists(), 15, "SIGTERM at the trainer")
        with pytest.raises(TrainError, match="in use"):
            lock_run_folder(str(exp))
        _wait_for(lambda: not _alive(trainer), 15, "the trainer to end")
        lock_run_folder(str(exp))
        release_run_folder(str(exp))
    finally:
        if _alive(trainer):
            os.kill(trainer, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_to_the_runner_is_passed_on_and_waited_for(tmp_path, fake_trainer, signum):
    exp, runner, trainer = _start_runner(tmp_path, fake_trainer)
    try:
        runner.send_signal(signum)
        out, err = runner.communicate(timeout=30)
        assert runner.returncode == 128 + signum, err
        assert (exp / "runs" / "uniform" / "seed0" / "term").exists() or signum == signal.SIGINT
        assert not _alive(trainer) and "Traceback" not in err
        assert f"interrupted by {signal.Signals(signum).name}: 1 run(s) stopped" in err
    finally:
        if _alive(trainer):
            os.kill(trainer, signal.SIGKILL)


def test_an_error_in_the_runner_ends_its_trainers_too(tmp_path, fake_trainer, monkeypatch):
    exp = tmp_path / "exp"
    pid_file = exp / "runs" / "uniform" / "seed0" / "pid"
    real_sleep = time.sleep

    def failing_sleep(seconds):
        if pid_file.exists() and pid_file.read_text():
            raise RuntimeError("the runner fails")
        real_sleep(seconds)

    monkeypatch.setenv("FAKE_SLEEP", "60")
    monkeypatch.setattr(time, "sleep", failing_sleep)
    with pytest.raises(RuntimeError, match="the runner fails"):
        run_experiment(str(exp), ["uniform"], [0], trainer=fake_trainer, stream=open(os.devnull, "w"))
    monkeypatch.undo()
    trainer = int(pid_file.read_text())
    try:
        assert not _alive(trainer) and (pid_file.parent / "term").exists()
    finally:
        if _alive(trainer):
            os.kill(trainer, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# 20: a killed report leaves the previous report, the new one, or no report.md
class _Killed(BaseException):
    """Stands for kill -9: nothing of the report code handles it."""


FILES = ("report.md", "report/per_seed.csv", "report/summary.csv", "report/paired.csv")


def _snapshot(exp: Path):
    return {name: (exp / name).read_bytes() if (exp / name).exists() else None for name in FILES}


def test_a_report_killed_at_any_write_is_never_two_invocations(tmp_path, monkeypatch):
    for name in ("plot_metric_vs_step", "plot_paired_diff_vs_step", "plot_loss_vs_logsnr",
                 "plot_variance_heatmap", "plot_vaw_weights", "plot_why"):  # the figures are not needed here
        monkeypatch.setattr(report_mod, name, lambda *a, **k: False)
    template = _experiment(tmp_path / "template" / "exp")
    build_report(str(template))
    old = _snapshot(template)
    with open(template / "runs" / "vaw" / "seed0" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 300, "loss": 0.25}) + "\n")
    fresh = tmp_path / "fresh" / "exp"
    shutil.copytree(template, fresh, symlinks=True)
    build_report(str(fresh))
    new = _snapshot(fresh)
    assert old["report.md"] != new["report.md"] and old["report/per_seed.csv"] != new["report/per_seed.csv"]

    calls = {"n": 0, "kill_at": 0}
    real = {name: getattr(os, name) for name in ("replace", "rename", "unlink")}

    def counting(name):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["kill_at"]:
                raise _Killed
            return real[name](*args, **kwargs)
        return call

    for kill_at in range(1, 200):
        exp = tmp_path / f"k{kill_at}" / "exp"
        shutil.copytree(template, exp, symlinks=True)
        calls.update(n=0, kill_at=kill_at)
        with monkeypatch.context() as m:
            for name in real:
                m.setattr(os, name, counting(name))
            try:
                build_report(str(exp))
                finished = True
            except _Killed:
                finished = False
        now = _snapshot(exp)
        if now["report.md"] is not None:
            assert now in (old, new), f"killed at write {kill_at}: report.md and the CSVs differ in invocation"
        if finished:
            assert now == new
            break
    assert kill_at > 5  # the crash points were reached


def test_a_report_removes_what_a_killed_report_left(tmp_path):
    exp = _experiment(tmp_path / "exp")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left = exp / f"{report_mod.STAGING_PREFIX}{gone.pid}-0badc0de"
    left.mkdir()
    (left / "per_seed.csv").write_text("half\n")
    build_report(str(exp))
    assert not left.exists() and (exp / "report" / "per_seed.csv").is_file()
    assert not [p for p in exp.iterdir() if p.name.startswith(report_mod.STAGING_PREFIX)]


# ---------------------------------------------------------------------------------------------
# issue 25, item 5: the run data model has its own module; nothing imports the report back
def test_the_experiments_modules_do_not_import_the_report_back():
    import ast

    import varweight_kernels.experiments as pkg

    folder = Path(pkg.__file__).parent
    for path in folder.glob("*.py"):
        if path.name in ("report.py", "__init__.py", "__main__.py"):
            continue
        imported = {node.module for node in ast.walk(ast.parse(path.read_text()))  # type-checking imports too
                    if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert "report" not in imported, path.name
    assert report_mod.fmt.__module__ == "varweight_kernels.experiments.stats"
    assert report_mod.load_runs.__module__ == report_mod.Run.__module__ == "varweight_kernels.experiments.runs"
