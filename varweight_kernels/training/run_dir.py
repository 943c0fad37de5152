"""The run folder (``--out``) and what the trainer reports: config.json, metrics.jsonl,
binstats.npz, the DONE marker, and the console lines.

Layout (docs/DESIGN.md): ``config.json``, ``metrics.jsonl``, ``binstats.npz``,
``persample.npz``, ``samples_step*.png``, ``checkpoints/ckpt_XXXXXXXX.pt``, ``DONE``;
``--sample-only`` adds ``samples.npz`` and ``samples.png``. A run never writes outside it.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import TrainConfig, TrainError, config_diff

__all__ = ["RUN_FILES", "TIMING_FIELDS", "LOG_FIELDS", "checkpoint_dir", "latest_checkpoint", "run_exists",
           "check_run_folder", "check_writable", "clear_run", "write_json_atomic", "read_saved_config",
           "write_run_config", "mark_done", "MetricsLog", "new_accumulator", "accumulate", "interval_record",
           "format_record", "say", "warn"]

RUN_FILES = ("config.json", "metrics.jsonl", "binstats.npz", "persample.npz", "DONE", "samples.npz", "samples.png",
             "index.md")
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


def run_exists(out: str) -> bool:
    if not os.path.isdir(out):
        return False
    return (os.path.exists(os.path.join(out, "config.json")) or os.path.exists(os.path.join(out, "metrics.jsonl"))
            or bool(ckpt.list_checkpoints(checkpoint_dir(out))))


def check_run_folder(cfg: TrainConfig, main_rank: bool) -> None:
    """Before any training: refuse to clobber a run or to resume a missing or different one, and
    prove ``--out`` writable (on rank 0)."""
    out = cfg.out
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume and --overwrite exclude each other")
    exists = run_exists(out)
    if exists and not (cfg.resume or cfg.overwrite):
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    if cfg.resume and not exists:
        raise TrainError(f"--resume: no run in {out} to continue")
    if main_rank:
        check_writable(out)
    if cfg.resume:
        diffs = config_diff(read_saved_config(out), cfg)
        if diffs:
            raise TrainError(f"cannot resume {out}: the config differs from the saved run in " + "; ".join(diffs))


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
    """--overwrite: remove the files a run writes (and nothing else) from ``out``."""
    for name in RUN_FILES:
        p = os.path.join(out, name)
        if os.path.isfile(p):
            os.unlink(p)
    for name in os.listdir(out):
        if name.startswith("samples_step") and name.endswith(".png"):
            os.unlink(os.path.join(out, name))
    for name in ("checkpoints", "tensorboard"):
        p = os.path.join(out, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
    os.makedirs(checkpoint_dir(out), exist_ok=True)


def write_json_atomic(path: str, obj: Any) -> None:
    ckpt.atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_saved_config(out: str) -> TrainConfig:
    path = os.path.join(out, "config.json")
    try:
        with open(path) as fh:
            saved = json.load(fh)
    except FileNotFoundError:
        raise TrainError(f"no run in {out} (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot read {path}: {exc}") from None
    return TrainConfig.from_dict(saved)


def write_run_config(out: str, run_config: Dict[str, Any], step: int, steps: int) -> None:
    """config.json; a DONE left by a shorter run goes when a resume trains further."""
    write_json_atomic(os.path.join(out, "config.json"), run_config)
    done = os.path.join(out, "DONE")
    if os.path.exists(done) and step < steps:
        os.unlink(done)


def mark_done(out: str, step: int) -> None:
    with open(os.path.join(out, "DONE"), "w") as fh:
        fh.write(f"step {step}\n")


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
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                self.tb = SummaryWriter(log_dir=os.path.join(out, "tensorboard"))
            except Exception:
                self.tb = None

    def truncate_to(self, step: int, log_every: int) -> None:
        """On resume from ``step``: drop what was logged after it, and the "final" partial-interval
        record / bin snapshot written at ``step`` if it was off the (saved run's) log cadence."""
        if not self.enabled:
            return
        if os.path.exists(self.path):
            keep = []
            with open(self.path) as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a crash
                    if rec.get("step", 0) > step:
                        continue
                    if rec.get("final"):
                        rec = {k: v for k, v in rec.items() if k == "step" or k not in LOG_FIELDS}
                        if len(rec) == 1:
                            continue
                    keep.append(json.dumps(rec) + "\n")
            ckpt.atomic_write_bytes(self.path, "".join(keep).encode())
        if os.path.exists(self.bin_path):
            try:
                with np.load(self.bin_path, allow_pickle=False) as z:
                    data = {k: z[k] for k in z.files}
                sel = (data["steps"] < step) | ((data["steps"] == step) & (step % log_every == 0))
                self.bin_edges = data["bin_edges"]
                for k in self.bins:
                    if k in data:
                        self.bins[k] = list(data[k][sel])
            except Exception as exc:
                warn(f"warning: {self.bin_path} unreadable ({exc}); its history restarts here")

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

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
        if self.tb is not None:
            self.tb.close()


def new_accumulator() -> Dict[str, Any]:
    """Sums over the steps since the last record (checkpointed as "log_accum", so a resumed
    interval logs the same means)."""
    return {"n": 0, "finite": 0, "nonfinite": 0, "loss": 0.0, "wloss": 0.0, "gnorm": 0.0}


def accumulate(acc: Dict[str, Any], finite: bool, loss: float, weighted_loss: float, grad_norm: float) -> None:
    acc["n"] += 1
    if finite:
        acc["loss"] += loss
        acc["wloss"] += weighted_loss
        acc["gnorm"] += grad_norm
        acc["finite"] += 1
    else:
        acc["nonfinite"] += 1


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
