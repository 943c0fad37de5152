"""Statistical report over an experiment folder written by ``runner`` (or any folder of
``runs/LABEL/seedS`` run folders in the DESIGN.md layout).

Writes ``EXP/report.md`` and, under ``EXP/report/``: ``per_seed.csv``, ``summary.csv``,
``paired.csv``, ``loss_vs_logsnr.csv`` and the figures ``metric_vs_step.png``,
``paired_diff_vs_step.png``, ``loss_vs_logsnr.png``, ``variance_heatmap.png``,
``vaw_weights.png`` (each only when there are data for it).
"""
from __future__ import annotations

import csv
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import stats as st

METRIC_PREFERENCE = ("fid", "fd_digits")
METRIC_TEXT = {
    "fid": "FID",
    "fd_digits": "digits FD",
    "loss": "training loss",
}
QUANTILE_BINS = 30


@dataclass
class Run:
    label: str
    method: str
    seed: int
    path: Path
    done: bool
    records: List[Dict]
    config: Dict = field(default_factory=dict)
    binstats: Optional[Dict[str, np.ndarray]] = None
    persample: Optional[Dict[str, np.ndarray]] = None

    def series(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
        rows = [(r["step"], r[key]) for r in self.records
                if key in r and "step" in r and r[key] is not None and _finite(r[key])]
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        # a resumed run may log a step twice: keep the last
        d = {}
        for s, v in rows:
            d[int(s)] = float(v)
        steps = np.array(sorted(d), dtype=np.int64)
        return steps, np.array([d[s] for s in steps])

    def final(self, key: str) -> Optional[Tuple[int, float]]:
        s, v = self.series(key)
        return (int(s[-1]), float(v[-1])) if s.size else None

    def last(self, key: str) -> Optional[float]:
        for r in reversed(self.records):
            if key in r and _finite(r[key]):
                return float(r[key])
        return None


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _read_jsonl(path: Path) -> List[Dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return out


def _read_npz(path: Path) -> Optional[Dict[str, np.ndarray]]:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:
        return None


def _read_persample(run_dir: Path) -> Optional[Dict[str, np.ndarray]]:
    """Per-sample (lam, loss) pairs, if the run wrote any (``persample*.npz`` with arrays
    ``lam`` and ``loss``; several files are concatenated)."""
    lams, losses = [], []
    for p in sorted(run_dir.glob("persample*.npz")):
        d = _read_npz(p)
        if d and "lam" in d and "loss" in d:
            lams.append(np.asarray(d["lam"], dtype=np.float64).reshape(-1))
            losses.append(np.asarray(d["loss"], dtype=np.float64).reshape(-1))
    if not lams:
        return None
    return {"lam": np.concatenate(lams), "loss": np.concatenate(losses)}


def _read_json(path: Path) -> Dict:
    """A JSON object from ``path``; {} when the file is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_runs(exp: Path) -> Tuple[List[Run], Dict]:
    exp = Path(exp)
    meta = _read_json(exp / "experiment.json")
    variants = meta.get("variants", {})
    runs = []
    root = exp / "runs"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: not an experiment folder")
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        label = label_dir.name
        method = variants.get(label, {}).get("method", label.split("__")[0])
        for seed_dir in sorted(p for p in label_dir.iterdir() if p.is_dir()):
            m = re.fullmatch(r"seed(-?\d+)", seed_dir.name)
            if not m:
                continue
            cfg = _read_json(seed_dir / "config.json")
            runs.append(Run(label=label, method=method, seed=int(m.group(1)), path=seed_dir,
                            done=(seed_dir / "DONE").exists(), records=_read_jsonl(seed_dir / "metrics.jsonl"),
                            config=cfg, binstats=_read_npz(seed_dir / "binstats.npz"),
                            persample=_read_persample(seed_dir)))
    return runs, meta


def choose_metric(runs: Sequence[Run], requested: Optional[str] = None) -> str:
    if requested:
        return requested
    for key in METRIC_PREFERENCE:
        if any(r.final(key) for r in runs):
            return key
    return "loss"


def _baseline_label(label: str, baseline: str, labels: Sequence[str], meta: Dict) -> Optional[str]:
    """The baseline variant to pair ``label`` with: same method name ``baseline`` and the same
    global grid values; else the plain ``baseline`` label."""
    variants = meta.get("variants", {})
    g = variants.get(label, {}).get("global", {})
    for cand in labels:
        v = variants.get(cand, {})
        if v.get("method", cand.split("__")[0]) == baseline and v.get("global", {}) == g and not v.get("scoped"):
            return cand
    return baseline if baseline in labels else None


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path, tight: bool = True) -> bool:
    """Write a finished figure (120 dpi) and release it; True, for the plot functions to return."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
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


def plot_metric_vs_step(groups: Dict[str, List[Run]], metric: str, path: Path, metric_label: str) -> bool:
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

    Per-sample data (``persample*.npz``): 30 quantile bins of lam, pooled edges over the
    seeds, as in the paper's analysis. Otherwise the last row of ``binstats.npz`` (the run's
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
        source = f"{QUANTILE_BINS} quantile bins of per-sample losses"
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
    M, V = np.array(means), np.array(vars_)

    def agg(a):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            n = np.sum(np.isfinite(a), axis=0)
            mean = np.nanmean(a, axis=0)
            sd = np.nanstd(a, axis=0, ddof=1) if a.shape[0] > 1 else np.full(a.shape[1], np.nan)
            se = np.where(n > 1, sd / np.sqrt(np.maximum(n, 1)), np.nan)
        return mean, se, n

    mm, ms, n = agg(M)
    vm, vs, _ = agg(V)
    return {"center": centers, "mean": mm, "mean_se": ms, "var": vm, "var_se": vs, "n": n, "source": source}


def plot_loss_vs_logsnr(curves: Dict[str, Dict], path: Path) -> bool:
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
    axes[0].set_ylabel("mean unweighted per-sample loss [loss units]")
    axes[1].set_ylabel("variance of the unweighted loss [loss units^2]")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("log-SNR lambda [nats]")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Loss vs log-SNR, mean +- stderr across seeds ({src})", fontsize=9)
    return _save_figure(fig, path)


def _mean_binstat(runs: Sequence[Run], key: str) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(steps, bin_edges, (T, K) mean across seeds on the steps all seeds logged) of binstats[key]."""
    bs = [r.binstats for r in runs if r.binstats is not None and key in r.binstats and r.binstats[key].size]
    if not bs:
        return None
    common = set(bs[0]["steps"].tolist())
    for b in bs[1:]:
        common &= set(b["steps"].tolist())
    steps = np.array(sorted(common), dtype=np.int64)
    K = bs[0][key].shape[1]
    bs = [b for b in bs if b[key].shape[1] == K]
    if not steps.size:
        return None
    stack = []
    for b in bs:
        pos = {int(s): i for i, s in enumerate(b["steps"])}
        rows = np.array([b[key][pos[int(s)]] for s in steps], dtype=np.float64)
        if "count" in b and key != "count":
            cnt = np.array([b["count"][pos[int(s)]] for s in steps])
            rows = np.where(cnt >= (2 if key == "var" else 1), rows, np.nan)
        stack.append(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return steps, bs[0]["bin_edges"], np.nanmean(np.stack(stack), axis=0)


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
        x = steps.astype(np.float64)
        xe = np.concatenate([[x[0] - (x[1] - x[0] if x.size > 1 else 1) / 2],
                             (x[1:] + x[:-1]) / 2 if x.size > 1 else [],
                             [x[-1] + (x[-1] - x[-2] if x.size > 1 else 1) / 2]])
        im = ax.pcolormesh(xe, edges, z, shading="flat", vmin=vmin, vmax=vmax, cmap="viridis")
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


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def _f(x, d=4) -> str:
    if x is None or not _finite(x):
        return "n/a"
    return f"{float(x):.{d}g}"


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            w.writerow(["" if (isinstance(v, float) and not math.isfinite(v)) else v for v in r])


def build_report(exp: str, baseline: str = "uniform", metric: Optional[str] = None,
                 include_unfinished: bool = False, out: Optional[str] = None) -> Dict:
    """Write the report; returns a dict with the numbers (for tests and callers)."""
    exp = Path(exp)
    runs, meta = load_runs(exp)
    if not runs:
        raise FileNotFoundError(f"no run folders under {exp / 'runs'}")
    metric = choose_metric(runs, metric)
    metric_label = METRIC_TEXT.get(metric, metric)
    report_md = Path(out) if out else exp / "report.md"
    assets = report_md.parent / "report"
    assets.mkdir(parents=True, exist_ok=True)

    order = []
    for r in runs:
        if r.label not in order:
            order.append(r.label)
    methods_in_meta = meta.get("methods") or []
    order.sort(key=lambda lab: (0 if lab.split("__")[0] == baseline else 1,
                                methods_in_meta.index(lab.split("__")[0]) if lab.split("__")[0] in methods_in_meta
                                else len(methods_in_meta), lab))
    all_groups = {lab: [r for r in runs if r.label == lab] for lab in order}
    used = {lab: [r for r in rs if r.done or include_unfinished] for lab, rs in all_groups.items()}

    # final scores per seed
    finals: Dict[str, Dict[int, Tuple[int, float]]] = {}
    per_seed_rows = []
    for lab, rs in all_groups.items():
        finals[lab] = {}
        for r in sorted(rs, key=lambda r: r.seed):
            fv = r.final(metric)
            counted = (r.done or include_unfinished) and fv is not None
            if counted:
                finals[lab][r.seed] = fv
            per_seed_rows.append([lab, r.method, r.seed, fv[0] if fv else "", fv[1] if fv else float("nan"),
                                  "yes" if r.done else "no", "yes" if counted else "no",
                                  r.last("fd_floor") if r.last("fd_floor") is not None else float("nan"),
                                  r.last("classifier_acc") if r.last("classifier_acc") is not None else float("nan")])
    _write_csv(assets / "per_seed.csv", ["label", "method", "seed", "final_step", metric, "done", "counted",
                                         "fd_floor", "classifier_acc"], per_seed_rows)

    # final steps must agree within a comparison
    summary_rows, summary = [], {}
    for lab in order:
        vals = np.array([fv[1] for _, fv in sorted(finals[lab].items())], dtype=np.float64)
        steps = sorted({s for s, _ in finals[lab].values()})
        n = vals.size
        mean = float(vals.mean()) if n else float("nan")
        sd, lo, hi = st.bootstrap_std_ci(vals) if n >= 2 else (float("nan"),) * 3
        summary[lab] = {"n": n, "mean": mean, "std": sd, "std_ci": (lo, hi), "steps": steps}
        summary_rows.append([lab, n, mean, sd, lo, hi, ";".join(map(str, steps))])
    _write_csv(assets / "summary.csv", ["label", "n_seeds", f"mean_{metric}", f"std_{metric}",
                                        "std_boot95_lo", "std_boot95_hi", "final_steps"], summary_rows)

    # paired comparisons
    labels = list(order)
    pairs: Dict[str, str] = {}
    paired: Dict[str, st.PairedResult] = {}
    paired_rows = []
    for lab in labels:
        base = _baseline_label(lab, baseline, labels, meta)
        if base is None or base == lab:
            continue
        pairs[lab] = base
        a = {s: v for s, (stp, v) in finals[lab].items()}
        b = {s: v for s, (stp, v) in finals[base].items()}
        # pair only seeds whose final steps agree
        a = {s: v for s, v in a.items() if s in finals[base] and finals[base][s][0] == finals[lab][s][0]}
        res = st.paired_comparison(a, b, method=lab, baseline=base)
        paired[lab] = res
        paired_rows.append([lab, base, res.n, res.mean_diff, res.ci_low, res.ci_high, res.wins, res.ties,
                            res.t_stat, res.t_p, res.wilcoxon_stat, res.wilcoxon_p,
                            " ".join(f"{s}:{d:+.4g}" for s, d in zip(res.seeds, res.diffs)),
                            st.describe_paired(res, metric_label)])
    _write_csv(assets / "paired.csv", ["label", "baseline", "n_pairs", "mean_diff", "t95_lo", "t95_hi", "wins",
                                       "ties", "t_stat", "paired_t_p", "wilcoxon_stat", "wilcoxon_p",
                                       "diffs_by_seed", "verdict"], paired_rows)

    # curves
    curves = {lab: c for lab, c in ((lab, loss_vs_logsnr(rs)) for lab, rs in used.items()) if c is not None}
    lrows = []
    for lab, c in curves.items():
        for i in range(c["center"].size):
            lrows.append([lab, c["center"][i], c["mean"][i], c["mean_se"][i], c["var"][i], c["var_se"][i],
                          int(c["n"][i])])
    _write_csv(assets / "loss_vs_logsnr.csv", ["label", "logsnr_center", "loss_mean", "loss_mean_stderr",
                                               "loss_var", "loss_var_stderr", "n_seeds"], lrows)

    figs = {}
    if plot_metric_vs_step(used, metric, assets / "metric_vs_step.png", metric_label):
        figs["metric_vs_step"] = "report/metric_vs_step.png"
    if pairs and plot_paired_diff_vs_step(used, pairs, metric, assets / "paired_diff_vs_step.png", metric_label):
        figs["paired_diff_vs_step"] = "report/paired_diff_vs_step.png"
    if plot_loss_vs_logsnr(curves, assets / "loss_vs_logsnr.png"):
        figs["loss_vs_logsnr"] = "report/loss_vs_logsnr.png"
    if plot_variance_heatmap(used, assets / "variance_heatmap.png"):
        figs["variance_heatmap"] = "report/variance_heatmap.png"
    if plot_vaw_weights(used, assets / "vaw_weights.png"):
        figs["vaw_weights"] = "report/vaw_weights.png"

    # markdown
    md = _markdown(exp, runs, meta, metric, metric_label, baseline, order, summary, finals, paired, figs,
                   include_unfinished, all_groups, curves)
    report_md.write_text(md)
    return {"metric": metric, "summary": summary, "paired": {k: v.to_dict() for k, v in paired.items()},
            "figures": {k: str(report_md.parent / v) for k, v in figs.items()}, "report": str(report_md),
            "verdicts": {k: st.describe_paired(v, metric_label) for k, v in paired.items()}}


def _metric_context(runs: Sequence[Run], metric: str) -> str:
    cfg = next((r.config for r in runs if r.config), {})
    ds = cfg.get("dataset", "?")
    nfid = cfg.get("fid_samples", "?")
    if metric == "fid":
        ref = {"cifar10": "cifar10-train", "cifar100": "cifar100-train"}.get(ds, f"{ds} train")
        return (f"FID of {nfid} samples (EMA weights) against the **{ref}** split (torch-fidelity, Inception-v3 "
                f"pool3 2048-d). FID against the val/test split would differ.")
    if metric == "fd_digits":
        floors = [r.last("fd_floor") for r in runs if r.last("fd_floor") is not None]
        accs = [r.last("classifier_acc") for r in runs if r.last("classifier_acc") is not None]
        fl = f"{floors[0]:.4g}" if floors else "n/a"
        acc = f"{accs[0]:.4f}" if accs else "n/a"
        return (f"Frechet distance of {nfid} samples in the penultimate features (64-d) of a small digits "
                f"classifier (held-out test accuracy **{acc}**), against the digits train split (1347 images). "
                f"Floor: FD of the 450 held-out real test images vs the train split, **{fl}** (real data scores "
                f"about this; the finite-sample bias differs with the number of samples, and the diffusion "
                f"models train on all 1797 digits).")
    if metric == "loss":
        return ("No run logged FID or digits FD; the score is the last logged **unweighted** training loss "
                "(the same per-sample loss for every weighting, so comparable, but not a sample-quality "
                "measure).")
    return f"Score: `{metric}` from metrics.jsonl (lower taken as better)."


def _markdown(exp, runs, meta, metric, metric_label, baseline, order, summary, finals, paired, figs,
              include_unfinished, all_groups, curves) -> str:
    L: List[str] = []
    L.append(f"# Experiment report: `{exp.name}`\n")
    cfg = next((r.config for r in runs if r.config), {})
    unfinished = [r for r in runs if not r.done]
    L.append(f"- runs: {len(runs)} in {len(order)} variant(s); unfinished (no DONE): {len(unfinished)}"
             + ("" if not unfinished else (" — included" if include_unfinished else " — excluded from the statistics")))
    if cfg:
        L.append(f"- dataset `{cfg.get('dataset', '?')}`, formulation `{cfg.get('formulation', '?')}`, preset "
                 f"`{cfg.get('preset', '') or 'none'}`, steps {cfg.get('steps', '?')}, batch {cfg.get('batch_size', '?')}")
    L.append(f"- score: **{metric_label}** (`{metric}`), lower is better. {_metric_context(runs, metric)}")
    L.append(f"- baseline for paired comparisons: `{baseline}`")
    L.append("")
    L.append(f"## Final {metric_label}: mean ± std across seeds\n")
    digits = metric == "fd_digits"
    extra_h = " FD floor (real test vs train) | classifier test acc |" if digits else ""
    L.append("| variant | n seeds | mean | std | std bootstrap 95% CI | final step(s) |" + extra_h)
    L.append("|---|---|---|---|---|---|" + ("---|---|" if digits else ""))
    for lab in order:
        s = summary[lab]
        extra = ""
        if digits:
            fl = [r.last("fd_floor") for r in all_groups[lab] if r.last("fd_floor") is not None]
            ac = [r.last("classifier_acc") for r in all_groups[lab] if r.last("classifier_acc") is not None]
            extra = f" {_f(fl[0]) if fl else 'n/a'} | {_f(ac[0]) if ac else 'n/a'} |"
        L.append(f"| {lab} | {s['n']} | {_f(s['mean'])} | {_f(s['std'])} | "
                 f"{_f(s['std_ci'][0])} to {_f(s['std_ci'][1])} | {', '.join(map(str, s['steps'])) or '-'} |" + extra)
    L.append("")
    seeds = sorted({r.seed for r in runs})
    L.append(f"## Per-seed final {metric_label}\n")
    L.append("| seed | " + " | ".join(order) + " |")
    L.append("|---|" + "---|" * len(order))
    for sd in seeds:
        cells = []
        for lab in order:
            v = finals[lab].get(sd)
            run = next((r for r in all_groups[lab] if r.seed == sd), None)
            if v is not None:
                cells.append(_f(v[1]))
            elif run is not None and not run.done:
                fv = run.final(metric)
                cells.append(f"({_f(fv[1]) if fv else '-'}, unfinished)")
            else:
                cells.append("-")
        L.append(f"| {sd} | " + " | ".join(cells) + " |")
    L.append("")
    if paired:
        L.append(f"## Paired comparison with `{baseline}` (difference = variant − baseline, per seed)\n")
        L.append("| variant | n | per-seed differences | mean diff | 95% t CI | wins (lower) | paired t p | Wilcoxon p |")
        L.append("|---|---|---|---|---|---|---|---|")
        for lab, res in paired.items():
            diffs = ", ".join(f"s{s}: {d:+.3g}" for s, d in zip(res.seeds, res.diffs)) or "-"
            L.append(f"| {lab} | {res.n} | {diffs} | {_f(res.mean_diff)} | {_f(res.ci_low)} to {_f(res.ci_high)} | "
                     f"{res.wins}/{res.n} | {_f(res.t_p, 2)} | {_f(res.wilcoxon_p, 2)} |")
        L.append("")
        L.append("**Verdicts** (a variant is called better or worse only when the 95% t interval of the mean "
                 "paired difference excludes 0):\n")
        for lab, res in paired.items():
            L.append(f"- {st.describe_paired(res, metric_label)}")
        L.append("")
    L.append("## Spread across seeds\n")
    for lab in order:
        x = [v for _, (_, v) in sorted(finals[lab].items())]
        base = _baseline_label(lab, baseline, order, meta)
        y = None
        if base and base != lab:
            common = sorted(set(finals[lab]) & set(finals[base]))
            x = [finals[lab][s][1] for s in common]
            y = [finals[base][s][1] for s in common]
        L.append(f"- {st.describe_spread(lab, x, base if y is not None else None, y, metric_label)}")
    L.append("")
    L.append("## Figures\n")
    captions = {
        "metric_vs_step": f"{metric_label} vs training step (mean across seeds, band ±1 std).",
        "paired_diff_vs_step": "Paired difference to the baseline vs step: thin lines per seed, thick the mean, "
                               "band its 95% t CI.",
        "loss_vs_logsnr": "Mean (left) and variance (right, log scale) of the unweighted per-sample loss by "
                          "log-SNR bin, mean ± stderr across seeds"
                          + (f" — {next(iter(curves.values()))['source']}." if curves else "."),
        "variance_heatmap": "Per-bin loss variance (colour, log10) by log-SNR bin and training step, per variant.",
        "vaw_weights": "VAW weight table vs log-SNR at several steps (runs that use VAW).",
    }
    if not figs:
        L.append("(no figure: the runs logged no usable series)")
    for key, path in figs.items():
        L.append(f"![{key}]({path})\n\n{captions[key]}\n")
    L.append("## Methods\n")
    L.append("- Paired by seed (same seed = same data order, initialisation and noise streams).")
    L.append("- Mean paired difference with a two-sided 95% **Student t** interval "
             "(mean ± t₀.₉₇₅,ₙ₋₁·sd/√n).")
    L.append("- Tests: **paired t-test** (`scipy.stats.ttest_rel`, two-sided) and **Wilcoxon signed-rank** "
             "(`scipy.stats.wilcoxon`, two-sided, zero differences dropped). With few seeds both have little "
             "power; the Wilcoxon test cannot go below p = 0.0625 with 5 seeds.")
    L.append(f"- Spread: std across seeds (ddof = 1) with a percentile bootstrap 95% CI "
             f"({st.BOOTSTRAP_RESAMPLES} resamples of the seeds, numpy seed {st.BOOTSTRAP_SEED}); the spread "
             f"difference to the baseline uses a paired bootstrap of the std difference.")
    L.append("- CSV: `report/per_seed.csv`, `report/summary.csv`, `report/paired.csv`, `report/loss_vs_logsnr.csv`.")
    return "\n".join(L) + "\n"
