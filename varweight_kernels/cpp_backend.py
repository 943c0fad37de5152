"""Deprecated path: the same module as ``varweight_kernels.backends.compiled``; importing it warns."""
import sys
import warnings

from .backends import compiled

warnings.warn("varweight_kernels.cpp_backend is deprecated; import varweight_kernels.backends.compiled",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = compiled
