"""Deprecated path: the same module as ``varweight_kernels.backends.triton``; importing it warns."""
import sys
import warnings

from .backends import triton

warnings.warn("varweight_kernels.triton_vaw is deprecated; import varweight_kernels.backends.triton",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = triton
