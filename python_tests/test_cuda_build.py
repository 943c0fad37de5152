"""CI check of the CUDA build: the compiled CUDA library exists and holds sm_90 machine code.

Needs no GPU. Skipped (with the reason) when the CUDA extension was not built, unless
``VARWEIGHT_REQUIRE_CUDA_BUILD`` is set (CI sets it): then a missing library fails.
The architectures are read from the fatbinary embedded in the library (no CUDA tools needed);
when ``cuobjdump`` is on PATH or in CUDA_HOME/bin its ``--list-elf`` output must agree.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from varweight_kernels.backends import extension as _ext

from varweight_kernels.backends.extension import FATBIN_KIND_ELF, FATBIN_KIND_PTX, fatbin_entries, runs_on_capability

EM_CUDA = 190


def _required() -> bool:
    return _ext.env_flag("VARWEIGHT_REQUIRE_CUDA_BUILD")


@pytest.fixture(scope="module")
def cuda_library() -> str:
    path = _ext.find_library(_ext.CUDA_MODULE)
    if path is None:
        message = (f"the CUDA extension {_ext.CUDA_MODULE} was not built (build with FORCE_CUDA=1 or with "
                   f"torch+CUDA and nvcc present)")
        if _required():
            pytest.fail(f"VARWEIGHT_REQUIRE_CUDA_BUILD is set but {message}", pytrace=False)
        pytest.skip(message)
    return path


def cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "cuobjdump")
    return candidate if os.path.exists(candidate) else None


def test_cuda_library_contains_sm90_code(cuda_library):
    with open(cuda_library, "rb") as f:
        data = f.read()
    entries = fatbin_entries(data)
    assert entries, f"no CUDA fatbinary found in {cuda_library}"
    elf_archs = sorted({arch for kind, arch, _ in entries if kind == FATBIN_KIND_ELF})
    assert 90 in elf_archs, f"{cuda_library} has machine code for sm_{elf_archs}, not sm_90"
    for kind, arch, head in entries:
        if kind == FATBIN_KIND_ELF and head[:4] == b"\x7fELF":  # uncompressed cubin: check it is CUDA code
            (machine,) = struct.unpack_from("<H", head, 18)
            assert machine == EM_CUDA, f"sm_{arch} entry is not a CUDA ELF (e_machine {machine})"


def test_cuobjdump_agrees(cuda_library):
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump is not installed (the fatbinary parse above is the check)")
    listing = subprocess.run([tool, "--list-elf", cuda_library], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "sm_90" in listing.stdout, listing.stdout


def test_default_arch_list_covers_sm80_and_sm90(cuda_library):
    """Without TORCH_CUDA_ARCH_LIST the build targets sm_80 and sm_90 (setup.py's default)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("TORCH_CUDA_ARCH_LIST is set in this environment; the build may have used another list")
    with open(cuda_library, "rb") as f:
        archs = {arch for kind, arch, _ in fatbin_entries(f.read()) if kind == FATBIN_KIND_ELF}
    assert {80, 90} <= archs, f"expected sm_80 and sm_90, found {sorted(archs)}"


def test_cuda_library_matches_installed_torch(cuda_library):
    assert _ext.read_marker(cuda_library) == torch.__version__


def test_capability_check_follows_cuda_compatibility():
    entries = [(FATBIN_KIND_ELF, 80, b""), (FATBIN_KIND_ELF, 90, b"")]
    assert runs_on_capability(entries, (9, 0)) and runs_on_capability(entries, (8, 6))  # sm_80 code runs on 8.6
    assert not runs_on_capability(entries, (7, 5)) and not runs_on_capability(entries, (10, 0))
    assert runs_on_capability(entries + [(FATBIN_KIND_PTX, 90, b"")], (10, 0))  # PTX is JIT-compiled upwards
    assert not runs_on_capability([], (9, 0))


def _fake_fatbin(archs) -> bytes:
    """A fatbinary with one empty ELF entry per architecture (the layout fatbin_entries reads)."""
    entries = b"".join(struct.pack("<HHIQ", FATBIN_KIND_ELF, 0, 32, 0) + bytes(12) + struct.pack("<I", arch)
                       for arch in archs)
    return b"junk" + struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(entries)) + entries


def test_cuda_backend_names_the_missing_architecture(tmp_path, monkeypatch):
    from varweight_kernels.backends import compiled, extension

    lib = tmp_path / "_C_cuda.so"
    lib.write_bytes(_fake_fatbin([80, 90]))
    assert [arch for _, arch, _ in fatbin_entries(lib.read_bytes())] == [80, 90]
    monkeypatch.setattr(extension, "find_library", lambda module: str(lib))
    assert compiled._missing_code_reason((9, 0)) is None
    reason = compiled._missing_code_reason((12, 0))
    assert "sm_80, sm_90" in reason and "compute capability 12.0" in reason and "TORCH_CUDA_ARCH_LIST" in reason


def test_auto_prefers_cuda_then_triton_on_cuda_tensors():
    from varweight_kernels.backends.registry import auto_order

    assert auto_order("cuda") == ("cuda", "triton", "reference")
    assert auto_order("cpu") == ("cpp", "reference")


def test_fused_kernels_are_off_by_default_and_switch(cuda_library):
    """The fused kernels run only when asked for: VARWEIGHT_FUSED_KERNELS=1 or ``backend.fused = True``."""
    code = ("from varweight_kernels.backends.compiled import CudaBackend\n"
            "from varweight_kernels.backends.extension import status\n"
            "print(status().cuda_reason is None and CudaBackend().fused)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for value, expected in (("", "False"), ("0", "False"), ("1", "True")):
        env = dict(os.environ, VARWEIGHT_FUSED_KERNELS=value,
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == expected, (value, result.stdout)
