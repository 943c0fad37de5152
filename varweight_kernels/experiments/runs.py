"""What an experiment folder holds, read and checked: ``EXP/experiment.json`` (the record that
``runner`` keeps) and the runs ``EXP/runs/LABEL/seedS`` as :class:`Run` objects.

The data model of the report, its figures and the studies: every reader of run folders goes
through :func:`load_runs`. It reads only regular files, never through a link or from a FIFO
(which would block), and refuses linked folders: a crafted or damaged folder is a one-line
``ValueError`` naming the file, never a traceback or a hang later.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..training.checkpoint import NotRegularFile, file_kind, read_regular
from ..training.records import parse_metrics

BINSTATS_TABLES = ("mean", "var", "count", "weight")  # (T, K) per logged step and bin


@dataclass
class Run:
    label: str
    method: str
    seed: int
    path: Path
    done: bool
    records: List[Dict]
    config: Dict = field(default_factory=dict)
    binstats: Optional[Dict[str, np.ndarray]] = None
    persample: Optional[Dict[str, np.ndarray]] = None
    settings: Optional[Dict] = None  # preset and flags it finished with (experiment.json "runs"); None: not recorded

    def series(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
        rows = [(r["step"], r[key]) for r in self.records
                if key in r and "step" in r and r[key] is not None and finite(r[key])]
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        # a resumed run may log a step twice: keep the last
        d = {}
        for s, v in rows:
            d[int(s)] = float(v)
        steps = np.array(sorted(d), dtype=np.int64)
        return steps, np.array([d[s] for s in steps])

    def final(self, key: str) -> Optional[Tuple[int, float]]:
        s, v = self.series(key)
        return (int(s[-1]), float(v[-1])) if s.size else None

    def last(self, key: str) -> Optional[float]:
        for r in reversed(self.records):
            if key in r and finite(r[key]):
                return float(r[key])
        return None


def finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError, OverflowError):
        return False


# ---------------------------------------------------------------------------------------------
# reading files: regular files only
# ---------------------------------------------------------------------------------------------
def regular_bytes(path: Path) -> Optional[bytes]:
    """The content of ``path``, None when it does not exist; a link, folder, FIFO or device is a
    ``ValueError`` (``checkpoint.read_regular``: neither followed nor waited on)."""
    try:
        return read_regular(str(path))
    except FileNotFoundError:
        return None
    except NotRegularFile as exc:
        if exc.what == "a link":
            raise ValueError(f"{path} is a link; a run folder holds only the files the trainer wrote") from None
        raise ValueError(f"{path} is {exc.what}, not a file the trainer wrote") from None
    except OSError as exc:
        raise ValueError(f"{path} is unreadable: {exc.strerror or exc}") from None


def is_marker(path: Path) -> bool:
    """Whether the marker file ``path`` (DONE) is there; only a regular file counts, anything
    else under that name is a ``ValueError``."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is {file_kind(mode)}, not a file the trainer wrote")
    return True


def real_folder(path: Path, what: str) -> None:
    """Refuse a link where an experiment keeps a folder: writes would land at its target."""
    if os.path.islink(path):
        raise ValueError(f"{path} ({what}) is a link; an experiment reads and writes only inside its own folder")


def read_jsonl(path: Path) -> List[Dict]:
    """Metrics records (``records.parse_metrics``: a line cut by a crash is skipped, any other bad
    line is a ``ValueError`` naming the file and line)."""
    data = regular_bytes(path)
    return [] if data is None else parse_metrics(data, path)


def read_json(path: Path) -> Dict:
    """A JSON object from ``path``; {} when it is missing, not JSON or not an object."""
    data = regular_bytes(path)
    try:
        obj = json.loads(data) if data is not None else {}
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def read_npz(path: Path) -> Optional[Dict[str, np.ndarray]]:
    """The numeric arrays of an ``.npz`` (no pickles), None when it does not exist."""
    data = regular_bytes(path)
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # numpy raises many kinds on a damaged archive
        raise ValueError(f"{path} is not a readable .npz archive ({type(exc).__name__})") from None
    for key, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{path}: array {key!r} holds {a.dtype} values, not numbers")
    return arrays


def read_binstats(path: Path) -> Optional[Dict[str, np.ndarray]]:
    """binstats.npz checked for the trainer's shapes: ``steps`` (T,), ``bin_edges`` (K+1,) and
    (T, K) tables."""
    d = read_npz(path)
    if d is None:
        return None
    problems = [f"has no {key!r}" for key in ("steps", "bin_edges") if key not in d]
    if not problems:
        steps, edges = d["steps"], d["bin_edges"]
        if steps.ndim != 1 or steps.dtype.kind not in "iu":
            problems.append(f"'steps' must be a 1-D integer array, got {steps.dtype} of shape {steps.shape}")
        if edges.ndim != 1 or edges.size < 2:
            problems.append(f"'bin_edges' must be a 1-D array of at least 2 edges, got shape {edges.shape}")
        want = (steps.shape[0] if steps.ndim == 1 else -1, edges.shape[0] - 1 if edges.ndim == 1 else -1)
        problems += [f"{key!r} has shape {d[key].shape}, expected (steps, bins) = {want}"
                     for key in BINSTATS_TABLES if key in d and d[key].shape != want]
    if problems:
        raise ValueError(f"{path} is not a binstats file: {'; '.join(problems)}")
    return d


def read_persample(run_dir: Path) -> Optional[Dict[str, np.ndarray]]:
    """Per-sample arrays, if the run wrote any (``persample*.npz`` with ``lam``, ``loss`` and, in
    runs since issue 15, ``weighted_loss``, ``raw_loss``, ``raw_weighted_loss``); several files
    are concatenated, keeping the arrays that every file has."""
    parts = []
    for path in sorted(run_dir.glob("persample*.npz")):
        d = read_npz(path)
        if not d or "lam" not in d or "loss" not in d:
            continue
        d = {k: np.asarray(a, dtype=np.float64).reshape(-1) for k, a in d.items()}
        sizes = {k: a.size for k, a in d.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{path}: the per-sample arrays differ in length ({sizes})")
        parts.append(d)
    if not parts:
        return None
    keys = set.intersection(*(set(d) for d in parts))
    return {k: np.concatenate([d[k] for d in parts]) for k in sorted(keys)}


# ---------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------
def read_experiment(out: Path) -> Dict:
    """``OUT/experiment.json`` checked for the shape ``run`` writes ({} when absent); a file of
    another shape is a one-line ``ValueError``, never a traceback later."""
    path = Path(out) / "experiment.json"
    raw = regular_bytes(path)
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{path} is unreadable ({exc}); move it away to start the record anew") from None
    shapes = {"invocations": list, "variants": dict, "methods": list, "seeds": list, "runs": dict}
    problems = [] if isinstance(data, dict) else ["it is not a JSON object"]
    if not problems:
        problems = [f"its {key!r} is not a JSON {'array' if kind is list else 'object'}"
                    for key, kind in shapes.items() if key in data and not isinstance(data[key], kind)]
        if not problems:
            problems = [f"its {what} {label!r} is not an object" for what in ("variants", "runs")
                        for label, v in data.get(what, {}).items() if not isinstance(v, dict)]
    if problems:
        raise ValueError(f"{path} is not an experiment record: {'; '.join(problems)}")
    return data


def settings_text(settings: Dict) -> str:
    """A run's recorded settings (preset, grid flags, pass-through flags) as one line."""
    def words(key: str) -> str:
        value = settings.get(key)
        return " ".join(map(str, value)) if isinstance(value, list) and value else "(none)"
    return (f"preset {settings.get('preset') or '(none)'}, grid flags {words('flags')}, "
            f"pass-through {words('passthrough')}")


def run_key(label: str, seed: int) -> str:
    """A run's key in experiment.json's "runs": its folder below ``EXP/runs``."""
    return f"{label}/seed{int(seed)}"


def load_runs(exp: Path) -> Tuple[List[Run], Dict]:
    """Every run folder ``EXP/runs/LABEL/seedS`` and the experiment record."""
    exp = Path(exp)
    meta = read_experiment(exp)
    variants = meta.get("variants", {})
    settings = meta.get("runs", {})
    runs = []
    root = exp / "runs"
    real_folder(root, "the runs folder")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: not an experiment folder")
    for label_dir in sorted(root.iterdir()):
        real_folder(label_dir, "a variant's folder")
        if not label_dir.is_dir():
            continue
        label = label_dir.name
        method = variants.get(label, {}).get("method", label.split("__")[0])
        for seed_dir in sorted(label_dir.iterdir()):
            m = re.fullmatch(r"seed(-?\d+)", seed_dir.name)
            if not m:
                continue
            real_folder(seed_dir, "a run folder")
            if not seed_dir.is_dir():
                continue
            seed = int(m.group(1))
            runs.append(Run(label=label, method=method, seed=seed, path=seed_dir, done=is_marker(seed_dir / "DONE"),
                            records=read_jsonl(seed_dir / "metrics.jsonl"), config=read_json(seed_dir / "config.json"),
                            binstats=read_binstats(seed_dir / "binstats.npz"), persample=read_persample(seed_dir),
                            settings=settings.get(run_key(label, seed))))
    return runs, meta
