"""Seed-level statistics for comparing training methods (issue 9).

Scores are "lower is better" (FID, FD). For a method against a baseline, seeds are paired
(same seed = same data order, init and noise streams), and everything is computed on the
per-seed differences ``d_s = method_s - baseline_s``:

* mean difference with a two-sided 95% **Student t** confidence interval
  (``mean +- t_{0.975, n-1} * sd / sqrt(n)``);
* wins: seeds with ``d_s < 0`` (ties counted apart);
* **paired t-test** (``scipy.stats.ttest_rel``, two-sided) and **Wilcoxon signed-rank test**
  (``scipy.stats.wilcoxon``, two-sided, zero differences dropped ("wilcox"), exact
  distribution for small n when there are no ties);
* spread: the std across seeds (ddof=1) per method with a **percentile bootstrap** 95% CI
  (seeds resampled with replacement, fixed seed), and the paired bootstrap CI of the std
  difference method - baseline.

The wording of :func:`describe_paired` follows the numbers: a method is called better/worse
only when the t interval excludes 0, always with its win count, interval and p-value.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as sps

BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 10000


def t_confidence_interval(x: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """(mean, lo, hi): two-sided Student-t interval for the mean (NaN bounds when n < 2)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n == 0:
        return (math.nan, math.nan, math.nan)
    m = float(x.mean())
    if n < 2:
        return (m, math.nan, math.nan)
    se = float(x.std(ddof=1)) / math.sqrt(n)
    half = float(sps.t.ppf(0.5 + level / 2.0, n - 1)) * se
    return (m, m - half, m + half)


def bootstrap_std_ci(x: Sequence[float], level: float = 0.95, n_boot: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> Tuple[float, float, float]:
    """(std, lo, hi): sample std (ddof=1) with a percentile bootstrap interval over seeds."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n < 2:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = x[idx].std(axis=1, ddof=1)
    a = (1.0 - level) / 2.0
    return (float(x.std(ddof=1)), float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a)))


def bootstrap_std_diff_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95,
                          n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Tuple[float, float, float]:
    """(std(x) - std(y), lo, hi) with seeds resampled jointly (x, y paired by position)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.size < 2:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    boots = x[idx].std(axis=1, ddof=1) - y[idx].std(axis=1, ddof=1)
    a = (1.0 - level) / 2.0
    return (float(x.std(ddof=1) - y.std(ddof=1)), float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a)))


@dataclass
class PairedResult:
    method: str
    baseline: str
    seeds: List[int]
    diffs: List[float]
    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    t_stat: float
    t_p: float
    wilcoxon_stat: float
    wilcoxon_p: float
    level: float = 0.95

    @property
    def ci_excludes_zero(self) -> bool:
        return bool(np.isfinite(self.ci_low) and np.isfinite(self.ci_high) and (self.ci_low > 0 or self.ci_high < 0))

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["ci_excludes_zero"] = self.ci_excludes_zero
        return d


def paired_comparison(method_scores: Mapping[int, float], baseline_scores: Mapping[int, float],
                      method: str = "method", baseline: str = "baseline", level: float = 0.95) -> PairedResult:
    """Compare per-seed scores (dicts seed -> score) on the seeds both have."""
    seeds = sorted(set(method_scores) & set(baseline_scores))
    a = np.array([float(method_scores[s]) for s in seeds], dtype=np.float64)
    b = np.array([float(baseline_scores[s]) for s in seeds], dtype=np.float64)
    d = a - b
    n = d.size
    mean, lo, hi = t_confidence_interval(d, level)
    t_stat = t_p = w_stat = w_p = math.nan
    if n >= 2:
        if np.all(d == d[0]):  # zero variance: t undefined (scipy gives nan / inf)
            t_stat, t_p = (math.nan, math.nan) if d[0] != 0 else (math.nan, 1.0)
        else:
            r = sps.ttest_rel(a, b)
            t_stat, t_p = float(r.statistic), float(r.pvalue)
        if np.any(d != 0):
            r = sps.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
            w_stat, w_p = float(r.statistic), float(r.pvalue)
        else:
            w_p = 1.0
    return PairedResult(method=method, baseline=baseline, seeds=[int(s) for s in seeds], diffs=d.tolist(), n=n,
                        mean_diff=mean, ci_low=lo, ci_high=hi, wins=int((d < 0).sum()), ties=int((d == 0).sum()),
                        t_stat=t_stat, t_p=t_p, wilcoxon_stat=w_stat, wilcoxon_p=w_p, level=level)


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.4e}"


def _fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def describe_paired(r: PairedResult, metric: str = "FID") -> str:
    """One sentence whose verdict follows the interval (lower score = better)."""
    if r.n == 0:
        return f"{r.method} vs {r.baseline}: no seed has both scores; nothing to compare."
    tie = f", {r.ties} tied" if r.ties else ""
    numbers = (f"mean {metric} difference {_fmt(r.mean_diff)} (95% t CI {_fmt(r.ci_low)} to {_fmt(r.ci_high)}), "
               f"paired t p={_fmt_p(r.t_p)}, Wilcoxon signed-rank p={_fmt_p(r.wilcoxon_p)}")
    if r.n < 2:
        return (f"{r.method} vs {r.baseline}: only {r.n} paired seed ({r.method} lower on {r.wins}/{r.n}); "
                f"difference {_fmt(r.mean_diff)}, no interval or test possible, so no claim.")
    if r.ci_excludes_zero:
        word = "better (lower)" if r.mean_diff < 0 else "worse (higher)"
        count = r.wins if r.mean_diff < 0 else r.n - r.wins - r.ties
        return f"{r.method} vs {r.baseline}: {word} on {count}/{r.n} seeds{tie}, {numbers}."
    return (f"{r.method} vs {r.baseline}: no clear difference (the 95% CI contains 0); lower on {r.wins}/{r.n} "
            f"seeds{tie}, {numbers}.")


def describe_spread(method: str, x: Sequence[float], baseline: Optional[str] = None,
                    y: Optional[Sequence[float]] = None, metric: str = "FID") -> str:
    """Std across seeds with its bootstrap CI; against a baseline, the paired bootstrap CI of the
    std difference decides whether the spread differs."""
    s, lo, hi = bootstrap_std_ci(x)
    if not np.isfinite(s):
        return f"{method}: fewer than 2 seeds, no spread estimate."
    text = (f"{method}: {metric} std across {len(x)} seeds {_fmt(s)} (bootstrap 95% CI {_fmt(lo)} to {_fmt(hi)}, "
            f"{BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})")
    if baseline is not None and y is not None and len(y) == len(x) and len(x) >= 2:
        d, dlo, dhi = bootstrap_std_diff_ci(x, y)
        if dlo > 0 or dhi < 0:
            verdict = "smaller" if d < 0 else "larger"
            text += (f"; spread {verdict} than {baseline} (std difference {_fmt(d)}, paired bootstrap 95% CI "
                     f"{_fmt(dlo)} to {_fmt(dhi)})")
        else:
            text += (f"; no clear difference in spread from {baseline} (std difference {_fmt(d)}, paired "
                     f"bootstrap 95% CI {_fmt(dlo)} to {_fmt(dhi)} contains 0)")
    return text + "."
