"""Pure-PyTorch reference of one VAW step: the readable statement of SPEC.md in code.

Every other backend is tested against these functions. They are vectorised over bins and
samples, never synchronise host and device, and work on CPU and CUDA tensors in any float
dtype. The step is split in two, as in every backend, so that distributed training can
all-reduce the moment buffer between them:

* :func:`forward_moments` bins ``lam``, gathers the weights, forms the weighted mean and (in
  training mode) the per-bin moments ``(n, s, q)`` and the non-finite count, packed into one
  float64 buffer of length ``3K + 1``: ``[n_0..n_{K-1}, s_0.., q_0.., nonfinite]``.
* :func:`update` applies the EMA to the state and writes the next weight table.

Precision contract shared by all backends: binning is done in float32 as
``floor((lam - lmin) * f32(K / (lmax - lmin)))`` (a multiply, so that every device rounds it
the same way); moments and the EMA / weight table are computed in float64 and stored in the
float32 state buffers; ``C`` is float64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import KernelParams

# Cap on the un-normalised weight so that sum(pi * raw) stays finite for any power.
RAW_WEIGHT_CAP = 1e300
# A loss enters the statistics only if L * L (float64) is at most the float32 maximum (|L| up to
# about 1.8e19): Q averages L^2 in float32, so a larger loss would overflow the state for good.
MAX_STAT_SQUARE = float(torch.finfo(torch.float32).max)


def accumulation_dtype(loss_dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64, everything else in float32."""
    return torch.float64 if loss_dtype == torch.float64 else torch.float32


def bin_index(lam: torch.Tensor, lmin: float, scale: float, num_bins: int) -> torch.Tensor:
    """Bin of each log-SNR value (int64); NaN goes to bin 0 and must be masked by the caller."""
    # Python scalars enter a float32 op as float32 on every device (and need no host-device copy).
    u = torch.floor((lam.to(torch.float32) - lmin) * scale).clamp(0.0, float(num_bins - 1))
    return torch.where(torch.isnan(u), torch.zeros_like(u), u).to(torch.int64)


def forward_moments(loss: torch.Tensor, lam: torch.Tensor, weight: torch.Tensor, lmin: float, bin_scale: float,
                    training: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Weighted mean, per-sample weights and (training only) the packed moment buffer."""
    num_bins = weight.numel()
    batch = loss.numel()
    idx = bin_index(lam, lmin, bin_scale, num_bins)
    lam_nan = torch.isnan(lam)
    w = torch.where(lam_nan, torch.ones((), dtype=weight.dtype, device=weight.device), weight[idx])
    acc = accumulation_dtype(loss.dtype)
    detached = loss.detach()
    out = ((w.to(acc) * detached.to(acc)).sum() / batch).to(loss.dtype)
    if not training:
        return out, w, None
    values = detached.to(torch.float64)
    valid = (values * values <= MAX_STAT_SQUARE) & ~lam_nan  # False for NaN and inf too
    zero = torch.zeros((), dtype=torch.float64, device=loss.device)
    masked = torch.where(valid, values, zero)
    per_sample = torch.stack([valid.to(torch.float64), masked, masked * masked])
    moments = torch.zeros(3, num_bins, dtype=torch.float64, device=loss.device)
    moments.scatter_add_(1, idx.expand(3, batch), per_sample)
    nonfinite = (~valid).sum().to(torch.float64).reshape(1)
    return out, w, torch.cat([moments.reshape(-1), nonfinite])


def bin_mean_var(M: torch.Tensor, Q: torch.Tensor, Z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bias-corrected per-bin mean and variance in float64 (bins with Z = 0: both 0)."""
    m, q, z = M.double(), Q.double(), Z.double()
    has_data = z > 0
    safe_z = torch.where(has_data, z, torch.ones_like(z))
    mu = torch.where(has_data, m / safe_z, torch.zeros_like(z))
    var = torch.where(has_data, (q / safe_z - mu * mu).clamp_min(0.0), torch.zeros_like(z))
    return mu, var


def weight_table(M: torch.Tensor, Q: torch.Tensor, Z: torch.Tensor, C: torch.Tensor, step: torch.Tensor,
                 params: KernelParams) -> torch.Tensor:
    """SPEC step 7 in float64: the weight table for the next batch (float32)."""
    _, var = bin_mean_var(M, Q, Z)
    raw = torch.pow(var + params.eps, -params.power / 2.0).clamp_max(RAW_WEIGHT_CAP)
    ready = C >= params.min_count
    ready_count = torch.where(ready, C, torch.zeros_like(C))
    total_ready = ready_count.sum()
    fill = torch.where(total_ready > 0, (ready_count * raw).sum() / total_ready.clamp_min(1.0),
                       torch.ones_like(total_ready))
    raw = torch.where(ready, raw, fill)
    total = C.sum()
    pi = torch.where(total > 0, C / total.clamp_min(1.0), torch.full_like(C, 1.0 / C.numel()))
    norm = (pi * raw).sum()
    scaled = raw / torch.where(norm > 0, norm, torch.ones_like(norm))
    w = torch.where(norm > 0, scaled.clamp(params.wmin, params.wmax), torch.ones_like(raw))
    steps = step.double()
    if params.ramp > 0:
        r = ((steps - params.warmup) / params.ramp).clamp(max=1.0)
        w = 1.0 + r * (w - 1.0)
    w = torch.where(steps <= params.warmup, torch.ones_like(w), w)
    return w.to(torch.float32)


def update(moments: torch.Tensor, M: torch.Tensor, Q: torch.Tensor, Z: torch.Tensor, C: torch.Tensor,
           weight: torch.Tensor, step: torch.Tensor, nonfinite: torch.Tensor, params: KernelParams) -> None:
    """SPEC steps 6-7, in place: EMA of the bins that saw samples, counters, next weight table."""
    num_bins = M.numel()
    n, s, q = moments[:num_bins], moments[num_bins:2 * num_bins], moments[2 * num_bins:3 * num_bins]
    seen = n > 0
    a = torch.pow(params.decay, n)
    safe_n = torch.where(seen, n, torch.ones_like(n))
    for buf, total in ((M, s), (Q, q)):
        old = buf.double()
        buf.copy_(torch.where(seen, a * old + (1.0 - a) * (total / safe_n), old))
    z = Z.double()
    Z.copy_(torch.where(seen, a * z + (1.0 - a), z))
    C.add_(n.to(C.dtype))
    step.add_(1)
    nonfinite.add_(moments[3 * num_bins].to(nonfinite.dtype))
    weight.copy_(weight_table(M, Q, Z, C, step, params))


def step(loss: torch.Tensor, lam: torch.Tensor, M: torch.Tensor, Q: torch.Tensor, Z: torch.Tensor,
         C: torch.Tensor, weight: torch.Tensor, step_count: torch.Tensor, nonfinite: torch.Tensor,
         params: KernelParams, training: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole step (no distributed sync): returns ``(out, w)`` and updates the state."""
    out, w, moments = forward_moments(loss, lam, weight, params.lmin, params.bin_scale, training)
    if moments is not None:
        update(moments, M, Q, Z, C, weight, step_count, nonfinite, params)
    return out, w


def scale_grad(grad_out: torch.Tensor, w: torch.Tensor, loss_dtype: torch.dtype) -> torch.Tensor:
    """Backward of a step (SPEC: d out / d L_i = w_i / B): ``grad * w / B`` in float32, cast to the loss dtype."""
    return (grad_out.to(torch.float32) * w / w.numel()).to(loss_dtype)
