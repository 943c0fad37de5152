"""The run folder (``--out``) and what the trainer reports: config.json, metrics.jsonl,
binstats.npz, the DONE marker, and the console lines.

Layout (docs/DESIGN.md): ``config.json``, ``metrics.jsonl``, ``binstats.npz``,
``persample.npz``, ``samples_step*.png``, ``checkpoints/ckpt_XXXXXXXX.pt``, ``DONE``;
``--sample-only`` adds ``samples.npz`` and ``samples.png``. ``.varweight-run`` marks the folder
as a run (``--overwrite`` removes the trainer's exact file names there and refuses a folder
holding others); ``.varweight-lock`` is flock'ed by the one process writing the run. A run never
writes outside its folder: every file is replaced atomically (``checkpoint.atomic_write_bytes``)
or appended with O_NOFOLLOW; a failed write is a one-line ``WriteError``. What a resume reads
back is opened only as a regular file (``checkpoint.open_regular``).
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import stat
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .records import format_number, read_metrics  # noqa: F401  (re-exported: the one reader and formatter)
from .config import TrainConfig, TrainError

__all__ = ["RUN_FILES", "RUN_FOLDERS", "RUN_MARKER", "LOCK_FILE", "TOLERATED", "TIMING_FIELDS", "LOG_FIELDS",
           "checkpoint_dir", "latest_checkpoint", "folder_kind", "is_run_path", "foreign_files", "check_run_folder",
           "lock_run_folder", "run_folder_held", "release_run_folder", "run_folder_lock", "check_writable",
           "clear_run", "no_checkpoint_advice", "write_json_atomic", "write_run_config", "mark_done", "MetricsLog",
           "read_metrics", "new_accumulator", "interval_record", "format_record", "format_number", "say", "warn"]

RUN_FILES = ("config.json", "metrics.jsonl", "binstats.npz", "persample.npz", "DONE", "samples.npz", "samples.png",
             "index.md")
RUN_FOLDERS = ("checkpoints", "tensorboard")
RUN_MARKER = ".varweight-run"  # JSON {"run_id", "created"}: this folder is a run, --overwrite may clear it
LOCK_FILE = ".varweight-lock"  # flock'ed by the process that writes the run
TOLERATED = ("train.log",)  # written by `experiments run` next to the run; kept by --overwrite
_HELD_LOCKS: Dict[str, int] = {}
TIMING_FIELDS = ("images_per_s", "elapsed_s")  # the only fields a resumed run does not reproduce
LOG_FIELDS = ("loss", "weighted_loss", "lr", "grad_norm", "images_per_s", "elapsed_s", "nonfinite", "skipped_steps",
              "nonfinite_samples", "epoch", "vaw_weight_min", "vaw_weight_max", "final")


def say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


def warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the folder ------------------------------------------------------------------------------------
def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def latest_checkpoint(out: str) -> Optional[str]:
    found = ckpt.list_checkpoints(checkpoint_dir(out))
    return found[0][1] if found else None


_GRID_RE = re.compile(r"^samples_step\d{8,}\.png$")
_PROBE_RE = re.compile(r"^\.write-test-[a-z0-9_]{8}$")  # tempfile.mkstemp's names


def _is_own_name(name: str, top: bool) -> bool:
    """Whether ``name`` is exactly a name the trainer writes: at the top of the run folder
    (``top``) or in checkpoints/."""
    if top:
        return name in RUN_FILES or name in (RUN_MARKER, LOCK_FILE) or bool(_GRID_RE.match(name))
    return bool(ckpt.CKPT_RE.match(name)) or (name.endswith(".corrupt") and bool(ckpt.CKPT_RE.match(name[:-8])))


def _is_run_file(rel: str) -> bool:
    """Whether ``rel`` (a path inside the run folder) names a file the trainer writes: its own
    names exactly, the temp files ``atomic_write_bytes`` makes of them, and the write probes."""
    parts = rel.split("/")
    name = parts[-1]
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "checkpoints"):
        temp = ckpt.temp_target(name)
        return (_is_own_name(name, len(parts) == 1) or bool(_PROBE_RE.match(name))
                or (temp is not None and _is_own_name(temp, len(parts) == 1)))
    return len(parts) == 2 and parts[0] == "tensorboard" and name.startswith("events.out.tfevents.")


def _folder_entries(out: str) -> List[str]:
    """Paths in ``out`` relative to it: files and links, and the contents of its real
    checkpoints/ and tensorboard/ folders (a link or another folder is listed as such, with a
    trailing "/" for a folder)."""
    found = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name in RUN_FOLDERS and os.path.isdir(path) and not os.path.islink(path):
            found += [f"{name}/{sub}" + ("/" if _is_dir(os.path.join(path, sub)) else "")
                      for sub in sorted(os.listdir(path))]
        else:
            found.append(name + ("/" if _is_dir(path) else ""))
    return found


def _is_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def is_run_path(out: str, path: str) -> bool:
    """Whether ``path`` is one of the files the run in ``out`` manages: in its checkpoints/ or
    tensorboard/ folder, or a file name the trainer writes at its top (folders resolved through
    links; the last name is not, since writes replace a link there)."""
    base = os.path.realpath(out)
    target = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    rel = os.path.relpath(target, base)
    if rel == "." or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return rel == "."
    parts = rel.split(os.sep)
    return parts[0] in RUN_FOLDERS or (len(parts) == 1 and _is_run_file(parts[0]))


def foreign_files(out: str) -> List[str]:
    """What in ``out`` the trainer did not write (``TOLERATED`` files aside)."""
    return [rel for rel in _folder_entries(out) if not _is_run_file(rel) and rel not in TOLERATED]


def folder_kind(out: str) -> str:
    """"run" (a run marker, or a run of an older version: config.json and checkpoints that all
    carry the checkpoint header), "empty" (nothing but the lock, tolerated files, write probes
    and empty run folders) or "other"."""
    if not os.path.isdir(out):
        return "empty"
    marker = os.path.join(out, RUN_MARKER)
    if os.path.isfile(marker) and not os.path.islink(marker):
        return "run"
    legacy_config = os.path.join(out, "config.json")
    found = ckpt.list_checkpoints(checkpoint_dir(out))
    if (os.path.isfile(legacy_config) and not os.path.islink(legacy_config) and found
            and all(ckpt.has_header(path) for _, path in found)):
        return "run"
    return "other" if _occupants(out) else "empty"


def _occupants(out: str) -> List[str]:
    """What in ``out`` keeps it from counting as empty (a leftover lock or a write probe, such as
    the one rank 0 of a fresh DDP start makes meanwhile, does not)."""
    inert = {LOCK_FILE, *TOLERATED}
    return [rel for rel in _folder_entries(out) if rel not in inert and not _PROBE_RE.match(rel.split("/")[-1])]


def _refuse_out(out: str) -> None:
    """The filesystem root and the home folder are never run folders (an --overwrite there
    would delete the user's checkpoints/)."""
    real = os.path.realpath(out)
    if real == os.path.realpath(os.sep) or real == os.path.realpath(os.path.expanduser("~")):
        raise TrainError(f"--out {out} is {'the filesystem root' if real == os.path.realpath(os.sep) else 'your home folder'}; "
                         "choose a folder of its own for the run")
    for name in RUN_FOLDERS:
        if os.path.islink(os.path.join(out, name)):
            raise TrainError(f"{os.path.join(out, name)} is a link; a run writes only inside its own folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainError(f"--out {out} exists and is not a folder")


def check_run_folder(cfg: TrainConfig, main_rank: bool) -> None:
    """Before any training: refuse the root or home folder, a folder another trainer holds, a
    folder of someone else's files, clobbering a run (without --overwrite) or resuming a missing
    one; prove ``--out`` writable and lock it (on rank 0). A refused folder is left as it was:
    the checks run before anything is created, and again under the lock."""
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume and --overwrite exclude each other")
    _refuse_out(cfg.out)
    _check_kind(cfg)
    if main_rank:
        check_writable(cfg.out)
        lock_run_folder(cfg.out)
        _check_kind(cfg)  # another process may have changed the folder before the lock was taken


def _check_kind(cfg: TrainConfig) -> None:
    out = cfg.out
    kind = folder_kind(out)
    if kind == "run":
        _check_run_entries(out, cfg.resume)
    if cfg.resume:
        if kind != "run":
            raise TrainError(f"--resume: no run in {out} to continue")
        if not ckpt.list_checkpoints(checkpoint_dir(out)):
            raise TrainError(no_checkpoint_advice(out))
        return
    if kind == "other":
        raise TrainError(f"{out} is not empty and holds no run ({_names(_occupants(out))}); "
                         "choose an empty or new folder")
    if kind == "run" and not cfg.overwrite:
        if not ckpt.list_checkpoints(checkpoint_dir(out)):
            raise TrainError(no_checkpoint_advice(out))
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    if kind == "run" and foreign_files(out):
        raise TrainError(f"--overwrite: {out} also holds files the run did not write ({_names(foreign_files(out))}); "
                         "move them away first")


def no_checkpoint_advice(out: str) -> str:
    """What to do with a run that stopped before its first checkpoint (--resume cannot continue it)."""
    return (f"{out} holds a run that stopped before its first checkpoint, so --resume cannot continue it; "
            "pass --overwrite to start it over")


def _check_run_entries(out: str, resume: bool) -> None:
    """No trainer file name in a run folder is a folder (a write cannot replace one, nor
    --overwrite delete it), and on --resume metrics.jsonl, which is read back, is a regular file
    (not a link, FIFO or device): refused before anything is read or deleted."""
    for rel in _folder_entries(out):
        name = rel.rstrip("/")
        if not _is_run_file(name) or name == LOCK_FILE:
            continue
        try:
            mode = os.lstat(os.path.join(out, name)).st_mode
        except FileNotFoundError:  # gone since the listing: another rank's write probe, a renamed temp file
            continue
        if stat.S_ISDIR(mode) or (resume and name == "metrics.jsonl" and not stat.S_ISREG(mode)):
            raise TrainError(f"{os.path.join(out, name)} is {ckpt.file_kind(mode)}, where the "
                             "run keeps a file of that name; move it away")


def _names(rels: List[str], shown: int = 5) -> str:
    more = f" and {len(rels) - shown} more" if len(rels) > shown else ""
    return ", ".join(rels[:shown]) + more


def lock_run_folder(out: str) -> None:
    """Hold an exclusive lock on ``out`` until ``release_run_folder`` (or the process ends: the
    OS drops a flock with its holder, so a kill -9 never leaves a stale lock)."""
    key = os.path.realpath(out)
    path = os.path.join(out, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise TrainError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise TrainError(f"{out} is in use by another varweight process (it holds {path}); wait for it "
                         "to end or choose another folder") from None
    _HELD_LOCKS[key] = fd


def run_folder_held(out: str) -> bool:
    """Whether this process holds ``out``'s lock."""
    return os.path.realpath(out) in _HELD_LOCKS


def release_run_folder(out: str) -> None:
    fd = _HELD_LOCKS.pop(os.path.realpath(out), None)
    if fd is not None:
        os.close(fd)


def held_lock_fd(out: str) -> Optional[int]:
    """The descriptor of this process's lock on ``out`` (None if not held): a child given it keeps
    the folder locked until it ends too (``experiments`` trainers, so a killed runner's folder
    stays locked while its trainers live)."""
    return _HELD_LOCKS.get(os.path.realpath(out))


@contextlib.contextmanager
def run_folder_lock(out: str) -> Iterator[None]:
    """``lock_run_folder`` for the duration of a ``with`` block."""
    lock_run_folder(out)
    try:
        yield
    finally:
        release_run_folder(out)


def check_writable(out: str) -> None:
    """Create ``out`` (and checkpoints/) and prove a file can be written there, or raise TrainError."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainError(f"--out {out} exists and is not a folder")
    try:
        os.makedirs(checkpoint_dir(out), exist_ok=True)
        for folder in (out, checkpoint_dir(out)):
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise TrainError(f"--out {out} is not writable: {exc.strerror or exc}") from None


def clear_run(out: str) -> None:
    """--overwrite: remove the files the trainer writes, and nothing else (``check_run_folder``
    refused a folder holding anything more, or a folder under a file's name); the lock stays held."""
    for rel in _folder_entries(out):
        if _is_run_file(rel) and rel != LOCK_FILE:
            os.unlink(os.path.join(out, rel))
    tensorboard = os.path.join(out, "tensorboard")
    if os.path.isdir(tensorboard) and not os.listdir(tensorboard):
        os.rmdir(tensorboard)
    os.makedirs(checkpoint_dir(out), exist_ok=True)


def write_json_atomic(path: str, obj: Any) -> None:
    ckpt.atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_run_config(out: str, run_config: Dict[str, Any], step: int, steps: int) -> None:
    """The run marker (kept on --resume, new after --overwrite) and config.json; a DONE left by a
    shorter run goes when a resume trains further."""
    if not os.path.isfile(os.path.join(out, RUN_MARKER)):
        write_json_atomic(os.path.join(out, RUN_MARKER), {"run_id": uuid.uuid4().hex,
                                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    write_json_atomic(os.path.join(out, "config.json"), run_config)
    done = os.path.join(out, "DONE")
    if os.path.lexists(done) and step < steps:
        os.unlink(done)


def mark_done(out: str, step: int) -> None:
    ckpt.atomic_write_bytes(os.path.join(out, "DONE"), f"step {step}\n".encode())


# -- metrics ---------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl (appended, flushed each line) and binstats.npz (rewritten atomically)."""

    def __init__(self, out: str, enabled: bool) -> None:
        self.out, self.enabled = out, enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.bin_path = os.path.join(out, "binstats.npz")
        self.bins: Dict[str, List[np.ndarray]] = {"steps": [], "mean": [], "var": [], "count": [], "weight": []}
        self.bin_edges: Optional[np.ndarray] = None
        self.tb = None
        if enabled:
            self.tb = _summary_writer(os.path.join(out, "tensorboard"))

    def truncate_to(self, step: int, log_every: int, keep_final: bool = False) -> None:
        """On resume from ``step``: drop what was logged after it, and the "final" partial-interval
        record / bin snapshot written at ``step`` if it was off the (saved run's) log cadence, since
        the steps that follow log that interval again. ``keep_final``: no step follows (the run
        is at its end), so nothing would rewrite them and both are kept."""
        if not self.enabled:
            return
        if os.path.lexists(self.path):
            try:
                records = read_metrics(self.path)
            except OSError as exc:
                raise TrainError(f"cannot read {self.path}: {exc.strerror or exc}; move it away to resume") from None
            except ValueError as exc:
                raise TrainError(f"{exc}; remove the line to resume") from None
            keep = []
            for rec in records:
                if rec.get("step", 0) > step:
                    continue
                if rec.get("final") and not keep_final:
                    rec = {k: v for k, v in rec.items() if k == "step" or k not in LOG_FIELDS}
                    if len(rec) == 1:
                        continue
                keep.append(json.dumps(rec) + "\n")
            ckpt.atomic_write_bytes(self.path, "".join(keep).encode())
        if os.path.lexists(self.bin_path):
            try:  # a link or a FIFO is unreadable here, never read through or waited on
                with np.load(io.BytesIO(ckpt.read_regular(self.bin_path)), allow_pickle=False) as z:
                    data = {k: z[k] for k in z.files}
                sel = (data["steps"] < step) | ((data["steps"] == step) & (keep_final or step % log_every == 0))
                self.bin_edges = data["bin_edges"]
                for k in self.bins:
                    if k in data:
                        self.bins[k] = list(data[k][sel])
            except Exception as exc:
                warn(f"warning: {self.bin_path} unreadable ({exc}); its history restarts here")

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode()
        try:  # appended in one write; O_NOFOLLOW: a planted link fails instead of being written through
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            with open(fd, "ab") as fh:
                fh.write(line)
        except OSError as exc:
            raise ckpt.WriteError(self.path, ckpt.write_reason(exc)) from None
        def scalars(writer) -> None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, record["step"])

        self.tensorboard(scalars)

    def tensorboard(self, log: Callable[[Any], Any]) -> None:
        """``log(writer)`` when there is a TensorBoard writer. A failure (a deleted folder, a full
        disk) stops TensorBoard logging with one line on stderr; the run and its other logs go on."""
        if self.tb is None:
            return
        try:
            log(self.tb)
        except Exception as exc:  # whatever TensorBoard raises, the run must not stop for its logs
            self.tb = None
            warn(f"warning: TensorBoard logging stopped: {_first_line(exc)}")

    def add_bins(self, step: int, stats: Dict[str, torch.Tensor], weight: Optional[torch.Tensor]) -> None:
        if not self.enabled:
            return
        self.bin_edges = stats["bin_edges"].numpy()
        self.bins["steps"].append(np.int64(step))
        for k in ("mean", "var", "count"):
            self.bins[k].append(stats[k].double().numpy())
        if weight is not None:
            self.bins["weight"].append(weight.double().cpu().numpy())
        arrays = {"steps": np.asarray(self.bins["steps"], dtype=np.int64), "bin_edges": self.bin_edges}
        for k in ("mean", "var", "count"):
            arrays[k] = np.stack(self.bins[k])
        if self.bins["weight"]:
            arrays["weight"] = np.stack(self.bins["weight"])
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        ckpt.atomic_write_bytes(self.bin_path, buf.getbuffer())

    def close(self) -> None:
        self.tensorboard(lambda writer: writer.close())


def _summary_writer(log_dir: str):
    """TensorBoard's writer for ``log_dir``, or None after one line on stderr saying why there is none
    (the run goes on without TensorBoard logs)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("warning: no TensorBoard logs: the tensorboard package is not installed "
             "(it comes with pip install 'varweight[train]')")
        return None
    try:
        return SummaryWriter(log_dir=log_dir)
    except Exception as exc:  # whatever TensorBoard raises, the run must not stop for its logs
        warn(f"warning: no TensorBoard logs: cannot create the writer in {log_dir}: {_first_line(exc)}")
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


def new_accumulator() -> Dict[str, Any]:
    """Sums over the steps since the last record (checkpointed as "log_accum", so a resumed
    interval logs the same means)."""
    return {"n": 0, "finite": 0, "nonfinite": 0, "loss": 0.0, "wloss": 0.0, "gnorm": 0.0}


def interval_record(step: int, acc: Dict[str, Any], *, lr: float, batch_size: int, interval_s: float,
                    elapsed_s: float, skipped_steps: int, nonfinite_samples: int, epoch: int) -> Dict[str, Any]:
    """A metrics.jsonl record: means over the interval's finite steps (NaN when there were none)."""
    def mean(key: str) -> float:
        return acc[key] / max(acc["finite"], 1) if acc["finite"] else float("nan")

    return {"step": step, "loss": mean("loss"), "weighted_loss": mean("wloss"), "lr": lr, "grad_norm": mean("gnorm"),
            "images_per_s": acc["n"] * batch_size / max(interval_s, 1e-9), "elapsed_s": elapsed_s,
            "nonfinite": acc["nonfinite"], "skipped_steps": skipped_steps, "nonfinite_samples": nonfinite_samples,
            "epoch": epoch}


def format_record(rec: Dict[str, Any], total: int) -> str:
    """The console line of a record."""
    parts = [f"step {rec['step']}/{total}"]
    for k in ("loss", "weighted_loss", "grad_norm", "images_per_s", "fid", "fd_digits"):
        if k in rec:
            parts.append(f"{k} {rec[k]:.4g}")
    if rec.get("skipped_steps"):
        parts.append(f"skipped {rec['skipped_steps']}")
    return " | ".join(parts)
