"""The trainer's loss weightings: ``make_weighting(name, cfg=None, **kw) -> Weighting`` (an ``nn.Module``).

A thin adapter over the library's ``varweight_kernels.weightings`` (one implementation of each
formula, there): it feeds them the trainer's ``LossTerms`` and adds importance weights.

Every weighting is called the same way, ``weighting.objective(terms, lam, is_weight=None) ->
scalar`` (``weighting(terms, lam)`` is the same without importance weights) with ``terms`` a
``LossTerms(loss, mse, snr)`` of (B,) tensors and ``lam`` the (B,) log-SNR, and returns the
batch mean of its weighted per-sample term; ``is_weight`` (B,), from importance-sampled noise
levels, multiplies each sample's weighted term, while the weighting's own statistics (VAW's)
see the raw terms. ``last_weights`` holds the (B,) detached weights of the last call (for
edm2: ``exp(-u(lam))``); ``bin_weights()`` the per-bin weight table (vaw) or None.

| name | per-sample term | weight |
|---|---|---|
| uniform | terms.loss | 1 |
| vaw | terms.loss | ``VarianceAwareWeighting`` (the library core) on (loss, lam) |
| seed-cauchy | terms.loss | ``CauchyWeighting``: ``1 / (1 + alpha (lam - mean_batch lam)^2)``, alpha = 0.05 |
| seed-standardized | terms.loss | ``1 + alpha (l - mean_batch l) / std_batch l`` (detached; population std; 1 when B = 1 or std = 0; clamped at ``min_weight`` = 0 by default), alpha = 0.5 |
| min-snr | terms.mse | ``MinSNRWeighting``: eps target ``min(SNR, gamma)/SNR``; x0 ``min(SNR, gamma)``; v ``min(SNR, gamma)/(SNR+1)``; gamma = 5; SNR = ``snr_scale * terms.snr`` |
| p2 | terms.mse | ``P2Weighting``: ``1/(k + SNR)^gamma`` on the eps MSE, k = 1, gamma = 1; SNR = ``snr_scale * terms.snr`` |
| edm2 | terms.loss | ``EDM2Weighting``, learned: ``loss / exp(u(lam)) + u(lam)`` |

Notes.
- The SNR of min-snr and p2. Both papers define SNR = alpha^2/sigma^2 of x = alpha x0 + sigma eps:
  abar/(1-abar) for DDPM, which is ``terms.snr = exp(lam)``, and 1/sigma^2 for EDM (alpha = 1),
  which is ``exp(lam)/sigma_data^2`` since EDM's lam = log(sigma_data^2/sigma^2). ``snr_scale``
  multiplies ``terms.snr``: the trainer passes ``1/sigma_data^2`` under EDM by default (the
  published SNR, ``--snr-convention published``) and 1 with ``--snr-convention sigma-data``
  (SNR = sigma_data^2/sigma^2, the trainer's earlier convention: with sigma_data = 0.5 it makes
  min-SNR-5 clip where the published min-SNR-20 would, and moves P2's knee by the same factor 4).
- min-snr and p2 need the formulation's ``target`` ("eps", "x0" or "v", or diffusers' names); pass ``target=``
  (``make_weighting("min-snr", target=formulation.target)``).
- p2 for non-eps targets converts the target MSE to an eps MSE before weighting (see
  ``P2Weighting``); under the sigma-data convention that is off by the constant factor
  sigma_data^2 on top of the moved knee.
- edm2 is the library's ``EDM2Weighting`` fed the trainer's lam: ``c = -lam/8`` is EDM2's
  ``c_noise`` for DDPM and, under EDM, ``ln(sigma)/4 - ln(sigma_data)/4`` (a constant shift). Its
  Fourier buffers come from the "weighting" stream, never the global RNG. Its parameters must be
  given to the optimiser along with the model's (``weighting.parameters()``).
- vaw passes every other keyword to ``VarianceAwareWeighting`` (num_bins, logsnr_range, decay,
  power, eps, min_count, weight_range, warmup_steps, ramp_steps, sync, backend); its state is in
  this module's ``state_dict()`` under ``vaw.``. ``prior_alpha`` is its ``prior=CauchyWeighting(alpha)``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from .. import VarianceAwareWeighting
from .. import weightings as lib
from ..rules import _hp

__all__ = ["Weighting", "UniformWeighting", "VAWWeighting", "SeedCauchyWeighting", "SeedStandardizedWeighting",
           "MinSNRWeighting", "P2Weighting", "EDM2Weighting", "WEIGHTINGS", "make_weighting"]


def _check_snr_scale(scale: float) -> float:
    if not scale > 0:
        raise ValueError(f"snr_scale must be > 0, got {scale!r}")
    return float(scale)


class Weighting(nn.Module):
    """Base class: ``sample_weights(terms, lam)`` gives the detached (B,) weights of the per-sample
    term named by ``term`` ("loss" or "mse"); ``objective`` is their weighted mean."""

    name = "base"
    term = "loss"

    def __init__(self) -> None:
        super().__init__()
        self.last_weights: Optional[torch.Tensor] = None

    def sample_weights(self, terms, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def objective(self, terms, lam: torch.Tensor, is_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        values = getattr(terms, self.term)
        w = self.sample_weights(terms, lam).detach().to(values.dtype)
        self.last_weights = w
        if is_weight is not None:
            w = w * is_weight.to(values.dtype)
        return (w * values).mean()

    def forward(self, terms, lam: torch.Tensor) -> torch.Tensor:
        return self.objective(terms, lam)

    def analysis_weights(self, terms, lam: torch.Tensor) -> torch.Tensor:
        """The (B,) weights this weighting gives (terms, lam) now, leaving its state as it is:
        the per-sample analysis weighs a trained model's losses with them."""
        return self.sample_weights(terms, lam).detach()

    def bin_weights(self) -> Optional[torch.Tensor]:
        """The per-log-SNR-bin weight table, for weightings that keep one (logged to binstats)."""
        return None


class _RuleWeighting(Weighting):
    """A library fixed rule (``self.rule``, stateless: the state_dict stays empty) on ``terms.loss``."""

    def __init__(self, rule: lib.FixedWeighting) -> None:
        super().__init__()
        self.rule = rule

    def sample_weights(self, terms, lam: torch.Tensor) -> torch.Tensor:
        return self.rule.weights(lam.to(terms.loss.device))


class UniformWeighting(_RuleWeighting):
    name = "uniform"

    def __init__(self) -> None:
        super().__init__(lib.UniformWeighting())  # w * loss == loss exactly, so the mean is loss.mean()


class VAWWeighting(Weighting):
    """``VarianceAwareWeighting`` applied to (terms.loss, lam).

    Two variants for the ablation of issue #17, both off by default: ``power_end`` with
    ``anneal_steps`` moves the power linearly from the module's power to ``power_end`` over that
    many updates (a rule that starts one way and ends another); ``prior_alpha`` multiplies the
    VAW weights by the paper's batch-centred Cauchy weights (the library's ``prior=``).
    """

    name = "vaw"

    def __init__(self, power_end: Optional[float] = None, anneal_steps: int = 0, prior_alpha: Optional[float] = None,
                 **vaw_kwargs: Any) -> None:
        super().__init__()
        prior = None if prior_alpha is None else lib.CauchyWeighting(prior_alpha)
        self.vaw = VarianceAwareWeighting(prior=prior, **vaw_kwargs)
        self.power_start = self.vaw.config.power
        self.power_end = self.power_start if power_end is None else float(power_end)
        self.anneal_steps = int(anneal_steps)
        # The anneal's count of VAW updates, kept on the host: read from the device once (again
        # after a state load), so annealing reads nothing back per step.
        self._updates: Optional[int] = None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_updates", None))

    @property
    def prior(self) -> Optional[lib.CauchyWeighting]:
        return self.vaw.prior

    def objective(self, terms, lam: torch.Tensor, is_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.anneal_steps > 0 and self.vaw.training:
            self._anneal_power()
        # The library step updates the statistics (of the raw loss) and returns the weighted mean
        # (its own backward); with importance weights only its weights (prior included) are used.
        out = self.vaw(terms.loss, lam.detach().to(terms.loss.device))
        self.last_weights = self.vaw.last_weights
        if is_weight is None:
            return out
        dtype = terms.loss.dtype
        return (self.last_weights.to(dtype) * is_weight.to(dtype) * terms.loss).mean()

    def _anneal_power(self) -> None:
        """Set the power for the coming update (every training-mode call makes one)."""
        if self._updates is None:
            self._updates = int(self.vaw.step)
        done = min(self._updates / self.anneal_steps, 1.0)
        self._updates += 1
        power = self.power_start + done * (self.power_end - self.power_start)
        if power != self.vaw.config.power:
            self.vaw.reconfigure(power=power)

    def analysis_weights(self, terms, lam: torch.Tensor) -> torch.Tensor:
        """The current table's weights (eval mode: the statistics are not updated), times the
        prior's where there is one."""
        was_training = self.vaw.training
        self.vaw.eval()
        try:
            self.vaw(terms.loss.detach(), lam.detach().to(terms.loss.device))
        finally:
            self.vaw.train(was_training)
        return self.vaw.last_weights.detach()

    def bin_weights(self) -> torch.Tensor:
        return self.vaw.weight


class SeedCauchyWeighting(_RuleWeighting):
    """The paper code's weighting, the library's ``CauchyWeighting(alpha, normalize)``."""

    name = "seed-cauchy"

    def __init__(self, alpha: float = 0.05, normalize: bool = False) -> None:
        super().__init__(lib.CauchyWeighting(alpha, normalize))

    alpha = property(lambda self: self.rule.alpha)
    normalize = property(lambda self: self.rule.normalize)


class SeedStandardizedWeighting(Weighting):
    """The paper README's weighting: ``w = 1 + alpha (l - mean_batch l) / std_batch l``
    (detached; population std). B = 1 or a zero/non-finite std gives w = 1. ``min_weight``
    (default 0, None disables) clamps w from below so a sample's gradient never flips sign."""

    name = "seed-standardized"

    def __init__(self, alpha: float = 0.5, min_weight: Optional[float] = 0.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.min_weight = None if min_weight is None else float(min_weight)

    def sample_weights(self, terms, lam: torch.Tensor) -> torch.Tensor:
        l = _hp(terms.loss)
        if l.numel() < 2:
            w = torch.ones_like(l)
        else:
            mu = l.mean()
            std = l.std(unbiased=False)
            ok = torch.isfinite(std) & (std > 0)
            safe = torch.where(ok, std, torch.ones_like(std))
            w = torch.where(ok, 1.0 + self.alpha * (l - mu) / safe, torch.ones_like(l))
        if self.min_weight is not None:
            w = w.clamp_min(self.min_weight)
        return w


class _SNRRuleWeighting(_RuleWeighting):
    """A library SNR rule on the target MSE ``terms.mse``, at ``SNR = snr_scale * terms.snr``: under
    EDM 1/sigma^2 as published (``snr_scale = 1/sigma_data^2``) or sigma_data^2/sigma^2
    (``snr_scale = 1``); see the module notes."""

    term = "mse"

    def __init__(self, rule, snr_scale: float) -> None:
        super().__init__(rule)
        self.snr_scale = _check_snr_scale(snr_scale)

    target = property(lambda self: self.rule.target)
    gamma = property(lambda self: self.rule.gamma)

    def weights(self, snr: torch.Tensor) -> torch.Tensor:
        """Weights on the target MSE for ``snr = terms.snr`` (scaled by ``snr_scale`` here)."""
        return self.rule.snr_weights(_hp(snr) * self.snr_scale)

    def sample_weights(self, terms, lam: torch.Tensor) -> torch.Tensor:
        return self.weights(terms.snr.to(terms.mse.device))


class MinSNRWeighting(_SNRRuleWeighting):
    """Min-SNR-gamma (Hang et al. 2023): the library's ``MinSNRWeighting`` on ``terms.mse``."""

    name = "min-snr"

    def __init__(self, target: str = "eps", gamma: float = 5.0, snr_scale: float = 1.0) -> None:
        super().__init__(lib.MinSNRWeighting(gamma, target=target), snr_scale)


class P2Weighting(_SNRRuleWeighting):
    """P2 (Choi et al. 2022): the library's ``P2Weighting`` on ``terms.mse`` (converted for x0/v targets)."""

    name = "p2"

    def __init__(self, target: str = "eps", k: float = 1.0, gamma: float = 1.0, snr_scale: float = 1.0) -> None:
        super().__init__(lib.P2Weighting(k, gamma, target=target), snr_scale)

    k = property(lambda self: self.rule.k)


class EDM2Weighting(lib.EDM2Weighting, Weighting):
    """The library's ``EDM2Weighting`` (same buffers and parameters) on ``terms.loss``."""

    name = "edm2"

    def forward(self, terms, lam: torch.Tensor) -> torch.Tensor:
        return self.objective(terms, lam)

    def analysis_weights(self, terms, lam: torch.Tensor) -> torch.Tensor:
        """``exp(-u(lam))``: the weight on the loss (the objective's ``+ u`` is not a weight)."""
        return torch.exp(-self.logvar(lam)).detach().to(terms.loss.device)

    def objective(self, terms, lam: torch.Tensor, is_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        per_sample = self.per_sample(terms.loss, lam)
        return per_sample.mean() if is_weight is None else (is_weight * per_sample).mean()


WEIGHTINGS = {
    "uniform": UniformWeighting,
    "vaw": VAWWeighting,
    "seed-cauchy": SeedCauchyWeighting,
    "seed-standardized": SeedStandardizedWeighting,
    "min-snr": MinSNRWeighting,
    "p2": P2Weighting,
    "edm2": EDM2Weighting,
}

# keyword arguments each weighting accepts (a ``cfg`` mapping may carry others; they are ignored
# for the weightings that do not take them, except vaw, which receives its own sub-mapping).
_KEYS = {
    "uniform": (),
    "seed-cauchy": ("alpha", "normalize"),
    "seed-standardized": ("alpha", "min_weight"),
    "min-snr": ("target", "gamma", "snr_scale"),
    "p2": ("target", "k", "gamma", "snr_scale"),
    "edm2": ("channels", "generator", "seed"),
}
VAW_KEYS = ("num_bins", "logsnr_range", "decay", "power", "eps", "min_count", "weight_range", "warmup_steps",
            "ramp_steps", "sync", "backend")


def make_weighting(name: str, cfg: Optional[Mapping[str, Any]] = None, **kw: Any) -> Weighting:
    """Build a weighting by name.

    ``cfg`` (optional) is a mapping of keyword arguments, merged under ``kw``. Plain keyword
    arguments are passed through as they are (an unknown one raises ``TypeError``); from ``cfg``
    only the keys the named weighting takes are used (for "vaw": everything in ``cfg["vaw"]`` if
    present, else the ``VarianceAwareWeighting`` keywords found in ``cfg``)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
    merged = {}
    if cfg is not None:
        if not isinstance(cfg, Mapping):
            raise TypeError(f"cfg must be a mapping, got {type(cfg).__name__}")
        if name == "vaw":
            sub = cfg.get("vaw")
            merged = dict(sub) if isinstance(sub, Mapping) else {k: cfg[k] for k in VAW_KEYS if k in cfg}
        else:
            merged = {k: cfg[k] for k in _KEYS[name] if k in cfg}
    merged.update(kw)
    return WEIGHTINGS[name](**merged)
