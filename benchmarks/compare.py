"""One table: every CPU backend of a VAW step against its peers, measured in one interleaved run.

Usage::

    python benchmarks/compare.py [--quick] [--threads 1] [--json PATH] [--no-compile] [--compile-backend eager]

Definitions (docs/BENCHMARKING.md):

* ``fwd+upd``: ``out = vaw(loss, lam)`` in training mode with ``loss.requires_grad_(True)``
  (weighted mean, moments, EMA, next weight table), no ``backward()``.
* ``bwd``: the op's own share of a backward pass, timed directly: the backward of the
  autograd function (``grad * w / B``), without the autograd engine's fixed cost.
* ``step`` = ``fwd+upd`` + ``bwd``.
* ``xfixed``: BENCHMARKING.md's subtraction, ``T(autograd.grad(vaw(loss, lam), loss))`` minus
  ``T(autograd.grad((loss * w).mean(), loss))``: what a whole forward+backward costs on top of a
  fixed weighting (it includes the forward; reported, not used for the ratios).
* Peers: the eager reference (``backend="reference"``) and ``torch.compile(reference.step)``
  (static shapes, compiled once per shape, run by the module's own ``VAWFunction``).
* Ratios are ``T(eager reference) / T(peer)`` (higher is faster), all from this run.
* ``--raw`` adds ``raw:<backend>``: the backend's ``step`` called directly (no module, custom op
  or autograd), to show how much of a step is the Python around the kernels.
* Bandwidth ``GB/s`` = 12 bytes per sample (float32 ``loss`` and ``lam`` read, float32 per-sample
  weights written) / ``fwd+upd`` time. The K-entry state is ignored (at most 1024 bins).

Times are the median over repeats; within a repeat every peer runs back to back (rotating the
order), so the peers see the same machine load. On a shared CPU only the ratios are claims.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import varweight_kernels  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(ROOT))
    import varweight_kernels  # noqa: F401

from varweight_kernels import VarianceAwareWeighting, available_backends, reference  # noqa: E402
from varweight_kernels.backends import backend_reason, cpu_name, get_backend  # noqa: E402
from varweight_kernels.backends.reference import ReferenceBackend  # noqa: E402
from varweight_kernels.config import as_kernel_params  # noqa: E402
from varweight_kernels.ops import STATE_NAMES, VAWFunction  # noqa: E402
from varweight_kernels.training.run_dir import format_number  # noqa: E402

FULL_BATCHES = (128, 4096, 65536, 1 << 20)
FULL_BINS = (64, 1024)
QUICK_BATCHES = (128, 65536)
QUICK_BINS = (64,)
EAGER = "reference"
COMPILED = "compile(reference)"
RAW = "raw:"
BYTES_PER_SAMPLE_FWD = 12  # float32 loss + float32 lam read, float32 weight written
BYTES_PER_SAMPLE_BWD = 8  # float32 weight read, float32 grad written
BYTES_PER_SAMPLE_INPUT = 8  # float32 loss + float32 lam read (the CPU bandwidth goal counts these)


# --------------------------------------------------------------------------------------------
# Peers: each one builds a runner for a shape. A runner exposes three callables without arguments.
# --------------------------------------------------------------------------------------------
def direct_backward(w: torch.Tensor, grad_out: torch.Tensor, loss_dtype: torch.dtype) -> torch.Tensor:
    """The reference backward, called directly (what VAWFunction runs for the reference backend)."""
    return reference.scale_grad(grad_out, w, loss_dtype)


class _CompiledReference(ReferenceBackend):
    """The reference backend with ``step`` compiled by ``torch.compile``: the module's own
    :class:`~varweight_kernels.ops.VAWFunction` runs it, so the peer differs from the eager reference
    only in the compilation."""

    def __init__(self, dynamic: bool = False, compile_backend: str = "inductor"):
        self._compiled = torch.compile(reference.step, dynamic=dynamic, backend=compile_backend)

    def step(self, loss, lam, M, Q, Z, C, weight, step, nonfinite, params, training):
        return self._compiled(loss, lam, M, Q, Z, C, weight, step, nonfinite, as_kernel_params(params), training)


def _raise_recompile_limit(limit: int = 256) -> None:
    """One compiled graph per shape: keep dynamo from falling back to eager after 8 shapes."""
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


@dataclass
class Runner:
    """Callables for one peer at one shape; ``fwd`` must be called before ``bwd``."""

    name: str
    fwd: Callable[[], torch.Tensor]
    bwd: Callable[[], torch.Tensor]
    grad: Callable[[], torch.Tensor]
    module: VarianceAwareWeighting


def make_inputs(batch: int, num_bins: int, device="cpu", seed: int = 0, dtype=torch.float32):
    """Random per-sample losses (log-normal, spread depending on lam) and log-SNRs inside the range."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed + 1000003 * num_bins + batch)
    lam = torch.rand(batch, generator=gen, device=device) * 26.0 - 13.0  # a few clamp to the edge bins
    loss = torch.exp(0.5 * torch.randn(batch, generator=gen, device=device)) * (1.0 + 0.1 * lam.abs())
    return loss.to(dtype).requires_grad_(True), lam


def make_runner(peer: str, batch: int, num_bins: int, device="cpu", seed: int = 0,
                dtype=torch.float32, dynamic: bool = False, compile_backend: str = "inductor") -> Runner:
    """Peer ``peer``: a backend name, ``compile(reference)`` (``dynamic``: one graph for all B), or
    ``raw:<backend>``: the backend's ``step`` called directly, without the module, the custom op and
    autograd (a diagnostic: what the kernels cost without the Python around them). ``compile_backend``
    is the compiled peer's ``torch.compile`` backend."""
    loss, lam = make_inputs(batch, num_bins, device, seed, dtype)
    raw = peer.startswith(RAW)
    backend = EAGER if peer == COMPILED else (peer[len(RAW):] if raw else peer)
    module = VarianceAwareWeighting(num_bins=num_bins, backend=backend, prior=None).to(device).train()  # the kernels alone
    grad_one = torch.ones((), dtype=dtype, device=device)
    last = {}
    if raw:
        impl = get_backend(backend)
        state = [getattr(module, n) for n in STATE_NAMES]
        params = module._params
        detached = loss.detach()

        def fwd():
            out, w = impl.step(detached, lam, *state, params, True)
            last["w"] = w
            return out

        def bwd():
            return direct_backward(last["w"], grad_one, dtype)

        def grad():
            fwd()
            return bwd()

        return Runner(peer, fwd, bwd, grad, module)
    if peer == COMPILED:
        _raise_recompile_limit()
        impl = _CompiledReference(dynamic, compile_backend)
        state = [getattr(module, n) for n in STATE_NAMES]
        params = module._params

        def fwd():
            out, w = VAWFunction.apply(loss, lam, *state, params, True, False, impl)
            last["w"] = w
            return out
    else:
        def fwd():
            out = module(loss, lam)
            last["w"] = module.last_weights
            last["out"] = out
            return out

    def bwd():
        node = last["out"].grad_fn if "out" in last else None
        if callable(node):  # a native (C++) backward node: call exactly what autograd runs
            return node(grad_one, None)[0]
        return direct_backward(last["w"], grad_one, dtype)

    def grad():
        # autograd.grad frees this output's graph: keep bwd pointed at the previous, intact one.
        previous = last.get("out")
        result = torch.autograd.grad(fwd(), loss)[0]
        if previous is None:
            last.pop("out", None)
        else:
            last["out"] = previous
        return result

    return Runner(peer, fwd, bwd, grad, module)


def make_fixed_weight_grad(batch: int, num_bins: int, device="cpu", seed: int = 0, dtype=torch.float32):
    """``autograd.grad((loss * w).mean(), loss)``: the fixed-weighting baseline of BENCHMARKING.md."""
    loss, lam = make_inputs(batch, num_bins, device, seed, dtype)
    w = (0.5 + (lam + 13.0) / 26.0).to(dtype)
    return lambda: torch.autograd.grad((loss * w).mean(), loss)[0]


def cpu_peers(include_compiled: bool = True, include_raw: bool = False) -> List[str]:
    """The eager reference, every other backend that runs on CPU tensors, then compiled reference.

    Triton is left out on CPU: there it only runs under the interpreter (TRITON_INTERPRET=1),
    which is a correctness tool, not something to time. ``include_raw`` adds ``raw:<backend>``
    (the backend's step without the module around it) for every backend.
    """
    peers = [EAGER] + [name for name in available_backends()
                       if name not in (EAGER, "triton") and backend_reason(name, torch.device("cpu")) is None]
    if include_compiled:
        peers.append(COMPILED)
    if include_raw:
        peers += [RAW + name for name in peers if name != COMPILED]
    return peers


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def _time_calls(fn: Callable[[], object], calls: int, before: Optional[Callable[[], object]] = None) -> float:
    """Mean seconds per call of ``fn`` over ``calls`` back-to-back calls (``before`` untimed)."""
    if before is None:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls
    total = 0.0
    for _ in range(calls):
        before()
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
    return total / calls


def calibrate(fn: Callable[[], object], target_s: float, before=None, max_calls: int = 100_000) -> int:
    """Calls per timed sample so that a sample lasts about ``target_s``."""
    calls = 1
    while True:
        elapsed = _time_calls(fn, calls, before) * calls
        if elapsed >= target_s / 4 or calls >= max_calls:
            break
        calls *= 4
    per_call = max(elapsed / calls, 1e-9)
    return int(min(max_calls, max(1, round(target_s / per_call))))


@dataclass
class Cell:
    batch: int
    bins: int
    peer: str
    fwd_us: float
    bwd_us: float
    step_us: float
    grad_us: float
    xfixed_us: float
    fwd_gbs: float
    step_gbs: float
    speedup_fwd: float = float("nan")
    speedup_step: float = float("nan")
    samples_fwd_us: List[float] = field(default_factory=list)


def measure_shape(batch: int, num_bins: int, peers: Sequence[str], repeats: int, target_s: float,
                  seed: int = 0, log=print, warmup: int = 3, compile_backend: str = "inductor") -> List[Cell]:
    """Time every peer at one shape, interleaved; returns one cell per peer."""
    runners = []
    for peer in peers:
        t0 = time.perf_counter()
        runner = make_runner(peer, batch, num_bins, seed=seed, compile_backend=compile_backend)
        for _ in range(max(1, warmup)):  # warm-up (and compilation for the compiled peer)
            runner.fwd()
            runner.bwd()
            runner.grad()
        runners.append(runner)
        if peer == COMPILED:
            log(f"  compiled reference for B={batch} K={num_bins} in {time.perf_counter() - t0:.1f} s")
    fixed = make_fixed_weight_grad(batch, num_bins, seed=seed)
    fixed()
    # (label, peer index or None for the baseline, fn, untimed setup)
    jobs = []
    for i, runner in enumerate(runners):
        jobs.append(("fwd", i, runner.fwd, None))
        jobs.append(("bwd", i, runner.bwd, None))  # reuses the weights of the last fwd
        jobs.append(("grad", i, runner.grad, None))
    jobs.append(("fixed", None, fixed, None))
    calls = [calibrate(fn, target_s, before) for _, _, fn, before in jobs]
    samples: Dict[tuple, List[float]] = {(label, i): [] for label, i, _, _ in jobs}
    for rep in range(repeats):
        shift = rep % len(jobs)
        for j in list(range(shift, len(jobs))) + list(range(shift)):
            label, i, fn, before = jobs[j]
            samples[(label, i)].append(_time_calls(fn, calls[j], before))
    med = {key: statistics.median(v) * 1e6 for key, v in samples.items()}
    fixed_us = med[("fixed", None)]
    cells = []
    for i, runner in enumerate(runners):
        fwd_us, bwd_us, grad_us = med[("fwd", i)], med[("bwd", i)], med[("grad", i)]
        step_us = fwd_us + bwd_us
        xfixed = float("nan") if runner.name.startswith(RAW) else grad_us - fixed_us  # raw: no autograd
        cells.append(Cell(batch, num_bins, runner.name, fwd_us, bwd_us, step_us, grad_us, xfixed,
                          BYTES_PER_SAMPLE_FWD * batch / (fwd_us * 1e3),
                          (BYTES_PER_SAMPLE_FWD + BYTES_PER_SAMPLE_BWD) * batch / (step_us * 1e3),
                          samples_fwd_us=[s * 1e6 for s in samples[("fwd", i)]]))
    eager = next((c for c in cells if c.peer == EAGER), None)
    if eager is not None:
        for c in cells:
            c.speedup_fwd = eager.fwd_us / c.fwd_us
            c.speedup_step = eager.step_us / c.step_us
    return cells


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def machine_info(threads: int) -> Dict[str, object]:
    return {
        "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "threads": threads,
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "backends": available_backends(), "cpu_isa": _cpu_isa(),
    }


def _cpu_isa() -> str:
    """The instruction set the C++ CPU pass uses ("-" without the extension)."""
    try:
        from varweight_kernels.backends.compiled import cpu_isa
        return cpu_isa()
    except RuntimeError:
        return "-"


def _fmt(x: float, digits: int = 1) -> str:
    return format_number(x, digits, missing="-", fixed=True)


def format_table(cells: Sequence[Cell]) -> str:
    """Markdown table: times in microseconds, ratios against the eager reference of the same shape."""
    head = ("| B | K | peer | fwd+upd us | bwd us | step us | step x eager | fwd+upd x eager | GB/s fwd+upd "
            "| xfixed us |")
    lines = [head, "|" + "---|" * 10]
    for c in cells:
        lines.append(f"| {c.batch} | {c.bins} | {c.peer} | {_fmt(c.fwd_us)} | {_fmt(c.bwd_us)} | {_fmt(c.step_us)} "
                     f"| {_fmt(c.speedup_step, 2)} | {_fmt(c.speedup_fwd, 2)} | {_fmt(c.fwd_gbs, 3)} "
                     f"| {_fmt(c.xfixed_us)} |")
    return "\n".join(lines)


GOALS = (
    # (text, batch, peer, against, kind, threshold)
    ("cpp step >= 20x eager reference at B=128", 128, "cpp", EAGER, "ratio", 20.0),
    ("cpp step >= 5x eager reference at B=2^20", 1 << 20, "cpp", EAGER, "ratio", 5.0),
    ("cpp step >= 2x torch.compile(reference) at B=128", 128, "cpp", COMPILED, "ratio", 2.0),
    ("cpp fwd+update >= 2 GB/s of input (8 B/sample) at B=2^20", 1 << 20, "cpp", None, "input_gbs", 2.0),
)


def check_goals(cells: Sequence[Cell]) -> List[Dict[str, object]]:
    """The CPU goals, per K, against the cells measured (``met`` is None when not measured)."""
    results = []
    for text, batch, peer, against, kind, threshold in GOALS:
        for bins in sorted({c.bins for c in cells}):
            mine = next((c for c in cells if (c.batch, c.bins, c.peer) == (batch, bins, peer)), None)
            other = next((c for c in cells if (c.batch, c.bins, c.peer) == (batch, bins, against)), None)
            if mine is None or (kind == "ratio" and other is None):
                value = None
            elif kind == "ratio":
                value = other.step_us / mine.step_us
            else:  # the issue counts the input only: float32 loss and lam, 8 bytes per sample
                value = BYTES_PER_SAMPLE_INPUT * batch / (mine.fwd_us * 1e3)
            results.append({"goal": text, "K": bins, "value": value,
                            "met": None if value is None else bool(value >= threshold)})
    return results


def format_goals(goals: Sequence[Dict[str, object]]) -> str:
    lines = []
    for g in goals:
        state = "not measured" if g["met"] is None else ("MET" if g["met"] else "NOT MET")
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        lines.append(f"  [{state}] {g['goal']} (K={g['K']}): {value}")
    return "\n".join(lines)


def run(batches: Sequence[int], bins: Sequence[int], repeats: int, target_s: float, threads: int = 1,
        include_compiled: bool = True, peers: Optional[Sequence[str]] = None, log=print, warmup: int = 3,
        include_raw: bool = False, compile_backend: str = "inductor"):
    """Measure every shape; returns (machine info, cells, goals)."""
    torch.set_num_threads(threads)
    peers = list(peers) if peers is not None else cpu_peers(include_compiled, include_raw)
    info = machine_info(threads)
    info["peers"] = peers
    info["compile_backend"] = compile_backend
    cells: List[Cell] = []
    for num_bins in bins:
        for batch in batches:
            log(f"measuring B={batch} K={num_bins} ({', '.join(peers)})")
            cells.extend(measure_shape(batch, num_bins, peers, repeats, target_s, log=log, warmup=warmup,
                                       compile_backend=compile_backend))
    return info, cells, check_goals(cells)


def report(info, cells, goals, command: str) -> str:
    lines = [
        f"# VAW step on CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs), {info['threads']} thread(s)",
        f"torch {info['torch']}, Python {info['python']}, {info['platform']}, {info['date']}",
        f"command: {command}",
        f"peers: {', '.join(info['peers'])}; available backends: {', '.join(info['backends'])}; "
        f"C++ CPU pass: {info.get('cpu_isa', '-')} (below B=1024: scalar); "
        f"torch.compile backend: {info.get('compile_backend', 'inductor')}",
        "times: median of interleaved repeats, microseconds; ratios: eager reference time / peer time;",
        f"GB/s: {BYTES_PER_SAMPLE_FWD} B/sample (f32 loss + lam read, f32 weights written) / fwd+upd time;",
        "bwd: the op's backward node (what autograd runs for it) timed directly; xfixed: T(grad(vaw)) - T(grad((loss*w).mean())).",
        "",
        format_table(cells),
        "",
        "goals:",
        format_goals(goals),
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, few repeats (under a minute)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=str, default=None, help="write machine info, cells and goals here")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peer")
    parser.add_argument("--raw", action="store_true",
                        help="also time raw:<backend>, each backend's step without the module (diagnostic)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="*", default=None)
    parser.add_argument("--bins", type=int, nargs="*", default=None)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per peer and shape (at least 1)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled peer (default inductor, what the table claims; "
                             "eager traces without generating code: the test suite's tiny run)")
    args = parser.parse_args(argv)
    batches = args.batches or (QUICK_BATCHES if args.quick else FULL_BATCHES)
    bins = args.bins or (QUICK_BINS if args.quick else FULL_BINS)
    repeats = args.repeats or (3 if args.quick else 7)
    target_s = 0.02 if args.quick else 0.1
    command = "python " + " ".join([os.path.relpath(__file__)] + list(argv if argv is not None else sys.argv[1:]))
    info, cells, goals = run(batches, bins, repeats, target_s, args.threads, not args.no_compile,
                             log=lambda s: print(s, file=sys.stderr, flush=True), include_raw=args.raw,
                             warmup=args.warmup, compile_backend=args.compile_backend)
    print(report(info, cells, goals, command))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "command": command, "cells": [asdict(c) for c in cells], "goals": goals},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
