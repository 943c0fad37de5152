"""Flags -> ``TrainConfig``: the parser (one flag per field) and ``flag > preset > base``.

A value is resolved as ``flag > preset > default``; on ``--resume`` the saved run's config takes
the place of the defaults (``flag > preset > saved config``), and a change to a field that would
alter the training trajectory is refused (``resume_policy.py``).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import fields
from typing import Any, Dict, Optional

from .presets import PRESETS
from .schema import TrainConfig, check_choice, flag_name, format_value

__all__ = ["build_parser", "explicit_flags", "resolve_config"]


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2, and a negative number
    in exponent form (``-1.2e1``) is a value, not an option."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog, description="Train a diffusion model with a chosen loss weighting (varweight).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: flag > preset > default (on --resume: flag > preset > the saved run's config).\n"
               "Distributed: torchrun --nproc_per_node N train_cifar.py ... (global --batch-size is split).")
    for f in fields(TrainConfig):
        flag = flag_name(f.name)
        default = f.default
        help_text = f"{f.metadata.get('help', '')} (default: {format_value(default) if default != '' else 'none'})"
        kw: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, tuple) and len(default) == 2 and isinstance(default[0], float):
            parser.add_argument(flag, nargs=2, type=float, metavar=("LO", "HI"), **kw)
        elif isinstance(default, tuple):
            parser.add_argument(flag, nargs="*", metavar="N", **kw)
        elif isinstance(default, int):
            parser.add_argument(flag, type=int, metavar="N", **kw)
        elif isinstance(default, float):
            parser.add_argument(flag, type=float, metavar="X", **kw)
        else:
            parser.add_argument(flag, type=str, metavar="STR", **kw)
    return parser


def explicit_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The fields the user gave on the command line (parser defaults are SUPPRESSed)."""
    out = {}
    known = {f.name: f for f in fields(TrainConfig)}
    for key, value in vars(args).items():
        if key in known:
            out[key] = value
    return out


def resolve_config(flags: Dict[str, Any], base: Optional[TrainConfig] = None) -> TrainConfig:
    """``flags > preset > base`` (base: the defaults, or the saved config on --resume)."""
    cfg = base if base is not None else TrainConfig()
    preset = flags.get("preset", "" if base is not None else cfg.preset)
    if preset:
        check_choice("preset", preset, PRESETS)
        cfg = cfg.replace(dict(PRESETS[preset], preset=preset))
    return cfg.replace(flags)

