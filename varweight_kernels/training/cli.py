"""The command line of ``train_cifar.py``: flags -> ``TrainConfig`` -> ``train``, or ``sample_only``
and/or ``export_run``.

``--print-config`` prints the fully resolved config (defaults, preset, saved run, flags) as
JSON and exits, so what a preset means can be read without starting a run.

Every flag is checked before the run folder is touched: ``TrainConfig.validate`` (types, choices,
ranges, fields that must agree) and ``check_machine`` (the device and the VAW backend exist here).
Every user-facing failure (``TrainError``, ``ConfigError``, ``CheckpointError``, ``WriteError``) is one line on
stderr and a non-zero exit status; never a traceback.
"""
from __future__ import annotations

import json
import sys
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..backends import backend_reason
from .checkpoint import CheckpointError, WriteError
from .config import ConfigError, TrainConfig, TrainError, build_parser, explicit_flags, resolve_config
from .distributed import DistInfo, resolve_device
from .export import export_run
from .loop import Callbacks, train
from .run_dir import run_folder_lock
from .run_index import write_run_index
from .sampling import sample_only
from .signals import SecondInterrupt
from .state import saved_config

__all__ = ["parse_config", "check_machine", "main"]


def parse_config(argv: Optional[List[str]] = None, prog: str = "train_cifar.py") -> TrainConfig:
    """flag > preset > default; on --resume / --sample-only / --export the config of the run's latest
    good checkpoint replaces the defaults (config.json is only a copy for people and tools)."""
    return _parse(argv, prog)[0]


def _parse(argv: Optional[List[str]], prog: str) -> Tuple[TrainConfig, bool]:
    """The resolved config and whether --print-config was given."""
    parser = build_parser(prog)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (preset and flags applied) as JSON and exit")
    args = parser.parse_args(argv)
    flags = explicit_flags(args)
    base = None
    if flags.get("resume") or flags.get("sample_only") or flags.get("export"):
        out = flags.get("out", TrainConfig().out)
        base = saved_config(out)
        base = base.replace({"resume": False, "overwrite": False, "sample_only": False, "export": "",
                             "allow_trajectory_change": False})
    return resolve_config(flags, base), args.print_config


def check_machine(cfg: TrainConfig, d: DistInfo) -> None:
    """What ``validate`` cannot know: that ``--device`` exists on this machine and that an explicit
    ``--backend`` runs on it. Raises a one-line ``ConfigError`` or ``TrainError``."""
    asked = torch.device(cfg.device) if cfg.device != "auto" else None  # validate() checked the form
    if asked is not None and asked.type == "cuda" and asked.index is not None and torch.cuda.is_available() \
            and asked.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    device = resolve_device(cfg, d)
    if cfg.backend != "auto":
        reason = backend_reason(cfg.backend, device)
        if reason is not None:
            raise ConfigError(f"--backend {cfg.backend} cannot run on {device}: {reason}")


def main(argv: Optional[List[str]] = None, callbacks: Optional[Callbacks] = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    d = DistInfo()
    try:
        cfg, print_config = _parse(argv, "train_cifar.py")
        cfg = cfg.validate()
        if print_config:
            if d.main:
                print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        if cfg.sample_only:
            sample_only(cfg)  # holds the run's lock while it writes
        if not (cfg.sample_only or cfg.export):
            check_machine(cfg, d)
            train(cfg, callbacks)
        elif d.main:
            with run_folder_lock(cfg.out):  # no trainer may write the run meanwhile
                if cfg.export:
                    export_run(cfg)
                write_run_index(cfg.out)
        return 0
    except (TrainError, ConfigError, CheckpointError, WriteError) as exc:
        if d.main or not isinstance(exc, ConfigError):
            prefix = "error" if d.world == 1 else f"error (rank {d.rank})"
            print(f"{prefix}: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 1
    except SecondInterrupt:
        print("aborted by a second interrupt; no checkpoint written for the current step", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside the training loop (set-up, the final samples): nothing half-written
        print("interrupted outside the training loop; the files written so far are intact", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
