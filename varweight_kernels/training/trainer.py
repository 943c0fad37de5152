"""Deprecated import path of the trainer (before the split of issue #14): re-exports only; importing it warns.

The loop is ``loop.py``; the CLI ``cli.py``; the run folder ``run_dir.py``; the pieces
``builders.py``; sampling and evaluation ``sampling.py``; the checkpointed state ``state.py``.
"""
import warnings

from .builders import EMA, build_model, build_noise_sampler, build_weighting, load_data  # noqa: F401
from .cli import main, parse_config  # noqa: F401
from .config import TrainError  # noqa: F401
from .loop import train  # noqa: F401
from .rng import STREAMS as RNG_STREAMS  # noqa: F401
from .run_dir import TIMING_FIELDS  # noqa: F401
from .sampling import sample_only  # noqa: F401


warnings.warn("varweight_kernels.training.trainer is deprecated; import from varweight_kernels.training.loop, "
              ".cli, .builders or .sampling", DeprecationWarning, stacklevel=2)
