"""Test-session setup shared by every test module.

Triton decides between the interpreter and the compiler when its kernels are defined, so the
switch must be set before any module imports ``varweight_kernels.backends.triton``: without a CUDA
device the Triton backend is tested on CPU tensors through ``TRITON_INTERPRET=1``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
