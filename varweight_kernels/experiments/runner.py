"""Run a grid of training runs (methods x grid values x seeds), each in its own folder.

Layout: ``OUT/runs/LABEL/seedS`` where ``LABEL = METHOD[__param=value...]``;
``OUT/experiment.json`` records the plan (merged over repeated ``run`` calls) and
``OUT/runs/LABEL/seedS/train.log`` each run's output. A run whose folder holds ``DONE`` is
skipped; one with a checkpoint gets ``--resume``; one with leftovers but no checkpoint gets
``--overwrite`` (nothing to resume from). Runs are ``sys.executable train_cifar.py ...``
subprocesses; flags after ``--`` pass through to every run.

What the runner sets itself (``--seed``, ``--weighting``, ``--out``, ``--preset``, ``--resume``,
``--overwrite``, abbreviations included) is refused after ``--`` and in grid values, and so are
labels that are not a plain folder name and linked folders under ``OUT/runs``. A run that
finishes is recorded in ``experiment.json`` ("runs": preset, grid flags and pass-through flags
per ``LABEL/seedS``): a finished run whose record differs from this call's is resumed with the
new flags (a raised ``--steps`` trains on; a change the trainer cannot resume with fails that
run, with the trainer's reason in its train.log), and ``report`` refuses to pool runs of one
label that finished with different flags. Finished runs of older versions have no record and
are skipped as before.

Each trainer runs in its own session and dies with the runner: SIGINT/SIGTERM to the runner
are passed on (the trainers checkpoint and exit, then the runner exits 128 + signal), and on
Linux a killed runner (kill -9) sends its trainers SIGTERM (``PR_SET_PDEATHSIG``). The trainers
inherit the experiment's lock, so no new runner starts before the last of them has ended.

Grid axes: ``--grid vaw.power=0.5,1,2 lr=1e-3,2e-3``. An axis whose prefix (before the first
dot) names one of the methods applies to that method only (``vaw.power`` -> ``--vaw-power``
on the vaw runs); other axes apply to all methods (``lr`` -> ``--lr``). The flag is
``--KEY`` with dots and underscores as dashes; where the trainer has no such flag the bare
parameter is tried (``min-snr.gamma`` -> ``--gamma``).
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..training.checkpoint import atomic_write_bytes
from ..training.run_dir import RUN_MARKER, held_lock_fd, run_folder_lock
from ..training.signals import StopSignal
from .runs import read_experiment, real_folder, run_key, settings_text

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER_FLAGS = ("--seed", "--weighting", "--out", "--preset", "--resume", "--overwrite")  # set per run by the runner
_RUNNER_OWN = set(RUNNER_FLAGS) | {"--no-" + f[2:] for f in RUNNER_FLAGS}  # with the boolean flags' negations
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RunnerInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped ``run``: the trainers were told, and have checkpointed and ended."""

    def __init__(self, signum: int, stopped: Sequence[str]) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}: {len(stopped)} run(s) stopped "
                         "(at a checkpoint); run the same command to resume them")
        self.signum, self.stopped = signum, list(stopped)


@dataclass
class Axis:
    key: str                 # as given, e.g. "vaw.power"
    values: List[str]
    scope: Optional[str]     # method name, or None for all methods
    param: str               # key without the scope, e.g. "power"
    flag: str                # trainer flag, e.g. "--vaw-power"


@dataclass
class RunSpec:
    label: str
    method: str
    seed: int
    out: str
    flags: List[str]                     # grid flags (before the pass-through flags)
    scoped: Dict[str, str] = field(default_factory=dict)
    global_: Dict[str, str] = field(default_factory=dict)


def find_trainer(explicit: Optional[str] = None) -> Path:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise FileNotFoundError(f"--trainer {p} does not exist")
        return p.resolve()
    for cand in (Path.cwd() / "train_cifar.py", REPO_ROOT / "train_cifar.py"):
        if cand.is_file():
            return cand.resolve()
    raise FileNotFoundError(f"train_cifar.py not found in {Path.cwd()} or {REPO_ROOT}; pass --trainer PATH")


def _trainer_flags() -> Optional[set]:
    try:
        from ..training.config import build_parser
    except Exception:
        return None
    return {s for a in build_parser()._actions for s in a.option_strings}


def refuse_runner_flags(args: Sequence[str], where: str) -> None:
    """Refuse, in ``args`` given by the user, any trainer flag the runner sets itself: passed on,
    it would override the runner's (``--seed 7`` makes every seed one run). Abbreviations count,
    as the trainer's argparse accepts them."""
    known = _trainer_flags()
    for token in args:
        name = token.split("=", 1)[0]
        if not name.startswith("--") or name == "--":
            continue
        names = [name] if known is None or name in known else [k for k in known if k.startswith(name)]
        own = sorted(set(names) & _RUNNER_OWN)
        if own:
            raise ValueError(f"{where}: {token} would set {own[0]}, which the runner sets itself for every run "
                             "(use --seeds, --methods, --out, --preset); a run's own flags are refused here")


def check_label(label: str) -> None:
    """A label is one plain folder name under OUT/runs (``--methods ..`` would write beside it)."""
    if label in ("", ".", "..") or "/" in label or os.sep in label or "\0" in label:
        raise ValueError(f"run label {label!r} is not a plain folder name; its runs would be written outside "
                         "OUT/runs/LABEL")


def parse_grid(specs: Sequence[str], methods: Sequence[str]) -> List[Axis]:
    known = _trainer_flags()
    axes = []
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"grid axis {spec!r} must look like key=v1,v2")
        key, vals = spec.split("=", 1)
        key = key.strip()
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not key or not values:
            raise ValueError(f"grid axis {spec!r} needs a key and at least one value")
        head, _, rest = key.partition(".")
        scope, param = (head, rest) if rest and head in methods else (None, key)
        cands = ["--" + key.replace(".", "-").replace("_", "-"), "--" + param.replace(".", "-").replace("_", "-")]
        flag = cands[0]
        if known is not None:
            hits = [c for c in cands if c in known]
            if not hits:
                raise ValueError(f"grid axis {key!r}: the trainer has no flag {' or '.join(dict.fromkeys(cands))}")
            flag = hits[0]
        refuse_runner_flags([flag] + values, f"--grid {spec}")
        axes.append(Axis(key=key, values=values, scope=scope, param=param, flag=flag))
    return axes


def _label(method: str, combo: Sequence[Tuple[Axis, str]]) -> str:
    parts = [method] + [f"{ax.param}={v}" for ax, v in combo]
    return "__".join(p.replace("/", "_").replace(" ", "") for p in parts)


def plan_runs(out: Path, methods: Sequence[str], seeds: Sequence[int], axes: Sequence[Axis]) -> List[RunSpec]:
    runs = []
    for method in methods:
        mine = [ax for ax in axes if ax.scope in (None, method)]
        for values in itertools.product(*[ax.values for ax in mine]) if mine else [()]:
            combo = list(zip(mine, values))
            label = _label(method, combo)
            flags: List[str] = []
            for ax, v in combo:
                flags += [ax.flag, v]
            for seed in seeds:
                runs.append(RunSpec(label=label, method=method, seed=int(seed),
                                    out=str(out / "runs" / label / f"seed{int(seed)}"), flags=flags,
                                    scoped={ax.param: v for ax, v in combo if ax.scope is not None},
                                    global_={ax.param: v for ax, v in combo if ax.scope is None}))
    return runs


def run_state(run_dir: Path) -> str:
    """'done', 'resume' (has a checkpoint), 'restart' (leftovers, no checkpoint) or 'new'."""
    if (run_dir / "DONE").exists():
        return "done"
    ck = run_dir / "checkpoints"
    if ck.is_dir() and any(p.suffix == ".pt" and p.name.startswith("ckpt_") for p in ck.iterdir()):
        return "resume"
    if any((run_dir / name).exists() for name in (RUN_MARKER, "config.json", "metrics.jsonl")):
        return "restart"
    return "new"


def build_command(spec: RunSpec, trainer: Path, preset: Optional[str], passthrough: Sequence[str],
                  state: str, python: str = sys.executable) -> List[str]:
    cmd = [python, str(trainer)]
    if preset:
        cmd += ["--preset", preset]
    cmd += ["--weighting", spec.method, "--seed", str(spec.seed), "--out", spec.out, *spec.flags, *passthrough]
    if state == "resume":
        cmd.append("--resume")
    elif state == "restart":
        cmd.append("--overwrite")
    return cmd


def _write_experiment(out: Path, data: Dict) -> None:
    atomic_write_bytes(str(out / "experiment.json"), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _record_finished(out: Path, spec: RunSpec, settings: Dict) -> None:
    """The settings a run finished with, under "runs" in experiment.json."""
    data = read_experiment(out)
    data.setdefault("runs", {})[run_key(spec.label, spec.seed)] = settings
    _write_experiment(out, data)


def _merge_experiment(out: Path, record: Dict) -> None:
    data = read_experiment(out) or {"invocations": [], "variants": {}}
    data.setdefault("invocations", []).append(record["invocation"])
    data.setdefault("variants", {}).update(record["variants"])
    for k in ("preset", "methods", "seeds"):
        if k in record:
            prev = data.get(k)
            if isinstance(prev, list) and isinstance(record[k], list):
                data[k] = prev + [x for x in record[k] if x not in prev]
            else:
                data[k] = record[k]
    _write_experiment(out, data)


def _open_log(run_dir: Path):
    """The run's train.log for appending; O_NOFOLLOW: a planted link fails instead of being written through."""
    fd = os.open(run_dir / "train.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    return open(fd, "a")


def run_experiment(out: str, methods: Sequence[str], seeds: Sequence[int], preset: Optional[str] = None,
                   grid: Sequence[str] = (), passthrough: Sequence[str] = (), trainer: Optional[str] = None,
                   jobs: int = 1, dry_run: bool = False, python: str = sys.executable,
                   stream=sys.stdout) -> Dict[str, List[str]]:
    """Run every planned run that is not done; returns {'done', 'skipped', 'failed'} lists of run dirs."""
    specs = plan_runs(Path(out), methods, seeds, parse_grid(grid, methods))
    invocation = {"methods": list(methods), "grid": list(grid)}
    return run_specs(out, specs, seeds, preset, passthrough, trainer, jobs, dry_run, python, stream, invocation)


def run_specs(out: str, specs: Sequence[RunSpec], seeds: Sequence[int], preset: Optional[str],
              passthrough: Sequence[str], trainer: Optional[str], jobs: int, dry_run: bool, python: str,
              stream, invocation: Dict) -> Dict[str, List[str]]:
    """Run the given runs (``jobs`` at a time), recording the plan in ``OUT/experiment.json``."""
    outp = Path(out)
    trainer_path = find_trainer(trainer)
    passthrough = list(passthrough)
    if passthrough and passthrough[0] == "--":
        passthrough = passthrough[1:]
    refuse_runner_flags(passthrough, "after `--`")
    for spec in specs:
        check_label(spec.label)
        for folder, what in ((outp / "runs", "the runs folder"), (outp / "runs" / spec.label, "a variant's folder"),
                             (Path(spec.out), "a run folder")):
            real_folder(folder, what)
    methods = list(dict.fromkeys(s.method for s in specs))
    if not dry_run:
        outp.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if dry_run else run_folder_lock(str(outp)):  # one `run` per experiment
        return _run_planned(outp, specs, trainer_path, preset, invocation, passthrough, methods, seeds, jobs,
                            dry_run, python, stream)


def _settings(spec: RunSpec, preset: Optional[str], passthrough: List[str]) -> Dict:
    """What a run is trained with beyond its label's method, seed and folder."""
    return {"preset": preset, "flags": list(spec.flags), "passthrough": list(passthrough)}


def _plan_states(outp: Path, specs: Sequence[RunSpec], preset: Optional[str], passthrough: List[str],
                 result: Dict[str, List[str]], stream) -> List[Tuple[RunSpec, str]]:
    """Each run to start and how ('new', 'resume', 'restart'); finished runs with this call's
    settings (or, from older versions, none recorded) are skipped, others resumed."""
    recorded = read_experiment(outp).get("runs", {})
    todo = []
    for spec in specs:
        state = run_state(Path(spec.out))
        if state == "done":
            before = recorded.get(run_key(spec.label, spec.seed))
            if before is None or before == _settings(spec, preset, passthrough):
                print(f"[skip] {spec.out} (DONE)", file=stream, flush=True)
                result["skipped"].append(spec.out)
                continue
            print(f"[stale] {spec.out} finished with {settings_text(before)}; resuming it with this call's",
                  file=stream, flush=True)
            state = "resume"
        todo.append((spec, state))
    return todo


def _child_setup(parent: int) -> Callable[[], None]:
    """In the trainer before exec: take the stop signals (blocked around the launch), and on
    Linux get SIGTERM when the runner dies, even by kill -9 (``PR_SET_PDEATHSIG``)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the runner died before the line above took effect
            os._exit(128 + int(signal.SIGTERM))
    return setup


class _ForwardStop(StopSignal):
    """SIGINT/SIGTERM to the runner go on to every trainer's process group; no new run starts."""

    def __init__(self, running: List) -> None:
        super().__init__()
        self.running = running

    def _handle(self, signum, frame) -> None:
        self.forward(signum)

    def forward(self, signum: int) -> None:
        self.signum = signum
        for job in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job[1].pid, signum)


def _run_planned(outp: Path, specs: Sequence[RunSpec], trainer_path: Path, preset: Optional[str], invocation: Dict,
                 passthrough: List[str], methods: Sequence[str], seeds: Sequence[int], jobs: int, dry_run: bool,
                 python: str, stream) -> Dict[str, List[str]]:
    result = {"done": [], "skipped": [], "failed": []}
    if not dry_run:
        _merge_experiment(outp, {
            "invocation": {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "preset": preset, **invocation,
                           "seeds": [int(s) for s in seeds], "passthrough": passthrough, "trainer": str(trainer_path)},
            "variants": {s.label: {"method": s.method, "scoped": s.scoped, "global": s.global_} for s in specs},
            "preset": preset, "methods": methods, "seeds": [int(s) for s in seeds]})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    pending = [(spec, build_command(spec, trainer_path, preset, passthrough, state, python), state)
               for spec, state in _plan_states(outp, specs, preset, passthrough, result, stream)]
    running: List[Tuple[RunSpec, subprocess.Popen, object, float]] = []
    lock_fd = held_lock_fd(str(outp))
    stopped: List[str] = []

    def reap_one() -> None:
        """Wait for one running process to end and record it."""
        while True:
            for i, (spec, proc, fh, t0) in enumerate(running):
                rc = proc.poll()
                if rc is None:
                    continue
                fh.close()
                ok = rc == 0 and (Path(spec.out) / "DONE").exists()
                tag = "done" if ok else ("stopped" if stop.signum is not None else "failed")
                if ok:
                    _record_finished(outp, spec, _settings(spec, preset, passthrough))
                (stopped if tag == "stopped" else result[tag]).append(spec.out)
                extra = "" if ok else f" (exit {rc}; see {Path(spec.out) / 'train.log'})"
                print(f"[{tag}] {spec.out} in {time.time() - t0:.1f}s{extra}", file=stream, flush=True)
                running.pop(i)
                return
            time.sleep(0.2)

    with _ForwardStop(running) as stop:
        try:
            for spec, cmd, state in pending:
                if stop.signum is not None:
                    break
                print(f"[{'dry-run' if dry_run else 'run'}] {state}: {shlex.join(cmd)}", file=stream, flush=True)
                if dry_run:
                    continue
                Path(spec.out).mkdir(parents=True, exist_ok=True)
                fh = _open_log(Path(spec.out))
                fh.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(cmd)}\n")
                fh.flush()
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a stop waits until it is listed
                try:
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(Path.cwd()),
                                            start_new_session=True, preexec_fn=_child_setup(os.getpid()),
                                            pass_fds=() if lock_fd is None else (lock_fd,))
                    running.append((spec, proc, fh, time.time()))
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                while len(running) >= max(1, jobs):
                    reap_one()
            while running:
                reap_one()
        finally:
            if running:  # the runner itself failed: its trainers end with it, as on a signal
                stop.forward(signal.SIGTERM)
                for _, proc, fh, _ in running:
                    proc.wait()
                    fh.close()
    if stop.signum is not None:
        raise RunnerInterrupted(stop.signum, stopped)
    return result
