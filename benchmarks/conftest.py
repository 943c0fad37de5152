"""pytest-benchmark setup for the micro-benchmarks in this folder (not part of the test suite).

Run with ``pytest benchmarks/bench_step.py`` (or ``pytest benchmarks``); the project's tests
live in ``python_tests/`` (``testpaths`` in pyproject.toml), so a plain ``pytest`` never collects
these. Every benchmark runs single-threaded.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):  # compare.py (shared runners) and an uninstalled checkout
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


BENCH_FILES = ("bench_step.py",)  # bench_gpu.py is a script, not a pytest module


def pytest_collect_file(file_path, parent):
    """Collect ``bench_step.py`` when the folder is given (explicit files are collected anyway)."""
    if (file_path.name in BENCH_FILES and file_path.parent == HERE
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
