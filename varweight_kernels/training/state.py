"""The training state: what a checkpoint holds, and how ``--resume`` puts it back.

``checkpoint.py`` writes and verifies the file; its payload is the plain dict

    {"version": STATE_VERSION, "step", "config", "model", "ema", "optimizer", "weighting",
     "observer", "noise_sampler", "ranks", "world_size", "image_shape", "log_accum",
     "counters": {"skipped_steps", "consecutive_nonfinite"}}

with ``ranks`` one entry a rank (its RNG streams, data position, global and CUDA RNG states),
so a resume on the same world size continues bitwise. ``STATE_VERSION`` changes when this
layout does; a checkpoint of another version is refused with a clear error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import checkpoint as ckpt
from .builders import EMA
from .config import RESUME_MUTABLE, TRAJECTORY_FIELDS, ConfigError, TrainConfig, TrainError, config_diff
from .distributed import DistInfo, all_gather_objects, broadcast_object
from .rng import derive_seed, get_rng_states, set_rng_states
from .run_dir import checkpoint_dir, folder_kind, new_accumulator, no_checkpoint_advice, warn

__all__ = ["STATE_VERSION", "TrainState", "ResumePoint", "read_resume_point", "saved_config", "checkpoint_config",
           "read_latest_good"]

STATE_VERSION = 1


def checkpoint_config(path: str, state: Dict[str, Any]) -> TrainConfig:
    """The config a checkpoint was saved with (the authority on --resume and --sample-only)."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise TrainError(f"checkpoint {path} holds no config (its 'config' is a {type(saved).__name__})")
    try:
        return TrainConfig.from_dict(saved).validate()
    except ConfigError as exc:
        raise TrainError(f"checkpoint {path} holds a bad config: {exc}") from None


# The checkpoint saved_config read, for the read that follows it (--resume, --sample-only and
# --export read the config first, then the state): one slot, taken by the next read_latest_good.
_PEEKED: Dict[str, Any] = {}


def _identity(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def saved_config(out: str) -> TrainConfig:
    """The config of the latest good checkpoint in ``out`` (read only: nothing is quarantined)."""
    if not ckpt.list_checkpoints(checkpoint_dir(out)):
        if folder_kind(out) == "run":
            raise TrainError(no_checkpoint_advice(out))
        raise TrainError(f"no run in {out} to continue (no checkpoint in {checkpoint_dir(out)})")
    path, state = ckpt.load_latest_good(checkpoint_dir(out), warn=lambda msg: None, quarantine=False)
    _PEEKED.clear()
    _PEEKED.update(path=path, identity=_identity(path), state=state)
    return checkpoint_config(path, state)


def _take_peeked(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """The state ``saved_config`` read and verified, if it is ``path`` and that file is unchanged on
    disk; else None. The slot is emptied either way."""
    peeked = dict(_PEEKED)
    _PEEKED.clear()
    if peeked and path is not None and peeked["path"] == path and _identity(path) == peeked["identity"]:
        return peeked["state"]
    return None


def _peeked_or_load(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path``, read and verified (by ``saved_config`` already, or now)."""
    state = _take_peeked(path)
    return ckpt.load_checkpoint(path) if state is None else state


def read_latest_good(folder: str, warn: Callable[[str], None], quarantine: bool) -> Tuple[str, Dict[str, Any]]:
    """``checkpoint.load_latest_good``, except that the checkpoint ``saved_config`` just read and
    verified, if it is still the newest file and unchanged on disk, is not read and checksummed again."""
    newest = ckpt.list_checkpoints(folder)[:1]
    path = newest[0][1] if newest else None
    state = _take_peeked(path)
    if state is not None:
        return path, state
    return ckpt.load_latest_good(folder, warn=warn, quarantine=quarantine)


@dataclass
class ResumePoint:
    path: str
    state: Dict[str, Any]
    config: TrainConfig  # the one it was saved with
    trajectory_changes: List[str]  # accepted with --allow-trajectory-change


def read_resume_point(cfg: TrainConfig, d: DistInfo) -> ResumePoint:
    """The latest good checkpoint of ``cfg.out`` (a bad newest one is quarantined), its layout
    version and config checked against ``cfg``; before any data is read, so the checkpoint, not
    an editable config.json, decides what is loaded."""
    path, state = _agreed_checkpoint(checkpoint_dir(cfg.out), d)
    if state.get("version") != STATE_VERSION:
        raise TrainError(f"checkpoint {path} holds training state version {state.get('version')!r}; "
                         f"this build resumes version {STATE_VERSION}")
    saved = checkpoint_config(path, state)
    diffs = config_diff(saved, cfg, ignore=RESUME_MUTABLE | TRAJECTORY_FIELDS)
    if diffs:
        raise TrainError(f"cannot resume from {path}: the config differs in " + "; ".join(diffs))
    changes = config_diff(saved, cfg, ignore=frozenset(f.name for f in fields(TrainConfig)) - TRAJECTORY_FIELDS)
    if changes and not cfg.allow_trajectory_change:
        raise TrainError(f"cannot resume from {path}: " + "; ".join(changes) + " would change the training "
                         "trajectory; pass --allow-trajectory-change to accept that (it is recorded in metrics.jsonl)")
    return ResumePoint(path, state, saved, changes)


def _agreed_checkpoint(folder: str, d: DistInfo) -> Tuple[str, Dict[str, Any]]:
    """Rank 0 picks the checkpoint (quarantining corrupt ones) and every rank loads that file, so
    ranks never resume from different steps; a failure on any rank stops every rank with its message."""
    path, state, error = None, None, None
    if d.main:
        ckpt.clean_temp_files(folder)  # a save killed half-way leaves one
        try:
            path, state = read_latest_good(folder, warn=warn, quarantine=True)
        except ckpt.CheckpointError as exc:
            error = str(exc)
    path, error = broadcast_object((path, error), d)
    if error is None and not d.main:
        try:
            state = _peeked_or_load(path)
        except ckpt.CheckpointError as exc:
            error = f"rank {d.rank}: {exc}"
    errors = [e for e in all_gather_objects(error, d) if e is not None]
    if errors:
        raise ckpt.CheckpointError(errors[0])
    return path, state


@dataclass
class TrainState:
    """Everything a training step changes. ``model`` is the bare module (not compiled, not DDP)."""

    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    weighting: torch.nn.Module
    observer: torch.nn.Module
    noise_sampler: Any
    generators: Dict[str, torch.Generator]
    batches: Any
    step: int = 0
    skipped: int = 0       # non-finite steps skipped so far
    consecutive: int = 0   # of them in a row, up to this step
    log_accum: Dict[str, Any] = field(default_factory=new_accumulator)

    def save(self, out: str, run_config: Dict[str, Any], image_shape: Tuple[int, ...], d: DistInfo,
             device: torch.device, keep: int) -> str:
        """Write ``checkpoints/ckpt_<step>.pt`` (collective: every rank calls it); returns its path."""
        cuda = device.type == "cuda"
        rank_state = {"rng": get_rng_states(self.generators), "data": self.batches.state_dict(),
                      "global_rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state(device) if cuda else torch.empty(0, dtype=torch.uint8)}
        ranks = all_gather_objects(rank_state, d)
        path = ckpt.checkpoint_path(checkpoint_dir(out), self.step)
        if d.main:
            state = {"version": STATE_VERSION, "step": self.step, "config": run_config,
                     "model": self.model.state_dict(), "ema": self.ema.module.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "weighting": self.weighting.state_dict(),
                     "observer": self.observer.vaw.state_dict(), "noise_sampler": self.noise_sampler.state_dict(),
                     "ranks": ranks, "world_size": d.world, "image_shape": list(image_shape),
                     "log_accum": dict(self.log_accum),
                     "counters": {"skipped_steps": self.skipped, "consecutive_nonfinite": self.consecutive}}
            ckpt.save_checkpoint(state, path)
            ckpt.prune_checkpoints(checkpoint_dir(out), keep)
        d.barrier()
        return path

    def resume(self, point: "ResumePoint", d: DistInfo, device: torch.device, seed: int) -> None:
        """Put back the state of the checkpoint ``read_resume_point`` found."""
        try:
            self._load(point.state, d, device, seed)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise TrainError(f"checkpoint {point.path} does not fit this run: {str(exc).splitlines()[0]}") from None

    def _load(self, state: Dict[str, Any], d: DistInfo, device: torch.device, seed: int) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.weighting.load_state_dict(state["weighting"])
        if self.observer.updates:  # else it reads the weighting's VAW, loaded above from the same statistics
            self.observer.vaw.load_state_dict(state["observer"])
        self.noise_sampler.load_state_dict(state["noise_sampler"])
        ranks: List[Dict[str, Any]] = state["ranks"]
        if len(ranks) == d.world:
            mine = ranks[d.rank]
            set_rng_states(self.generators, mine["rng"])
            self.batches.load_state_dict(mine["data"])
            torch.set_rng_state(mine["global_rng"])
            if device.type == "cuda" and mine.get("cuda_rng") is not None and mine["cuda_rng"].numel():
                torch.cuda.set_rng_state(mine["cuda_rng"], device)
        else:
            warn(f"warning: world size changed from {len(ranks)} to {d.world}; data order and noise "
                 "streams restart from re-derived seeds (the run continues, not bitwise as before)")
            for name, g in self.generators.items():
                g.manual_seed(derive_seed(seed, f"{name}@{state['step']}", d.rank))
        self.step = int(state["step"])
        self.skipped = int(state["counters"]["skipped_steps"])
        self.consecutive = int(state["counters"]["consecutive_nonfinite"])
        self.log_accum = _log_accum(state["log_accum"])


def _log_accum(saved: Any) -> Dict[str, Any]:
    """A checkpoint's log accumulator, checked: the keys ``new_accumulator`` makes, each a number
    of its type (the loop reads every one of them)."""
    fresh = new_accumulator()
    if not isinstance(saved, dict) or set(saved) != set(fresh):
        got = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"its log_accum holds {got}, not the keys {sorted(fresh)}")
    for key, value in fresh.items():
        if type(saved[key]) is not type(value) and not (isinstance(value, float) and type(saved[key]) is int):
            raise ValueError(f"its log_accum[{key!r}] is a {type(saved[key]).__name__}, not a {type(value).__name__}")
    return dict(saved)
