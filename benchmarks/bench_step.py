"""pytest-benchmark micro-benchmarks of one VAW step on CPU, one thread.

    pytest benchmarks/bench_step.py                       # all shapes
    pytest benchmarks/bench_step.py -k "128-64"           # one shape
    pytest benchmarks/bench_step.py --benchmark-group-by=group --benchmark-columns=median,iqr,ops

Peers: every backend that runs on CPU tensors (reference, cpp, ...; triton is left out: on CPU it
only runs under its interpreter) and ``torch.compile(reference.step)``. Shapes: B in {128, 4096,
65536, 2^20} x K in {64, 1024}. Three measurements per peer and shape, as docs/BENCHMARKING.md
defines them: ``fwd+update`` (``vaw(loss, lam)`` in training mode, loss requires grad),
``backward`` (the op's backward, timed directly) and ``step`` (the two back to back). Each is
its own benchmark group per shape, so pytest-benchmark prints the peers of one shape in one
table. ``benchmarks/compare.py`` gives the same numbers as ratios in one interleaved table.
"""
from __future__ import annotations

import pytest
import torch

import compare
from varweight_kernels.backends import BACKEND_NAMES, backend_reason, get_backend

BATCHES = (128, 4096, 65536, 1 << 20)
BINS = (64, 1024)
# Every backend that is meant for CPU tensors (shown as skipped, with the reason, when it is not
# built here), then torch.compile(reference). Triton is left out: on CPU it is only interpreted.
PEERS = tuple(dict.fromkeys([compare.EAGER] + [b for b in BACKEND_NAMES if b not in ("reference", "triton")
                                               and "cpu" in get_backend(b).devices]
                            + compare.cpu_peers(include_compiled=True)))

_RUNNERS = {}


def _runner(peer: str, batch: int, num_bins: int) -> compare.Runner:
    if peer != compare.COMPILED:
        reason = backend_reason(peer, torch.device("cpu"))
        if reason is not None:
            pytest.skip(f"backend {peer!r} cannot run on CPU here: {reason}")
    key = (peer, batch, num_bins)
    if key not in _RUNNERS:
        runner = compare.make_runner(peer, batch, num_bins)
        for _ in range(3):  # warm-up; compiles the compiled peer once per shape
            runner.fwd()
            runner.bwd()
        _RUNNERS[key] = runner
    return _RUNNERS[key]


def _info(benchmark, peer, batch, num_bins, phase):
    benchmark.group = f"{phase} B={batch} K={num_bins}"
    benchmark.extra_info.update(peer=peer, batch=batch, bins=num_bins, phase=phase, threads=torch.get_num_threads(),
                                bytes_fwd=compare.BYTES_PER_SAMPLE_FWD * batch,
                                bytes_bwd=compare.BYTES_PER_SAMPLE_BWD * batch)


shapes = pytest.mark.parametrize("num_bins", BINS)
batches = pytest.mark.parametrize("batch", BATCHES)
peers = pytest.mark.parametrize("peer", PEERS)


@shapes
@batches
@peers
def test_step(benchmark, peer, batch, num_bins):
    runner = _runner(peer, batch, num_bins)
    _info(benchmark, peer, batch, num_bins, "step")

    def step():
        runner.fwd()
        return runner.bwd()

    benchmark(step)


@shapes
@batches
@peers
def test_forward_update(benchmark, peer, batch, num_bins):
    runner = _runner(peer, batch, num_bins)
    _info(benchmark, peer, batch, num_bins, "fwd+update")
    benchmark(runner.fwd)


@shapes
@batches
@peers
def test_backward(benchmark, peer, batch, num_bins):
    runner = _runner(peer, batch, num_bins)
    runner.fwd()
    _info(benchmark, peer, batch, num_bins, "backward")
    benchmark(runner.bwd)
