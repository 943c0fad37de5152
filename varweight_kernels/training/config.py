"""``TrainConfig`` and its flags, presets and resume policy: the one import path for all of them.

The pieces live in their own modules; this one re-exports their public names, so
``from varweight_kernels.training.config import TrainConfig, PRESETS, build_parser`` keeps working:

- ``schema``: ``TrainConfig`` (every knob of a run, one flag per field), its types and validation;
- ``presets``: ``PRESETS``, named partial configs;
- ``resume_policy``: what a ``--resume`` may change (``RESUME_MUTABLE``, ``TRAJECTORY_FIELDS``,
  ``config_diff``);
- ``flags``: the parser and ``flag > preset > default`` (``build_parser``, ``resolve_config``);
- ``registry``: the lists of names (datasets, weightings, architectures, ...).
"""
from __future__ import annotations

from .flags import build_parser, explicit_flags, resolve_config
from .presets import PRESETS
from .registry import ARCHITECTURES, DATASETS, FORMULATIONS, NOISE_SAMPLINGS, SAMPLERS, SNR_CONVENTIONS, WEIGHTINGS
from .resume_policy import RESUME_MUTABLE, TRAJECTORY_FIELDS, config_diff
from .schema import OLD_CONFIG_VALUES, VAW_BACKENDS, ConfigError, TrainConfig, TrainError

__all__ = ["TrainConfig", "ConfigError", "TrainError", "PRESETS", "WEIGHTINGS", "DATASETS", "FORMULATIONS",
           "NOISE_SAMPLINGS", "SAMPLERS", "ARCHITECTURES", "SNR_CONVENTIONS", "RESUME_MUTABLE", "TRAJECTORY_FIELDS",
           "build_parser", "explicit_flags", "resolve_config", "config_diff", "OLD_CONFIG_VALUES", "VAW_BACKENDS"]
