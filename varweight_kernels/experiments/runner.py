"""Run a grid of training runs (methods x grid values x seeds), each in its own folder.

Layout: ``OUT/runs/LABEL/seedS`` where ``LABEL = METHOD[__param=value...]``;
``OUT/experiment.json`` records the plan (merged over repeated ``run`` calls) and
``OUT/runs/LABEL/seedS/train.log`` each run's output. A run whose folder holds ``DONE`` is
skipped; one with a checkpoint gets ``--resume``; one with leftovers but no checkpoint gets
``--overwrite`` (nothing to resume from). Runs are ``sys.executable train_cifar.py ...``
subprocesses; flags after ``--`` pass through to every run.

Grid axes: ``--grid vaw.power=0.5,1,2 lr=1e-3,2e-3``. An axis whose prefix (before the first
dot) names one of the methods applies to that method only (``vaw.power`` -> ``--vaw-power``
on the vaw runs); other axes apply to all methods (``lr`` -> ``--lr``). The flag is
``--KEY`` with dots and underscores as dashes; where the trainer has no such flag the bare
parameter is tried (``min-snr.gamma`` -> ``--gamma``).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..training.checkpoint import atomic_write_bytes
from ..training.run_dir import RUN_MARKER, run_folder_lock

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def read_experiment(out: Path) -> Dict:
    """``OUT/experiment.json`` checked for the shape ``run`` writes ({} when absent); a file of
    another shape is a one-line ``ValueError``, never a traceback later."""
    path = Path(out) / "experiment.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); move it away to start the record anew") from None
    shapes = {"invocations": list, "variants": dict, "methods": list, "seeds": list}
    problems = [] if isinstance(data, dict) else ["it is not a JSON object"]
    if not problems:
        problems = [f"its {key!r} is not a JSON {'array' if kind is list else 'object'}"
                    for key, kind in shapes.items() if key in data and not isinstance(data[key], kind)]
        if not problems:
            problems = [f"its variant {label!r} is not an object" for label, v in data.get("variants", {}).items()
                        if not isinstance(v, dict)]
    if problems:
        raise ValueError(f"{path} is not an experiment record: {'; '.join(problems)}")
    return data


def _merge_experiment(out: Path, record: Dict) -> None:
    path = out / "experiment.json"
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
    atomic_write_bytes(str(path), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


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
    methods = list(dict.fromkeys(s.method for s in specs))
    if not dry_run:
        outp.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if dry_run else run_folder_lock(str(outp)):  # one `run` per experiment
        return _run_planned(outp, specs, trainer_path, preset, invocation, passthrough, methods, seeds, jobs,
                            dry_run, python, stream)


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
    pending = []
    for spec in specs:
        state = run_state(Path(spec.out))
        if state == "done":
            print(f"[skip] {spec.out} (DONE)", file=stream, flush=True)
            result["skipped"].append(spec.out)
            continue
        cmd = build_command(spec, trainer_path, preset, passthrough, state, python)
        pending.append((spec, cmd, state))
    running: List[Tuple[RunSpec, subprocess.Popen, object, float]] = []

    def reap_one() -> None:
        """Wait for one running process to end and record it."""
        while True:
            for i, (spec, proc, fh, t0) in enumerate(running):
                rc = proc.poll()
                if rc is None:
                    continue
                fh.close()
                ok = rc == 0 and (Path(spec.out) / "DONE").exists()
                tag = "done" if ok else "failed"
                result[tag].append(spec.out)
                extra = "" if ok else f" (exit {rc}; see {Path(spec.out) / 'train.log'})"
                print(f"[{tag}] {spec.out} in {time.time() - t0:.1f}s{extra}", file=stream, flush=True)
                running.pop(i)
                return
            time.sleep(0.2)

    for spec, cmd, state in pending:
        print(f"[{'dry-run' if dry_run else 'run'}] {state}: {shlex.join(cmd)}", file=stream, flush=True)
        if dry_run:
            continue
        Path(spec.out).mkdir(parents=True, exist_ok=True)
        fh = _open_log(Path(spec.out))
        fh.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(Path.cwd()))
        running.append((spec, proc, fh, time.time()))
        while len(running) >= max(1, jobs):
            reap_one()
    while running:
        reap_one()
    return result
