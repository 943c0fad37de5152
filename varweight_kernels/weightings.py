"""Drop-in loss weightings for a diffusion training loop, all called as ``w(loss, lam) -> scalar``.

``loss`` is the (B,) unweighted per-sample loss of the model's own target (the plain MSE of eps,
v or x0 for ``MinSNRWeighting`` and ``P2Weighting``), ``lam`` the (B,) standard log-SNR
``log(alpha^2 / sigma^2)``, so ``SNR = exp(lam)`` (``varweight_kernels.logsnr`` converts timesteps
and sigmas). Each returns the batch mean of its weighted per-sample loss, keeps the (B,) detached
weights of the last call in ``last_weights``, and round-trips through ``state_dict``.

| class | weight of sample i | source |
|---|---|---|
| ``UniformWeighting()`` | 1 | |
| ``CauchyWeighting(alpha=0.05, normalize=False)`` | ``1 / (1 + alpha (lam_i - mean_batch lam)^2)`` | the VAW paper's code |
| ``MinSNRWeighting(gamma=5, target=...)`` | eps: ``min(SNR, g)/SNR``; v: ``min(SNR, g)/(SNR+1)``; x0: ``min(SNR, g)`` | Hang et al. 2023 |
| ``P2Weighting(k=1, gamma=1, target=...)`` | ``1/(k + SNR)^gamma`` on the eps MSE (x0, v: converted) | Choi et al. 2022 |
| ``EDM2Weighting(channels=128)`` | learned: loss ``L_i / exp(u(lam_i)) + u(lam_i)`` | Karras et al. 2024 |
| ``VarianceAwareWeighting(...)`` | a power of the loss spread in lam's bin | this package |

The fixed rules (``FixedWeighting`` subclasses) also give their weights alone, ``w.weights(lam)``;
``VarianceAwareWeighting(..., prior=w)`` multiplies them into VAW's. ``target`` takes our names
or diffusers' ``prediction_type``: ``eps``/``epsilon``, ``v``/``v_prediction``, ``x0``/``sample``.
"""
from .module import VarianceAwareWeighting
from .rules import (TARGETS, CauchyWeighting, EDM2Weighting, FixedWeighting, MinSNRWeighting, P2Weighting,
                    UniformWeighting, canonical_target)

__all__ = ["FixedWeighting", "UniformWeighting", "CauchyWeighting", "MinSNRWeighting", "P2Weighting",
           "EDM2Weighting", "VarianceAwareWeighting", "TARGETS", "canonical_target"]
