"""Diffusion formulations: EDM (Karras et al. 2022) and DDPM (Ho et al. 2020).

``make_formulation("edm" | "ddpm", **kw)`` returns an object with

- ``target``: "x0" (EDM, the denoiser's target) or "eps" (DDPM);
- ``sample_levels(batch, generator, device) -> level (B,)``: EDM sigma (float32), DDPM timestep
  ``t`` (int64). Draws on ``generator``'s device, then moves to ``device``;
- ``logsnr(level) -> lam (B,) float32``;
- ``level_from_logsnr(lam) -> level`` (DDPM: nearest timestep in log-SNR);
- ``logsnr_density(lam)``: density of lam under the default level distribution (see each class);
- ``logsnr_bounds() -> (lo, hi)``: the range of lam the default distribution can produce;
- ``loss(model, x0, level, noise) -> LossTerms(loss, mse, snr)``, each (B,);
- ``denoise(model, x, level) -> x0 estimate`` (what samplers call);
- ``c_noise(level)``: the network's noise-conditioning input;
- ``recommended_embedding``: the ``UNet(embedding=...)`` that fits ``c_noise``'s scale.

All randomness goes through the generator passed in.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch

__all__ = ["LossTerms", "EDMFormulation", "DDPMFormulation", "make_formulation", "FORMULATIONS"]


class LossTerms(NamedTuple):
    """Per-sample (B,) terms of one batch.

    loss: the formulation's own per-sample loss (EDM: EDM-weighted x0 MSE; DDPM: eps MSE);
    mse: the plain per-sample MSE of the formulation's target (EDM: x0; DDPM: eps);
    snr: exp(lam).
    """
    loss: torch.Tensor
    mse: torch.Tensor
    snr: torch.Tensor


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _normal(batch: int, generator: torch.Generator, device) -> torch.Tensor:
    gdev = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn(batch, generator=generator, device=gdev, dtype=torch.float32)
    return z.to(device) if device is not None else z


class EDMFormulation:
    """EDM preconditioning with log-normal sigma: ln(sigma) ~ N(P_mean, P_std^2), clamped to
    [sigma_min, sigma_max]. ``level`` is sigma; ``lam = log(sigma_data^2 / sigma^2)``.

    ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)`` with ``c_skip = sd^2/(s^2+sd^2)``,
    ``c_out = s sd / sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``, ``c_noise = ln(s)/4``.
    Loss per sample: mean over pixels of ``(s^2+sd^2)/(s sd)^2 * (D - x0)^2``.
    """

    name = "edm"
    target = "x0"
    recommended_embedding = "fourier"

    def __init__(self, sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2,
                 sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        if not (sigma_data > 0 and P_std > 0 and 0 < sigma_min < sigma_max):
            raise ValueError(f"invalid EDM parameters sigma_data={sigma_data}, P_std={P_std}, "
                             f"sigma range=({sigma_min}, {sigma_max})")
        self.sigma_data, self.P_mean, self.P_std = float(sigma_data), float(P_mean), float(P_std)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    # -- levels ---------------------------------------------------------------------------
    def sample_levels(self, batch: int, generator: torch.Generator, device=None) -> torch.Tensor:
        z = _normal(batch, generator, device)
        return (self.P_mean + self.P_std * z).exp().clamp(self.sigma_min, self.sigma_max)

    def logsnr(self, level: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(level).double()
        return (2.0 * math.log(self.sigma_data) - 2.0 * sigma.log()).float()

    def level_from_logsnr(self, lam: torch.Tensor) -> torch.Tensor:
        """sigma = sigma_data * exp(-lam/2), clamped to [sigma_min, sigma_max]."""
        lam = torch.as_tensor(lam).double()
        return (self.sigma_data * (-0.5 * lam).exp()).clamp(self.sigma_min, self.sigma_max).float()

    def logsnr_density(self, lam: torch.Tensor) -> torch.Tensor:
        """Density of lam = 2 ln(sd) - 2 ln(sigma): normal with mean 2 ln(sd) - 2 P_mean and std
        2 P_std, restricted to ``logsnr_bounds()`` (0 outside). The clamp's point masses at the
        bounds (probability ~2e-5 in total for the defaults) are ignored."""
        lam = torch.as_tensor(lam).double()
        mean = 2.0 * math.log(self.sigma_data) - 2.0 * self.P_mean
        std = 2.0 * self.P_std
        dens = torch.exp(-0.5 * ((lam - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
        lo, hi = self.logsnr_bounds()
        return torch.where((lam >= lo) & (lam <= hi), dens, torch.zeros_like(dens)).float()

    def logsnr_bounds(self) -> Tuple[float, float]:
        sd2 = self.sigma_data ** 2
        return (math.log(sd2 / self.sigma_max ** 2), math.log(sd2 / self.sigma_min ** 2))

    # -- network ----------------------------------------------------------------------------
    def c_noise(self, level: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(level).float().log() / 4.0

    def denoise(self, model, x: torch.Tensor, level) -> torch.Tensor:
        """``D(x; sigma)``: the x0 estimate from noisy ``x = x0 + sigma * n``."""
        sigma = torch.as_tensor(level, device=x.device).float()
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        sd = self.sigma_data
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1.0 / (s ** 2 + sd ** 2).sqrt()
        F_x = model((c_in * x).to(x.dtype), self.c_noise(sigma))
        return c_skip * x + c_out * F_x.float()

    def loss(self, model, x0: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> LossTerms:
        sigma = level.float().to(x0.device)
        s = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
        x_noisy = x0 + s * noise
        D = self.denoise(model, x_noisy, sigma)
        sq = (D - x0.float()) ** 2
        mse = _per_sample_mean(sq)
        sd = self.sigma_data
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        return LossTerms(loss=weight * mse, mse=mse, snr=self.logsnr(sigma).to(x0.device).exp())


class DDPMFormulation:
    """DDPM eps-prediction with a linear beta schedule (beta_start..beta_end over T steps).

    ``level`` is the integer timestep ``t`` in [0, T) (int64; float levels are rounded).
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, ``lam_t = log(abar_t / (1 - abar_t))``,
    ``c_noise = t`` (as float; use ``UNet(embedding="positional")``). Loss = eps MSE.
    """

    name = "ddpm"
    target = "eps"
    recommended_embedding = "positional"

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        if num_timesteps < 2 or not (0 < beta_start <= beta_end < 1):
            raise ValueError(f"invalid DDPM schedule T={num_timesteps}, beta=({beta_start}, {beta_end})")
        self.num_timesteps = int(num_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.betas = torch.linspace(beta_start, beta_end, self.num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.lams = (self.alphas_cumprod / (1.0 - self.alphas_cumprod)).log()  # decreasing in t
        # Cells of the piecewise-constant log-SNR density: midpoints between neighbouring lam_t,
        # outer edges extended by half the neighbouring gap.
        lam_asc = self.lams.flip(0)
        mid = 0.5 * (lam_asc[1:] + lam_asc[:-1])
        lo = lam_asc[0] - 0.5 * (lam_asc[1] - lam_asc[0])
        hi = lam_asc[-1] + 0.5 * (lam_asc[-1] - lam_asc[-2])
        edges = torch.cat([lo.reshape(1), mid, hi.reshape(1)])  # ascending, T+1
        self._cell_width = (edges[1:] - edges[:-1]).flip(0)  # indexed by t
        self._edges = (float(lo), float(hi))
        self._cache = {}

    def _on(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device)
        return self._cache[key]

    def _abar(self, device) -> torch.Tensor:
        return self._on("alphas_cumprod", device)

    @staticmethod
    def _t(level) -> torch.Tensor:
        t = torch.as_tensor(level)
        return t if not t.dtype.is_floating_point else t.round().long()

    # -- levels ---------------------------------------------------------------------------
    def sample_levels(self, batch: int, generator: torch.Generator, device=None) -> torch.Tensor:
        gdev = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gdev)
        return t.to(device) if device is not None else t

    def level_probs(self) -> torch.Tensor:
        """Probability of each timestep under the default (uniform) distribution, (T,) float64."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def logsnr(self, level) -> torch.Tensor:
        t = self._t(level).long()
        return self._on("lams", t.device)[t].float()

    def level_from_logsnr(self, lam: torch.Tensor) -> torch.Tensor:
        """The timestep whose lam_t is nearest to ``lam`` (int64, same device)."""
        lam = torch.as_tensor(lam)
        lams = self._on("lams", lam.device)
        flat = lam.reshape(-1).double()
        # lam_t decreasing: search the ascending copy, then compare the two neighbours.
        asc = lams.flip(0)
        j = torch.searchsorted(asc, flat).clamp(1, self.num_timesteps - 1)
        left, right = asc[j - 1], asc[j]
        j = torch.where((flat - left).abs() <= (right - flat).abs(), j - 1, j)
        t = (self.num_timesteps - 1) - j
        return t.reshape(lam.shape)

    def logsnr_density(self, lam: torch.Tensor) -> torch.Tensor:
        """The default distribution of lam is discrete (uniform over the T values lam_t). This
        returns its piecewise-constant density: ``level_probs()[t] / width_t`` on the cell of
        the nearest timestep ``t`` (cells split at midpoints between neighbouring lam_t), 0
        outside ``logsnr_bounds()``. It integrates to 1 over the bounds. For exact per-timestep
        importance weights use ``level_probs()`` instead."""
        lam = torch.as_tensor(lam)
        t = self.level_from_logsnr(lam)
        dens = (self.level_probs().to(lam.device)[t] / self._cell_width.to(lam.device)[t])
        lo, hi = self.logsnr_bounds()
        lamd = lam.double()
        return torch.where((lamd >= lo) & (lamd <= hi), dens, torch.zeros_like(dens)).float()

    def logsnr_bounds(self) -> Tuple[float, float]:
        """Outer edges of the density cells (slightly beyond lam_{T-1} and lam_0)."""
        return self._edges

    # -- network ----------------------------------------------------------------------------
    def c_noise(self, level) -> torch.Tensor:
        return self._t(level).float()

    def predict_eps(self, model, x: torch.Tensor, level) -> torch.Tensor:
        t = self._t(level).to(x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return model(x, self.c_noise(t)).float()

    def denoise(self, model, x: torch.Tensor, level) -> torch.Tensor:
        """x0 estimate ``(x - sqrt(1-abar_t) eps_hat) / sqrt(abar_t)`` (not clipped)."""
        t = self._t(level).to(x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        abar = self._abar(x.device)[t].float().reshape(-1, *([1] * (x.dim() - 1)))
        eps = self.predict_eps(model, x, t)
        return (x.float() - (1 - abar).sqrt() * eps) / abar.sqrt()

    def loss(self, model, x0: torch.Tensor, level, noise: torch.Tensor) -> LossTerms:
        t = self._t(level).to(x0.device)
        abar = self._abar(x0.device)[t].float().reshape(-1, *([1] * (x0.dim() - 1)))
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        eps = self.predict_eps(model, x_t, t)
        mse = _per_sample_mean((eps - noise.float()) ** 2)
        return LossTerms(loss=mse, mse=mse, snr=self.logsnr(t).to(x0.device).exp())


FORMULATIONS = {"edm": EDMFormulation, "ddpm": DDPMFormulation}


def make_formulation(name: str, **kw):
    """``make_formulation("edm", sigma_data=0.5, P_mean=-1.2, P_std=1.2, sigma_min=0.002,
    sigma_max=80)`` or ``make_formulation("ddpm", num_timesteps=1000, beta_start=1e-4,
    beta_end=0.02)``."""
    try:
        cls = FORMULATIONS[name]
    except KeyError:
        raise ValueError(f"unknown formulation {name!r}; choose one of {sorted(FORMULATIONS)}") from None
    return cls(**kw)
