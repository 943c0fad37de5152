"""varweight_kernels: variance-aware adaptive loss weighting for diffusion training.

Implements "Variance-Aware Adaptive Weighting for Diffusion Model Training" (arXiv 2603.10391)
as a PyTorch module with reference, Triton, C++ and CUDA backends.
"""
from . import logsnr, weightings
from .backends import available_backends
from .config import VAWConfig
from .module import VarianceAwareWeighting
from .monitor import LogSNRMonitor
from .ops import VAWFunction, vaw

__all__ = ["VarianceAwareWeighting", "LogSNRMonitor", "VAWConfig", "VAWFunction", "available_backends", "vaw", "logsnr",
           "weightings"]
__version__ = "0.1.0"
