"""Deprecated path, kept for one release: the same module as ``varweight_kernels.backends.compiled``."""
import sys

from .backends import compiled

sys.modules[__name__] = compiled
