"""Sample-quality evaluation: Frechet distances (FID on CIFAR, classifier FD on digits), computed by torch-fidelity.

Names are loaded lazily so ``python -m varweight_kernels.evaluation.digits_classifier`` runs cleanly.
"""
from importlib import import_module

_EXPORTS = {
    "FIDEvaluator": ".fid", "FIDUnavailable": ".fid", "FID_REFERENCES": ".fid", "resolve_inception_weights": ".fid",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
