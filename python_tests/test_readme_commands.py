"""Every command README.md shows runs, at a tiny size, or is listed in NOT_RUN with the reason.

A command is a line of a ```bash block (continuation lines joined, comments dropped) or an inline
code span of a program (python, pytest, bash, torchrun, make, pip) with its arguments. A test runs the
command exactly as README writes it, with flags appended that shrink it (argparse keeps the last
value of a flag: ``--steps 2``, one seed, a small network) and, for the experiment commands,
trainer flags after their ``--``. The commands run in this process: ``python train_cifar.py ARGS``
is ``training.cli.main(ARGS)`` (all that train_cifar.py does), ``python -m
varweight_kernels.experiments ARGS`` its ``main(ARGS)``, and the experiment runner's trainer
subprocesses call the same ``main`` in-process (a fresh interpreter costs seconds a run on CI's 2
cores). CIFAR is a fabricated extracted folder whose MD5s are registered with torchvision for the
test, so ``--download`` finds it verified and fetches nothing.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Sequence

import numpy as np
import pytest

from tiny_runs import ROOT, load_script, subprocess_env, write_fake_cifar10
from tiny_runs import one_thread  # noqa: F401  (an autouse fixture: one thread)

README = ROOT / "README.md"
PROGRAMS = ("python", "pytest", "bash", "torchrun", "make", "pip")

# Commands no test runs, and why. Each must still appear in README (a stale entry fails).
NOT_RUN = {
    "make test": "CI itself: .ci/run runs it (a fresh venv, the install, the whole suite)",
    "make VENV=path ...": "a placeholder form of make quickstart / make test",
    "pip install -r requirements/build.txt -c requirements/constraints.txt":
        "installs from the package index; the Makefile's install recipe runs it, which CI runs "
        "(test_install_commands_are_the_makefiles checks they agree)",
    'pip install --no-build-isolation -e ".[train]" -c requirements/constraints.txt':
        "installs from the package index, as above",
    "torchrun --nproc_per_node 8 train_cifar.py --preset seed-cifar10 --weighting vaw --out runs/c10-ddp":
        "GPU: eight processes, one a GPU; DDP itself runs on CPU in test_distributed.py (gloo)",
    "bash benchmarks/gpu_check.sh": "GPU: the prepared check of a CUDA machine (builds and tests the CUDA kernels)",
    "python benchmarks/images_per_s.py --device cuda --out results/images_per_s":
        "GPU: --device cuda; the script's CPU path runs tiny in test_benchmarks_smoke.py",
}

# README command -> the test here that runs it (filled by @runs).
RUN: Dict[str, str] = {}


def runs(*commands: str) -> Callable:
    def register(test):
        for command in commands:
            assert command not in RUN, command
            RUN[command] = test.__name__
        return test
    return register


def readme_commands(text: str) -> List[str]:
    """The commands of README, in order (see the module docstring)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [span for span in re.findall(r"`([^`\n]+)`", prose)  # a program with arguments, not `torchrun`
              if span.split()[0] in PROGRAMS and len(span.split()) > 1]
    return list(dict.fromkeys(found))


COMMANDS = readme_commands(README.read_text())


def test_every_readme_command_is_run_or_listed_with_a_reason():
    assert len(COMMANDS) > 20  # the extraction found the blocks
    assert not set(RUN) & set(NOT_RUN)
    assert sorted(set(COMMANDS) - set(RUN) - set(NOT_RUN)) == [], "a README command no test runs"
    assert sorted((set(RUN) | set(NOT_RUN)) - set(COMMANDS)) == [], "listed, but no longer in README"


def test_extraction_joins_continuations_and_drops_comments():
    text = ("```bash\n# a comment\npython a.py --x 1 \\\n    --y 2   # why\n```\n"
            "then `pytest b.py`, `vaw.eval()` and DDP/`torchrun`\n```python\npython not_a_command.py\n```\n")
    assert readme_commands(text) == ["python a.py --x 1 --y 2", "pytest b.py"]


def test_install_commands_are_the_makefiles():
    """README's pip lines are what `make install` runs (which CI runs through `make test`)."""
    dry = subprocess.run(["make", "-n", "install", "VENV=/venv"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    makefile = {" ".join(line.replace("/venv/bin/pip", "pip").replace(" -q", "").split())
                for line in dry.splitlines() if "pip install" in line}
    readme = {c for c in COMMANDS if c.startswith("pip install")}
    assert readme and readme == makefile


# --------------------------------------------------------------------------------------------
# Running a README command in this process
# --------------------------------------------------------------------------------------------
class _InProcessTrainer:
    """Stands in for ``subprocess.Popen`` in the experiment runner: runs its ``python
    train_cifar.py ARGS`` command as ``training.cli.main(ARGS)``, output to the run's log."""

    def __init__(self, cmd, stdout=None, stderr=None, env=None, cwd=None, **process_options):
        """``process_options`` (new session, death signal, inherited lock fd) concern a real child only."""
        from varweight_kernels.training import cli

        assert Path(cmd[1]).name == "train_cifar.py", cmd
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
            self.returncode = _exit_status(lambda: cli.main(cmd[2:]))

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        return self.returncode


def _exit_status(fn: Callable[[], int]) -> int:
    try:
        return int(fn() or 0)
    except SystemExit as exc:  # argparse (--help, bad flags)
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1


def readme(command: str, *tail: str, before_passthrough: Sequence[str] = ()) -> str:
    """Run README's ``command`` in this process with ``tail`` appended (and ``before_passthrough``
    inserted before its ``--``); returns what it printed. A non-zero exit fails the test."""
    assert command in COMMANDS, f"not a README command: {command}"
    argv = [arg[1:-1] if arg.startswith("[") and arg.endswith("]") else arg  # an optional flag: given
            for arg in shlex.split(command)]
    if before_passthrough:
        cut = argv.index("--") if "--" in argv else len(argv)
        argv[cut:cut] = list(before_passthrough)
    argv += list(tail)
    if argv[:2] == ["python", "train_cifar.py"]:
        from varweight_kernels.training import cli
        run = lambda: cli.main(argv[2:])  # noqa: E731
    elif argv[:3] == ["python", "-m", "varweight_kernels.experiments"]:
        from varweight_kernels.experiments.__main__ import main
        run = lambda: main(argv[3:])  # noqa: E731
    elif argv[0] == "python" and argv[1].startswith("benchmarks/"):
        script = load_script(argv[1])
        run = lambda: script.main(argv[2:])  # noqa: E731
    else:
        raise AssertionError(f"no in-process runner for {command}")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = _exit_status(run)
    assert status == 0, f"{command} exited {status}: {err.getvalue()[-2000:]}{out.getvalue()[-2000:]}"
    return out.getvalue()


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    """One digits-classifier cache for the module (the classifier trains once, ~3 s)."""
    return tmp_path_factory.mktemp("varweight_cache")


@pytest.fixture
def here(tmp_path, monkeypatch, classifier_cache):
    """README's commands run from the repository root; their outputs go to a temp folder instead
    (a shared digits-classifier cache, CIFAR fabricated under data/, trainer subprocesses in-process)."""
    from varweight_kernels.experiments import runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VARWEIGHT_CACHE", str(classifier_cache))
    monkeypatch.setattr(runner, "subprocess", SimpleNamespace(Popen=_InProcessTrainer, STDOUT=subprocess.STDOUT))
    rng = np.random.default_rng(0)
    write_fake_cifar10(tmp_path / "data/cifar-10-batches-py", lambda i: rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                       monkeypatch)
    return tmp_path


# Trainer flags that make a run tiny: a step or two, small networks, few samples, no FID.
TINY = ["--steps", "2", "--batch-size", "8", "--channels", "16", "--sample-steps", "2", "--grid-size", "4",
        "--fid-every", "0", "--sample-every", "0", "--analysis-batches", "1", "--quiet"]
TINY_PAPER = [*TINY, "--channels", "32", "--steps", "1"]  # the paper's U-Net: GroupNorm(32) needs 32 channels


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
@runs("python train_cifar.py --help")
def test_help(here):
    from varweight_kernels.training.config import PRESETS

    text = re.sub(r"-\s+", "-", readme("python train_cifar.py --help"))  # argparse may wrap at a hyphen
    assert "--vaw-bins" in text
    preset_help = text[text.index("--preset STR "):text.index("--out STR ")]
    assert [name for name in PRESETS if name not in preset_help] == []  # the help names every preset


@runs("python train_cifar.py --preset digits-smoke --out runs/smoke")
def test_digits_smoke(here):
    readme("python train_cifar.py --preset digits-smoke --out runs/smoke", "--steps", "2")
    assert (here / "runs/smoke/DONE").exists()


@runs("make quickstart")
def test_make_quickstart_trains_its_preset(here):
    """The venv and install of `make quickstart` are CI's (NOT_RUN); its training line runs here."""
    dry = subprocess.run(["make", "-n", "quickstart", "VENV=/venv"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    train = [line for line in dry.splitlines() if "train_cifar.py" in line]
    assert len(train) == 1 and train[0].startswith("/venv/bin/python train_cifar.py "), dry
    from varweight_kernels.training import cli
    assert cli.main(shlex.split(train[0])[2:] + ["--steps", "2", "--quiet"]) == 0
    assert (here / "runs/quickstart/DONE").exists()


C10 = "python train_cifar.py --preset seed-cifar10 --weighting vaw --download --out runs/c10-vaw"


@runs(C10, "python train_cifar.py --out runs/c10-vaw --resume",
      "python train_cifar.py --out runs/c10-vaw --sample-only --num-samples 50000",
      "python train_cifar.py --out runs/c10-vaw --export c10-vaw.safetensors",
      "python train_cifar.py --out runs/c10-vaw --export raw.pt --export-weights raw")
def test_cifar_run_resume_sample_export(here):
    readme(C10, *TINY_PAPER)
    readme("python train_cifar.py --out runs/c10-vaw --resume", "--steps", "2")
    assert (here / "runs/c10-vaw/checkpoints/ckpt_00000002.pt").exists()
    readme("python train_cifar.py --out runs/c10-vaw --sample-only --num-samples 50000", "--num-samples", "3")
    with np.load(here / "runs/c10-vaw/samples.npz") as z:
        assert z["images"].shape == (3, 32, 32, 3)
    readme("python train_cifar.py --out runs/c10-vaw --export c10-vaw.safetensors")
    readme("python train_cifar.py --out runs/c10-vaw --export raw.pt --export-weights raw")
    from varweight_kernels.training.export import load_pretrained
    net, meta = load_pretrained(str(here / "c10-vaw.safetensors"))
    assert meta["step"] == 2 and (here / "raw.pt.json").exists()


# --------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------
PAPER = ("python -m varweight_kernels.experiments run --preset seed-cifar10 --methods uniform seed-cauchy vaw "
         "--seeds 42 142 242 --grid seed-cauchy.alpha=0.01,0.05 --out exp/paper-cifar10 -- --data-root data "
         "--download --fid-weights PATH_TO_INCEPTION_WEIGHTS")


@runs(PAPER, "python -m varweight_kernels.experiments report exp/paper-cifar10 --paper-analysis")
def test_paper_table_commands(here):
    readme(PAPER, *TINY_PAPER, before_passthrough=["--seeds", "42"])
    runs_dir = here / "exp/paper-cifar10/runs"
    assert sorted(p.name for p in runs_dir.iterdir()) == ["seed-cauchy__alpha=0.01", "seed-cauchy__alpha=0.05",
                                                         "uniform", "vaw"]
    assert all((d / "DONE").exists() for d in runs_dir.glob("*/seed*"))
    readme("python -m varweight_kernels.experiments report exp/paper-cifar10 --paper-analysis")
    assert (here / "exp/paper-cifar10/report.md").exists()


DIGITS = ("python -m varweight_kernels.experiments run --preset digits-cpu --methods uniform vaw seed-cauchy "
          "--seeds 0 1 2 --out exp/digits-cpu --jobs 2 --report")


@runs(DIGITS, "python -m varweight_kernels.experiments report exp/digits-cpu --baseline uniform")
def test_digits_experiment_commands(here):
    readme(DIGITS, "--", *TINY, "--fid-steps", "1,2", "--fid-samples", "16", before_passthrough=["--seeds", "0", "1"])
    report = (here / "exp/digits-cpu/report.md").read_text()
    assert "fd_digits" in report and "seed-cauchy" in report
    readme("python -m varweight_kernels.experiments report exp/digits-cpu --baseline uniform")


CONFIRM = "python -m varweight_kernels.experiments confirm --out exp/confirm --jobs 2 --report"


@runs(CONFIRM)
def test_confirm_command(here):
    readme(CONFIRM, "--seeds", "100", "101", "--", *TINY, "--fid-steps", "1,2", "--fid-samples", "16")
    assert (here / "exp/confirm/confirm.md").exists()


ABLATION = "python -m varweight_kernels.experiments ablation --out exp/ablation --seeds 0 1 2 3 4 --jobs 2"


@runs(ABLATION, "python -m varweight_kernels.experiments report exp/ablation --baseline uniform")
def test_ablation_commands(here):
    readme(ABLATION, "--seeds", "0", "1", "--variants", "uniform", "vaw__power=1", "--",
           *TINY, "--fid-steps", "1,2", "--fid-samples", "16")
    readme("python -m varweight_kernels.experiments report exp/ablation --baseline uniform")
    assert "vaw__power=1" in (here / "exp/ablation/report.md").read_text()


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------
@runs("python benchmarks/compare.py [--quick]")
def test_compare_quick(here):
    """--quick with every peer, the compiled one included (it crashed on KernelParams once), at two
    tiny shapes; the compiled peer traced by dynamo without generating code (--compile-backend eager)."""
    text = readme("python benchmarks/compare.py [--quick]", *_quick_tail(here))
    table = [line for line in text.splitlines() if line.startswith("| 7 ") or line.startswith("| 64 ")]
    for peer in ("reference", "cpp", "compile(reference)"):
        assert sum(f"| {peer} |" in line for line in table) == 2, text
    import json
    cells = json.loads((here / "compare.json").read_text())["cells"]
    assert {c["peer"] for c in cells} >= {"reference", "compile(reference)"}


def _quick_tail(here):
    return ["--batches", "7", "64", "--bins", "4", "--repeats", "1", "--warmup", "1", "--compile-backend", "eager",
            "--json", str(here / "compare.json")]


@runs("pytest benchmarks/bench_step.py")
def test_bench_step(here):
    """The pytest-benchmark file, each benchmark called once (--benchmark-disable), eager peers, one shape."""
    result = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks/bench_step.py"), "-q",
                             "-p", "no:cacheprovider", "--benchmark-disable", "-k", "128-64 and not compile"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\b[1-9]\d* passed", result.stdout), result.stdout[-2000:]
