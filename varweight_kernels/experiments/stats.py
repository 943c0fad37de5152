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

Issue 17 adds per-run sample-efficiency scores that go through the same paired statistics: the
normalised area under the score curve (:func:`curve_auc`) and the step at which the score
first reaches a threshold taken from the baseline (:func:`steps_to_threshold`,
:func:`baseline_threshold`, censored runs in :func:`paired_crossing_comparison`); and, for a
look at why, the effective sample fraction of a weighted batch and the log-SNR ranges a
weighting moves weight to.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as sps

from ..training.records import format_number

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


def fmt(x, digits: int = 4) -> str:
    """A number for the report's tables ("n/a" for None, NaN, inf or text): ``records.format_number``."""
    return format_number(x, digits)


def _fmt(x: float, digits: int = 3) -> str:
    """``fmt`` for the sentences: 3 digits, 4 decimals in e-notation from 1e4 on."""
    if x is None or not np.isfinite(x):
        return "n/a"
    return fmt(x, digits) if abs(x) < 1e4 else f"{x:.4e}"


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


# ---------------------------------------------------------------------------------------------
# sample efficiency (issue 17): area under the score curve and steps to a threshold
# ---------------------------------------------------------------------------------------------
Curve = Tuple[np.ndarray, np.ndarray]  # (evaluation steps, scores), steps increasing


def require_same_eval_steps(curves: Mapping[str, Curve]) -> np.ndarray:
    """The evaluation steps of ``curves`` (name -> curve), which must all be the same: an AUC or
    a crossing step compared across runs is only meaningful over the same evaluation points."""
    if not curves:
        raise ValueError("no curves to compare")
    ref_name, (ref_steps, _) = next(iter(curves.items()))
    ref = [int(s) for s in ref_steps]
    for name, (steps, _) in curves.items():
        own = [int(s) for s in steps]
        if own != ref:
            only_own = sorted(set(own) - set(ref))
            only_ref = sorted(set(ref) - set(own))
            raise ValueError(
                f"evaluation steps differ: {name} has {len(own)} ({_steps_text(only_own)} not in {ref_name}) and "
                f"{ref_name} has {len(ref)} ({_steps_text(only_ref)} not in {name}); AUC and steps-to-threshold "
                f"need the same evaluation steps in every run compared")
    return np.asarray(ref_steps)


def _steps_text(steps: Sequence[int], most: int = 5) -> str:
    if not steps:
        return "none"
    shown = ", ".join(str(s) for s in steps[:most])
    return f"steps {shown}" + (f", ... ({len(steps)} in all)" if len(steps) > most else "")


def _checked_curve(steps: Sequence[float], scores: Sequence[float]) -> Curve:
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"steps {x.shape} and scores {y.shape} must be 1-d of the same length")
    if x.size < 2:
        raise ValueError(f"a score curve needs at least 2 evaluation points, got {x.size}")
    if np.any(np.diff(x) <= 0) or not np.all(np.isfinite(y)):
        raise ValueError("evaluation steps must increase and scores must be finite")
    return x, y


def curve_auc(steps: Sequence[float], scores: Sequence[float]) -> float:
    """Normalised area under score-vs-step: the trapezoid area over the evaluation points divided
    by (last - first step), i.e. the mean score over training with the curve taken as linear between
    evaluations. In score units, so a flat curve at c gives c and lower is better."""
    x, y = _checked_curve(steps, scores)
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))
    return area / float(x[-1] - x[0])


@dataclass(frozen=True)
class Crossing:
    """When a run's score first fell to the threshold. ``step`` is that step, interpolated between
    evaluations; if the run never got there (``censored``) it is the last evaluation step, a lower
    bound of the true step."""
    step: float
    censored: bool

    def text(self) -> str:
        return f">{self.step:.0f}" if self.censored else f"{self.step:.0f}"


def steps_to_threshold(steps: Sequence[float], scores: Sequence[float], threshold: float) -> Crossing:
    """First step at which the score is <= ``threshold``, linearly interpolated between the last
    evaluation above it and the first at or below it (the same linear curve the AUC integrates),
    so a crossing is resolved finer than the evaluation spacing. A run already at or below the
    threshold at its first evaluation crosses at that step (nothing earlier was measured)."""
    x, y = _checked_curve(steps, scores)
    reached = np.flatnonzero(y <= threshold)
    if reached.size == 0:
        return Crossing(float(x[-1]), True)
    i = int(reached[0])
    if i == 0:
        return Crossing(float(x[0]), False)
    frac = (y[i - 1] - threshold) / (y[i - 1] - y[i])
    return Crossing(float(x[i - 1] + frac * (x[i] - x[i - 1])), False)


def baseline_threshold(baseline_curves: Mapping[str, Curve]) -> Tuple[float, float]:
    """(threshold, step): the baseline's mean score across seeds at the middle of its evaluation
    range, linearly interpolated. The baseline needs about half its budget to get there, so both
    faster variants and variants up to about twice as slow cross within the run (few censored
    runs), and it sits in the early part of training where weightings act; unlike a fraction of
    the improvement it does not depend on the (arbitrary) score at the first evaluation."""
    steps = require_same_eval_steps(baseline_curves).astype(np.float64)
    mean_curve = np.mean([_checked_curve(*c)[1] for c in baseline_curves.values()], axis=0)
    mid = 0.5 * (steps[0] + steps[-1])
    return float(np.interp(mid, steps, mean_curve)), mid


@dataclass
class CrossingComparison:
    """Paired steps-to-threshold differences. Seeds where only one run crossed enter with the other
    at its last evaluation step (a bound: the true difference is at least that large in magnitude,
    so such pairs pull the mean towards 0); seeds where neither crossed say nothing about which is
    faster and are left out (``neither``)."""
    result: PairedResult
    method_censored: List[int]
    baseline_censored: List[int]
    neither: List[int]


def paired_crossing_comparison(method: Mapping[int, Crossing], baseline: Mapping[int, Crossing],
                               method_name: str = "method", baseline_name: str = "baseline",
                               level: float = 0.95) -> CrossingComparison:
    """Paired comparison of crossing steps (dicts seed -> Crossing) on the seeds both have."""
    seeds = sorted(set(method) & set(baseline))
    neither = [s for s in seeds if method[s].censored and baseline[s].censored]
    kept = [s for s in seeds if s not in neither]
    result = paired_comparison({s: method[s].step for s in kept}, {s: baseline[s].step for s in kept},
                               method_name, baseline_name, level)
    return CrossingComparison(result=result, neither=neither,
                              method_censored=[s for s in kept if method[s].censored],
                              baseline_censored=[s for s in kept if baseline[s].censored])


def describe_crossing(c: CrossingComparison) -> str:
    """:func:`describe_paired` for crossing steps, with what the censored seeds do to it."""
    r = c.result
    if r.n == 0 and c.neither:
        return (f"{r.method} vs {r.baseline}: neither reached the threshold on seeds "
                f"{', '.join(map(str, c.neither))}; nothing to compare.")
    text = describe_paired(r, "steps-to-threshold")
    notes = []
    if c.method_censored or c.baseline_censored:
        notes.append(f"{len(c.method_censored)} seed(s) where only {r.baseline} and {len(c.baseline_censored)} "
                     f"where only {r.method} reached the threshold enter with the last evaluation step for the "
                     f"other run, so their differences are bounds towards 0")
    if c.neither:
        notes.append(f"seed(s) {', '.join(map(str, c.neither))} left out (neither reached it)")
    return (text[:-1] + " (" + "; ".join(notes) + ").") if notes else text


# ---------------------------------------------------------------------------------------------
# where the weights go (issue 17): effective sample size and the weight shift over log-SNR
# ---------------------------------------------------------------------------------------------
WEIGHT_TOLERANCE = 0.05  # |mean weight - 1| up to this counts as unchanged

def effective_sample_fraction(counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Kish effective sample size of a weighted batch as a fraction of the batch,
    ``(sum_k n_k w_k)^2 / (N sum_k n_k w_k^2)`` with ``n_k`` samples of weight ``w_k`` in bin k:
    1 when every sample has the same weight, 1/N when one sample carries it all. It says how much
    of each batch the weighted loss effectively averages over. ``counts``, ``weights``: (..., K);
    NaN where no sample or no weight."""
    n, w = np.asarray(counts, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    total = n.sum(-1)
    first, second = (n * w).sum(-1), (n * w * w).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((total > 0) & (second > 0), first * first / (total * second), np.nan)


def weight_ranges(bin_edges: Sequence[float], mean_weight: Sequence[float], used: Sequence[bool],
                  tolerance: float = WEIGHT_TOLERANCE) -> Dict[str, List[Tuple[float, float, float]]]:
    """Where a weighting moves weight over log-SNR: the runs of adjacent bins (among the ``used``
    ones, those that saw samples) with mean weight above ``1 + tolerance`` ("up") and below
    ``1 - tolerance`` ("down"), each as (lam_low, lam_high, mean weight over those bins). Weights
    are relative to uniform (VAW normalises the table to mean 1 over the sample distribution), so
    1 is "unchanged"; the tolerance keeps a few percent of noise from reading as a shift."""
    edges = np.asarray(bin_edges, dtype=np.float64)
    w = np.asarray(mean_weight, dtype=np.float64)
    out: Dict[str, List[Tuple[float, float, float]]] = {"up": [], "down": []}
    run: List[int] = []
    side = None
    for k in range(w.size + 1):
        k_side = None
        if k < w.size and used[k] and np.isfinite(w[k]) and abs(w[k] - 1.0) > tolerance:
            k_side = "up" if w[k] > 1.0 else "down"
        if run and k_side != side:
            out[side].append((float(edges[run[0]]), float(edges[run[-1] + 1]), float(w[run].mean())))
            run = []
        if k_side is not None:
            run.append(k)
        side = k_side
    return out
