"""Deprecated path, kept for one release: the same module as ``varweight_kernels.backends.triton``."""
import sys

from .backends import triton

sys.modules[__name__] = triton
