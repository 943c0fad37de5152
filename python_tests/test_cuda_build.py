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
from typing import List, Tuple

import pytest
import torch

from varweight_kernels.backends import extension as _ext

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
FATBIN_KIND_PTX, FATBIN_KIND_ELF = 1, 2
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


def fatbin_entries(data: bytes) -> List[Tuple[int, int, bytes]]:
    """(kind, sm, first payload bytes) of every entry of every fatbinary in ``data``.

    Layout: header {u32 magic 0xBA55ED50, u16 version, u16 header size, u64 entries size}; entries
    {u16 kind (1 PTX, 2 ELF), u16, u32 header size, u64 payload size, ..., u32 arch at offset 28}.
    """
    entries = []
    pos = data.find(FATBIN_MAGIC)
    while pos >= 0:
        _, _, header_size, total = struct.unpack_from("<IHHQ", data, pos)
        entry = pos + header_size
        end = min(entry + total, len(data))
        while entry + 32 <= end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            if entry_header < 32 or kind not in (FATBIN_KIND_PTX, FATBIN_KIND_ELF):
                break
            payload = entry + entry_header
            entries.append((kind, arch, data[payload:payload + 64]))
            entry = payload + size
        pos = data.find(FATBIN_MAGIC, max(end, pos + 4))
    return entries


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
