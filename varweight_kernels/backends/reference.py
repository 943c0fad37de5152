"""The "reference" backend: :mod:`varweight_kernels.reference` itself, on any device."""
from __future__ import annotations

from .. import reference
from ..config import as_kernel_params
from .base import Backend


class ReferenceBackend(Backend):
    devices = ("cpu", "cuda")

    def forward_moments(self, loss, lam, weight, lmin, bin_scale, training):
        return reference.forward_moments(loss, lam, weight, lmin, bin_scale, training)

    def update(self, moments, M, Q, Z, C, weight, step, nonfinite, params):
        reference.update(moments, M, Q, Z, C, weight, step, nonfinite, as_kernel_params(params))
