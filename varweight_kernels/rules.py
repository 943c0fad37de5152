"""The fixed-rule weightings and the input check they share with ``VarianceAwareWeighting``.

A leaf of the core: ``module`` (VAW's default prior) and the public ``weightings`` import it,
it imports neither. Users import these names from ``varweight_kernels.weightings``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn


def check_loss_lam(loss: Any, lam: Any) -> None:
    """Raise, in one line, unless ``loss`` and ``lam`` are 1-D floating tensors of one length B >= 1."""
    if not isinstance(loss, torch.Tensor) or not isinstance(lam, torch.Tensor):
        raise TypeError(f"loss and lam must be tensors, got {type(loss).__name__} and {type(lam).__name__}")
    shape = loss.shape
    if len(shape) != 1 or lam.shape != shape or shape[0] == 0:
        raise ValueError("loss and lam must be 1-D of the same length B >= 1, got shapes "
                         f"loss {tuple(loss.shape)} and lam {tuple(lam.shape)}")
    if not (loss.dtype.is_floating_point and lam.dtype.is_floating_point):
        bad, t = ("loss", loss) if not loss.dtype.is_floating_point else ("lam", lam)
        raise TypeError(f"{bad} must have a floating dtype, got {t.dtype}")


# every accepted spelling -> our name (diffusers' prediction_type on the right)
TARGETS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "x0": "x0", "sample": "x0"}


def canonical_target(target: str) -> str:
    """``eps``, ``v`` or ``x0`` for any accepted spelling of a prediction target."""
    try:
        return TARGETS[target]
    except (KeyError, TypeError):
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}") from None


def _hp(t: torch.Tensor) -> torch.Tensor:
    """Detached, at least float32 (float64 stays float64) for computing weights."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _finite(name: str, value: float, low: float = -math.inf, strict: bool = False) -> float:
    value = float(value)
    if not (math.isfinite(value) and (value > low if strict else value >= low)):
        raise ValueError(f"{name} must be finite and {'>' if strict else '>='} {low}, got {value!r}")
    return value


class FixedWeighting(nn.Module):
    """Base of the rules whose weight is a fixed function of lam (no learned or running state).

    Subclasses implement ``weights(lam) -> (B,)`` detached weights; a usable ``prior`` of
    ``VarianceAwareWeighting``."""

    def __init__(self) -> None:
        """A rule with no hyper-parameters here; ``last_weights`` is None until the first call."""
        super().__init__()
        self.last_weights: Optional[torch.Tensor] = None

    def weights(self, lam: torch.Tensor) -> torch.Tensor:
        """The (B,) detached weights at log-SNR ``lam``."""
        raise NotImplementedError

    def forward(self, loss: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """``mean_i(w_i * loss_i)`` with ``w = weights(lam)`` (detached: the gradient is ``w_i / B``)."""
        check_loss_lam(loss, lam)
        w = self.weights(lam.to(loss.device)).to(loss.dtype)
        self.last_weights = w
        return (w * loss).mean()


class UniformWeighting(FixedWeighting):
    """Every sample weighs 1: the plain mean of the loss."""

    def weights(self, lam: torch.Tensor) -> torch.Tensor:
        """Ones, (B,)."""
        return torch.ones_like(_hp(lam))


class CauchyWeighting(FixedWeighting):
    """The VAW paper's code: ``w_i = 1 / (1 + alpha (lam_i - mean_batch(lam))^2)``, centred on the batch.

    Its weights are not normalised (mean about 0.83 at alpha 0.05 under EDM's log-normal noise),
    which also lowers the effective learning rate; ``normalize=True`` divides them by their batch
    mean. lam must be finite (one NaN makes the batch mean, and so every weight, NaN).
    """

    def __init__(self, alpha: float = 0.05, normalize: bool = False) -> None:
        """``alpha`` >= 0: the width of the bump (0 gives weight 1); ``normalize``: batch mean weight 1."""
        super().__init__()
        self.alpha = _finite("alpha", alpha, 0.0)
        self.normalize = bool(normalize)

    def weights(self, lam: torch.Tensor) -> torch.Tensor:
        """The (B,) Cauchy weights of one batch's lam."""
        lam = _hp(lam)
        w = 1.0 / (1.0 + self.alpha * (lam - lam.mean()) ** 2)
        return w / w.mean() if self.normalize else w

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, normalize={self.normalize}"


class MinSNRWeighting(FixedWeighting):
    """Min-SNR-gamma (Hang et al. 2023) on the plain MSE of ``target``, ``SNR = exp(lam)``.

    eps: ``min(SNR, gamma) / SNR``; v: ``min(SNR, gamma) / (SNR + 1)``; x0: ``min(SNR, gamma)``.
    (diffusers' ``snr_gamma`` in its training scripts is this weighting.)
    """

    def __init__(self, gamma: float = 5.0, *, target: str) -> None:
        """``gamma`` > 0: where the SNR is clipped; ``target``: what the model predicts (and the loss is the MSE of)."""
        super().__init__()
        self.gamma = _finite("gamma", gamma, 0.0, strict=True)
        self.target = canonical_target(target)

    def weights(self, lam: torch.Tensor) -> torch.Tensor:
        """The (B,) weights at log-SNR ``lam``."""
        return self.snr_weights(_hp(lam).exp())

    def snr_weights(self, snr: torch.Tensor) -> torch.Tensor:
        """The weights at ``SNR = snr`` (what ``weights`` applies to ``exp(lam)``)."""
        snr = _hp(snr)
        clipped = torch.minimum(snr, torch.full_like(snr, self.gamma))  # min, never max
        if self.target == "eps":
            return clipped / snr
        if self.target == "x0":
            return clipped
        return clipped / (snr + 1.0)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, target={self.target!r}"


class P2Weighting(FixedWeighting):
    """P2 (Choi et al. 2022): ``1 / (k + SNR)^gamma`` on the eps MSE, ``SNR = exp(lam)``.

    For an x0 or v target the weight also converts the given MSE to the eps MSE it stands for:
    ``eps-MSE = SNR * x0-MSE`` (any ``x = alpha x0 + sigma eps``) and ``eps-MSE = SNR/(SNR+1) *
    v-MSE`` (variance-preserving, ``alpha^2 + sigma^2 = 1``).
    """

    def __init__(self, k: float = 1.0, gamma: float = 1.0, *, target: str) -> None:
        """``k`` >= 0 and ``gamma`` >= 0 as in the paper (gamma 0.5 or 1); ``target``: what the model predicts."""
        super().__init__()
        self.k = _finite("k", k, 0.0)
        self.gamma = _finite("gamma", gamma, 0.0)
        self.target = canonical_target(target)

    def weights(self, lam: torch.Tensor) -> torch.Tensor:
        """The (B,) weights at log-SNR ``lam``, on the MSE of ``target``."""
        return self.snr_weights(_hp(lam).exp())

    def snr_weights(self, snr: torch.Tensor) -> torch.Tensor:
        """The weights at ``SNR = snr`` (what ``weights`` applies to ``exp(lam)``)."""
        snr = _hp(snr)
        w = 1.0 / (self.k + snr) ** self.gamma
        if self.target == "x0":
            w = w * snr
        elif self.target == "v":
            w = w * snr / (snr + 1.0)
        return w

    def extra_repr(self) -> str:
        return f"k={self.k}, gamma={self.gamma}, target={self.target!r}"


class EDM2Weighting(nn.Module):
    """EDM2's learned uncertainty (Karras et al. 2024): loss ``mean_i(L_i / exp(u(lam_i)) + u(lam_i))``.

    ``u(lam) = linear(fourier(c))`` with ``c = -lam / 8``, which is EDM2's ``c_noise = ln(sigma)/4``
    for the standard lam of ``x = x0 + sigma n``. Fourier features are ``sqrt(2) cos(2 pi (f c +
    phi))``, f ~ N(0, 1), phi ~ U(0, 1), fixed buffers drawn from ``generator`` (or a private one
    seeded with ``seed``), never from the global RNG. The linear layer starts at zero (u = 0).
    Its parameters are learned with the model's: give ``w.parameters()`` to the optimiser.
    ``last_weights`` is ``exp(-u(lam))``, the weight on each loss.
    """

    def __init__(self, channels: int = 128, generator: Optional[torch.Generator] = None, seed: int = 0) -> None:
        """``channels`` Fourier features; their frequencies and phases come from ``generator`` or ``seed``."""
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed))
        gdev = generator.device
        self.register_buffer("freqs", torch.randn(channels, generator=generator, device=gdev).cpu())
        self.register_buffer("phases", torch.rand(channels, generator=generator, device=gdev).cpu())
        # zero-initialised without nn.Linear's default (global-RNG) init
        self.weight = nn.Parameter(torch.zeros(1, channels))
        self.bias = nn.Parameter(torch.zeros(1))
        self.last_weights: Optional[torch.Tensor] = None

    def features(self, lam: torch.Tensor) -> torch.Tensor:
        c = -lam.detach().float().reshape(-1, 1) / 8.0
        return math.sqrt(2.0) * torch.cos(2 * math.pi * (c * self.freqs + self.phases))

    def logvar(self, lam: torch.Tensor) -> torch.Tensor:
        """u(lam), shape (B,)."""
        feats = self.features(lam.to(self.freqs.device))
        return (feats @ self.weight.t() + self.bias).reshape(-1)

    def per_sample(self, loss: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The (B,) terms ``L_i / exp(u_i) + u_i`` (sets ``last_weights``)."""
        u = self.logvar(lam).to(loss.device)
        self.last_weights = torch.exp(-u).detach()
        return loss / torch.exp(u).to(loss.dtype) + u.to(loss.dtype)

    def forward(self, loss: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """``mean_i(loss_i / exp(u(lam_i)) + u(lam_i))``: gradients reach both the loss and u."""
        check_loss_lam(loss, lam)
        return self.per_sample(loss, lam).mean()
