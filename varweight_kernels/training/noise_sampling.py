"""Noise-level (log-SNR) sampling for training: the formulation's default, or adaptive
importance sampling from VAW-style per-bin loss statistics ("vaw-is", issue 6).

``make_noise_sampler("default" | "vaw-is", formulation, ...)`` returns an object with
``sample(batch, generator, device) -> (level, lam, is_weight)`` (each (B,) on ``device``;
``level`` as the formulation's ``sample_levels`` gives it, ``lam = formulation.logsnr(level)``
float32, ``is_weight`` float32), ``update_from_vaw(vaw)``, ``update_from_stats(...)``,
``probs()``, ``state_dict()`` / ``load_state_dict()`` (plain CPU tensors).

vaw-is
------
Bins: ``num_bins`` uniform bins over ``logsnr_range`` (default: ``formulation.logsnr_bounds()``;
pass the VAW module's ``num_bins``/``logsnr_range`` to share its grid), intersected with the
formulation's bounds; bins with no base mass there are never drawn.

Per-bin statistic ``r_k`` of the UNweighted per-sample loss, conditional on its bin (so it does
not depend on how lam was sampled): ``"rms"`` = sqrt(E[L^2]) (improved DDPM's loss-second-moment
resampler, the variance-optimal proposal for estimating E[L]), ``"mean"`` (VDM++'s adaptive
schedule: loss magnitude) or ``"std"`` (VAW's spread). With ``include_weight`` the bin's VAW
weight multiplies ``r_k`` (the objective then being estimated is E[w L]). Bins that have seen
fewer than ``min_count`` samples take the count-weighted mean of ``r`` over the ready bins.

Proposal: ``P_k = (1 - mix) * m_k r_k^power / sum_j m_j r_j^power + mix / K_valid`` where ``m_k``
is the base (default-distribution) probability mass of bin ``k``; the uniform part keeps every
bin alive. Within the chosen bin:

* continuous levels (EDM sigma): lam uniform on the bin's valid interval, level =
  ``formulation.level_from_logsnr(lam)``; ``is_weight = p_base(lam) / q(lam)`` with
  ``q(lam) = P_k / width_k`` and ``p_base = formulation.logsnr_density``.
* discrete levels (formulations with ``level_probs()``, e.g. DDPM timesteps): t drawn within
  the bin proportionally to its base probability (uniform over the bin's timesteps for DDPM);
  ``is_weight = p_t / q_t = m_k / P_k`` (exact).

So ``E_q[is_weight * f(lam)] = E_base[f(lam)]`` for any f: the objective is unchanged in
expectation. Until ``warmup_samples`` losses have been seen (and at least one bin is ready),
sampling is exactly the default (``is_weight = 1``).

Determinism / DDP: ``sample`` draws only from the generator passed in (inverse-CDF sampling
with float64 CDFs, 2 uniforms per sample on the generator's device). The proposal is a pure
function of the statistics; those must be identical on all ranks: ``update_from_vaw`` reads a
``VarianceAwareWeighting``'s buffers (all-reduced by the module).

Host syncs: ``update_from_vaw`` (called every training step) reads the VAW buffers where they
live and rebuilds the proposal and its CDF there, in float64, with no copy to the host. Until
the sampler is warm, ``sample`` reads one flag back to choose between the default and the
proposal (it cannot be decided on the device: the two draw differently from the generator);
once warm it stays warm (VAW's counts only grow) and reads nothing.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .registry import IS_STATISTICS as STATISTICS
from .registry import NOISE_SAMPLINGS as NOISE_SAMPLERS

__all__ = ["make_noise_sampler", "DefaultNoiseSampler", "VAWImportanceSampler", "NOISE_SAMPLERS"]

_SUBGRID = 64  # quadrature points per bin for the base mass of continuous formulations


def _gen_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class DefaultNoiseSampler:
    """The formulation's own level distribution; ``is_weight`` is 1."""

    name = "default"

    def __init__(self, formulation) -> None:
        self.formulation = formulation

    def sample(self, batch: int, generator: torch.Generator, device=None):
        level = self.formulation.sample_levels(batch, generator, device)
        lam = self.formulation.logsnr(level).to(level.device)
        return level, lam, torch.ones(batch, dtype=torch.float32, device=level.device)

    def update_from_vaw(self, vaw, include_weight: Optional[bool] = None) -> None:
        pass

    def update_from_stats(self, *args, **kwargs) -> None:
        pass

    @property
    def warm(self) -> bool:
        return False

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if state:
            raise RuntimeError(f"the default noise sampler has no state; got keys {sorted(state)}")


class VAWImportanceSampler:
    """Adaptive importance sampling of log-SNR bins (see the module docstring)."""

    name = "vaw-is"

    def __init__(self, formulation, num_bins: int = 64, logsnr_range: Optional[Tuple[float, float]] = None,
                 mix: float = 0.02, min_count: int = 16, statistic: str = "rms", power: float = 1.0,
                 include_weight: bool = True, warmup_samples: Optional[int] = None) -> None:
        if int(num_bins) < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        if not (0.0 < mix <= 1.0):
            raise ValueError(f"mix must be in (0, 1], got {mix}")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        if min_count < 0 or (warmup_samples is not None and warmup_samples < 0):
            raise ValueError("min_count and warmup_samples must be >= 0")
        self.formulation = formulation
        self.K = int(num_bins)
        lo_b, hi_b = (float(v) for v in formulation.logsnr_bounds())
        lmin, lmax = (lo_b, hi_b) if logsnr_range is None else (float(logsnr_range[0]), float(logsnr_range[1]))
        if not lmin < lmax:
            raise ValueError(f"logsnr_range must have lmin < lmax, got {(lmin, lmax)}")
        self.logsnr_range = (lmin, lmax)
        self.mix, self.min_count = float(mix), int(min_count)
        self.statistic, self.power, self.include_weight = statistic, float(power), bool(include_weight)
        self.warmup_samples = int(self.K * self.min_count if warmup_samples is None else warmup_samples)
        self.edges = torch.linspace(lmin, lmax, self.K + 1, dtype=torch.float64)
        self.discrete = callable(getattr(formulation, "level_probs", None))
        if self.discrete:
            self._setup_discrete()
        else:
            self._setup_continuous(lo_b, hi_b)
        self.valid = self.base_mass > 0
        if not bool(self.valid.any()):
            raise ValueError(f"no bin of {(lmin, lmax)} overlaps the formulation's log-SNR bounds {(lo_b, hi_b)}")
        self._tables: Dict[torch.device, Dict[str, torch.Tensor]] = {}  # the fixed tables per device
        self._foreign: Dict[tuple, torch.Tensor] = {}  # bin maps from other grids, per device
        self._warm_seen = False
        # statistics (float64, on the device of the last update_from_vaw): EMA mean M, EMA mean
        # square Q, EMA normaliser Z, count C; weight table
        self.M = torch.zeros(self.K, dtype=torch.float64)
        self.Q = torch.zeros(self.K, dtype=torch.float64)
        self.Z = torch.zeros(self.K, dtype=torch.float64)
        self.C = torch.zeros(self.K, dtype=torch.float64)
        self.weight = torch.ones(self.K, dtype=torch.float64)
        self.updates = torch.zeros((), dtype=torch.int64)
        self._refresh()

    # -- grid / base distribution ---------------------------------------------------------------
    def bin_index(self, lam: torch.Tensor) -> torch.Tensor:
        """Bin of each lam on this sampler's grid (clamped to the edge bins; NaN -> 0)."""
        lam = torch.as_tensor(lam).double()
        lmin, lmax = self.logsnr_range
        f = ((lam - lmin) * (self.K / (lmax - lmin))).floor().clamp(0, self.K - 1)
        return torch.nan_to_num(f, nan=0.0).long()

    def _on(self, dev: torch.device) -> Dict[str, torch.Tensor]:
        """The fixed tables (grid, base distribution) on ``dev``, copied there once."""
        if dev not in self._tables:
            names = ("valid", "base_mass") + (("level_bin", "level_prob") if self.discrete else ("lo", "width"))
            self._tables[dev] = {name: getattr(self, name).to(dev) for name in names}
        return self._tables[dev]

    def _setup_continuous(self, lo_b: float, hi_b: float) -> None:
        lo = self.edges[:-1].clamp(lo_b, hi_b)
        hi = self.edges[1:].clamp(lo_b, hi_b)
        self.lo, self.width = lo, (hi - lo).clamp_min(0.0)
        # base mass of each bin: midpoint rule on a fine sub-grid of the bin's valid interval
        u = (torch.arange(_SUBGRID, dtype=torch.float64) + 0.5) / _SUBGRID
        pts = self.lo[:, None] + self.width[:, None] * u[None, :]
        dens = self.formulation.logsnr_density(pts.reshape(-1)).double().reshape(self.K, _SUBGRID)
        self.base_mass = torch.where(self.width > 0, dens.mean(dim=1) * self.width, torch.zeros_like(self.width))

    def _setup_discrete(self) -> None:
        p = self.formulation.level_probs().double().cpu()
        T = p.numel()
        levels = torch.arange(T)
        lam_t = self.formulation.logsnr(levels).double().cpu()
        self.level_values = levels
        self.level_prob = p
        self.level_bin = self.bin_index(lam_t)
        self.base_mass = torch.zeros(self.K, dtype=torch.float64).index_add_(0, self.level_bin, p)

    # -- statistics -> proposal -------------------------------------------------------------------
    def _bin_statistic(self) -> torch.Tensor:
        has = self.Z > 0
        z = torch.where(has, self.Z, torch.ones_like(self.Z))
        mean = torch.where(has, self.M / z, torch.zeros_like(self.M))
        msq = torch.where(has, self.Q / z, torch.zeros_like(self.Q)).clamp_min(0.0)
        if self.statistic == "rms":
            r = msq.sqrt()
        elif self.statistic == "mean":
            r = mean.abs()
        else:
            r = (msq - mean * mean).clamp_min(0.0).sqrt()
        if self.include_weight:
            r = r * self.weight
        return r

    @property
    def warm(self) -> bool:
        """Whether ``sample`` draws from the proposal (a read from the device until it first is)."""
        if not self._warm_seen:
            self._warm_seen = bool(self._warm)
        return self._warm_seen

    def _refresh(self) -> None:
        """Rebuild the proposal and its CDF from the statistics, on their device, without a host read."""
        tab = self._on(self.C.device)
        valid, base_mass = tab["valid"], tab["base_mass"]
        base = base_mass / base_mass.sum()
        uniform = valid.double() / valid.double().sum()
        ready = (self.C >= max(self.min_count, 1)) & valid
        self._warm = ready.any() & (self.C.sum() >= self.warmup_samples)
        r = self._bin_statistic()
        ready = ready & torch.isfinite(r)
        fill = _ready_sum(r * self.C, ready) / _ready_sum(self.C, ready)
        r = torch.where(ready, r, fill).clamp_min(0.0) ** self.power
        tilt = base * r
        total = tilt.sum()
        tilt = torch.where((total > 0) & torch.isfinite(tilt).all(), tilt / total, base)
        P = torch.where(self._warm, (1.0 - self.mix) * tilt + self.mix * uniform, base)
        P = torch.where(valid, P, torch.zeros_like(P))
        self._P = P / P.sum()
        if self.discrete:
            # q_t = P_k * p_t / m_k for t in bin k
            level_bin = tab["level_bin"]
            m = base_mass[level_bin]
            self._q_level = self._P[level_bin] * tab["level_prob"] / torch.where(m > 0, m, torch.ones_like(m))
            self._cdf = self._cumsum(self._q_level)
        else:
            self._cdf = self._cumsum(self._P)

    @staticmethod
    def _cumsum(p: torch.Tensor) -> torch.Tensor:
        cdf = torch.cumsum(p, 0)
        return cdf / cdf[-1]

    def probs(self) -> torch.Tensor:
        """Probability of drawing each bin, (K,) float64 on the CPU (the target of ``sample``)."""
        return self._P.cpu().clone()

    def base_probs(self) -> torch.Tensor:
        """Probability of each bin under the default distribution, (K,) float64."""
        return self.base_mass / self.base_mass.sum()

    # -- updates ----------------------------------------------------------------------------------
    @torch.no_grad()
    def update_from_stats(self, mean, second_moment, count, weight=None, bin_edges=None) -> None:
        """Replace the statistics with given per-bin values (already identical on all ranks).
        ``bin_edges`` (len(mean)+1, ascending, uniform) maps a foreign grid onto this one by the
        foreign bin containing each of this grid's bin centres; omitted: same grid."""
        mean = torch.as_tensor(mean).double().cpu().reshape(-1)
        m2 = torch.as_tensor(second_moment).double().cpu().reshape(-1)
        count = torch.as_tensor(count).double().cpu().reshape(-1)
        w = torch.ones_like(mean) if weight is None else torch.as_tensor(weight).double().cpu().reshape(-1)
        if not (mean.shape == m2.shape == count.shape == w.shape):
            raise ValueError("mean, second_moment, count and weight must have one length")
        if bin_edges is None:
            if mean.numel() != self.K:
                raise ValueError(f"statistics have {mean.numel()} bins, this sampler {self.K}; pass bin_edges")
            sel = torch.arange(self.K)
        else:
            e = torch.as_tensor(bin_edges).double().cpu().reshape(-1)
            if e.numel() != mean.numel() + 1:
                raise ValueError(f"bin_edges must have {mean.numel() + 1} entries, got {e.numel()}")
            sel = self._select(e)
        self._warm_seen = False  # given statistics may hold fewer counts than the last ones
        self._set_stats(mean, m2, count, w, sel)

    def _select(self, e: torch.Tensor) -> torch.Tensor:
        """The bin of the foreign grid ``e`` that holds each of this grid's bin centres."""
        centres = 0.5 * (self.edges[:-1] + self.edges[1:])
        kf = e.numel() - 1
        return ((centres - e[0]) * (kf / (e[-1] - e[0]))).floor().clamp(0, kf - 1).long()

    def _set_stats(self, mean, m2, count, w, sel) -> None:
        mean, m2, count, w = mean[sel], m2[sel], count[sel], w[sel]
        seen = count > 0
        self.M = torch.where(seen, mean, torch.zeros_like(mean))
        self.Q = torch.where(seen, m2.clamp_min(0.0), torch.zeros_like(m2))
        self.Z = seen.double()
        self.C = count.clamp_min(0.0)
        self.weight = torch.where(torch.isfinite(w), w, torch.ones_like(w))
        self.updates += 1
        self._refresh()

    @torch.no_grad()
    def update_from_vaw(self, vaw, include_weight: Optional[bool] = None) -> None:
        """Take the statistics of a ``VarianceAwareWeighting`` (its buffers are all-reduced under
        DDP, so this is rank-identical), on the device they live on: no host copy. VAW's counts
        only grow, so a warm sampler stays warm."""
        from ..reference import bin_mean_var

        if include_weight is not None:
            self.include_weight = bool(include_weight)
        lmin, lmax = vaw.config.logsnr_range
        key = (vaw.config.num_bins, float(lmin), float(lmax), vaw.M.device)
        if key not in self._foreign:  # copied to the device once, not every step
            edges = torch.linspace(lmin, lmax, vaw.config.num_bins + 1, dtype=torch.float64)
            self._foreign[key] = self._select(edges).to(vaw.M.device)
        sel = self._foreign[key]
        mean, var = bin_mean_var(vaw.M, vaw.Q, vaw.Z)
        self._set_stats(mean, var + mean ** 2, vaw.C.double(), vaw.weight.double(), sel)

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch: int, generator: torch.Generator, device=None):
        if not self.warm:
            level = self.formulation.sample_levels(batch, generator, device)
            lam = self.formulation.logsnr(level).to(level.device)
            self.last_bins = self.bin_index(lam)
            return level, lam, torch.ones(batch, dtype=torch.float32, device=level.device)
        gdev = _gen_device(generator)
        home = self._cdf.device  # the proposal's device: the uniforms go there in one copy
        tab = self._on(home)
        u = torch.rand(batch, generator=generator, device=gdev, dtype=torch.float64)
        if self.discrete:
            t = torch.searchsorted(self._cdf, u.to(home), right=True).clamp_max(self._cdf.numel() - 1)
            level = t
            is_w = tab["level_prob"][t] / self._q_level[t]
            self.last_bins = tab["level_bin"][t]
        else:
            v = torch.rand(batch, generator=generator, device=gdev, dtype=torch.float64)
            u, v = torch.stack([u, v]).to(home)
            k = torch.searchsorted(self._cdf, u, right=True).clamp_max(self.K - 1)
            lam64 = tab["lo"][k] + v * tab["width"][k]
            q = self._P[k] / tab["width"][k]
            is_w = self.formulation.logsnr_density(lam64).double().to(home) / q
            level = self.formulation.level_from_logsnr(lam64)
            self.last_bins = k
        dev = home if device is None else torch.device(device)
        level = level.to(dev)
        lam = self.formulation.logsnr(level).to(dev)
        self.last_bins = self.last_bins.to(dev)
        return level, lam, is_w.to(dev, torch.float32)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"edges": self.edges.clone(), "M": self.M.cpu().clone(), "Q": self.Q.cpu().clone(),
                "Z": self.Z.cpu().clone(), "C": self.C.cpu().clone(), "weight": self.weight.cpu().clone(),
                "updates": self.updates.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = [k for k in ("edges", "M", "Q", "Z", "C", "weight", "updates") if k not in state]
        if missing:
            raise RuntimeError(f"vaw-is sampler state lacks {missing}")
        edges = torch.as_tensor(state["edges"]).double().cpu()
        if edges.shape != self.edges.shape or not torch.allclose(edges, self.edges, rtol=0, atol=1e-9):
            raise RuntimeError(f"vaw-is sampler state has {edges.numel() - 1} bins over "
                               f"({float(edges[0])}, {float(edges[-1])}); this sampler has {self.K} over "
                               f"{self.logsnr_range}")
        for name in ("M", "Q", "Z", "C", "weight"):
            v = torch.as_tensor(state[name]).double().cpu()
            if v.shape != (self.K,) or not bool(torch.isfinite(v).all()):
                raise RuntimeError(f"vaw-is sampler state {name!r} is not {self.K} finite values")
            setattr(self, name, v.clone())
        self.updates = torch.as_tensor(state["updates"]).to(torch.int64).reshape(()).clone()
        self._warm_seen = False
        self._refresh()


def make_noise_sampler(name: str, formulation, **kw):
    """``"default"`` (no options) or ``"vaw-is"`` (options of :class:`VAWImportanceSampler`:
    ``num_bins, logsnr_range, mix, min_count, statistic, power, include_weight,
    warmup_samples``)."""
    if name == "default":
        return DefaultNoiseSampler(formulation)
    if name == "vaw-is":
        return VAWImportanceSampler(formulation, **kw)
    raise ValueError(f"unknown noise sampling {name!r}; choose one of {NOISE_SAMPLERS}")


def _ready_sum(x: torch.Tensor, ready: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ready bins. On the CPU over the selected elements, in the order
    the pinned runs summed them; on a device as a masked sum (selecting would wait for the device)."""
    return x[ready].sum() if x.device.type == "cpu" else torch.where(ready, x, torch.zeros_like(x)).sum()
