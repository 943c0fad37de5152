"""The command line of ``train_cifar.py``: flags -> ``TrainConfig`` -> ``train`` or ``sample_only``.

Every user-facing failure (``TrainError``, ``ConfigError``, ``CheckpointError``, ``WriteError``) is one line on
stderr and a non-zero exit status; never a traceback.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import torch.distributed as dist

from .checkpoint import CheckpointError, WriteError
from .config import ConfigError, TrainConfig, TrainError, build_parser, explicit_flags, resolve_config
from .distributed import DistInfo
from .loop import Callbacks, train
from .sampling import sample_only
from .signals import SecondInterrupt
from .state import saved_config

__all__ = ["parse_config", "main"]


def parse_config(argv: Optional[List[str]] = None, prog: str = "train_cifar.py") -> TrainConfig:
    """flag > preset > default; on --resume / --sample-only the config of the run's latest good
    checkpoint replaces the defaults (config.json is only a copy for people and tools)."""
    args = build_parser(prog).parse_args(argv)
    flags = explicit_flags(args)
    base = None
    if flags.get("resume") or flags.get("sample_only"):
        out = flags.get("out", TrainConfig().out)
        base = saved_config(out)
        base = base.replace({"resume": False, "overwrite": False, "sample_only": False,
                             "allow_trajectory_change": False})
    return resolve_config(flags, base)


def main(argv: Optional[List[str]] = None, callbacks: Optional[Callbacks] = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    d = DistInfo()
    try:
        cfg = parse_config(argv)
        if cfg.sample_only:
            sample_only(cfg)
        else:
            train(cfg, callbacks)
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
