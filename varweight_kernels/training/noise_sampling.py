"""Noise-level (log-SNR) sampling for training: the formulation's default, or adaptive
importance sampling from VAW-style per-bin loss statistics ("vaw-is", issue 6).

``make_noise_sampler("default" | "vaw-is", formulation, ...)`` returns an object with
``sample(batch, generator, device) -> (level, lam, is_weight)`` (each (B,) on ``device``;
``level`` as the formulation's ``sample_levels`` gives it, ``lam = formulation.logsnr(level)``
float32, ``is_weight`` float32), ``observe(lam, loss)``, ``update_from_vaw(vaw)``,
``update_from_stats(...)``, ``probs()``, ``state_dict()`` / ``load_state_dict()`` (plain tensors).

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
``VarianceAwareWeighting``'s buffers (all-reduced by the module), and ``observe`` all-reduces
its per-bin sums when ``torch.distributed`` is initialised with world size > 1.
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

    def observe(self, lam: torch.Tensor, loss: torch.Tensor, sync: Optional[bool] = None) -> None:
        pass

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
                 mix: float = 0.02, decay: float = 0.99, min_count: int = 16, statistic: str = "rms",
                 power: float = 1.0, include_weight: bool = True, warmup_samples: Optional[int] = None,
                 sync: bool = True) -> None:
        if int(num_bins) < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        if not (0.0 < mix <= 1.0):
            raise ValueError(f"mix must be in (0, 1], got {mix}")
        if not (0.0 < decay < 1.0):
            raise ValueError(f"decay must be in (0, 1), got {decay}")
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
        self.mix, self.decay, self.min_count = float(mix), float(decay), int(min_count)
        self.statistic, self.power, self.include_weight = statistic, float(power), bool(include_weight)
        self.warmup_samples = int(self.K * self.min_count if warmup_samples is None else warmup_samples)
        self.sync = bool(sync)
        self.edges = torch.linspace(lmin, lmax, self.K + 1, dtype=torch.float64)
        self.discrete = callable(getattr(formulation, "level_probs", None))
        if self.discrete:
            self._setup_discrete()
        else:
            self._setup_continuous(lo_b, hi_b)
        self.valid = self.base_mass > 0
        if not bool(self.valid.any()):
            raise ValueError(f"no bin of {(lmin, lmax)} overlaps the formulation's log-SNR bounds {(lo_b, hi_b)}")
        # statistics (float64, CPU): EMA mean M, EMA mean square Q, EMA normaliser Z, count C; weight table
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
        ready = (self.C >= max(self.min_count, 1)) & self.valid
        return bool(ready.any()) and float(self.C.sum()) >= self.warmup_samples

    def _refresh(self) -> None:
        valid = self.valid
        base = self.base_mass / self.base_mass.sum()
        uniform = valid.double() / valid.double().sum()
        if self.warm:
            r = self._bin_statistic()
            ready = (self.C >= max(self.min_count, 1)) & valid & torch.isfinite(r)
            fill = (r[ready] * self.C[ready]).sum() / self.C[ready].sum()
            r = torch.where(ready, r, fill).clamp_min(0.0) ** self.power
            tilt = base * r
            tilt = tilt / tilt.sum() if float(tilt.sum()) > 0 and bool(torch.isfinite(tilt).all()) else base
            P = (1.0 - self.mix) * tilt + self.mix * uniform
        else:
            P = base.clone()
        P = torch.where(valid, P, torch.zeros_like(P))
        self._P = P / P.sum()
        if self.discrete:
            # q_t = P_k * p_t / m_k for t in bin k
            m = self.base_mass[self.level_bin]
            self._q_level = self._P[self.level_bin] * self.level_prob / torch.where(m > 0, m, torch.ones_like(m))
            self._cdf = self._cumsum(self._q_level)
        else:
            self._cdf = self._cumsum(self._P)
        self._dev_cache: Dict[str, Tuple[torch.Tensor, ...]] = {}

    @staticmethod
    def _cumsum(p: torch.Tensor) -> torch.Tensor:
        cdf = torch.cumsum(p, 0)
        return cdf / cdf[-1]

    def probs(self) -> torch.Tensor:
        """Probability of drawing each bin, (K,) float64 (the target of ``sample``)."""
        return self._P.clone()

    def base_probs(self) -> torch.Tensor:
        """Probability of each bin under the default distribution, (K,) float64."""
        return self.base_mass / self.base_mass.sum()

    # -- updates ----------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, lam: torch.Tensor, loss: torch.Tensor, sync: Optional[bool] = None) -> None:
        """Fold a batch of UNweighted per-sample losses into the per-bin EMAs (VAW's EMA rule:
        ``a = decay ** n_k``). Non-finite samples are skipped. With torch.distributed initialised
        (world size > 1) and ``sync`` the per-bin sums are all-reduced first, so every rank
        ends with the same proposal."""
        lam = lam.detach().reshape(-1)
        loss = loss.detach().reshape(-1)
        if lam.shape != loss.shape:
            raise ValueError(f"lam and loss must have one shape, got {tuple(lam.shape)} and {tuple(loss.shape)}")
        dev = loss.device
        ok = torch.isfinite(loss) & ~torch.isnan(lam)
        idx = self.bin_index(lam.to(dev)).to(dev)
        L = torch.where(ok, loss.double(), torch.zeros_like(loss, dtype=torch.float64))
        okd = ok.double()
        sums = torch.zeros(3 * self.K, dtype=torch.float64, device=dev)
        sums[: self.K].index_add_(0, idx, okd)
        sums[self.K: 2 * self.K].index_add_(0, idx, L)
        sums[2 * self.K:].index_add_(0, idx, L * L)
        sync = self.sync if sync is None else sync
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(sums)
        sums = sums.cpu()
        n, s, q = sums[: self.K], sums[self.K: 2 * self.K], sums[2 * self.K:]
        has = n > 0
        a = torch.where(has, torch.full_like(n, self.decay) ** n, torch.ones_like(n))
        nn_ = torch.where(has, n, torch.ones_like(n))
        self.M = torch.where(has, a * self.M + (1 - a) * s / nn_, self.M)
        self.Q = torch.where(has, a * self.Q + (1 - a) * q / nn_, self.Q)
        self.Z = torch.where(has, a * self.Z + (1 - a), self.Z)
        self.C = self.C + n
        self.updates += 1
        self._refresh()

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
            centres = 0.5 * (self.edges[:-1] + self.edges[1:])
            kf = mean.numel()
            sel = ((centres - e[0]) * (kf / (e[-1] - e[0]))).floor().clamp(0, kf - 1).long()
        mean, m2, count, w = mean[sel], m2[sel], count[sel], w[sel]
        seen = count > 0
        self.M = torch.where(seen, mean, torch.zeros_like(mean))
        self.Q = torch.where(seen, m2.clamp_min(0.0), torch.zeros_like(m2))
        self.Z = seen.double()
        self.C = count.clamp_min(0.0)
        self.weight = torch.where(torch.isfinite(w), w, torch.ones_like(w))
        self.updates += 1
        self._refresh()

    def update_from_vaw(self, vaw, include_weight: Optional[bool] = None) -> None:
        """Take the statistics of a ``VarianceAwareWeighting`` (its buffers are all-reduced under
        DDP, so this is rank-identical). One small device->host copy."""
        if include_weight is not None:
            self.include_weight = bool(include_weight)
        st = vaw.stats()
        self.update_from_stats(st["mean"], st["var"] + st["mean"] ** 2, st["count"], st["weight"],
                               bin_edges=st["bin_edges"])

    # -- sampling ---------------------------------------------------------------------------------
    def _on(self, dev: torch.device) -> Tuple[torch.Tensor, ...]:
        key = str(dev)
        if key not in self._dev_cache:
            if self.discrete:
                vals = (self._cdf, self._q_level, self.level_prob)
            else:
                vals = (self._cdf, self._P, self.lo, self.width)
            self._dev_cache[key] = tuple(v.to(dev) for v in vals)
        return self._dev_cache[key]

    @torch.no_grad()
    def sample(self, batch: int, generator: torch.Generator, device=None):
        if not self.warm:
            level = self.formulation.sample_levels(batch, generator, device)
            lam = self.formulation.logsnr(level).to(level.device)
            self.last_bins = self.bin_index(lam)
            return level, lam, torch.ones(batch, dtype=torch.float32, device=level.device)
        gdev = _gen_device(generator)
        u = torch.rand(batch, generator=generator, device=gdev, dtype=torch.float64)
        if self.discrete:
            cdf, q_level, p_level = self._on(gdev)
            t = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.numel() - 1)
            # guard against zero-probability levels picked by rounding at the CDF's top
            level = t
            is_w = p_level[t] / q_level[t]
            self.last_bins = self.level_bin.to(gdev)[t]
        else:
            cdf, P, lo, width = self._on(gdev)
            k = torch.searchsorted(cdf, u, right=True).clamp_max(self.K - 1)
            v = torch.rand(batch, generator=generator, device=gdev, dtype=torch.float64)
            lam64 = lo[k] + v * width[k]
            q = P[k] / width[k]
            is_w = self.formulation.logsnr_density(lam64).double().to(gdev) / q
            level = self.formulation.level_from_logsnr(lam64)
            self.last_bins = k
        dev = gdev if device is None else torch.device(device)
        level = level.to(dev)
        lam = self.formulation.logsnr(level).to(dev)
        self.last_bins = self.last_bins.to(dev)
        return level, lam, is_w.to(dev, torch.float32)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"edges": self.edges.clone(), "M": self.M.clone(), "Q": self.Q.clone(), "Z": self.Z.clone(),
                "C": self.C.clone(), "weight": self.weight.clone(), "updates": self.updates.clone()}

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
        self._refresh()


def make_noise_sampler(name: str, formulation, **kw):
    """``"default"`` (no options) or ``"vaw-is"`` (options of :class:`VAWImportanceSampler`:
    ``num_bins, logsnr_range, mix, decay, min_count, statistic, power, include_weight,
    warmup_samples, sync``)."""
    if name == "default":
        return DefaultNoiseSampler(formulation)
    if name == "vaw-is":
        return VAWImportanceSampler(formulation, **kw)
    raise ValueError(f"unknown noise sampling {name!r}; choose one of {NOISE_SAMPLERS}")
