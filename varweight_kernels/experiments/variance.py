"""The paper's variance analysis (Sun & Shi 2026, its notebook 4.3), a report option
(``report --paper-analysis``) beside our own, which stays the default.

| | the paper's (this module) | ours (``figures.loss_vs_logsnr``) |
|---|---|---|
| model | raw (non-EMA) weights at the end | EMA weights, the ones sampled from |
| loss | weighted by the run's weighting (for uniform the same as unweighted) | unweighted |
| x-axis | -2 log sigma | lam (EDM: log(sigma_data^2/sigma^2) = -2 log sigma + 2 log sigma_data) |
| bins | 30 quantile bins computed per seed | 30 quantile bins with edges pooled over seeds |
| variance | population (ddof 0) | unbiased (ddof 1) |

Ours is the default because it compares like with like: every weighting's loss is measured the
same way (a weight below 1 lowers the variance of the weighted loss by construction), on the
model that is evaluated, and a bin means the same noise range for every seed. Both aggregate
over seeds as mean +- standard error. The per-sample data are ``persample.npz`` (``sampling.py``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .figures import QUANTILE_BINS, across_seeds, plot_loss_vs_logsnr

if TYPE_CHECKING:
    from .runs import Run

PAPER_LOSS_KEY = "raw_weighted_loss"
CSV_HEADER = ["label", "bin", "minus_2_log_sigma_center", "loss_mean", "loss_mean_stderr", "loss_var",
              "loss_var_stderr", "n_seeds"]


def minus_two_log_sigma(lam: np.ndarray, config: Mapping) -> np.ndarray:
    """-2 log sigma from the trainer's lam: EDM's lam is log(sigma_data^2/sigma^2); DDPM's
    log(abar/(1-abar)) is -2 log sigma of the equivalent x0 + sigma eps process already."""
    if config.get("formulation", "edm") == "edm":
        return lam - 2.0 * math.log(float(config.get("sigma_data", 0.5)))
    return lam


def per_seed_bins(x: np.ndarray, loss: np.ndarray, bins: int = QUANTILE_BINS) -> Dict[str, np.ndarray]:
    """One seed's ``bins`` quantile bins of ``x`` (its own edges): bin centres (midpoints of the
    edges), the mean and the population variance (ddof 0) of ``loss`` per bin (NaN if empty)."""
    edges = np.quantile(x, np.linspace(0.0, 1.0, bins + 1))
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
    mean, var = np.full(bins, np.nan), np.full(bins, np.nan)
    for k in range(bins):
        v = loss[(idx == k) & np.isfinite(loss)]
        if v.size:
            mean[k], var[k] = v.mean(), v.var(ddof=0)
    return {"center": 0.5 * (edges[1:] + edges[:-1]), "mean": mean, "var": var}


def paper_variance_curve(runs: Sequence["Run"]) -> Optional[Dict[str, np.ndarray]]:
    """Per-seed binned curves of the raw model's weighted loss, then bin by bin (bin k of every
    seed: the same quantile) the mean +- stderr across seeds; None without the data."""
    per_seed = [per_seed_bins(minus_two_log_sigma(r.persample["lam"], r.config), r.persample[PAPER_LOSS_KEY])
                for r in runs if r.persample is not None and PAPER_LOSS_KEY in r.persample
                and r.persample["lam"].size >= QUANTILE_BINS]
    if not per_seed:
        return None
    mean, mean_se, n = across_seeds(np.array([c["mean"] for c in per_seed]))
    var, var_se, _ = across_seeds(np.array([c["var"] for c in per_seed]))
    return {"center": np.mean([c["center"] for c in per_seed], axis=0), "mean": mean, "mean_se": mean_se,
            "var": var, "var_se": var_se, "n": n,
            "source": f"raw model, weighted loss, {QUANTILE_BINS} quantile bins per seed, ddof 0"}


def paper_variance_analysis(used: Mapping[str, Sequence["Run"]], figure: Path):
    """The curves per label, their CSV rows, and whether the figure was written."""
    curves = {lab: c for lab, c in ((lab, paper_variance_curve(rs)) for lab, rs in used.items()) if c is not None}
    rows = [[lab, k, c["center"][k], c["mean"][k], c["mean_se"][k], c["var"][k], c["var_se"][k], int(c["n"][k])]
            for lab, c in curves.items() for k in range(c["center"].size)]
    drawn = plot_loss_vs_logsnr(curves, figure, xlabel="-2 log sigma", loss_name="the weighted loss, raw model",
                                title="Paper analysis")
    return curves, rows, drawn


def paper_variance_markdown(curves: Mapping[str, Dict], figure: Optional[str]) -> List[str]:
    """The report section: what was computed, how it differs from ours, the figure."""
    L = ["## The paper's variance analysis (`--paper-analysis`)\n"]
    if not curves:
        L.append(f"(no run has `{PAPER_LOSS_KEY}` in persample.npz: runs from before issue 15, or "
                 f"`--analysis-batches 0`)\n")
        return L
    L.append("As the paper's notebook 4.3 computes it: the **raw** (non-EMA) model's per-sample loss **weighted** by "
             "the run's weighting, 30 quantile bins of -2 log sigma computed **per seed**, population variance "
             "(ddof 0), mean ± stderr across seeds. Our analysis (the loss-vs-log-SNR figure) uses the EMA model's "
             "unweighted loss, edges pooled over seeds and ddof 1; a weight below 1 lowers the weighted loss's "
             "variance by construction, so only ours compares the weightings' effect on the same quantity.\n")
    for lab, c in curves.items():
        v = c["var"][np.isfinite(c["var"])]
        if v.size:
            L.append(f"- `{lab}`: per-bin variance {v.min():.4g} to {v.max():.4g}, mean over bins {v.mean():.4g} "
                     f"({int(c['n'].max())} seed(s))")
    L.append("")
    L.append("Per bin: `report/variance_paper.csv`.\n")
    if figure:
        L.append(f"![variance_comparison]({figure})\n")
    return L
