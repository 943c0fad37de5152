"""Placeholder until the compiled extension lands (issue 4)."""
from .backends import Backend, register_backend


class _Unbuilt(Backend):
    devices = ("cpu",)

    def unavailable_reason(self):
        return "the compiled extension is not part of this build yet"


class CppBackend(_Unbuilt):
    name = "cpp"


class CudaBackend(_Unbuilt):
    name = "cuda"
    devices = ("cuda",)


register_backend("cpp", CppBackend)
register_backend("cuda", CudaBackend)
