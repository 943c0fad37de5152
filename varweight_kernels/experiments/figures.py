"""Figures of the experiment report (``report.py`` writes the tables and calls these).

Every plot function takes the run groups (label -> runs) and a path, writes one PNG and returns
True, or returns False and writes nothing when the runs hold no data for it.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import stats as st
from ..training.checkpoint import atomic_write_bytes

if TYPE_CHECKING:
    from .runs import Run

QUANTILE_BINS = 30


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path, tight: bool = True) -> bool:
    """Write a finished figure (120 dpi) and release it; True, for the plot functions to return."""
    if tight:
        fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    atomic_write_bytes(path, png.getbuffer())
    _plt().close(fig)
    return True


def _colors(labels: Sequence[str]) -> Dict[str, object]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


def _common_series(runs: Sequence[Run], key: str) -> Tuple[np.ndarray, Dict[int, np.ndarray]]:
    """Steps present in every run's series for ``key`` and the values per seed at those steps."""
    series = {r.seed: r.series(key) for r in runs}
    series = {s: v for s, v in series.items() if v[0].size}
    if not series:
        return np.zeros(0, dtype=np.int64), {}
    common = None
    for steps, _ in series.values():
        common = set(steps.tolist()) if common is None else common & set(steps.tolist())
    steps = np.array(sorted(common), dtype=np.int64)
    vals = {}
    for s, (st_, v) in series.items():
        idx = {int(a): i for i, a in enumerate(st_)}
        vals[s] = np.array([v[idx[int(x)]] for x in steps])
    return steps, vals


def plot_metric_vs_step(groups: Dict[str, List[Run]], metric: str, path: Path, metric_label: str,
                        thresholds: Optional[Dict[str, float]] = None) -> bool:
    """Score curves per variant; ``thresholds`` (baseline label -> score) are drawn dashed."""
    plt = _plt()
    colors = _colors(list(groups))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for label, runs in groups.items():
        steps, vals = _common_series(runs, metric)
        if not steps.size:
            continue
        arr = np.stack(list(vals.values()))
        mean = arr.mean(0)
        sd = arr.std(0, ddof=1) if arr.shape[0] > 1 else np.zeros_like(mean)
        ax.plot(steps, mean, "-o", ms=3, color=colors[label], label=f"{label} (n={arr.shape[0]})")
        ax.fill_between(steps, mean - sd, mean + sd, color=colors[label], alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    for base, value in (thresholds or {}).items():
        ax.axhline(value, color=colors.get(base, "k"), linestyle="--", linewidth=0.9,
                   label=f"steps-to-threshold threshold (from {base})")
    ax.set_xlabel("training step [optimizer steps]")
    ax.set_ylabel(f"{metric_label} [unitless; lower is better]")
    ax.set_title(f"{metric_label} vs step: mean across seeds, band = +-1 std")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_paired_diff_vs_step(groups: Dict[str, List[Run]], pairs: Dict[str, str], metric: str, path: Path,
                             metric_label: str) -> bool:
    plt = _plt()
    colors = _colors(list(groups))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for label, base in pairs.items():
        s1, v1 = _common_series(groups[label], metric)
        s0, v0 = _common_series(groups[base], metric)
        steps = np.array(sorted(set(s1.tolist()) & set(s0.tolist())), dtype=np.int64)
        seeds = sorted(set(v1) & set(v0))
        if not steps.size or not seeds:
            continue
        i1 = [list(s1).index(x) for x in steps]
        i0 = [list(s0).index(x) for x in steps]
        diffs = np.stack([v1[s][i1] - v0[s][i0] for s in seeds])
        for row in diffs:
            ax.plot(steps, row, "-", color=colors[label], alpha=0.25, linewidth=0.8)
        mean = diffs.mean(0)
        ax.plot(steps, mean, "-o", ms=3, color=colors[label], label=f"{label} - {base} (n={len(seeds)})")
        if len(seeds) > 1:
            ci = np.array([st.t_confidence_interval(diffs[:, j])[1:] for j in range(steps.size)])
            ax.fill_between(steps, ci[:, 0], ci[:, 1], color=colors[label], alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.set_xlabel("training step [optimizer steps]")
    ax.set_ylabel(f"paired {metric_label} difference vs baseline [unitless; < 0 = better]")
    ax.set_title("Per-seed paired differences (thin), mean with 95% t CI (band)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def loss_vs_logsnr(runs: Sequence[Run]) -> Optional[Dict[str, np.ndarray]]:
    """Per-bin mean and variance of the unweighted loss, mean +- stderr across seeds.

    Per-sample data (``persample*.npz``): the EMA model's unweighted losses in 30 quantile bins
    of lam with edges pooled over the seeds (every seed's bin k covers the same lam range) and
    the unbiased variance (ddof 1); ``variance.py`` has the paper's variant. Otherwise the last row of ``binstats.npz`` (the run's
    EMA bins; bins with no samples are left out)."""
    ps = [r for r in runs if r.persample is not None and r.persample["lam"].size >= QUANTILE_BINS]
    if ps:
        all_lam = np.concatenate([r.persample["lam"] for r in ps])
        edges = np.unique(np.quantile(all_lam, np.linspace(0, 1, QUANTILE_BINS + 1)))
        nb = edges.size - 1
        means, vars_ = [], []
        for r in ps:
            idx = np.clip(np.searchsorted(edges, r.persample["lam"], side="right") - 1, 0, nb - 1)
            m = np.full(nb, np.nan)
            v = np.full(nb, np.nan)
            for k in range(nb):
                x = r.persample["loss"][idx == k]
                x = x[np.isfinite(x)]
                if x.size:
                    m[k] = x.mean()
                    v[k] = x.var(ddof=1) if x.size > 1 else np.nan
            means.append(m)
            vars_.append(v)
        centers = 0.5 * (edges[1:] + edges[:-1])
        source = f"EMA model, {QUANTILE_BINS} quantile bins of lam pooled over seeds, ddof 1"
    else:
        bs = [r for r in runs if r.binstats is not None and "mean" in r.binstats and r.binstats["mean"].shape[0]]
        if not bs:
            return None
        edges = bs[0].binstats["bin_edges"]
        centers = 0.5 * (edges[1:] + edges[:-1])
        means, vars_ = [], []
        for r in bs:
            if r.binstats["mean"].shape[1] != centers.size:
                continue
            cnt = r.binstats["count"][-1]
            means.append(np.where(cnt > 0, r.binstats["mean"][-1], np.nan))
            vars_.append(np.where(cnt >= 2, r.binstats["var"][-1], np.nan))  # a variance needs 2 samples
        source = "binstats.npz (EMA statistics of the last logged step, fixed log-SNR bins)"
    mm, ms, n = across_seeds(np.array(means))
    vm, vs, _ = across_seeds(np.array(vars_))
    return {"center": centers, "mean": mm, "mean_se": ms, "var": vm, "var_se": vs, "n": n, "source": source}


def across_seeds(a: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of a (seeds, bins) array: the mean over the finite entries, its standard error
    (sample std, ddof 1, over sqrt(n); NaN below 2 seeds) and n."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        n = np.sum(np.isfinite(a), axis=0)
        mean = np.nanmean(a, axis=0)
        sd = np.nanstd(a, axis=0, ddof=1) if a.shape[0] > 1 else np.full(a.shape[1], np.nan)
        se = np.where(n > 1, sd / np.sqrt(np.maximum(n, 1)), np.nan)
    return mean, se, n


def plot_loss_vs_logsnr(curves: Dict[str, Dict], path: Path, xlabel: str = "log-SNR lambda [nats]",
                        loss_name: str = "the unweighted loss", title: str = "Loss vs log-SNR") -> bool:
    if not curves:
        return False
    plt = _plt()
    colors = _colors(list(curves))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, c in curves.items():
        for ax, key in ((axes[0], "mean"), (axes[1], "var")):
            y, se = c[key], c[key + "_se"]
            ok = np.isfinite(y)
            ax.plot(c["center"][ok], y[ok], "-o", ms=2.5, color=colors[label], label=label)
            band = ok & np.isfinite(se)
            if band.any():
                lower = y - se if key == "mean" else np.maximum(y - se, 0.1 * y)  # log axis: clip at y/10
                ax.fill_between(c["center"][band], lower[band], (y + se)[band], color=colors[label], alpha=0.2,
                                linewidth=0)
    src = next(iter(curves.values()))["source"]
    axes[0].set_ylabel(f"mean of {loss_name} [loss units]")
    axes[1].set_ylabel(f"variance of {loss_name} [loss units^2]")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}, mean +- stderr across seeds ({src})", fontsize=9)
    return _save_figure(fig, path)


def _binstat_stack(runs: Sequence[Run], keys: Sequence[str]
                   ) -> Optional[Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]]:
    """(steps, bin_edges, key -> (S, T, K) array) of binstats ``keys``, stacked over the runs
    that logged all of them with the same bins, on the steps every such run logged."""
    bs = [r.binstats for r in runs
          if r.binstats is not None and all(k in r.binstats and r.binstats[k].size for k in keys)]
    if not bs:
        return None
    K = bs[0][keys[0]].shape[1]
    bs = [b for b in bs if all(b[k].shape[1] == K for k in keys)]
    common = set(bs[0]["steps"].tolist())
    for b in bs[1:]:
        common &= set(b["steps"].tolist())
    steps = np.array(sorted(common), dtype=np.int64)
    if not steps.size:
        return None
    rows = [[{int(s): i for i, s in enumerate(b["steps"])}[int(s)] for s in steps] for b in bs]
    stacks = {k: np.stack([np.asarray(b[k], dtype=np.float64)[r] for b, r in zip(bs, rows)]) for k in keys}
    return steps, bs[0]["bin_edges"], stacks


def _mean_binstat(runs: Sequence[Run], key: str) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(steps, bin_edges, (T, K) mean across seeds on the steps all seeds logged) of binstats[key];
    a bin's variance needs 2 samples, its mean or weight 1 (else it is left out)."""
    got = _binstat_stack(runs, [key, "count"] if key != "count" else ["count"])
    if got is None:
        return None
    steps, edges, stacks = got
    values = stacks[key]
    if key != "count":
        values = np.where(stacks["count"] >= (2 if key == "var" else 1), values, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return steps, edges, np.nanmean(values, axis=0)


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges half way between logged steps, for a (bins x steps) heatmap."""
    x = steps.astype(np.float64)
    if x.size == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (x[1] - x[0]) / 2], mid, [x[-1] + (x[-1] - x[-2]) / 2]])


def plot_variance_heatmap(groups: Dict[str, List[Run]], path: Path) -> bool:
    data = {lab: _mean_binstat(runs, "var") for lab, runs in groups.items()}
    data = {k: v for k, v in data.items() if v is not None}
    if not data:
        return False
    plt = _plt()
    vals = np.concatenate([np.log10(np.clip(v[2][np.isfinite(v[2])], 1e-12, None)).ravel() for v in data.values()])
    vmin, vmax = (float(np.percentile(vals, 2)), float(np.percentile(vals, 98))) if vals.size else (0.0, 1.0)
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    n = len(data)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1.5, 4), squeeze=False, sharey=True, layout="constrained")
    im = None
    for ax, (label, (steps, edges, var)) in zip(axes[0], data.items()):
        z = np.log10(np.clip(var, 1e-12, None)).T  # (K, T)
        z = np.ma.masked_invalid(z)
        im = ax.pcolormesh(_step_edges(steps), edges, z, shading="flat", vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("training step [optimizer steps]")
    axes[0][0].set_ylabel("log-SNR lambda [nats]")
    cb = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, extend="both")
    cb.set_label("log10 loss variance [log10 loss units^2]")
    fig.suptitle("Per-bin variance of the unweighted loss over training (mean across seeds; blank: < 2 samples)",
                 fontsize=9)
    return _save_figure(fig, path, tight=False)  # this figure places its colorbar itself


def plot_vaw_weights(groups: Dict[str, List[Run]], path: Path) -> bool:
    data = {lab: _mean_binstat(runs, "weight") for lab, runs in groups.items()}
    data = {k: v for k, v in data.items() if v is not None}
    if not data:
        return False
    plt = _plt()
    n = len(data)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, (label, (steps, edges, w)) in zip(axes[0], data.items()):
        centers = 0.5 * (edges[1:] + edges[:-1])
        pick = np.unique(np.linspace(0, steps.size - 1, min(6, steps.size)).round().astype(int))
        cmap = plt.get_cmap("plasma")
        for j, i in enumerate(pick):
            ax.plot(centers, w[i], "-", color=cmap(j / max(len(pick) - 1, 1)), label=f"step {int(steps[i])}")
        ax.axhline(1.0, color="k", linewidth=0.7, linestyle=":")
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("log-SNR lambda [nats]")
        ax.set_ylabel("VAW weight w_k [x, relative to uniform]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("VAW weight table over training (mean across seeds)", fontsize=9)
    return _save_figure(fig, path)


def interval_counts(count: np.ndarray) -> np.ndarray:
    """Samples per bin in each logging interval from the cumulative counts (T, K) of binstats:
    the batch composition the weights of that interval met. A row whose difference is not a
    plain count (a resumed history can step back) falls back to the cumulative row."""
    diff = np.diff(count, axis=-2, prepend=np.zeros_like(count[..., :1, :]))
    bad = np.any(diff < 0, axis=-1, keepdims=True) | (diff.sum(-1, keepdims=True) <= 0)
    return np.where(bad, count, diff)


def weight_diagnostics(runs: Sequence[Run]) -> Optional[Dict[str, np.ndarray]]:
    """What a variant's weighting does per log-SNR bin, from binstats (mean across seeds on the
    steps all seeds logged): ``var`` before and ``weighted_var`` (w^2 var) after weighting,
    ``weight`` (T, K), the effective sample fraction ``ess`` (T,) per seed ``ess_seeds`` (S, T),
    each bin's ``sample_share`` and ``weight_share`` of the batch over the whole run, and
    ``mean_weight`` (K,) over training. Without a logged weight table only ``var`` is there."""
    has_weight = any(r.binstats is not None and "weight" in r.binstats for r in runs)
    got = _binstat_stack(runs, ["var", "count", "weight"] if has_weight else ["var", "count"])
    if got is None:
        return None
    steps, edges, b = got
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        var = np.where(b["count"] >= 2, b["var"], np.nan)
        out = {"steps": steps, "bin_edges": edges, "n_seeds": np.array(b["var"].shape[0]),
               "var": np.nanmean(var, axis=0), "used": b["count"][:, -1].sum(0) > 0}
        if not has_weight:
            return out
        w = b["weight"]
        share = b["count"][:, -1] / b["count"][:, -1].sum(-1, keepdims=True)  # (S, K) over the run
        ess = st.effective_sample_fraction(interval_counts(b["count"]), w)
        out.update(weight=np.nanmean(np.where(b["count"] >= 1, w, np.nan), axis=0),
                   weighted_var=np.nanmean(w * w * var, axis=0), ess_seeds=ess, ess=ess.mean(0),
                   sample_share=share.mean(0), mean_weight=w.mean(axis=(0, 1)),
                   weight_share=(share * w[:, -1] / (share * w[:, -1]).sum(-1, keepdims=True)).mean(0))
    return out


def plot_why(diagnostics: Dict[str, Dict[str, np.ndarray]], path: Path) -> bool:
    """One row per variant: its weight table over training (bins x steps), the per-bin variance
    before and after weighting at the last logged step, and the effective sample fraction."""
    if not diagnostics:
        return False
    plt = _plt()
    n = len(diagnostics)
    fig, axes = plt.subplots(n, 3, figsize=(15, 3.8 * n), squeeze=False, layout="constrained")
    for row, (label, d) in zip(axes, diagnostics.items()):
        edges, steps = d["bin_edges"], d["steps"]
        centers = 0.5 * (edges[1:] + edges[:-1])
        if "weight" in d:
            z = np.ma.masked_invalid(np.log2(np.clip(d["weight"], 1e-6, None)).T)
            lim = max(float(np.nanmax(np.abs(z))) if z.count() else 0.0, 0.1)
            im = row[0].pcolormesh(_step_edges(steps), edges, z, shading="flat", cmap="RdBu_r", vmin=-lim, vmax=lim)
            fig.colorbar(im, ax=row[0]).set_label("log2 weight [0 = uniform]")
            row[0].set_xlabel("training step [optimizer steps]")
            row[0].set_ylabel("log-SNR lambda [nats]")
        else:
            row[0].text(0.5, 0.5, "no weight table logged\n(only VAW runs log one)", ha="center", va="center",
                        transform=row[0].transAxes)
            row[0].set_axis_off()
        row[0].set_title(f"{label}: weight table over training", fontsize=9)
        ax = row[1]
        ax.plot(centers, d["var"][-1], "-o", ms=3, color="tab:gray", label="before: var_k")
        if "weighted_var" in d:
            ax.plot(centers, d["weighted_var"][-1], "-o", ms=3, color="tab:red", label="after: w_k^2 var_k")
        ax.set_yscale("log")
        ax.set_xlabel("log-SNR lambda [nats]")
        ax.set_ylabel("per-bin loss variance [loss units^2]")
        ax.set_title(f"{label}: variance per bin at step {int(steps[-1])}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = row[2]
        if "ess" in d:
            for seed_row in d["ess_seeds"]:
                ax.plot(steps, seed_row, "-", color="tab:blue", alpha=0.25, linewidth=0.8)
            ax.plot(steps, d["ess"], "-o", ms=3, color="tab:blue", label=f"mean of {int(d['n_seeds'])} seeds")
            ax.set_ylim(0, 1.05)
            ax.legend(fontsize=8)
        ax.set_xlabel("training step [optimizer steps]")
        ax.set_ylabel("effective sample fraction [1 = whole batch]")
        ax.set_title(f"{label}: how much of each batch the weights use", fontsize=9)
        ax.grid(alpha=0.3)
    return _save_figure(fig, path, tight=False)  # constrained layout places the colorbars
