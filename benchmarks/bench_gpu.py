"""VAW step on a CUDA GPU: every backend, its CUDA-graph replay and the reference peers.

    python benchmarks/bench_gpu.py [--quick] [--out DIR] [--peak-gbs 4800] [--batches ...] [--bins ...]

Writes ``DIR/bench_gpu.json`` and ``DIR/bench_gpu.md`` (DIR: ``--out``, else ``$OUT``, else
``gpu_results``) and prints the markdown table.

Peers per shape (docs/BENCHMARKING.md): every backend that runs on CUDA tensors, eager
(``triton``, ``cuda``, ``reference``), the same step replayed from a CUDA graph (``graph(<name>)``:
``graph(reference)`` is the reference replayed from a CUDA graph), and ``torch.compile
(reference.step)`` (``compile(reference)``, ``dynamic=True``: compiled once, not once per shape).

* ``fwd+upd``: ``out = vaw(loss, lam)`` in training mode, loss requires grad.
* ``bwd``: the op's backward (``grad * w / B``) timed directly.
* ``step`` = fwd+upd + bwd; ``whole step``: ``autograd.grad(vaw(loss, lam), loss)`` timed as one
  call (for ``graph(<name>)`` the whole step captured as ONE graph and replayed). Times: ``triton.testing.do_bench`` medians (CUDA events, L2 flushed
  before each call), so they are device time; ``wall`` is the host's clock over back-to-back
  calls (it shows launch overhead for small B).
* Bytes: fwd+upd 12 B/sample (f32 loss + lam read, f32 weight written), bwd 8 B/sample (weight
  read, gradient written), step 20 B/sample; ``%peak`` against the device's datasheet memory
  bandwidth (table below; ``--peak-gbs`` overrides it); the copy bandwidth measured here is
  reported too.

Checks per backend (reported, never fatal): ``sync-free`` (a whole eager step, forward and
``autograd.grad``, under ``torch.cuda.set_sync_debug_mode("error")`` raises nothing) and
``capturable`` (the whole step captures into one CUDA graph and its replay advances the state).

``--fused`` adds the fused kernels (``backend.fused = True``, what VARWEIGHT_FUSED_KERNELS=1
switches on) as peers ``cuda+fused`` and ``triton+fused`` (with their graphs and checks), and the
bandwidth table ``bench_gpu_fused.md``: the raw training step (``backend.step``, 12 B/sample) at
B = 2^24, K = 64, for lam uniform over the range, EDM log-normal (ln sigma ~ N(-1.2, 1.2^2),
lam = -2 ln sigma) and all in one bin, today's kernels against the fused ones, with a cold L2
(do_bench flushes it before every call) and a warm one (CUDA events over back-to-back calls).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (shared runners; also puts an uninstalled checkout on sys.path)
from varweight_kernels import available_backends  # noqa: E402
from varweight_kernels.backends import backend_reason, get_backend  # noqa: E402
from varweight_kernels.config import VAWConfig  # noqa: E402

# Datasheet peak memory bandwidth in GB/s; the longest name contained in the device name wins.
PEAK_GBS = {
    "H200": 4800.0, "GH200": 4000.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0, "H800": 3350.0,
    "H20": 4000.0, "B200": 8000.0, "B100": 8000.0,
    "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100-PCIE-40GB": 1555.0, "A100-SXM4-40GB": 1555.0,
    "A100": 1555.0, "A800": 2039.0, "A40": 696.0, "A10G": 600.0, "A10": 600.0, "L40S": 864.0, "L40": 864.0,
    "L4": 300.0, "T4": 320.0, "V100": 900.0, "RTX 4090": 1008.0, "RTX 3090": 936.0, "RTX 6000 Ada": 960.0,
}
FULL_BATCHES = tuple(1 << e for e in (10, 14, 17, 20, 23, 26))
FULL_BINS = (64, 1024)
QUICK_BATCHES = (1 << 10, 1 << 20, 1 << 24)
QUICK_BINS = (64,)
BYTES_FWD, BYTES_BWD = compare.BYTES_PER_SAMPLE_FWD, compare.BYTES_PER_SAMPLE_BWD
FUSED = "+fused"
FUSED_BACKENDS = ("cuda", "triton")
BANDWIDTH_SHAPE = (1 << 24, 64)
LAM_KINDS = ("uniform", "edm", "one bin")


@contextlib.contextmanager
def fused_kernels(peer: str):
    """Runs the block with ``<backend>.fused`` as peer ``peer`` asks (``<backend>+fused``: on)."""
    name = peer[:-len(FUSED)] if peer.endswith(FUSED) else peer
    if name not in FUSED_BACKENDS:
        yield name
        return
    backend = get_backend(name)
    before = backend.fused
    backend.fused = peer.endswith(FUSED)
    try:
        yield name
    finally:
        backend.fused = before


def peak_gbs(name: str) -> Optional[float]:
    for key in sorted(PEAK_GBS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_GBS[key]
    return None


def bench(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    """Median microseconds per call (CUDA events, L2 flushed before every call)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3


def wall_us(fn: Callable[[], object], min_s: float = 0.05) -> float:
    """Host clock over back-to-back calls, synchronised at both ends: includes launch overhead."""
    torch.cuda.synchronize()
    calls, elapsed = 1, 0.0
    while elapsed < min_s and calls <= 1 << 16:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        calls *= 4
    return elapsed / (calls // 4) * 1e6


def copy_bandwidth_gbs(nbytes: int = 1 << 31) -> float:
    """Device-to-device copy, bytes read plus bytes written over the median time."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    us = bench(functools.partial(dst.copy_, src), 25, 200)
    return 2 * nbytes / (us * 1e3)


def capture(fn: Callable[[], object], warm: int = 3, stream: Optional[torch.cuda.Stream] = None) -> torch.cuda.CUDAGraph:
    """Warm ``fn`` up on a side stream, then capture one call of it on that stream (autograd's
    nodes, AccumulateGrad included, must live on the stream the capture runs on)."""
    stream = stream or torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.synchronize()
    return graph


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:300]


def check_backend(peer: str, batch: int, num_bins: int) -> Dict[str, object]:
    """Sync-free eager step and whole-step graph capture of peer ``peer`` (never raises)."""
    with fused_kernels(peer) as name:
        return _check_backend(name, batch, num_bins, {"backend": peer, "batch": batch, "bins": num_bins})


def _check_backend(name: str, batch: int, num_bins: int, result: Dict[str, object]) -> Dict[str, object]:
    try:
        runner = compare.make_runner(name, batch, num_bins, device="cuda")
        for _ in range(3):
            runner.grad()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            runner.grad()
            result["sync_free"], result["sync_error"] = True, None
        except Exception as exc:  # noqa: BLE001 (reported, not fatal)
            result["sync_free"], result["sync_error"] = False, _short(exc)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        torch.cuda.set_sync_debug_mode(0)
        result["sync_free"], result["sync_error"] = False, "setup failed: " + _short(exc)
        result["capturable"], result["capture_error"] = False, "setup failed"
        return result
    try:
        holder = {}
        graph = capture(lambda: holder.__setitem__("g", runner.grad()))
        before = int(runner.module.step.item())
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        advanced = int(runner.module.step.item()) - before
        finite = bool(torch.isfinite(holder["g"]).all().item())
        result["capturable"] = advanced == 5 and finite
        result["capture_error"] = None if result["capturable"] else (
            f"replays advanced step by {advanced} (expected 5), gradient finite: {finite}")
        result["replay_step_us"] = bench(graph.replay, 10, 50)
        del graph
    except Exception as exc:  # noqa: BLE001
        result["capturable"], result["capture_error"] = False, _short(exc)
    return result


def measure_shape(batch: int, num_bins: int, backends: List[str], include_compiled: bool, warmup_ms: float,
                  rep_ms: float, log=print) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    peers = list(backends) + [f"graph({b})" for b in backends] + (["compile(reference)"] if include_compiled else [])
    for peer in peers:
        graphed = peer.startswith("graph(")
        with fused_kernels(peer[6:-1] if graphed else peer) as name:
            rows.append(_measure_peer(peer, name, graphed, batch, num_bins, warmup_ms, rep_ms, log))
        gc.collect()
        torch.cuda.empty_cache()
    eager = next((r for r in rows if r["peer"] == "reference" and r.get("error") is None), None)
    for r in rows:
        if eager is not None and r.get("error") is None:
            r["speedup_step"] = eager["step_us"] / r["step_us"]
            r["speedup_fwd"] = eager["fwd_us"] / r["fwd_us"]
    return rows


def _measure_peer(peer: str, name: str, graphed: bool, batch: int, num_bins: int, warmup_ms: float, rep_ms: float,
                  log) -> Dict[str, object]:
    """One row of measure_shape: backend ``name`` (eager, or ``graphed``) at one shape (never raises
    unless the device is unusable afterwards)."""
    row: Dict[str, object] = {"batch": batch, "bins": num_bins, "peer": peer}
    try:
        t0 = time.perf_counter()
        # A graphed peer lives on one side stream from its first call: warm-up and capture.
        side = torch.cuda.Stream() if graphed else None
        side_ctx = torch.cuda.stream(side) if graphed else contextlib.nullcontext()
        with side_ctx:
            runner = compare.make_runner(name, batch, num_bins, device="cuda", dynamic=True)
            for _ in range(3):
                runner.fwd()
                runner.bwd()
        torch.cuda.synchronize()
        g_step = None
        if graphed:
            g_fwd = capture(runner.fwd, stream=side)
            g_bwd = capture(runner.bwd, stream=side)
            g_step = capture(runner.grad, stream=side)  # the whole step (forward, update, backward) as one graph
            fwd, bwd = g_fwd.replay, g_bwd.replay
        else:
            fwd, bwd = runner.fwd, runner.bwd
        row["setup_s"] = time.perf_counter() - t0
        row["fwd_us"] = bench(fwd, warmup_ms, rep_ms)
        row["bwd_us"] = bench(bwd, warmup_ms, rep_ms)
        row["step_us"] = row["fwd_us"] + row["bwd_us"]
        row["grad_us"] = bench(g_step.replay if graphed else runner.grad, warmup_ms, rep_ms)
        row["fwd_wall_us"] = wall_us(fwd)
        row["fwd_gbs"] = BYTES_FWD * batch / (row["fwd_us"] * 1e3)
        row["step_gbs"] = (BYTES_FWD + BYTES_BWD) * batch / (row["step_us"] * 1e3)
        row["error"] = None
    except Exception as exc:  # noqa: BLE001 (one failing peer must not end the run)
        row["error"] = _short(exc)
        log(f"  {peer} failed at B={batch} K={num_bins}: {row['error']}")
        traceback.print_exc()
        try:  # a failed capture leaves no capture open; make sure the device is still usable
            torch.cuda.synchronize()
        except Exception as again:  # noqa: BLE001
            log(f"  device unusable after {peer}: {_short(again)}")
            raise
    return row


def lam_inputs(kind: str, batch: int, num_bins: int):
    """(loss, lam) on the GPU for the bandwidth table: lam uniform over the default range, EDM
    log-normal, or all in one bin."""
    gen = torch.Generator(device="cuda").manual_seed(batch + num_bins)
    loss = torch.exp(0.5 * torch.randn(batch, generator=gen, device="cuda"))
    if kind == "uniform":
        lo, hi = VAWConfig(num_bins=num_bins).logsnr_range
        lam = lo + (hi - lo) * torch.rand(batch, generator=gen, device="cuda")
    elif kind == "edm":
        lam = 2.4 - 2.4 * torch.randn(batch, generator=gen, device="cuda")  # -2 ln sigma, ln sigma ~ N(-1.2, 1.2^2)
    else:
        lam = torch.full((batch,), 0.3, device="cuda")
    return loss, lam


def warm_us(fn: Callable[[], object], calls: int = 20) -> float:
    """Device time per call over back-to-back calls (CUDA events, L2 not flushed: the warm case)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def fused_bandwidth(backends: List[str], warmup_ms: float, rep_ms: float, log=print) -> List[Dict[str, object]]:
    """The raw training step (``backend.step``) at BANDWIDTH_SHAPE per lam distribution, today's
    kernels against the fused ones, cold and warm L2 (never raises)."""
    batch, num_bins = BANDWIDTH_SHAPE
    params = VAWConfig(num_bins=num_bins).kernel_params()
    rows: List[Dict[str, object]] = []
    for kind in LAM_KINDS:
        loss, lam = lam_inputs(kind, batch, num_bins)
        for peer in [p for b in FUSED_BACKENDS if b in backends for p in (b, b + FUSED)]:
            row: Dict[str, object] = {"lam": kind, "batch": batch, "bins": num_bins, "peer": peer}
            try:
                with fused_kernels(peer) as name:
                    impl = get_backend(name)
                    state = [torch.zeros(num_bins, device="cuda") for _ in range(3)] + [
                        torch.zeros(num_bins, dtype=torch.float64, device="cuda"), torch.ones(num_bins, device="cuda"),
                        torch.zeros((), dtype=torch.int64, device="cuda"), torch.zeros((), dtype=torch.int64, device="cuda")]
                    step = functools.partial(impl.step, loss, lam, *state, params, True)
                    row["cold_us"] = bench(step, warmup_ms, rep_ms)
                    row["warm_us"] = warm_us(step)
                row["cold_gbs"] = BYTES_FWD * batch / (row["cold_us"] * 1e3)
                row["warm_gbs"] = BYTES_FWD * batch / (row["warm_us"] * 1e3)
            except Exception as exc:  # noqa: BLE001
                row["error"] = _short(exc)
            rows.append(row)
            log(f"bandwidth {row}")
    return rows


def bandwidth_markdown(rows: List[Dict[str, object]], peak: Optional[float]) -> str:
    pct = (lambda g: None if not peak or g is None else 100.0 * g / peak)
    lines = ["", f"Raw training step (backend.step) at B = {BANDWIDTH_SHAPE[0]}, K = {BANDWIDTH_SHAPE[1]}, "
             f"{BYTES_FWD} B/sample; cold: do_bench median, L2 flushed; warm: back-to-back calls:", "",
             "| lam | peer | cold us | cold GB/s | cold %peak | warm us | warm GB/s | warm %peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['lam']} | {r['peer']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['lam']} | {r['peer']} | {_f(r['cold_us'])} | {_f(r['cold_gbs'])} | "
                     f"{_f(pct(r['cold_gbs']), 2)} | {_f(r['warm_us'])} | {_f(r['warm_gbs'])} | "
                     f"{_f(pct(r['warm_gbs']), 2)} |")
    return "\n".join(lines)


# Kernel-1 geometries of the Triton backend tried by --sweep: (BLOCK_B, bin tile cap, program cap, warps).
SWEEP_GEOMETRIES = ((256, 16, 1056, 8), (16, 64, 1056, 4), (128, 16, 1056, 8), (512, 16, 1056, 8),
                    (256, 16, 528, 8), (256, 16, 2112, 8), (256, 32, 1056, 8), (512, 16, 528, 16))
SWEEP_SHAPES = ((1 << 16, 64), (1 << 24, 64), (1 << 24, 1024))


def sweep_triton(warmup_ms: float, rep_ms: float, log=print) -> List[Dict[str, object]]:
    """Time the Triton forward (raw backend step) under each kernel-1 geometry; the state must
    agree with the first geometry's to rounding (same sums, another tree)."""
    from varweight_kernels.backends import triton as tv
    rows: List[Dict[str, object]] = []
    try:
        for batch, num_bins in SWEEP_SHAPES:
            baseline = None
            for geometry in SWEEP_GEOMETRIES:
                tv.GEOMETRY_OVERRIDE = tv.Geometry(*geometry)
                row: Dict[str, object] = {"batch": batch, "bins": num_bins, "geometry": geometry,
                                          "launch": tv.launch_geometry(batch, num_bins, True, False)}
                try:
                    runner = compare.make_runner("raw:triton", batch, num_bins, device="cuda")
                    runner.fwd()
                    state = torch.cat([runner.module.M, runner.module.Q, runner.module.weight])
                    if baseline is None:
                        baseline = state
                    row["max_rel_diff"] = float(((state - baseline).abs() / baseline.abs().clamp_min(1e-30)).max())
                    row["fwd_us"] = bench(runner.fwd, warmup_ms, rep_ms)
                    row["fwd_gbs"] = BYTES_FWD * batch / (row["fwd_us"] * 1e3)
                except Exception as exc:  # noqa: BLE001
                    row["error"] = _short(exc)
                rows.append(row)
                log(f"sweep {row}")
    finally:
        tv.GEOMETRY_OVERRIDE = None
    return rows


def sweep_markdown(rows: List[Dict[str, object]]) -> str:
    lines = ["", "Triton kernel-1 geometry sweep (raw forward+update, do_bench median):", "",
             "| B | K | BLOCK_B, bin tile, program cap, warps | programs, blocks/program, block_b, tiles, block_k "
             "| fwd+upd us | GB/s | max rel diff of M, Q, weight table vs the first geometry |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['bins']} | {r['geometry']} | {r['launch']} | {_f(r.get('fwd_us'))} "
                     f"| {_f(r.get('fwd_gbs'))} | {r.get('max_rel_diff', r.get('error'))} |")
    return "\n".join(lines)


def _f(x, digits=1):
    if x is None or x != x:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def markdown(info: Dict[str, object], rows: List[Dict[str, object]], checks: List[Dict[str, object]]) -> str:
    peak = info.get("peak_gbs")
    lines = [
        f"# VAW step on {info['device']} ({info['date']})",
        f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, driver-visible SMs {info['sms']}; "
        f"backends: {', '.join(info['backends'])}",
        f"peak memory bandwidth {_f(peak, 0)} GB/s ({info['peak_source']}); measured D2D copy "
        f"{_f(info['copy_gbs'], 0)} GB/s",
        f"command: {info['command']}",
        "times: do_bench medians in us (CUDA events, L2 flushed); fwd wall: host clock, back-to-back calls;",
        f"bytes: fwd+upd {BYTES_FWD} B/sample, step {BYTES_FWD + BYTES_BWD} B/sample; x eager = reference time / time",
        "",
        "| B | K | peer | fwd+upd us | bwd us | step us | whole step us | fwd wall us | step x eager | step GB/s "
        "| step %peak | fwd+upd GB/s | fwd %peak |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['batch']} | {r['bins']} | {r['peer']} | failed: {r['error'][:80]} |" + " |" * 9)
            continue
        pct = (lambda g: None if not peak else 100.0 * g / peak)
        lines.append(
            f"| {r['batch']} | {r['bins']} | {r['peer']} | {_f(r['fwd_us'])} | {_f(r['bwd_us'])} | {_f(r['step_us'])} "
            f"| {_f(r.get('grad_us'))} | {_f(r['fwd_wall_us'])} | {_f(r.get('speedup_step'), 2)} | {_f(r['step_gbs'])} "
            f"| {_f(pct(r['step_gbs']), 2)} | {_f(r['fwd_gbs'])} | {_f(pct(r['fwd_gbs']), 2)} |")
    lines += ["", "| backend | sync-free eager step | capturable whole step | graph replay step us | note |",
              "|---|---|---|---|---|"]
    for c in checks:
        note = "; ".join(x for x in (c.get("sync_error"), c.get("capture_error")) if x)
        lines.append(f"| {c['backend']} (B={c['batch']}, K={c['bins']}) | {'yes' if c.get('sync_free') else 'NO'} "
                     f"| {'yes' if c.get('capturable') else 'NO'} | {_f(c.get('replay_step_us'))} | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", type=int, nargs="*", default=None)
    parser.add_argument("--bins", type=int, nargs="*", default=None)
    parser.add_argument("--peak-gbs", type=float, default=None, help="override the datasheet bandwidth (GB/s)")
    parser.add_argument("--out", type=str, default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--warmup-ms", type=float, default=10.0)
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--sweep", action="store_true", help="also time the Triton kernel-1 geometries of SWEEP_GEOMETRIES")
    parser.add_argument("--fused", action="store_true",
                        help="also the fused kernels (peers <backend>+fused) and the B = 2^24 bandwidth table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    out = Path(args.out or os.environ.get("OUT") or "gpu_results")
    out.mkdir(parents=True, exist_ok=True)
    batches = args.batches or (QUICK_BATCHES if args.quick else FULL_BATCHES)
    bins = args.bins or (QUICK_BINS if args.quick else FULL_BINS)
    log = (lambda s: print(s, file=sys.stderr, flush=True))

    import triton
    props = torch.cuda.get_device_properties(0)
    backends = [b for b in available_backends() if backend_reason(b, torch.device("cuda")) is None]
    backends = ["reference"] + [b for b in backends if b != "reference"]
    not_run = {b: backend_reason(b, torch.device("cuda")) for b in ("triton", "cuda") if b not in backends}
    table_peak = peak_gbs(props.name)
    info: Dict[str, object] = {
        "device": props.name, "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "backends": backends, "not_run": not_run,
        "peak_gbs": args.peak_gbs or table_peak,
        "peak_source": "--peak-gbs" if args.peak_gbs else ("datasheet table" if table_peak else "unknown device"),
        "command": "python " + " ".join([os.path.relpath(__file__)] + list(argv if argv is not None else sys.argv[1:])),
    }
    for b, why in not_run.items():
        log(f"backend {b!r} not run on CUDA: {why}")
    info["copy_gbs"] = copy_bandwidth_gbs()
    log(f"{props.name}: copy {info['copy_gbs']:.0f} GB/s, peak {info['peak_gbs']} GB/s; backends {backends}")

    peers = backends + ([b + FUSED for b in FUSED_BACKENDS if b in backends] if args.fused else [])
    checks = []
    for b in peers:
        checks.append(check_backend(b, 1 << 20, 64))
        log(f"check {b}: {checks[-1]}")
    bandwidth: List[Dict[str, object]] = []
    if args.fused:
        bandwidth = fused_bandwidth(backends, args.warmup_ms, args.rep_ms, log)
        (out / "bench_gpu_fused.md").write_text(bandwidth_markdown(bandwidth, info["peak_gbs"]) + "\n")
    sweep: List[Dict[str, object]] = []
    if args.sweep and "triton" in backends:
        sweep = sweep_triton(args.warmup_ms, args.rep_ms, log)
        (out / "bench_gpu_sweep.md").write_text(sweep_markdown(sweep) + "\n")
    rows: List[Dict[str, object]] = []
    for num_bins in bins:
        for batch in batches:
            t0 = time.perf_counter()
            rows.extend(measure_shape(batch, num_bins, peers, not args.no_compile, args.warmup_ms, args.rep_ms, log))
            log(f"B={batch} K={num_bins} done in {time.perf_counter() - t0:.1f} s")
            # write as we go: a timeout later still leaves what was measured
            (out / "bench_gpu.json").write_text(json.dumps({"info": info, "rows": rows, "checks": checks, "sweep": sweep,
                                                            "bandwidth": bandwidth}, indent=1, default=str))
            (out / "bench_gpu.md").write_text(markdown(info, rows, checks) + "\n")
    print(markdown(info, rows, checks) + (sweep_markdown(sweep) if sweep else "")
          + (bandwidth_markdown(bandwidth, info["peak_gbs"]) if bandwidth else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
