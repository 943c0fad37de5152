"""Placeholder until the Triton kernels land (issue 3)."""
from .backends import Backend, register_backend


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda",)

    def unavailable_reason(self):
        return "the Triton kernels are not part of this build yet"


register_backend("triton", TritonBackend)
