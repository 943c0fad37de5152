"""The "triton" backend: the whole VAW training step in two kernel launches, without host syncs.

* ``_bin_partials_kernel`` (grid: sample programs x bin tiles) bins ``lam``, gathers and writes
  the per-sample weights, and writes one row of partial results per sample program: the
  per-bin ``(n, s, q)`` of its contiguous sample range (one-hot compare against a tile of bins,
  so no atomics), its non-finite count and its partial ``sum(w * L)``.
* ``_finalize_kernel`` (one program) reduces those rows in a fixed order, writes ``out`` and,
  depending on the phase, the packed moment buffer and/or the EMA + next weight table.

With ``fused`` (``VARWEIGHT_FUSED_KERNELS=1``; off by default until measured on a GPU) a training
``step`` is one launch, ``_fused_step_kernel``: each program writes the same partial row, counts
by ``tl.histogram`` and sums ``L`` and ``L^2`` per bin with a factorised one-hot float64 ``tl.dot``
(no K-wide one-hot; every sample read once up to 256 bins), and the last program to take a ticket
(an atomic counter, acquire/release) reduces the rows and updates the state like ``_finalize_kernel``.

The grid depends only on ``B`` and ``K`` and no sum uses atomics, so a step is bitwise
reproducible. Moments and the EMA / weight table are computed in float64 so that the float32
state matches :mod:`varweight_kernels.reference` bit for bit (a bin that saw a single sample has
a variance made only of rounding noise, so float32 moments would change its weight).
Both kernels are launched with ``enable_fp_fusion=False``: the reference rounds every product
before adding it, and ``Q/Z - mu^2`` cancels, so a fused multiply-add would change the state.

The interpreter (``TRITON_INTERPRET=1``) is chosen by Triton when the kernels are defined, so
the variable must be set before this module is imported to run on CPU tensors.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from ..config import KernelParams
from ..reference import MAX_STAT_SQUARE as _MAX_STAT_SQUARE, RAW_WEIGHT_CAP
from .base import Backend, fused_kernels_requested, triton_interpret

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the backend then reports itself unavailable
    triton = None
    _IMPORT_ERROR = f"triton cannot be imported ({exc})"
else:
    _IMPORT_ERROR = None

class Geometry(NamedTuple):
    """Kernel-1 tiling: samples per block, cap on bins per tile, cap on programs, warps."""

    block_b: int
    max_bin_tile: int
    max_programs: int
    num_warps: int


# Compiled: a BLOCK_B x BLOCK_K tile of float64 accumulators per program stays in registers.
# Picked on an H200 (benchmarks/RESULTS.md, bench_gpu.py --sweep): wide sample blocks over
# narrow bin tiles were the fastest of the geometries tried at B = 2^16 and 2^24, K = 64 and 1024.
# The interpreter costs per operation, not per element, so it gets few wide tiles and few programs.
COMPILED_GEOMETRY = Geometry(256, 16, 1056, 8)
INTERPRETER_GEOMETRY = Geometry(1024, 1024, 16, 4)
GEOMETRY_OVERRIDE: Optional[Geometry] = None  # set by benchmarks/bench_gpu.py --sweep
BLOCK_B_EVAL = 1024   # eval only gathers weights, so a program takes wide blocks
FINAL_TILE = {False: 2048, True: 65536}  # elements of one (partial rows x bins) tile of the finalize kernel
FINAL_BIN_TILE = {False: 256, True: 4096}
BACKWARD_BLOCK = 1024


class FusedGeometry(NamedTuple):
    """One-launch step: samples per block, cap on programs, warps."""

    block_b: int
    max_programs: int
    num_warps: int


# Not yet measured (blocked on a GPU): two programs per H200 SM; bench_gpu.py --fused times it.
# The interpreter gets few wide programs (still more than one, so the ticket is exercised).
FUSED_COMPILED_GEOMETRY = FusedGeometry(128, 264, 4)
FUSED_INTERPRETER_GEOMETRY = FusedGeometry(1024, 4, 4)
FUSED_LO = 16      # bin = FUSED_LO * hi + lo; 16 is tl.dot's smallest N
FUSED_MAX_HI = 16  # hi values per bin tile: up to 256 bins are summed in one pass over the samples


def fused_geometry(batch: int, num_bins: int, interpret: bool) -> Tuple[int, int, int, int, int, int]:
    """``(programs, blocks_per_program, block_b, hi, tiles, num_warps)`` of the fused kernel, from B and K only."""
    geometry = FUSED_INTERPRETER_GEOMETRY if interpret else FUSED_COMPILED_GEOMETRY
    hi = max(8, min(FUSED_MAX_HI, triton.next_power_of_2(triton.cdiv(num_bins, FUSED_LO))))  # 2 hi >= 16 rows
    blocks = triton.cdiv(batch, geometry.block_b)
    per_program = triton.cdiv(blocks, min(blocks, geometry.max_programs))
    return (triton.cdiv(blocks, per_program), per_program, geometry.block_b, hi,
            triton.cdiv(num_bins, hi * FUSED_LO), geometry.num_warps)


def launch_geometry(batch: int, num_bins: int, training: bool, interpret: bool) -> Tuple[int, int, int, int, int, int]:
    """``(programs, blocks_per_program, block_b, bin_tiles, block_k, num_warps)`` of kernel 1, from B and K only."""
    if interpret:
        geometry = INTERPRETER_GEOMETRY
    else:
        geometry = GEOMETRY_OVERRIDE or COMPILED_GEOMETRY
    block_b = geometry.block_b if training else BLOCK_B_EVAL
    block_k = max(16, min(geometry.max_bin_tile, triton.next_power_of_2(num_bins)))
    tiles = triton.cdiv(num_bins, block_k) if training else 1
    blocks = triton.cdiv(batch, block_b)
    per_program = triton.cdiv(blocks, max(1, min(blocks, geometry.max_programs // tiles)))
    return triton.cdiv(blocks, per_program), per_program, block_b, tiles, block_k, geometry.num_warps


if triton is not None:
    RAW_CAP = tl.constexpr(RAW_WEIGHT_CAP)
    MAX_STAT_SQUARE = tl.constexpr(_MAX_STAT_SQUARE)
    # Offsets of the named scalars in the float64 ``params`` tensor the kernels read (KernelParams order).
    LMIN, BIN_SCALE, DECAY, POWER, EPS, MIN_COUNT, WMIN, WMAX, WARMUP, RAMP = (
        tl.constexpr(KernelParams._fields.index(name)) for name in
        ("lmin", "bin_scale", "decay", "power", "eps", "min_count", "wmin", "wmax", "warmup", "ramp"))

    @triton.jit
    def _bin(lam, lmin, bin_scale, K):
        """Bin of each float32 ``lam`` (NaN: bin 0) and the NaN mask."""
        lam_nan = lam != lam
        # Precision contract: float32 multiply, clamp in float before the int conversion.
        u = tl.floor((lam - lmin) * bin_scale)
        u = tl.where(u < 0.0, 0.0, u)
        u = tl.where(u > K - 1, K - 1, u)
        return tl.where(lam_nan, 0.0, u).to(tl.int32), lam_nan

    @triton.jit
    def _bin_partials_kernel(loss_ptr, lam_ptr, weight_ptr, w_ptr, part_ptr, params_ptr, batch, blocks_per_program,
                             stride, K, ACC: tl.constexpr, TRAINING: tl.constexpr, BLOCK_B: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        """Program (p, t): samples of block range p; tile t = 0 also does weights, out and the bad count."""
        pid = tl.program_id(0)
        tile = tl.program_id(1)
        lmin = tl.load(params_ptr + LMIN).to(tl.float32)
        bin_scale = tl.load(params_ptr + BIN_SCALE).to(tl.float32)
        lanes = tl.arange(0, BLOCK_B)
        bins = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        first = pid.to(tl.int64) * blocks_per_program
        # Per-lane accumulators, reduced once at the end: a fixed summation order and no
        # cross-lane reduction inside the loop.
        out_acc = tl.zeros([BLOCK_B], dtype=tl.float64)
        bad_acc = tl.zeros([BLOCK_B], dtype=tl.int32)
        n_acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.int32)
        s_acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float64)
        q_acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float64)
        # Each iteration loads the next block before it works on this one (prefetch in registers:
        # the loads are in flight during the one-hot work).
        next_offs = first * BLOCK_B + lanes
        next_lam = tl.load(lam_ptr + next_offs, mask=next_offs < batch, other=0.0)
        next_loss = tl.load(loss_ptr + next_offs, mask=next_offs < batch, other=0.0)
        for i in range(0, blocks_per_program):
            offs = next_offs
            mask = offs < batch
            lam = next_lam.to(tl.float32)
            loss = next_loss
            next_offs = offs + BLOCK_B  # past the program's range on the last block: read, never used
            next_lam = tl.load(lam_ptr + next_offs, mask=next_offs < batch, other=0.0)
            next_loss = tl.load(loss_ptr + next_offs, mask=next_offs < batch, other=0.0)
            idx, lam_nan = _bin(lam, lmin, bin_scale, K)
            if tile == 0:
                w = tl.where(lam_nan, 1.0, tl.load(weight_ptr + idx, mask=mask, other=1.0))
                tl.store(w_ptr + offs, w, mask=mask)
                out_acc += (w.to(ACC) * loss.to(ACC)).to(tl.float64)
            if TRAINING:
                value = loss.to(tl.float64)
                valid = mask & (value * value <= MAX_STAT_SQUARE) & ~lam_nan  # False for NaN and inf
                bad_acc += (mask & ~valid).to(tl.int32)
                hit = (idx[:, None] == bins[None, :]) & valid[:, None]
                n_acc += hit.to(tl.int32)
                s_acc += tl.where(hit, value[:, None], 0.0)
                q_acc += tl.where(hit, (value * value)[:, None], 0.0)
        row = part_ptr + pid.to(tl.int64) * stride
        if TRAINING:
            in_range = bins < K
            tl.store(row + bins, tl.sum(n_acc, axis=0).to(tl.float64), mask=in_range)
            tl.store(row + K + bins, tl.sum(s_acc, axis=0), mask=in_range)
            tl.store(row + 2 * K + bins, tl.sum(q_acc, axis=0), mask=in_range)
        if tile == 0:
            tl.store(row + stride - 1, tl.sum(out_acc, axis=0))
            if TRAINING:
                tl.store(row + 3 * K, tl.sum(bad_acc, axis=0).to(tl.float64))

    @triton.jit
    def _pow(x, y):
        """x ** y for x >= 0 (or NaN) like torch.pow: 0 ** 0 = NaN ** 0 = 1, 0 ** (y > 0) = 0, 0 ** (y < 0) = inf."""
        return tl.where(y == 0.0, 1.0, tl.exp(y * tl.log(x)))

    @triton.jit
    def _raw_weight(M_ptr, Q_ptr, Z_ptr, cols, in_range, neg_half_power, eps):
        """``(var + eps) ** (-p/2)`` capped, from the float32 state exactly as the reference reads it."""
        m = tl.load(M_ptr + cols, mask=in_range, other=0.0).to(tl.float64)
        q = tl.load(Q_ptr + cols, mask=in_range, other=0.0).to(tl.float64)
        z = tl.load(Z_ptr + cols, mask=in_range, other=0.0).to(tl.float64)
        has_data = z > 0.0
        safe_z = tl.where(has_data, z, 1.0)
        mu = tl.where(has_data, m / safe_z, 0.0)
        var = q / safe_z - mu * mu
        var = tl.where(has_data, tl.where(var < 0.0, 0.0, var), 0.0)
        raw = _pow(var + eps, neg_half_power)
        return tl.where(raw > RAW_CAP, RAW_CAP, raw)

    @triton.jit
    def _filled_raw(M_ptr, Q_ptr, Z_ptr, C_ptr, cols, in_range, neg_half_power, eps, min_count, fill):
        """Raw weight of ready bins, ``fill`` elsewhere; also returns the counts."""
        raw = _raw_weight(M_ptr, Q_ptr, Z_ptr, cols, in_range, neg_half_power, eps)
        c = tl.load(C_ptr + cols, mask=in_range, other=0.0)
        return tl.where(c >= min_count, raw, fill), c

    @triton.jit
    def _finalize_kernel(part_ptr, n_parts, stride, out_ptr, batch, mom_ptr, params_ptr, M_ptr, Q_ptr, Z_ptr, C_ptr,
                         W_ptr, step_ptr, bad_ptr, K, ACC: tl.constexpr, REDUCE: tl.constexpr, HIST: tl.constexpr,
                         MOMENTS: tl.constexpr, UPDATE: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        """One program: :func:`_finalize`."""
        _finalize(part_ptr, n_parts, stride, out_ptr, batch, mom_ptr, params_ptr, M_ptr, Q_ptr, Z_ptr, C_ptr, W_ptr,
                  step_ptr, bad_ptr, K, ACC, REDUCE, HIST, MOMENTS, UPDATE, BLOCK_P, BLOCK_K)

    @triton.jit
    def _finalize(part_ptr, n_parts, stride, out_ptr, batch, mom_ptr, params_ptr, M_ptr, Q_ptr, Z_ptr, C_ptr, W_ptr,
                  step_ptr, bad_ptr, K, ACC: tl.constexpr, REDUCE: tl.constexpr, HIST: tl.constexpr,
                  MOMENTS: tl.constexpr, UPDATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
        """REDUCE: sum the partial rows (else read ``mom_ptr``); MOMENTS: write the packed moments;
        UPDATE: EMA, counters and the next weight table (SPEC steps 6-7). Run by one program."""
        rows = tl.arange(0, BLOCK_P)
        lanes = tl.arange(0, BLOCK_K)
        if REDUCE:
            out_acc = tl.zeros([BLOCK_P], dtype=tl.float64)
            bad_acc = tl.zeros([BLOCK_P], dtype=tl.float64)
            for p0 in range(0, n_parts, BLOCK_P):
                r = p0 + rows
                base = part_ptr + r.to(tl.int64) * stride
                out_acc += tl.load(base + stride - 1, mask=r < n_parts, other=0.0)
                if HIST:
                    bad_acc += tl.load(base + 3 * K, mask=r < n_parts, other=0.0)
            mean = (tl.sum(out_acc, axis=0) / batch).to(ACC)
            tl.store(out_ptr, mean.to(out_ptr.dtype.element_ty))
            bad = tl.sum(bad_acc, axis=0)
        else:
            bad = tl.load(mom_ptr + 3 * K)
        if MOMENTS:
            tl.store(mom_ptr + 3 * K, bad)
        if UPDATE:
            decay = tl.load(params_ptr + DECAY)
            neg_half_power = -0.5 * tl.load(params_ptr + POWER)
            eps = tl.load(params_ptr + EPS)
            min_count = tl.load(params_ptr + MIN_COUNT)
            steps = tl.load(step_ptr) + 1
            tl.store(step_ptr, steps)
            tl.store(bad_ptr, tl.load(bad_ptr) + bad.to(tl.int64))
        if HIST:
            # Pass 1: per-bin moments, then (UPDATE) the EMA of the bins that saw samples.
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + lanes
                in_range = cols < K
                if REDUCE:
                    n = tl.zeros([BLOCK_K], dtype=tl.float64)
                    s = tl.zeros([BLOCK_K], dtype=tl.float64)
                    q = tl.zeros([BLOCK_K], dtype=tl.float64)
                    for p0 in range(0, n_parts, BLOCK_P):
                        r = p0 + rows
                        ptrs = part_ptr + (r.to(tl.int64) * stride)[:, None] + cols[None, :]
                        m2 = (r < n_parts)[:, None] & in_range[None, :]
                        n += tl.sum(tl.load(ptrs, mask=m2, other=0.0), axis=0)
                        s += tl.sum(tl.load(ptrs + K, mask=m2, other=0.0), axis=0)
                        q += tl.sum(tl.load(ptrs + 2 * K, mask=m2, other=0.0), axis=0)
                else:
                    n = tl.load(mom_ptr + cols, mask=in_range, other=0.0)
                    s = tl.load(mom_ptr + K + cols, mask=in_range, other=0.0)
                    q = tl.load(mom_ptr + 2 * K + cols, mask=in_range, other=0.0)
                if MOMENTS:
                    tl.store(mom_ptr + cols, n, mask=in_range)
                    tl.store(mom_ptr + K + cols, s, mask=in_range)
                    tl.store(mom_ptr + 2 * K + cols, q, mask=in_range)
                if UPDATE:
                    seen = n > 0.0
                    a = _pow(decay, n)
                    safe_n = tl.where(seen, n, 1.0)
                    m_old = tl.load(M_ptr + cols, mask=in_range, other=0.0).to(tl.float64)
                    q_old = tl.load(Q_ptr + cols, mask=in_range, other=0.0).to(tl.float64)
                    z_old = tl.load(Z_ptr + cols, mask=in_range, other=0.0).to(tl.float64)
                    m_new = tl.where(seen, a * m_old + (1.0 - a) * (s / safe_n), m_old)
                    q_new = tl.where(seen, a * q_old + (1.0 - a) * (q / safe_n), q_old)
                    z_new = tl.where(seen, a * z_old + (1.0 - a), z_old)
                    tl.store(M_ptr + cols, m_new.to(tl.float32), mask=in_range)
                    tl.store(Q_ptr + cols, q_new.to(tl.float32), mask=in_range)
                    tl.store(Z_ptr + cols, z_new.to(tl.float32), mask=in_range)
                    c_new = tl.load(C_ptr + cols, mask=in_range, other=0.0) + n
                    tl.store(C_ptr + cols, c_new, mask=in_range)
        if UPDATE:
            # The next passes read back the state written above by other threads of this program.
            tl.debug_barrier()
            total_acc = tl.zeros([BLOCK_K], dtype=tl.float64)
            ready_acc = tl.zeros([BLOCK_K], dtype=tl.float64)
            ready_raw_acc = tl.zeros([BLOCK_K], dtype=tl.float64)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + lanes
                in_range = cols < K
                raw = _raw_weight(M_ptr, Q_ptr, Z_ptr, cols, in_range, neg_half_power, eps)
                c = tl.load(C_ptr + cols, mask=in_range, other=0.0)
                ready_c = tl.where((c >= min_count) & in_range, c, 0.0)
                total_acc += c
                ready_acc += ready_c
                ready_raw_acc += ready_c * raw
            total = tl.sum(total_acc, axis=0)
            total_ready = tl.sum(ready_acc, axis=0)
            fill = tl.where(total_ready > 0.0, tl.sum(ready_raw_acc, axis=0) / tl.maximum(total_ready, 1.0), 1.0)
            # Pass 2: the normaliser sum(pi * raw) with pi = C / sum(C) (uniform before any sample).
            uniform = tl.full([], 1.0, dtype=tl.float64) / K  # 1/K in float64, as the reference
            norm_acc = tl.zeros([BLOCK_K], dtype=tl.float64)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + lanes
                in_range = cols < K
                raw, c = _filled_raw(M_ptr, Q_ptr, Z_ptr, C_ptr, cols, in_range, neg_half_power, eps, min_count, fill)
                pi = tl.where(total > 0.0, c / tl.maximum(total, 1.0), uniform)
                norm_acc += tl.where(in_range, pi * raw, 0.0)
            norm = tl.sum(norm_acc, axis=0)
            # Pass 3: clamp, warmup / ramp with the incremented step, write the table.
            wmin = tl.load(params_ptr + WMIN)
            wmax = tl.load(params_ptr + WMAX)
            warmup = tl.load(params_ptr + WARMUP)
            ramp = tl.load(params_ptr + RAMP)
            steps_f = steps.to(tl.float64)
            r = (steps_f - warmup) / tl.where(ramp > 0.0, ramp, 1.0)
            r = tl.where(r > 1.0, 1.0, r)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + lanes
                in_range = cols < K
                raw, c = _filled_raw(M_ptr, Q_ptr, Z_ptr, C_ptr, cols, in_range, neg_half_power, eps, min_count, fill)
                w = raw / tl.where(norm > 0.0, norm, 1.0)
                w = tl.where(w < wmin, wmin, w)
                w = tl.where(w > wmax, wmax, w)
                w = tl.where(norm > 0.0, w, 1.0)
                w = tl.where(ramp > 0.0, 1.0 + r * (w - 1.0), w)
                w = tl.where(steps_f <= warmup, 1.0, w)
                tl.store(W_ptr + cols, w.to(tl.float32), mask=in_range)


    @triton.jit
    def _fused_step_kernel(loss_ptr, lam_ptr, weight_ptr, w_ptr, part_ptr, ticket_ptr, out_ptr, params_ptr, M_ptr,
                           Q_ptr, Z_ptr, C_ptr, step_ptr, bad_ptr, batch, blocks_per_program, stride, K, tiles,
                           ACC: tl.constexpr, BLOCK_B: tl.constexpr, HI: tl.constexpr, LO: tl.constexpr,
                           KP: tl.constexpr, FINAL_P: tl.constexpr, FINAL_K: tl.constexpr):
        """The whole training step in one launch. Program p writes the partial row of its samples
        (layout of ``_bin_partials_kernel``); the last program to finish reduces the rows in a fixed
        order and updates the state (:func:`_finalize`)."""
        pid = tl.program_id(0)
        lmin = tl.load(params_ptr + LMIN).to(tl.float32)
        bin_scale = tl.load(params_ptr + BIN_SCALE).to(tl.float32)
        lanes = tl.arange(0, BLOCK_B)
        # Factorised one-hot, bin = LO * hi + lo: a tile of HI * LO bins is the float64 product of a
        # [2 HI, BLOCK_B] left operand (L in the s rows, L^2 in the q rows, where the sample's hi
        # matches the row) and the [BLOCK_B, LO] one-hot of lo. Every product is x * 1 or x * 0, so
        # exact; the sums are in float64 like the reference's.
        rows = tl.arange(0, 2 * HI)
        row_hi = rows % HI
        row_q = rows >= HI
        lo = tl.arange(0, LO)
        first = pid.to(tl.int64) * blocks_per_program * BLOCK_B
        row = part_ptr + pid.to(tl.int64) * stride
        n_acc = tl.zeros([KP], dtype=tl.int32)
        out_acc = tl.zeros([BLOCK_B], dtype=tl.float64)
        bad_acc = tl.zeros([BLOCK_B], dtype=tl.int32)
        for tile in range(0, tiles):  # one tile up to HI * LO bins: every sample is read once
            sq_acc = tl.zeros([2 * HI, LO], dtype=tl.float64)
            for i in range(0, blocks_per_program):
                offs = first + i * BLOCK_B + lanes
                mask = offs < batch
                lam = tl.load(lam_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                loss = tl.load(loss_ptr + offs, mask=mask, other=0.0)
                idx, lam_nan = _bin(lam, lmin, bin_scale, K)
                value = loss.to(tl.float64)
                valid = mask & (value * value <= MAX_STAT_SQUARE) & ~lam_nan  # False for NaN and inf
                if tile == 0:
                    # Weights, the weighted sum, the excluded count and the counts (integer histogram).
                    w = tl.where(lam_nan, 1.0, tl.load(weight_ptr + idx, mask=mask, other=1.0))
                    tl.store(w_ptr + offs, w, mask=mask)
                    out_acc += (w.to(ACC) * loss.to(ACC)).to(tl.float64)
                    bad_acc += (mask & ~valid).to(tl.int32)
                    n_acc += tl.histogram(idx, KP, mask=valid)
                # Sums of L and L^2 of this tile's bins.
                sample = tl.where(valid, value, 0.0)
                values = tl.where(row_q[:, None], (sample * sample)[None, :], sample[None, :])
                left = tl.where(row_hi[:, None] == (idx // LO - tile * HI)[None, :], values, 0.0)
                right = ((idx % LO)[:, None] == lo[None, :]).to(tl.float64)
                sq_acc = tl.dot(left, right, sq_acc, input_precision="ieee")
            bins = (tile * HI + row_hi)[:, None] * LO + lo[None, :]
            tl.store(row + K + row_q.to(tl.int32)[:, None] * K + bins, sq_acc, mask=bins < K)
        kp = tl.arange(0, KP)
        tl.store(row + kp, n_acc.to(tl.float64), mask=kp < K)
        tl.store(row + 3 * K, tl.sum(bad_acc, axis=0).to(tl.float64))
        tl.store(row + stride - 1, tl.sum(out_acc, axis=0))
        # Ticket: the row stores of every thread come before the release; the last program acquires them all.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(0) - 1:
            tl.store(ticket_ptr, 0)  # zero again for the next step (and the next graph replay)
            _finalize(part_ptr, tl.num_programs(0), stride, out_ptr, batch, part_ptr, params_ptr, M_ptr, Q_ptr,
                      Z_ptr, C_ptr, weight_ptr, step_ptr, bad_ptr, K, ACC, True, True, False, True, FINAL_P,
                      FINAL_K)

    @triton.jit
    def _scale_grad_kernel(grad_ptr, w_ptr, out_ptr, batch, inv_b, BLOCK: tl.constexpr):
        """Backward in one launch: ``(float(grad) * w) * (1/B)``, the float32 arithmetic of torch's
        ``grad.float() * w / B`` on CUDA (a division by a host scalar multiplies by its reciprocal)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < batch
        g = tl.load(grad_ptr).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (g * w) * inv_b, mask=mask)


# Whether Triton built the kernels for its interpreter (it decides when they are defined).
KERNELS_INTERPRETED = triton is not None and not isinstance(_finalize_kernel, triton.runtime.JITFunction)


SCALAR_SLOTS = 4  # parameter sets kept on the device: the train and eval modules of a few runs


class TritonBackend(Backend):
    """Registered as "triton": CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1``."""


    def __init__(self) -> None:
        # float64 scalars live on the device (Triton passes Python floats as float32); one upload
        # per (values, device) while they stay among the SCALAR_SLOTS most recently used. A
        # reconfigure every step (an annealed power) uploads once per step and keeps no more.
        self._scalars: "OrderedDict[Tuple[Tuple[float, ...], torch.device], torch.Tensor]" = OrderedDict()
        # The fused step's ticket counters (one int32 per device and stream, zero between steps).
        self._tickets: Dict[Tuple[torch.device, int], torch.Tensor] = {}
        # True: a training ``step`` is the one-launch ``_fused_step_kernel`` (VARWEIGHT_FUSED_KERNELS).
        self.fused = fused_kernels_requested()

    @property
    def devices(self) -> Tuple[str, ...]:
        return ("cuda", "cpu") if triton_interpret() and KERNELS_INTERPRETED else ("cuda",)

    def unavailable_reason(self):
        if triton is None:
            return _IMPORT_ERROR
        if torch.cuda.is_available():
            return None
        if not triton_interpret():
            return "needs a CUDA device or TRITON_INTERPRET=1"
        if not KERNELS_INTERPRETED:
            return ("TRITON_INTERPRET=1 was set after varweight_kernels.backends.triton was imported; "
                    "set it before the first import")
        return None

    def _scalar_tensor(self, values: Sequence[float], device: torch.device) -> torch.Tensor:
        key = (tuple(float(v) for v in values), device)
        if key in self._scalars:
            self._scalars.move_to_end(key)
        else:
            self._scalars[key] = torch.tensor(key[0], dtype=torch.float64, device=device)
            while len(self._scalars) > SCALAR_SLOTS:
                self._scalars.popitem(last=False)
        return self._scalars[key]

    def _partials(self, loss, lam, weight, scalars, training):
        """Kernel 1: returns (w, partial rows, number of rows, row stride)."""
        loss, lam = loss.detach().contiguous(), lam.contiguous()
        batch, num_bins = loss.numel(), weight.numel()
        programs, per_program, block_b, tiles, block_k, num_warps = launch_geometry(batch, num_bins, training,
                                                                                    KERNELS_INTERPRETED)
        stride = 3 * num_bins + 2 if training else 1
        parts = torch.empty((programs, stride), dtype=torch.float64, device=loss.device)
        w = torch.empty(batch, dtype=torch.float32, device=loss.device)
        _bin_partials_kernel[(programs, tiles)](
            loss, lam, weight, w, parts, scalars, batch, per_program, stride, num_bins, ACC=_acc_dtype(loss),
            TRAINING=training, BLOCK_B=block_b, BLOCK_K=block_k, num_warps=num_warps, enable_fp_fusion=False)
        return w, parts, programs, stride

    @staticmethod
    def _finalize(scalars, state, num_bins, training, parts=None, out=None, moments=None, update=False):
        """Kernel 2. With ``parts = (loss, rows, n_rows, stride)`` it reduces kernel 1's rows and writes
        ``out``, else it reads ``moments``; with ``parts`` and ``moments`` it fills ``moments``;
        ``update`` runs the EMA and the weight table."""
        block_k = max(16, min(FINAL_BIN_TILE[KERNELS_INTERPRETED], triton.next_power_of_2(num_bins)))
        reduce = parts is not None
        loss, rows, n_rows, stride = parts if reduce else (moments, moments, 0, 1)
        _finalize_kernel[(1,)](
            rows, n_rows, stride, out if reduce else rows, loss.numel(), rows if moments is None else moments,
            scalars, *state, num_bins, ACC=_acc_dtype(loss), REDUCE=reduce, HIST=training,
            MOMENTS=reduce and moments is not None, UPDATE=update, BLOCK_P=FINAL_TILE[KERNELS_INTERPRETED] // block_k,
            BLOCK_K=block_k, num_warps=8, enable_fp_fusion=False)

    def forward_moments(self, loss, lam, weight, lmin, bin_scale, training):
        scalars = self._scalar_tensor((lmin, bin_scale), loss.device)  # the first two KernelParams
        w, rows, n_parts, stride = self._partials(loss, lam, weight, scalars, training)
        out = torch.empty((), dtype=loss.dtype, device=loss.device)
        num_bins = weight.numel()
        moments = torch.empty(3 * num_bins + 1, dtype=torch.float64, device=loss.device) if training else None
        # Without ``update`` the state is not touched; ``weight`` stands in for every state pointer.
        self._finalize(scalars, (weight,) * 7, num_bins, training, parts=(loss, rows, n_parts, stride), out=out,
                       moments=moments)
        return out, w, moments

    def update(self, moments, M, Q, Z, C, weight, step, nonfinite, params):
        scalars = self._scalar_tensor(params, moments.device)
        self._finalize(scalars, (M, Q, Z, C, weight, step, nonfinite), M.numel(), True, moments=moments,
                       update=True)

    def backward(self, grad_out, w, loss_dtype):
        batch = w.numel()
        grad_loss = torch.empty(batch, dtype=torch.float32, device=w.device)
        _scale_grad_kernel[(triton.cdiv(batch, BACKWARD_BLOCK),)](
            grad_out.contiguous(), w, grad_loss, batch, 1.0 / batch, BLOCK=BACKWARD_BLOCK, num_warps=4)
        # Other loss dtypes are cast by torch (its rounding; the interpreter's bf16 cast differs).
        return grad_loss if loss_dtype == torch.float32 else grad_loss.to(loss_dtype)

    def _ticket(self, device: torch.device) -> torch.Tensor:
        """The ticket counter of the current stream: steps on one stream never overlap, so one suffices."""
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (device, stream)
        if key not in self._tickets:
            self._tickets[key] = torch.zeros(1, dtype=torch.int32, device=device)
        return self._tickets[key]

    def _fused_step(self, loss, lam, M, Q, Z, C, weight, step, nonfinite, scalars):
        """The training step in one launch of ``_fused_step_kernel``."""
        loss, lam = loss.detach().contiguous(), lam.contiguous()
        batch, num_bins = loss.numel(), weight.numel()
        programs, per_program, block_b, hi, tiles, num_warps = fused_geometry(batch, num_bins, KERNELS_INTERPRETED)
        stride = 3 * num_bins + 2
        parts = torch.empty((programs, stride), dtype=torch.float64, device=loss.device)
        w = torch.empty(batch, dtype=torch.float32, device=loss.device)
        out = torch.empty((), dtype=loss.dtype, device=loss.device)
        final_k = max(16, min(FINAL_BIN_TILE[KERNELS_INTERPRETED], triton.next_power_of_2(num_bins)))
        _fused_step_kernel[(programs,)](
            loss, lam, weight, w, parts, self._ticket(loss.device), out, scalars, M, Q, Z, C, step, nonfinite, batch,
            per_program, stride, num_bins, tiles, ACC=_acc_dtype(loss), BLOCK_B=block_b, HI=hi, LO=FUSED_LO,
            KP=triton.next_power_of_2(num_bins), FINAL_P=FINAL_TILE[KERNELS_INTERPRETED] // final_k, FINAL_K=final_k,
            num_warps=num_warps, enable_fp_fusion=False)
        return out, w

    def step(self, loss, lam, M, Q, Z, C, weight, step, nonfinite, params, training):
        """Fused step: kernel 1 and one finalize launch (EMA + weight table when training), or with
        ``fused`` in training the one-launch kernel."""
        scalars = self._scalar_tensor(params, loss.device)
        if self.fused and training:
            return self._fused_step(loss, lam, M, Q, Z, C, weight, step, nonfinite, scalars)
        w, rows, n_parts, stride = self._partials(loss, lam, weight, scalars, training)
        out = torch.empty((), dtype=loss.dtype, device=loss.device)
        self._finalize(scalars, (M, Q, Z, C, weight, step, nonfinite), weight.numel(), training,
                       parts=(loss, rows, n_parts, stride), out=out, update=training)
        return out, w


def _acc_dtype(loss: torch.Tensor):
    """Triton twin of ``reference.accumulation_dtype``: the dtype of ``w * L`` and of ``out``'s division."""
    return tl.float64 if loss.dtype == torch.float64 else tl.float32

