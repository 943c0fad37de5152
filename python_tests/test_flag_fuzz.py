"""Every flag of ``train_cifar.py`` against bad values (issue 24 item 14).

For each parser action (one per ``TrainConfig`` field) and each bad value of its kind (0, negative,
NaN, inf, huge, wrong type, empty), ``cli.main`` either exits non-zero with one line on stderr that
names the flag and no traceback, or accepts the value; every accepted value then runs 1 step of a
tiny config, which must finish (``DONE``) or fail with one line, and must not leave a folder marked
as a run without a checkpoint. Validation alone is milliseconds a case; the real runs are ~0.1 s.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from dataclasses import fields
from pathlib import Path

import pytest

from varweight_kernels.training import cli
from varweight_kernels.training.config import TrainConfig, build_parser
from varweight_kernels.training.run_dir import RUN_MARKER
from tiny_runs import one_thread  # noqa: F401

# One step of a tiny digits model; a fuzzed flag comes after these and overrides them.
FAST = ["--dataset", "digits", "--channels", "8", "--channel-mults", "1", "--num-res-blocks", "1",
        "--attn-resolutions", "none", "--batch-size", "4", "--steps", "1", "--ckpt-every", "1", "--log-every", "1",
        "--sample-steps", "1", "--grid-size", "1", "--analysis-batches", "0", "--vaw-bins", "8",
        "--vaw-min-count", "2", "--quiet"]

# The setting under which a flag takes effect, so that its real run exercises it.
_VAW = ["--weighting", "vaw"]
CONTEXT = {
    "--gamma": ["--weighting", "min-snr"], "--snr-convention": ["--weighting", "min-snr"],
    "--p2-gamma": ["--weighting", "p2"], "--p2-k": ["--weighting", "p2"], "--edm2-channels": ["--weighting", "edm2"],
    "--alpha": ["--weighting", "seed-cauchy"], "--seed-normalize": ["--weighting", "seed-cauchy"],
    "--ddpm-timesteps": ["--formulation", "ddpm"], "--beta-start": ["--formulation", "ddpm"],
    "--beta-end": ["--formulation", "ddpm"], "--vaw-power-end": _VAW + ["--vaw-power-anneal", "1"],
    "--vaw-prior": _VAW, "--backend": _VAW,
}
for _f in fields(TrainConfig):
    _flag = "--" + _f.name.replace("_", "-")
    if _flag.startswith("--vaw-"):
        CONTEXT.setdefault(_flag, _VAW)
    elif _flag.startswith("--is-"):  # adapting from the first step
        CONTEXT.setdefault(_flag, ["--noise-sampling", "vaw-is", "--is-warmup", "0"])

HUGE_INT, BEYOND_INT64 = str(2 ** 40), str(10 ** 20)
BAD_INTS = ["0", "-1", HUGE_INT, BEYOND_INT64, "1.5", "nan", "inf", "abc", ""]
BAD_FLOATS = ["0", "-1", "1e30", "1e300", "-1e300", "1e400", "nan", "inf", "abc", ""]
BAD_STRINGS = ["", "abc", "0", "-1", "x" * 300]
# Flags that read an existing run: on the empty --out here they fail naming the run, not the flag.
READS_A_RUN = {"--resume", "--sample-only", "--export"}
# Accepted values not run: a run's length is the user's choice, and torch.compile takes minutes.
NOT_RUN = {("--steps", HUGE_INT), ("--compile",)}


def bad_cases(action: argparse.Action):
    """Argument lists of bad values for one parser action, by the kind of value it takes."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [[flag], ["--no-" + flag[2:]], [flag + "=abc"], [flag + "="]]
    if action.nargs == 2:
        return [[flag, a, b] for a, b in (("0", "0"), ("-1", "-1"), ("-1e300", "1e300"), ("1", "0"), ("nan", "nan"),
                                          ("inf", "inf"), ("abc", "abc"))] + [[flag, ""], [flag, "1"]]
    if action.nargs == "*":
        return [[flag]] + [[flag, v] for v in BAD_INTS] + [[flag, "1", "-1"]]
    values = {int: BAD_INTS, float: BAD_FLOATS}.get(action.type, BAD_STRINGS)
    return [[flag, v] for v in values]


def config_actions():
    actions = [a for a in build_parser()._actions if a.dest in {f.name for f in fields(TrainConfig)}]
    assert {a.dest for a in actions} == {f.name for f in fields(TrainConfig)}  # every field has its flag
    return actions


def run_main(argv):
    """``(exit status, stderr)`` of ``cli.main(argv)``; an exception escaping it is a traceback."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
        except Exception as exc:  # noqa: BLE001 - the test reports it with the case
            rc, err = 1, io.StringIO(f"Traceback: {type(exc).__name__}: {exc}")
    return rc, err.getvalue()


def one_line_naming(err: str, flag: str, *alternatives: str) -> str:
    """Why ``err`` is not one line naming ``flag`` (or its name without the dashes, or one of
    ``alternatives``), or ""."""
    text = err.strip()
    if not text or "\n" in text or "Traceback" in text:
        return f"not one line: {err!r}"
    if not any(name in text for name in (flag, flag[2:]) + alternatives):
        return f"does not name {flag}: {text!r}"
    return ""


def test_every_flag_rejects_a_bad_value_in_one_line_or_runs_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # accepted relative paths (--out abc, --export abc) land here
    problems, accepted = [], []
    for action in config_actions():
        flag = action.option_strings[0]
        for case in bad_cases(action):
            argv = FAST + CONTEXT.get(flag, []) + ["--out", str(tmp_path / "unused")] + case + ["--print-config"]
            rc, err = run_main(argv)
            if rc == 0:
                accepted.append(case)
            elif why := one_line_naming(err, flag, *(["no run in"] if flag in READS_A_RUN else [])):
                problems.append(f"{case}: exit {rc}, {why}")
            assert not (tmp_path / "unused").exists(), case  # validation touches no folder
    assert not problems, "\n".join(problems)

    seen = set()
    for i, case in enumerate(accepted):
        flag = case[0].split("=")[0]
        argv = FAST + CONTEXT.get(flag, []) + ["--out", str(tmp_path / f"run{i}")] + case
        cfg = cli.parse_config(argv)
        key = json.dumps({**cfg.to_dict(), "out": cfg.out if flag == "--out" else ""}, sort_keys=True)
        if tuple(case) in NOT_RUN or key in seen:  # one run per distinct config
            continue
        seen.add(key)
        out = Path(cfg.out)
        rc, err = run_main(argv)
        if rc != 0:
            text = err.strip()
            if not text or "\n" in text or "Traceback" in text:
                problems.append(f"{case}: run exit {rc}, not one line: {err!r}")
        elif not (out / "DONE").is_file() and "--sample-only" not in case and "--export" not in flag:
            problems.append(f"{case}: exit 0 without DONE")
        marked = os.path.isdir(out) and (out / RUN_MARKER).exists()  # isdir: False for a name too long
        if marked and not any((out / "checkpoints").glob("ckpt_*.pt")):
            problems.append(f"{case}: {out} is marked as a run but holds no checkpoint")
    assert not problems, "\n".join(problems)


def test_the_issue_values_are_refused_up_front(tmp_path):
    """The 13 values of issue 24 item 14 (the machine-dependent ones where this machine lacks CUDA)."""
    import torch
    cases = [["--device", "xyz"], ["--device", "meta"], ["--sigma-min", "0"], ["--sigma-min", "100"],
             ["--sigma-data", "0"], ["--rho", "0"], ["--formulation", "ddpm", "--beta-end", "2"],
             ["--formulation", "ddpm", "--ddpm-timesteps", "1"], ["--noise-sampling", "vaw-is", "--is-mix", "5"],
             ["--noise-sampling", "vaw-is", "--is-mix", "-1"], ["--weighting", "min-snr", "--gamma", "-1"]]
    if not torch.cuda.is_available():
        cases += [["--backend", "cuda"]]
        if os.environ.get("TRITON_INTERPRET") != "1":
            cases += [["--backend", "triton"]]
    for case in cases:
        out = tmp_path / "run"
        rc, err = run_main(FAST + ["--out", str(out)] + case)
        assert rc == 1 and not one_line_naming(err, case[-2]), (case, err)
        assert not out.exists(), case  # refused before the folder is touched


def test_exponent_form_negative_numbers_are_values():
    cfg = cli.parse_config(["--vaw-logsnr-range", "-1.2e1", "12"])
    assert cfg.vaw_logsnr_range == (-12.0, 12.0)


@pytest.mark.parametrize("argv, message", [
    (["--alpha", "-0.5"], "--alpha must be >= 0, or -1"),
    (["--vaw-logsnr-range", "3", "-3"], "--vaw-logsnr-range needs LO < HI"),
    (["--fid-samples", "1"], "--fid-samples must lie in [2, 1000000]"),
    (["--channels", HUGE_INT], "--channels must lie in [1, 4096]"),
])
def test_messages_name_the_rule(argv, message):
    rc, err = run_main(argv + ["--print-config"])
    assert rc == 1 and message in err, err
