"""Log-SNR ``lam`` of the common diffusion schedules, the second input of ``VarianceAwareWeighting``.

Every function returns the standard log signal-to-noise ratio of ``x_t = alpha_t x0 + sigma_t eps``::

    lam = log(alpha_t**2 / sigma_t**2)

so one ``logsnr_range`` means the same noise levels whatever the schedule (DDPM, EDM, flow).
The functions use stable forms (``log1p``, ``expm1``, a symmetric ``sin``), so in float64 they
stay accurate up to the ends of their range and return exactly ``+inf`` / ``-inf`` only at the
end points themselves (pure signal / pure noise); VAW puts +-inf in the edge bins. Inputs outside
the documented range give NaN, which VAW excludes from its statistics and counts in ``nonfinite``.
Tensors keep their floating dtype and device; Python numbers and integer tensors become float64.

Which per-sample loss to pass with ``lam``: the mean over pixels of the squared error in the
space the network predicts, with no weighting of your own on top:

- eps prediction: ``(eps_pred - eps)**2``;
- v prediction: ``(v_pred - v)**2`` with ``v = alpha_t eps - sigma_t x0`` (diffusers:
  ``scheduler.get_velocity(x0, eps, t)``);
- x0 prediction: ``(x0_pred - x0)**2``; with EDM preconditioning this is EDM's
  ``lambda(sigma) * (D(x_t) - x0)**2``, the squared error of the raw network output;
- flow velocity (rectified flow): ``(v_pred - (eps - x0))**2``.

It must be the *unweighted* loss because VAW measures the spread of exactly what it is given and
its weight is a function of that spread. A loss already multiplied by a lam-dependent weight
``w0`` (min-SNR, P2, SD3's ``compute_loss_weighting_for_sd3``) has ``w0`` times the spread, so the
two weightings compound (power -1) or cancel (power +1) instead of VAW weighting the loss the
network is trained on; and a loss multiplied by VAW's own ``last_weights`` would feed its weights
back into their own estimate. Pass the plain loss; ``vaw(loss, lam)`` returns the weighted mean.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

ArrayLike = Union[torch.Tensor, float, int]


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        return torch.as_tensor(x, dtype=torch.float64)
    return x if x.dtype.is_floating_point else x.to(torch.float64)


def _nan_outside_unit_interval(t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    # The trigonometric and polynomial forms stay finite past [0, 1]; NaN makes a t on the wrong
    # scale (0..1000 instead of 0..1) show in VAW's ``nonfinite`` count instead of binning silently.
    return torch.where((t >= 0) & (t <= 1), lam, torch.full_like(lam, math.nan))


def from_alphas_cumprod(alphas_cumprod, timesteps=None) -> torch.Tensor:
    """lam of a discrete VP schedule (DDPM, DDIM): ``lam_t = log(abar_t) - log1p(-abar_t)``.

    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, so ``lam_t = log(abar_t / (1 - abar_t))``.
    ``alphas_cumprod`` is the table ``abar`` or any object holding one as ``.alphas_cumprod`` (a
    diffusers ``DDPMScheduler``, ``DDIMScheduler``, ...). Valid range: ``abar`` in [0, 1];
    ``abar = 1`` gives +inf, ``abar = 0`` (a zero-terminal-SNR schedule's last step) gives -inf,
    anything in between a finite value, computed in float64 and returned in the table's dtype.

    ``timesteps`` (integer indices into the table, any device) selects the entries; ``None``
    returns the whole table. In a training loop, compute the table once and index it
    (``table = from_alphas_cumprod(scheduler).to(device)``, then ``lam = table[t]``).
    """
    abar = _as_float_tensor(getattr(alphas_cumprod, "alphas_cumprod", alphas_cumprod))
    abar64 = abar.to(torch.float64)
    lam = (torch.log(abar64) - torch.log1p(-abar64)).to(abar.dtype)
    if timesteps is None:
        return lam
    timesteps = torch.as_tensor(timesteps)
    return lam.to(timesteps.device)[timesteps]


def from_sigma(sigma: ArrayLike, sigma_data: Optional[float] = None) -> torch.Tensor:
    """lam of a variance-exploding / EDM noise level: ``lam = -2 log(sigma)``.

    ``x = x0 + sigma eps`` has ``alpha = 1``. Valid range: ``sigma >= 0``; ``sigma = 0`` gives
    +inf, every positive float (subnormals included) a finite value.

    ``sigma_data`` switches to the convention of ``train_cifar.py``'s EDM formulation,
    ``lam = log(sigma_data**2 / sigma**2) = 2 log(sigma_data) - 2 log(sigma)``: the SNR of data
    with standard deviation ``sigma_data``, the standard lam shifted by ``2 log(sigma_data)``
    (-1.386 for 0.5). Bins are the same up to that shift; pick ``logsnr_range`` in the convention
    you pass.
    """
    lam = -2.0 * torch.log(_as_float_tensor(sigma))
    return lam if sigma_data is None else lam + 2.0 * math.log(sigma_data)


def from_flow_t(t: ArrayLike) -> torch.Tensor:
    """lam of rectified flow ``x_t = (1 - t) x0 + t eps``: ``lam = 2 (log1p(-t) - log(t))``.

    That is ``2 log((1 - t) / t) = -2 logit(t)``, so a logit-normal ``t`` (SD3) gives a normal
    lam. A diffusers ``FlowMatchEulerDiscreteScheduler``'s ``sigmas`` are this ``t``; its
    ``shift`` s maps ``t`` to ``s t / (1 + (s - 1) t)``, which lowers lam by ``2 log(s)``.
    Valid range: ``t`` in [0, 1]; ``t = 0`` gives +inf, ``t = 1`` gives -inf, and every ``t``
    strictly between a finite value (in float64 down to ``t = 1e-300`` and up to
    ``t = 1 - 2**-53``).
    """
    t = _as_float_tensor(t)
    return 2.0 * (torch.log1p(-t) - torch.log(t))


def from_vp_cosine(t: ArrayLike) -> torch.Tensor:
    """lam of the continuous cosine VP schedule ``alpha_t = cos(pi t / 2)``, ``sigma_t = sin(pi t / 2)``.

    ``lam = -2 log(tan(pi t / 2))``, computed as ``2 (log(sin(pi (1 - t) / 2)) - log(sin(pi t / 2)))``
    so that the end near ``t = 1`` does not lose ``cos`` to the rounding of ``pi / 2``. This is
    Nichol & Dhariwal's schedule without their offset s; for the discrete version with the
    offset (diffusers ``beta_schedule="squaredcos_cap_v2"``) use ``from_alphas_cumprod``.
    Valid range: ``t`` in [0, 1]; ``t = 0`` gives +inf, ``t = 1`` gives -inf, every ``t``
    strictly between a finite value (in float64 from ``t = 1e-300`` up to ``t = 1 - 2**-53``).
    """
    t = _as_float_tensor(t)
    half_pi = 0.5 * math.pi
    lam = 2.0 * (torch.log(torch.sin(half_pi * (1.0 - t))) - torch.log(torch.sin(half_pi * t)))
    return _nan_outside_unit_interval(t, lam)


def from_vp_linear(t: ArrayLike, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """lam of the continuous linear VP schedule (VP-SDE, Song et al. 2021): ``lam = -g - log(-expm1(-g))``.

    ``beta(t) = beta_min + t (beta_max - beta_min)`` and ``abar_t = exp(-g)`` with
    ``g = beta_min t + (beta_max - beta_min) t**2 / 2``, so ``lam = log(abar / (1 - abar))``. The
    defaults are the continuous limit of DDPM's linear betas (1e-4 to 0.02 over 1000 steps): at
    ``t = (i + 1) / 1000`` lam is within 0.1 of the discrete schedule's step ``i``.
    Valid range: ``t`` in [0, 1]; ``t = 0`` gives +inf, every ``t`` in (0, 1] a finite value (in float64 down to ``t = 1e-300``).
    """
    t = _as_float_tensor(t)
    g = beta_min * t + 0.5 * (beta_max - beta_min) * t * t
    return _nan_outside_unit_interval(t, -g - torch.log(-torch.expm1(-g)))


_WRAPPERS = ("module", "_orig_mod", "model")  # DDP / accelerate, torch.compile, lucidrains' Trainer


def from_schedule(schedule, timesteps=None) -> torch.Tensor:
    """lam of the noise levels of a diffusers scheduler or a lucidrains diffusion object.

    ``schedule`` is anything holding the table ``alphas_cumprod``: a diffusers ``DDPMScheduler``,
    ``DDIMScheduler``, ... or a lucidrains ``GaussianDiffusion`` (a buffer there, on the model's
    device), also wrapped in DDP / ``accelerate.prepare`` / ``torch.compile`` or a lucidrains
    ``Trainer``; ``timesteps`` are then integer indices into it (the ``t`` the loop drew) and the
    result is ``from_alphas_cumprod(table, timesteps)``, on the timesteps' device. A lucidrains
    ``ContinuousTimeGaussianDiffusion`` has no table but a ``log_snr(times)`` function of float
    times in [0, 1], whose values are already this lam. ``timesteps=None`` returns the whole
    table (discrete schedules only), e.g. for ``suggest_logsnr_range``. Schedules on sigma (EDM,
    lucidrains' ``ElucidatedDiffusion``) or flow time have no table: use ``from_sigma`` or
    ``from_flow_t``.
    """
    obj = schedule
    for _ in range(4):
        if hasattr(obj, "alphas_cumprod") or callable(getattr(obj, "log_snr", None)):
            break
        obj = next((getattr(obj, name) for name in _WRAPPERS if hasattr(obj, name)), obj)
    table = getattr(obj, "alphas_cumprod", None)
    if table is not None:
        table = _as_float_tensor(table)
        if timesteps is None:
            return from_alphas_cumprod(table)
        t = torch.as_tensor(timesteps)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"timesteps must be integer indices into the schedule's {table.numel()} steps, "
                            f"got {t.dtype}")
        # checked on the CPU only: on a GPU it would cost a sync every step (indexing fails loudly there)
        if t.is_cpu and t.numel() and (int(t.min()) < 0 or int(t.max()) >= table.numel()):
            raise ValueError(f"timesteps must lie in [0, {table.numel() - 1}], got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
        return from_alphas_cumprod(table, t)
    if callable(getattr(obj, "log_snr", None)):
        if timesteps is None:
            raise ValueError(f"{type(obj).__name__} is continuous in time: pass the float times in [0, 1] it drew")
        with torch.no_grad():
            return obj.log_snr(_as_float_tensor(timesteps)).detach()
    raise TypeError(f"{type(schedule).__name__} holds no alphas_cumprod table and no log_snr function; for "
                    "sigma (EDM) use logsnr.from_sigma, for flow matching logsnr.from_flow_t")


def _drop_isolated_ends(table: torch.Tensor) -> torch.Tensor:
    """A schedule's table (lam monotone in t) without an end point set apart from the rest: its
    gap to the next value is over 3 times the next gap and a tenth of the rest's span. That is a
    clipped last timestep (beta clipped at 0.999: lucidrains' cosine puts t = T at lam -19.8,
    6.9 below t = T - 1, whose own gap is 1.4); a smooth table's end gaps grow by under 2x.
    Anything not monotone (a sample of noise levels) is returned as it is."""
    steps = table.diff()
    if table.numel() < 4 or not (bool((steps >= 0).all()) or bool((steps <= 0).all())):
        return table
    values = table.sort().values
    gaps = values.diff()
    lo = int(gaps[0] > 3 * gaps[1] and gaps[0] > 0.1 * (values[-1] - values[1]))
    hi = values.numel() - int(gaps[-1] > 3 * gaps[-2] and gaps[-1] > 0.1 * (values[-2] - values[lo]))
    return values[lo:hi]


def suggest_logsnr_range(lam: torch.Tensor, coverage: float = 1.0,
                         keep_isolated: bool = False) -> Tuple[float, float]:
    """A ``logsnr_range`` for ``VarianceAwareWeighting`` that covers the lam values of a schedule.

    ``lam`` holds the values the schedule produces: the whole table of a discrete schedule
    (``from_alphas_cumprod(scheduler)``) or a large sample of training noise levels for a
    continuous one. Returns ``(floor(lo), ceil(hi))`` of the finite values, whole numbers so
    that the bin edges do not move with small changes to the schedule; +-inf are left out
    (they fall in the edge bins). With ``coverage < 1``, ``lo`` and ``hi`` are the
    ``(1 - coverage) / 2`` and ``(1 + coverage) / 2`` quantiles instead of the extremes: for
    unbounded distributions (log-normal sigma, logit-normal t) whose rare tails would otherwise
    stretch the range over bins that almost never see a sample; the tails then share the edge bins.

    In a schedule's table (lam monotone in t), an end value set far apart from the rest is left
    out too (unless ``keep_isolated``): a schedule that clips its last beta (lucidrains' sigmoid
    and cosine, diffusers' ``squaredcos_cap_v2``) puts t = T alone at lam -15.0 or -19.8, 6.9
    below t = T - 1, which would spend a fifth of the bins on one timestep; left out, it shares
    the edge bin. Samples (not monotone) keep their extremes.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage!r}")
    lam = torch.as_tensor(lam).detach().to("cpu", torch.float64).reshape(-1)
    finite = lam[torch.isfinite(lam)]
    if finite.numel() == 0:
        raise ValueError("lam holds no finite value to suggest a range from")
    if coverage < 1.0:
        tail = (1.0 - coverage) / 2.0
        lo, hi = torch.quantile(finite, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    else:
        kept = finite if keep_isolated else _drop_isolated_ends(finite)
        lo, hi = kept.min().item(), kept.max().item()
    lo, hi = float(math.floor(lo)), float(math.ceil(hi))
    return (lo, hi if hi > lo else lo + 1.0)
