"""Statistical report over an experiment folder written by ``runner`` (or any folder of
``runs/LABEL/seedS`` run folders in the DESIGN.md layout).

Writes ``EXP/report.md`` and, under ``EXP/report/``: ``per_seed.csv``, ``summary.csv``,
``paired.csv``, ``loss_vs_logsnr.csv``, ``efficiency_per_seed.csv``, ``efficiency_paired.csv``,
``why_bins.csv``, ``why_ess.csv`` and the figures ``metric_vs_step.png``,
``paired_diff_vs_step.png``, ``loss_vs_logsnr.png``, ``variance_heatmap.png``,
``vaw_weights.png``, ``why_best_worst.png`` (each only when there are data for it). The
sample-efficiency and look-at-why sections come from ``dynamics``, the figures from ``figures``;
with ``paper_analysis`` also the paper's variance analysis (``variance``): ``variance_paper.csv``
and ``variance_comparison.png``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..training.checkpoint import atomic_write_bytes
from ..training.run_index import write_run_index
from . import dynamics as dyn
from . import stats as st
from .dynamics import fmt
from .figures import (loss_vs_logsnr, plot_loss_vs_logsnr, plot_metric_vs_step, plot_paired_diff_vs_step,
                      plot_variance_heatmap, plot_vaw_weights, plot_why, weight_diagnostics)
from .variance import CSV_HEADER as PAPER_VARIANCE_HEADER, paper_variance_analysis, paper_variance_markdown
from .runner import read_experiment

METRIC_PREFERENCE = ("fid", "fd_digits")
METRIC_TEXT = {
    "fid": "FID",
    "fd_digits": "digits FD",
    "loss": "training loss",
}


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
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if not isinstance(record, dict):
            raise ValueError(f"{path}: a line is not a metrics record (a JSON object): {line[:60]}")
        out.append(record)
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
    """Per-sample arrays, if the run wrote any (``persample*.npz`` with ``lam``, ``loss`` and, in
    runs since issue 15, ``weighted_loss``, ``raw_loss``, ``raw_weighted_loss``); several files
    are concatenated, keeping the arrays that every file has."""
    parts = [d for d in (_read_npz(p) for p in sorted(run_dir.glob("persample*.npz"))) if d and "lam" in d and "loss" in d]
    if not parts:
        return None
    keys = set.intersection(*(set(d) for d in parts))
    return {k: np.concatenate([np.asarray(d[k], dtype=np.float64).reshape(-1) for d in parts]) for k in sorted(keys)}


def _read_json(path: Path) -> Dict:
    """A JSON object from ``path``; {} when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_runs(exp: Path) -> Tuple[List[Run], Dict]:
    exp = Path(exp)
    meta = read_experiment(exp)
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
# the report
# ---------------------------------------------------------------------------------------------
def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    for r in rows:
        w.writerow(["" if (isinstance(v, float) and not math.isfinite(v)) else v for v in r])
    atomic_write_bytes(path, text.getvalue().encode())


def build_report(exp: str, baseline: str = "uniform", metric: Optional[str] = None,
                 include_unfinished: bool = False, out: Optional[str] = None,
                 threshold: Optional[float] = None, paper_analysis: bool = False) -> Dict:
    """Write the report; returns a dict with the numbers (for tests and callers). ``threshold``:
    the score for steps-to-threshold (default: from each baseline, see ``dynamics``);
    ``paper_analysis``: add the paper's variance analysis (``variance``) beside ours."""
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

    # sample efficiency and the look at why (issue 17)
    eff = dyn.sample_efficiency(used, pairs, metric, threshold)
    eff_seed_rows, eff_paired_rows = dyn.efficiency_csv_rows(eff)
    _write_csv(assets / "efficiency_per_seed.csv", dyn.EFFICIENCY_PER_SEED_HEADER, eff_seed_rows)
    _write_csv(assets / "efficiency_paired.csv", dyn.EFFICIENCY_PAIRED_HEADER, eff_paired_rows)
    chosen = dyn.best_and_worst(paired)
    roles = {lab: ("best and worst" if len(chosen) == 1 else role) for lab, role in zip(chosen, ("best", "worst"))}
    looks = {lab: d for lab, d in ((lab, weight_diagnostics(used[lab])) for lab in chosen) if d is not None}
    why_bins, why_ess = dyn.why_csv_rows(looks, roles)
    if looks:
        _write_csv(assets / "why_bins.csv", dyn.WHY_BINS_HEADER, why_bins)
        _write_csv(assets / "why_ess.csv", dyn.WHY_ESS_HEADER, why_ess)

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
    thresholds = {base: eff.threshold[base] for base in set(pairs.values()) if base in eff.threshold}
    if plot_metric_vs_step(used, metric, assets / "metric_vs_step.png", metric_label, thresholds):
        figs["metric_vs_step"] = "report/metric_vs_step.png"
    if pairs and plot_paired_diff_vs_step(used, pairs, metric, assets / "paired_diff_vs_step.png", metric_label):
        figs["paired_diff_vs_step"] = "report/paired_diff_vs_step.png"
    if plot_loss_vs_logsnr(curves, assets / "loss_vs_logsnr.png"):
        figs["loss_vs_logsnr"] = "report/loss_vs_logsnr.png"
    if plot_variance_heatmap(used, assets / "variance_heatmap.png"):
        figs["variance_heatmap"] = "report/variance_heatmap.png"
    if plot_vaw_weights(used, assets / "vaw_weights.png"):
        figs["vaw_weights"] = "report/vaw_weights.png"
    why_figure = "report/why_best_worst.png" if plot_why(looks, assets / "why_best_worst.png") else None
    paper_curves, paper_section = {}, []
    if paper_analysis:
        paper_curves, paper_rows, drawn = paper_variance_analysis(used, assets / "variance_comparison.png")
        _write_csv(assets / "variance_paper.csv", PAPER_VARIANCE_HEADER, paper_rows)
        paper_section = paper_variance_markdown(paper_curves, "report/variance_comparison.png" if drawn else None)

    # markdown
    md = _markdown(exp, runs, meta, metric, metric_label, baseline, order, summary, finals, paired, figs,
                   include_unfinished, all_groups, curves,
                   dyn.efficiency_markdown(eff, order, paired, {lab: s["mean"] for lab, s in summary.items()},
                                           metric_label),
                   dyn.why_markdown(looks, roles, paired, metric_label, why_figure), paper_section)
    atomic_write_bytes(report_md, md.encode())
    for r in runs:  # each run's index.md now links the report's figures
        write_run_index(str(r.path))
    return {"metric": metric, "summary": summary, "paired": {k: v.to_dict() for k, v in paired.items()},
            "figures": {k: str(report_md.parent / v) for k, v in figs.items()}, "report": str(report_md),
            "verdicts": {k: st.describe_paired(v, metric_label) for k, v in paired.items()},
            "efficiency": eff, "paper_variance": paper_curves, "why": {"roles": roles, "diagnostics": looks,
                                     "figure": str(report_md.parent / why_figure) if why_figure else None}}


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
              include_unfinished, all_groups, curves, efficiency_section, why_section, paper_section) -> str:
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
            extra = f" {fmt(fl[0]) if fl else 'n/a'} | {fmt(ac[0]) if ac else 'n/a'} |"
        L.append(f"| {lab} | {s['n']} | {fmt(s['mean'])} | {fmt(s['std'])} | "
                 f"{fmt(s['std_ci'][0])} to {fmt(s['std_ci'][1])} | {', '.join(map(str, s['steps'])) or '-'} |" + extra)
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
                cells.append(fmt(v[1]))
            elif run is not None and not run.done:
                fv = run.final(metric)
                cells.append(f"({fmt(fv[1]) if fv else '-'}, unfinished)")
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
            L.append(f"| {lab} | {res.n} | {diffs} | {fmt(res.mean_diff)} | {fmt(res.ci_low)} to {fmt(res.ci_high)} | "
                     f"{res.wins}/{res.n} | {fmt(res.t_p, 2)} | {fmt(res.wilcoxon_p, 2)} |")
        L.append("")
        L.append("**Verdicts** (a variant is called better or worse only when the 95% t interval of the mean "
                 "paired difference excludes 0):\n")
        for lab, res in paired.items():
            L.append(f"- {st.describe_paired(res, metric_label)}")
        L.append("")
    L.extend(efficiency_section)
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
    L.extend(why_section)
    L.extend(paper_section)
    L.append("## Figures\n")
    captions = {
        "metric_vs_step": f"{metric_label} vs training step (mean across seeds, band ±1 std; dashed: the "
                          f"steps-to-threshold threshold).",
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
    L.extend(dyn.EFFICIENCY_METHODS)
    L.append("- CSV: `report/per_seed.csv`, `report/summary.csv`, `report/paired.csv`, `report/loss_vs_logsnr.csv`, "
             "`report/efficiency_per_seed.csv`, `report/efficiency_paired.csv`.")
    return "\n".join(L) + "\n"
