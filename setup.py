"""Build of the compiled kernels; the package metadata lives in pyproject.toml.

    pip install --no-build-isolation .        # compiles against the installed torch

* ``varweight_kernels._C`` (C++ CPU kernels, OpenMP) is always built.
* ``varweight_kernels._C_cuda`` (CUDA kernels) is built when torch has CUDA and nvcc is found, or
  when ``FORCE_CUDA=1`` (compiles without a GPU). ``FORCE_ONLY_CPU=1`` skips it.
  ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0" (plus the archs of visible GPUs).
* ``MAX_JOBS`` limits the parallel compile jobs (ninja).

Both libraries carry the torch version they were compiled against (``varweight_kernels/backends/extension.py``
checks it at import and falls back to a JIT build of the CPU kernels on a mismatch).
"""
import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["csrc/vaw.cpp", "csrc/cpu/vaw_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/vaw_cuda.cu"]
HEADERS = ["csrc/common.h", "csrc/bin_update.h", "csrc/cpu/vaw_cpu.h"]
DEFAULT_ARCHS = ["8.0", "9.0"]


def env_flag(name):
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def torch_version_define(torch):
    # A pp-number ("1" + hex digits): survives every shell/ninja/nvcc quoting and is never expanded.
    return "-DVAW_TORCH_VERSION_HEX=1" + torch.__version__.encode().hex()


def nvidia_include_dirs():
    """Headers torch includes that pip ships in <site-packages>/nvidia/<pkg>/include (e.g. cusparse.h)."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    found = []
    for base in list(getattr(nvidia, "__path__", [])):
        for header in sorted(glob.glob(os.path.join(base, "*", "include", "cusparse.h"))):
            found.append(os.path.dirname(header))
    return found


def cuda_wanted(torch, cuda_home):
    if env_flag("FORCE_ONLY_CPU"):
        return False, "FORCE_ONLY_CPU is set"
    if env_flag("FORCE_CUDA"):
        return True, "FORCE_CUDA is set"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is in {cuda_home}"


def default_arch_list(torch):
    archs = list(DEFAULT_ARCHS)
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                if f"{major}.{minor}" not in archs:
                    archs.append(f"{major}.{minor}")
    except Exception:  # no driver: keep the defaults
        pass
    return ";".join(archs)


def default_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin then points it at
    /usr/local (no lib64/libcudart). Prefer the standard toolkit folder when CUDA_HOME is unset."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        for candidate in ("/usr/local/cuda",):
            if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
                os.environ["CUDA_HOME"] = candidate
                break


def get_extensions():
    default_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    version = torch_version_define(torch)
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx_flags = ["-O3", "-ffp-contract=off", version] + openmp
    extensions = [
        CppExtension(
            "varweight_kernels._C",
            sources=CPU_SOURCES,
            include_dirs=[os.path.join(ROOT, "csrc")],
            depends=HEADERS,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    ]
    with_cuda, why = cuda_wanted(torch, CUDA_HOME)
    print(f"varweight setup: CUDA extension {'ON' if with_cuda else 'OFF'} ({why})")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(torch)
        print(f"varweight setup: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        nvcc_flags = ["-O3", "--fmad=false", "-lineinfo", version]
        for inc in nvidia_include_dirs():  # after the toolkit's own headers
            nvcc_flags += ["-isystem", inc]
        extensions.append(
            CUDAExtension(
                "varweight_kernels._C_cuda",
                sources=CUDA_SOURCES,
                include_dirs=[os.path.join(ROOT, "csrc")],
                depends=HEADERS,
                extra_compile_args={"cxx": ["-O3", version], "nvcc": nvcc_flags},
            )
        )
    return extensions


class BuildPyWithSources(build_py):
    """Also ships csrc/ inside the package (varweight_kernels/_csrc) for the JIT fallback build."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "varweight_kernels", "_csrc")
        for rel in CPU_SOURCES + CUDA_SOURCES + HEADERS:
            src = os.path.join(ROOT, rel)
            if os.path.exists(src):
                dst = os.path.join(target, os.path.relpath(rel, "csrc"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)


def main():
    default_cuda_home()  # before torch.utils.cpp_extension reads it
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=get_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithSources},
    )


if __name__ == "__main__":
    main()
