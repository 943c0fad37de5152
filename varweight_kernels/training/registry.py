"""The trainer's lists of names as plain data: the one place each name is written.

A leaf module (it imports nothing), so ``TrainConfig`` validates against these lists, and the
modules that build the named things (``data``, ``unet``, ``noise_sampling``, ``formulations``,
``weightings``, ``evaluation.fid``) check their builders against them, without importing each
other. Adding a weighting, a dataset or an architecture starts here. The first entry of a list is
the config's default where the config has one.
"""
from __future__ import annotations

__all__ = ["DATASETS", "ARCHITECTURES", "FORMULATIONS", "WEIGHTINGS", "NOISE_SAMPLINGS", "IS_STATISTICS",
           "SAMPLERS", "SNR_CONVENTIONS", "EMBEDDINGS", "AMP_MODES", "VAW_PRIORS", "EXPORT_WEIGHTS"]

DATASETS = ("cifar10", "cifar100", "digits")
ARCHITECTURES = ("ddpm", "paper")
FORMULATIONS = ("edm", "ddpm")
WEIGHTINGS = ("uniform", "vaw", "seed-cauchy", "seed-standardized", "min-snr", "p2", "edm2")
NOISE_SAMPLINGS = ("default", "vaw-is")
IS_STATISTICS = ("rms", "mean", "std")  # the per-bin statistic vaw-is samples by
SAMPLERS = ("auto", "heun", "ddpm", "ddim")
SNR_CONVENTIONS = ("published", "sigma-data")
EMBEDDINGS = ("auto", "fourier", "positional")
AMP_MODES = ("auto", "bf16", "fp32")
VAW_PRIORS = ("none", "cauchy")
EXPORT_WEIGHTS = ("ema", "raw")
