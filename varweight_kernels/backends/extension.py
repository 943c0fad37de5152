"""Loader of the compiled kernels (``varweight_kernels._C`` and ``varweight_kernels._C_cuda``).

The libraries register the ops ``torch.ops.varweight_ext.{forward_moments, update, step,
weighted_step, scale_grad, build_info, cpu_isa}`` when loaded (``csrc/vaw.cpp`` has their schemas),
and the CUDA library also ``cuda_fused_kernels`` (its schema is in ``csrc/cuda/vaw_cuda.cu``).
Each carries the ``torch.__version__`` it was compiled against as a marker string; the marker is
read from the file BEFORE the library is loaded, so a build for another torch is never dlopen'ed (that could crash on undefined symbols or ABI changes). When the CPU library is missing,
was built for another torch, or fails to load, a warning is issued once and the CPU kernels are
built just in time with ``torch.utils.cpp_extension.load`` (cached under ``TORCH_EXTENSIONS_DIR``
or ``~/.cache/torch_extensions``). ``VARWEIGHT_NO_JIT=1`` disables that build; the backend is then
unavailable with the reason. The CUDA library has no JIT fallback. ``VARWEIGHT_FORCE_JIT=1``
ignores the installed library (to test the fallback).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import io
import os
import re
import struct
import threading
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from .base import env_flag

NAMESPACE = "varweight_ext"
DISTRIBUTION = "varweight"
CPU_MODULE = "varweight_kernels._C"
CUDA_MODULE = "varweight_kernels._C_cuda"
MARKER_PREFIX = b"VARWEIGHT_TORCH_VERSION_HEX="
NO_JIT_ENV = "VARWEIGHT_NO_JIT"
FORCE_JIT_ENV = "VARWEIGHT_FORCE_JIT"
SOURCE_FILES = ("vaw.cpp", "cpu/vaw_cpu.cpp", "cpu/vaw_cpu.h", "common.h", "bin_update.h")
INSTALL_HINT = "rebuild with `pip install --no-build-isolation .` against the installed torch"


@dataclasses.dataclass
class ExtensionStatus:
    """What got loaded: ``cpu_reason`` / ``cuda_reason`` are None when that library is usable."""

    cpu_reason: Optional[str] = None
    cuda_reason: Optional[str] = None
    cpu_origin: Optional[str] = None  # "prebuilt", "jit" or "already loaded"


def read_marker(path: str) -> Optional[str]:
    """The torch version baked into a built library, or None when it carries no (readable) marker."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    # The first occurrence that parses: the prefix may also appear elsewhere (debug info, say).
    for match in re.finditer(re.escape(MARKER_PREFIX) + rb"1((?:[0-9a-f]{2})+)(?![0-9a-f])", data):
        try:
            version = bytes.fromhex(match.group(1).decode()).decode("ascii")
        except ValueError:
            continue
        if version.isprintable():
            return version
    return None


FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
FATBIN_KIND_PTX, FATBIN_KIND_ELF = 1, 2


def fatbin_entries(data: bytes) -> List[Tuple[int, int, bytes]]:
    """(kind, sm, first payload bytes) of every entry of every fatbinary in ``data``.

    Layout: header {u32 magic 0xBA55ED50, u16 version, u16 header size, u64 entries size}; entries
    {u16 kind (1 PTX, 2 ELF), u16, u32 header size, u64 payload size, ..., u32 arch at offset 28}.
    """
    entries: List[Tuple[int, int, bytes]] = []
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


def runs_on_capability(entries: Sequence[Tuple[int, int, bytes]], capability: Tuple[int, int]) -> bool:
    """Whether a library with these fatbinary entries has code for a device of ``capability``:
    machine code of the same major version and a minor at most the device's, or PTX of an
    architecture at most the device's (the driver compiles it)."""
    major, minor = capability
    device = 10 * major + minor
    return any((kind == FATBIN_KIND_ELF and arch // 10 == major and arch <= device)
               or (kind == FATBIN_KIND_PTX and arch <= device) for kind, arch, _ in entries)


def find_library(module: str) -> Optional[str]:
    """Path of an installed extension module without importing it.

    First beside the imported package; then in the installed distribution, for a source checkout
    that shadows an installed (non-editable) build, as when ``python train_cifar.py`` runs from the
    repository root after ``pip install .`` (the build's torch marker is still checked).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin is not None and os.path.isfile(spec.origin):
        return spec.origin
    return installed_library(module)


def installed_library(module: str) -> Optional[str]:
    """The file of ``module`` recorded by an installed ``varweight`` distribution, if any.

    Every distribution of that name on ``sys.path`` is searched, in path order: the first one
    found is often the source tree's own ``varweight.egg-info`` (left by ``pip install .`` and
    first on the path when running from the repository root), whose file list holds no build."""
    stem = module.replace(".", "/") + "."
    for dist in importlib.metadata.distributions(name=DISTRIBUTION):
        for entry in dist.files or []:
            name = str(entry)
            if name.startswith(stem) and name.endswith((".so", ".pyd")):
                path = str(entry.locate())
                if os.path.isfile(path):
                    return path
    return None


def ops_registered(key: str = "CPU") -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::step", key))
    except RuntimeError:
        return False


def library_problem(path: Optional[str], module: str) -> Optional[str]:
    """Why the library at ``path`` must not be loaded (missing, or built for another torch), or None."""
    if path is None:
        return f"the compiled extension {module} is not installed"
    built = read_marker(path)
    if built is None:
        return f"{path} carries no torch version marker (not built by this project's setup.py)"
    if built != torch.__version__:
        return f"{path} was built for torch {built}, but torch {torch.__version__} is installed"
    return None


def load_library(path: str) -> Optional[str]:
    """dlopen ``path`` (registers its ops); returns the error text on failure, never raises."""
    try:
        torch.ops.load_library(path)
    except (OSError, ImportError, RuntimeError) as exc:  # undefined symbols arrive as OSError
        return f"loading {path} failed: {exc}"
    return None


def source_dir() -> Optional[Path]:
    """csrc/ shipped in the package (``_csrc``) or of a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if all((candidate / f).is_file() for f in SOURCE_FILES):
            return candidate
    return None


def jit_build_name() -> str:
    return "varweight_ext_cpu_" + re.sub(r"[^A-Za-z0-9]", "_", torch.__version__)


def jit_build() -> None:
    """Compile and load the CPU kernels with torch.utils.cpp_extension.load (cached by torch)."""
    with contextlib.redirect_stderr(io.StringIO()):  # its "No CUDA runtime is found" line is noise here
        from torch.utils.cpp_extension import load

    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/) are not shipped with this installation")
    openmp = [] if os.uname().sysname == "Darwin" else ["-fopenmp"]
    load(name=jit_build_name(), sources=[str(src / "vaw.cpp"), str(src / "cpu" / "vaw_cpu.cpp")],
         extra_cflags=["-O3", "-ffp-contract=off", "-DVAW_TORCH_VERSION_HEX=1" + torch.__version__.encode().hex()]
         + openmp, extra_ldflags=openmp, extra_include_paths=[str(src)], is_python_module=False, verbose=False)


def load_extensions(cpu_path: Optional[str] = None, cuda_path: Optional[str] = None, allow_jit: Optional[bool] = None,
                    force_jit: Optional[bool] = None, warn=None) -> ExtensionStatus:
    """Check and load the libraries; returns an :class:`ExtensionStatus` and never raises.

    The arguments exist for tests; by default the installed modules and the environment decide.
    """
    status = ExtensionStatus()
    allow_jit = (not env_flag(NO_JIT_ENV)) if allow_jit is None else allow_jit
    force_jit = env_flag(FORCE_JIT_ENV) if force_jit is None else force_jit
    cpu_path = cpu_path if cpu_path is not None else find_library(CPU_MODULE)
    cuda_path = cuda_path if cuda_path is not None else find_library(CUDA_MODULE)

    if ops_registered("CPU"):  # already loaded in this process (e.g. a module reload)
        status.cpu_origin = "already loaded"
    else:
        problem = (f"{FORCE_JIT_ENV}=1 is set" if force_jit else library_problem(cpu_path, CPU_MODULE))
        if problem is None:
            problem = load_library(cpu_path)
            if problem is None:
                status.cpu_origin = "prebuilt"
        if problem is not None:
            if not allow_jit:
                status.cpu_reason = f"{problem}; the JIT fallback build is disabled ({NO_JIT_ENV}=1); {INSTALL_HINT}"
            else:
                message = (f"varweight: {problem}. Falling back to a just-in-time build of the C++ CPU kernels "
                           f"with torch.utils.cpp_extension.load (cached in TORCH_EXTENSIONS_DIR or "
                           f"~/.cache/torch_extensions; set {NO_JIT_ENV}=1 to disable). To fix: {INSTALL_HINT}.")
                if warn is not None:
                    warn(message)
                try:
                    jit_build()
                    status.cpu_origin = "jit"
                except Exception as exc:  # compiler missing, sources missing, ...
                    status.cpu_reason = f"{problem}; the JIT fallback build failed: {exc}"

    if status.cpu_reason is not None:
        status.cuda_reason = f"the C++ extension is unavailable: {status.cpu_reason}"
    elif ops_registered("CUDA"):
        pass
    elif cuda_path is None:
        status.cuda_reason = (f"the CUDA extension ({CUDA_MODULE}) was not built (needs torch with CUDA and nvcc "
                              f"at build time, or FORCE_CUDA=1)")
    elif torch.version.cuda is None:
        status.cuda_reason = f"torch {torch.__version__} was built without CUDA"
    else:
        problem = library_problem(cuda_path, CUDA_MODULE)
        if problem is None:
            problem = load_library(cuda_path)
        if problem is not None:
            status.cuda_reason = f"{problem}; {INSTALL_HINT}"
    return status


_LOCK = threading.Lock()
_STATUS: Optional[ExtensionStatus] = None
_WARNED = False


def _warn_once(message: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def status() -> ExtensionStatus:
    """Load the extensions once per process and return what happened."""
    global _STATUS
    with _LOCK:
        if _STATUS is None:
            _STATUS = load_extensions(warn=_warn_once)
            if _STATUS.cpu_reason is None:
                register_fakes()
        return _STATUS


_FAKES_REGISTERED = False


def register_fakes() -> None:
    """Shape functions of the ops for FakeTensor / torch.compile / torch.export."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return
    _FAKES_REGISTERED = True

    def forward_moments_fake(loss, lam, weight, lmin, scale, training):
        out = loss.new_empty(())
        w = torch.empty(loss.shape, dtype=torch.float32, device=loss.device)
        size = 3 * weight.numel() + 1 if training else 0
        return out, w, torch.empty((size,), dtype=torch.float64, device=loss.device)

    def update_fake(moments, M, Q, Z, C, weight, step, nonfinite, params):
        return None

    def step_fake(loss, lam, M, Q, Z, C, weight, step, nonfinite, params, training):
        return loss.new_empty(()), torch.empty(loss.shape, dtype=torch.float32, device=loss.device)

    def scale_grad_fake(grad, w, dtype):
        return torch.empty(w.shape, dtype=dtype, device=w.device)

    for name, fn in (("forward_moments", forward_moments_fake), ("update", update_fake), ("step", step_fake),
                     ("scale_grad", scale_grad_fake)):
        try:
            torch.library.register_fake(f"{NAMESPACE}::{name}")(fn)
        except RuntimeError as exc:  # already registered (e.g. by a reloaded module)
            if "already" not in str(exc):
                raise
