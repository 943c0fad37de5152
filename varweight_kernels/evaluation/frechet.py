"""Frechet distance between two Gaussians fitted to feature sets.

``FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``.

The trace term is computed from the eigenvalues of the symmetric PSD matrix
``S1^1/2 S2 S1^1/2`` (``S1^1/2`` from ``eigh``), which equals ``tr sqrtm(S1 S2)`` but never
produces complex parts or needs the diagonal offset that a general ``sqrtm`` of the
non-symmetric ``S1 S2`` does when the covariances are near-singular.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def _as_cov(sigma: np.ndarray, name: str) -> np.ndarray:
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {sigma.shape}")
    if not np.all(np.isfinite(sigma)):
        raise ValueError(f"{name} holds NaN or inf")
    return 0.5 * (sigma + sigma.T)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(sigma)
    vals = np.clip(vals, 0.0, None)
    return (vecs * np.sqrt(vals)) @ vecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S1 S2)^1/2)`` for symmetric PSD ``S1``, ``S2`` (via ``S1^1/2 S2 S1^1/2``)."""
    s1 = _psd_sqrt(sigma1)
    m = s1 @ sigma2 @ s1
    m = 0.5 * (m + m.T)
    vals = np.linalg.eigvalsh(m)
    return float(np.sum(np.sqrt(np.clip(vals, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet (2-Wasserstein squared) distance of N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be 1-D of one length, got {mu1.shape} and {mu2.shape}")
    s1 = _as_cov(sigma1, "sigma1")
    s2 = _as_cov(sigma2, "sigma2")
    if s1.shape != (mu1.size, mu1.size) or s2.shape != s1.shape:
        raise ValueError(f"covariances {s1.shape}, {s2.shape} do not match the mean length {mu1.size}")
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(fd, 0.0)


def gaussian_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ddof=1) covariance of an (N, D) feature array."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance_from_features(features1, features2) -> float:
    mu1, s1 = gaussian_statistics(features1)
    mu2, s2 = gaussian_statistics(features2)
    return frechet_distance(mu1, s1, mu2, s2)
