"""Samplers: EDM Heun on the Karras schedule, DDPM ancestral and DDIM.

All three draw their randomness only from the generator passed in (on the generator's device,
then moved to ``device``), so a sample is reproducible from the generator's state.

- ``heun_karras(denoiser, shape, generator, ...)``: ``denoiser(x, sigma) -> x0`` with
  ``sigma`` of shape (B,). Deterministic 2nd-order Heun (EDM Algorithm 1 with S_churn = 0);
  ``steps`` noise levels, ``2*steps - 1`` denoiser calls.
- ``ddpm_ancestral`` / ``ddim``: ``denoiser(x, t) -> x0`` with ``t`` int64 timesteps (B,);
  ``alphas_cumprod`` (T,) of the training schedule; ``steps`` < T respaces the schedule to
  evenly spaced timesteps.

The trainer's dispatcher (sampler by config, batches, uint8 output) is ``sampling.generate``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["karras_sigmas", "heun_karras", "respaced_timesteps", "ddpm_ancestral", "ddim"]


def _randn(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    gdev = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn(tuple(shape), generator=generator, device=gdev, dtype=torch.float32)
    return z.to(device) if device is not None else z


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """``steps`` decreasing levels ``(smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``
    followed by a final 0 (float64, length steps + 1)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    denom = max(steps - 1, 1)
    s = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_karras(denoiser: Callable, shape: Sequence[int], generator: Optional[torch.Generator], steps: int = 50,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None) -> torch.Tensor:
    """EDM deterministic Heun sampler; returns the final x (float32), unclipped."""
    sig = karras_sigmas(steps, sigma_min, sigma_max, rho)
    x = _randn(shape, generator, device) * float(sig[0])
    B = x.shape[0]
    for i in range(steps):
        s_cur, s_next = float(sig[i]), float(sig[i + 1])
        d = (x - denoiser(x, torch.full((B,), s_cur, device=x.device)).float()) / s_cur
        x_next = x + (s_next - s_cur) * d
        if s_next > 0:
            d2 = (x_next - denoiser(x_next, torch.full((B,), s_next, device=x.device)).float()) / s_next
            x_next = x + (s_next - s_cur) * 0.5 * (d + d2)
        x = x_next
    return x


def respaced_timesteps(num_timesteps: int, steps: Optional[int]) -> torch.Tensor:
    """Increasing int64 timesteps used by a ``steps``-step sampler (all T when steps is None)."""
    if steps is None or steps >= num_timesteps:
        return torch.arange(num_timesteps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long().unique()


def _x0_eps(denoiser, x, t_b, abar, clip):
    x0 = denoiser(x, t_b).float()
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    eps = (x - abar.sqrt() * x0) / (1.0 - abar).sqrt()
    return x0, eps


@torch.no_grad()
def ddpm_ancestral(denoiser: Callable, shape: Sequence[int], generator: Optional[torch.Generator],
                   alphas_cumprod: torch.Tensor, steps: Optional[int] = None, clip_denoised: bool = True,
                   variance: str = "large", device=None) -> torch.Tensor:
    """Ancestral sampling of Ho et al. (2020) on the (optionally respaced) schedule.

    ``variance="large"`` uses sigma_t^2 = beta_t (DDPM's CIFAR-10 choice), ``"small"`` the
    posterior variance. No noise is added at the final step."""
    if variance not in ("large", "small"):
        raise ValueError(f"variance must be 'large' or 'small', got {variance!r}")
    acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    ts = respaced_timesteps(acp.shape[0], steps)
    abar = acp[ts]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = 1.0 - abar / abar_prev
    x = _randn(shape, generator, device)
    B = x.shape[0]
    for i in reversed(range(len(ts))):
        a, ap, b = float(abar[i]), float(abar_prev[i]), float(betas[i])
        t_b = torch.full((B,), int(ts[i]), dtype=torch.long, device=x.device)
        x0, _ = _x0_eps(denoiser, x, t_b, torch.tensor(a, device=x.device), clip_denoised)
        mean = (ap ** 0.5 * b / (1 - a)) * x0 + ((1 - b) ** 0.5 * (1 - ap) / (1 - a)) * x
        if i > 0:
            var = b if variance == "large" else b * (1 - ap) / (1 - a)
            x = mean + var ** 0.5 * _randn(x.shape, generator, x.device)
        else:
            x = mean
    return x


@torch.no_grad()
def ddim(denoiser: Callable, shape: Sequence[int], generator: Optional[torch.Generator],
         alphas_cumprod: torch.Tensor, steps: int = 50, eta: float = 0.0, clip_denoised: bool = True,
         device=None) -> torch.Tensor:
    """DDIM (Song et al. 2021) with ``steps`` evenly spaced timesteps; ``eta=0`` is deterministic
    after the initial noise, ``eta=1`` matches ancestral-sampling noise."""
    acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    ts = respaced_timesteps(acp.shape[0], steps)
    abar = acp[ts]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    x = _randn(shape, generator, device)
    B = x.shape[0]
    for i in reversed(range(len(ts))):
        a, ap = float(abar[i]), float(abar_prev[i])
        t_b = torch.full((B,), int(ts[i]), dtype=torch.long, device=x.device)
        x0, eps = _x0_eps(denoiser, x, t_b, torch.tensor(a, device=x.device), clip_denoised)
        sig = eta * ((1 - ap) / (1 - a)) ** 0.5 * (1 - a / ap) ** 0.5
        x = ap ** 0.5 * x0 + max(1 - ap - sig ** 2, 0.0) ** 0.5 * eps
        if sig > 0 and i > 0:
            x = x + sig * _randn(x.shape, generator, x.device)
    return x
