"""Statistical report over an experiment folder written by ``runner`` (or any folder of
``runs/LABEL/seedS`` run folders in the DESIGN.md layout).

Writes ``EXP/report.md`` and, under ``EXP/report/``: ``per_seed.csv``, ``summary.csv``,
``paired.csv``, ``loss_vs_logsnr.csv``, ``efficiency_per_seed.csv``, ``efficiency_paired.csv``,
``why_bins.csv``, ``why_ess.csv`` and the figures ``metric_vs_step.png``,
``paired_diff_vs_step.png``, ``loss_vs_logsnr.png``, ``variance_heatmap.png``,
``vaw_weights.png``, ``why_best_worst.png`` (each only when there are data for it). The
sample-efficiency and look-at-why sections come from ``dynamics``, the figures from ``figures``;
with ``paper_analysis`` also the paper's variance analysis (``variance``): ``variance_paper.csv``
and ``variance_comparison.png``. The runs are read by ``runs.load_runs``.

One invocation's files, never two: everything under ``report/`` is written into a fresh
temporary folder beside it, and then ``report.md`` is removed, the folder swapped in (renames)
and the new ``report.md`` written. A kill at any point leaves the previous report, the new one,
or no ``report.md`` (run ``report`` again); leftover temporary folders go on the next run.
"""
from __future__ import annotations

import csv
import io
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..training.checkpoint import TEMP_PREFIX, WriteError, atomic_write_bytes, write_reason
from ..training.run_index import write_run_index
from . import dynamics as dyn
from . import stats as st
from .figures import (loss_vs_logsnr, plot_loss_vs_logsnr, plot_metric_vs_step, plot_paired_diff_vs_step,
                      plot_variance_heatmap, plot_vaw_weights, plot_why, weight_diagnostics)
from .runs import Run, load_runs, real_folder, settings_text
from .stats import fmt
from .variance import CSV_HEADER as PAPER_VARIANCE_HEADER, paper_variance_analysis, paper_variance_markdown

__all__ = ["build_report", "choose_metric", "load_runs", "Run", "METRIC_PREFERENCE", "METRIC_TEXT"]

METRIC_PREFERENCE = ("fid", "fd_digits")
METRIC_TEXT = {
    "fid": "FID",
    "fd_digits": "digits FD",
    "loss": "training loss",
}
STAGING_PREFIX = f"{TEMP_PREFIX}report-"  # + pid-hex: a report being written (or left by a kill)


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


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    for r in rows:
        w.writerow(["" if (isinstance(v, float) and not math.isfinite(v)) else v for v in r])
    atomic_write_bytes(path, text.getvalue().encode())


# ---------------------------------------------------------------------------------------------
# where the report goes, and swapping it in
# ---------------------------------------------------------------------------------------------
def _report_paths(exp: Path, out: Optional[str]) -> Tuple[Path, Path]:
    """(report.md, its report/ folder), refused before anything is written when they are not a
    file path and a real folder."""
    report_md = Path(out) if out else exp / "report.md"
    if report_md.is_dir():
        raise ValueError(f"{'--out ' if out else ''}{report_md} is a folder; the report is a file "
                         f"(e.g. {report_md / 'report.md'})")
    assets = report_md.parent / "report"
    real_folder(assets, "the report's folder")
    if assets.exists() and not assets.is_dir():
        raise ValueError(f"{assets} is not a folder; move it away to write the report")
    return report_md, assets


def _remove_stale_staging(folder: Path) -> None:
    """Temporary report folders whose writer is gone (a kill mid-report)."""
    for path in folder.glob(STAGING_PREFIX + "*"):
        pid = path.name[len(STAGING_PREFIX):].split("-")[0]
        if not pid.isdigit() or path.is_symlink() or not path.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            if int(pid) != os.getpid():
                continue  # a report being written now
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(path, ignore_errors=True)


def _staging_folder(assets: Path) -> Path:
    assets.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(assets.parent)
    staging = assets.parent / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def _publish(staging: Path, assets: Path, report_md: Path, markdown: str) -> None:
    """Swap the finished ``staging`` folder in as ``assets`` and write ``report_md``: report.md
    goes first and comes back last, so it never describes files of another invocation."""
    retired = assets.parent / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if os.path.lexists(report_md):
            os.unlink(report_md)
        if os.path.lexists(assets):
            os.rename(assets, retired)
        os.rename(staging, assets)
    except OSError as exc:
        raise WriteError(str(assets), write_reason(exc)) from None
    atomic_write_bytes(report_md, markdown.encode())
    shutil.rmtree(retired, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the report's steps
# ---------------------------------------------------------------------------------------------
@dataclass
class ReportData:
    """What the markdown is made of: the runs, the numbers and the sections already written."""
    exp: Path
    runs: List[Run]
    meta: Dict
    metric: str
    metric_label: str
    baseline: str
    order: List[str]
    all_groups: Dict[str, List[Run]]
    include_unfinished: bool
    summary: Dict[str, Dict]
    finals: Dict[str, Dict[int, Tuple[int, float]]]
    paired: Dict[str, st.PairedResult]
    figs: Dict[str, str]
    curves: Dict[str, Dict]
    efficiency_section: List[str]
    why_section: List[str]
    paper_section: List[str]


def _variant_order(runs: Sequence[Run], meta: Dict, baseline: str) -> List[str]:
    """Labels: the baseline first, then in the order the methods were given, then by name."""
    order = list(dict.fromkeys(r.label for r in runs))
    given = meta.get("methods") or []

    def key(lab: str):
        method = lab.split("__")[0]
        return 0 if method == baseline else 1, given.index(method) if method in given else len(given), lab
    return sorted(order, key=key)


def _check_settings(used: Dict[str, List[Run]]) -> None:
    """Runs of one label that finished with other pass-through flags (or preset) are not one
    variant: refuse to pool them."""
    for lab, rs in used.items():
        seen: Dict[str, List[int]] = {}
        for r in rs:
            if r.settings is not None:
                seen.setdefault(settings_text(r.settings), []).append(r.seed)
        if len(seen) > 1:
            groups = "; ".join(f"seeds {', '.join(map(str, seeds))} with {text}" for text, seeds in seen.items())
            raise ValueError(f"runs/{lab}: its runs finished with different settings ({groups}); they would pool "
                             "under one label: run them again with one set of flags or report on another folder")


def _final_scores(all_groups: Dict[str, List[Run]], metric: str, include_unfinished: bool):
    """Each label's counted final score per seed, and the per_seed.csv rows."""
    finals: Dict[str, Dict[int, Tuple[int, float]]] = {}
    rows = []
    for lab, rs in all_groups.items():
        finals[lab] = {}
        for r in sorted(rs, key=lambda r: r.seed):
            fv = r.final(metric)
            counted = (r.done or include_unfinished) and fv is not None
            if counted:
                finals[lab][r.seed] = fv
            rows.append([lab, r.method, r.seed, fv[0] if fv else "", fv[1] if fv else float("nan"),
                         "yes" if r.done else "no", "yes" if counted else "no",
                         r.last("fd_floor") if r.last("fd_floor") is not None else float("nan"),
                         r.last("classifier_acc") if r.last("classifier_acc") is not None else float("nan")])
    return finals, rows


def _summary(order: Sequence[str], finals: Dict[str, Dict[int, Tuple[int, float]]]):
    """Mean, std and its bootstrap interval per label (final steps listed: they must agree)."""
    summary, rows = {}, []
    for lab in order:
        vals = np.array([fv[1] for _, fv in sorted(finals[lab].items())], dtype=np.float64)
        steps = sorted({s for s, _ in finals[lab].values()})
        n = vals.size
        mean = float(vals.mean()) if n else float("nan")
        sd, lo, hi = st.bootstrap_std_ci(vals) if n >= 2 else (float("nan"),) * 3
        summary[lab] = {"n": n, "mean": mean, "std": sd, "std_ci": (lo, hi), "steps": steps}
        rows.append([lab, n, mean, sd, lo, hi, ";".join(map(str, steps))])
    return summary, rows


def _paired(order: Sequence[str], finals, baseline: str, meta: Dict, metric_label: str):
    """Each variant against its baseline on the seeds whose final steps agree."""
    pairs: Dict[str, str] = {}
    paired: Dict[str, st.PairedResult] = {}
    rows = []
    for lab in order:
        base = _baseline_label(lab, baseline, order, meta)
        if base is None or base == lab:
            continue
        pairs[lab] = base
        a = {s: v for s, (stp, v) in finals[lab].items()
             if s in finals[base] and finals[base][s][0] == finals[lab][s][0]}
        b = {s: v for s, (stp, v) in finals[base].items()}
        res = st.paired_comparison(a, b, method=lab, baseline=base)
        paired[lab] = res
        rows.append([lab, base, res.n, res.mean_diff, res.ci_low, res.ci_high, res.wins, res.ties,
                     res.t_stat, res.t_p, res.wilcoxon_stat, res.wilcoxon_p,
                     " ".join(f"{s}:{d:+.4g}" for s, d in zip(res.seeds, res.diffs)),
                     st.describe_paired(res, metric_label)])
    return pairs, paired, rows


def _curve_rows(curves: Dict[str, Dict]) -> List[list]:
    return [[lab, c["center"][i], c["mean"][i], c["mean_se"][i], c["var"][i], c["var_se"][i], int(c["n"][i])]
            for lab, c in curves.items() for i in range(c["center"].size)]


def _figures(folder: Path, used, pairs, metric: str, metric_label: str, eff, curves) -> Dict[str, str]:
    """The figures that have data, as name -> path relative to report.md."""
    thresholds = {base: eff.threshold[base] for base in set(pairs.values()) if base in eff.threshold}
    drawn = {
        "metric_vs_step": plot_metric_vs_step(used, metric, folder / "metric_vs_step.png", metric_label, thresholds),
        "paired_diff_vs_step": bool(pairs) and plot_paired_diff_vs_step(used, pairs, metric,
                                                                        folder / "paired_diff_vs_step.png",
                                                                        metric_label),
        "loss_vs_logsnr": plot_loss_vs_logsnr(curves, folder / "loss_vs_logsnr.png"),
        "variance_heatmap": plot_variance_heatmap(used, folder / "variance_heatmap.png"),
        "vaw_weights": plot_vaw_weights(used, folder / "vaw_weights.png"),
    }
    return {name: f"report/{name}.png" for name, ok in drawn.items() if ok}


def build_report(exp: str, baseline: str = "uniform", metric: Optional[str] = None,
                 include_unfinished: bool = False, out: Optional[str] = None,
                 threshold: Optional[float] = None, paper_analysis: bool = False) -> Dict:
    """Write the report; returns a dict with the numbers (for tests and callers). ``threshold``:
    the score for steps-to-threshold (default: from each baseline, see ``dynamics``);
    ``paper_analysis``: add the paper's variance analysis (``variance``) beside ours."""
    exp = Path(exp)
    report_md, assets = _report_paths(exp, out)
    runs, meta = load_runs(exp)
    if not runs:
        raise FileNotFoundError(f"no run folders under {exp / 'runs'}")
    metric = choose_metric(runs, metric)
    metric_label = METRIC_TEXT.get(metric, metric)
    order = _variant_order(runs, meta, baseline)
    all_groups = {lab: [r for r in runs if r.label == lab] for lab in order}
    used = {lab: [r for r in rs if r.done or include_unfinished] for lab, rs in all_groups.items()}
    _check_settings(used)
    staging = _staging_folder(assets)
    try:
        finals, per_seed_rows = _final_scores(all_groups, metric, include_unfinished)
        _write_csv(staging / "per_seed.csv", ["label", "method", "seed", "final_step", metric, "done", "counted",
                                              "fd_floor", "classifier_acc"], per_seed_rows)
        summary, summary_rows = _summary(order, finals)
        _write_csv(staging / "summary.csv", ["label", "n_seeds", f"mean_{metric}", f"std_{metric}", "std_boot95_lo",
                                             "std_boot95_hi", "final_steps"], summary_rows)
        pairs, paired, paired_rows = _paired(order, finals, baseline, meta, metric_label)
        _write_csv(staging / "paired.csv", ["label", "baseline", "n_pairs", "mean_diff", "t95_lo", "t95_hi", "wins",
                                            "ties", "t_stat", "paired_t_p", "wilcoxon_stat", "wilcoxon_p",
                                            "diffs_by_seed", "verdict"], paired_rows)

        # sample efficiency and the look at why (issue 17)
        eff = dyn.sample_efficiency(used, pairs, metric, threshold)
        eff_seed_rows, eff_paired_rows = dyn.efficiency_csv_rows(eff)
        _write_csv(staging / "efficiency_per_seed.csv", dyn.EFFICIENCY_PER_SEED_HEADER, eff_seed_rows)
        _write_csv(staging / "efficiency_paired.csv", dyn.EFFICIENCY_PAIRED_HEADER, eff_paired_rows)
        chosen = dyn.best_and_worst(paired)
        roles = {lab: ("best and worst" if len(chosen) == 1 else role) for lab, role in zip(chosen, ("best", "worst"))}
        looks = {lab: d for lab, d in ((lab, weight_diagnostics(used[lab])) for lab in chosen) if d is not None}
        why_bins, why_ess = dyn.why_csv_rows(looks, roles)
        if looks:
            _write_csv(staging / "why_bins.csv", dyn.WHY_BINS_HEADER, why_bins)
            _write_csv(staging / "why_ess.csv", dyn.WHY_ESS_HEADER, why_ess)

        curves = {lab: c for lab, c in ((lab, loss_vs_logsnr(rs)) for lab, rs in used.items()) if c is not None}
        _write_csv(staging / "loss_vs_logsnr.csv", ["label", "logsnr_center", "loss_mean", "loss_mean_stderr",
                                                    "loss_var", "loss_var_stderr", "n_seeds"], _curve_rows(curves))
        figs = _figures(staging, used, pairs, metric, metric_label, eff, curves)
        why_figure = "report/why_best_worst.png" if plot_why(looks, staging / "why_best_worst.png") else None
        paper_curves, paper_section = {}, []
        if paper_analysis:
            paper_curves, paper_rows, drawn = paper_variance_analysis(used, staging / "variance_comparison.png")
            _write_csv(staging / "variance_paper.csv", PAPER_VARIANCE_HEADER, paper_rows)
            paper_section = paper_variance_markdown(paper_curves, "report/variance_comparison.png" if drawn else None)

        data = ReportData(
            exp=exp, runs=runs, meta=meta, metric=metric, metric_label=metric_label, baseline=baseline, order=order,
            all_groups=all_groups, include_unfinished=include_unfinished, summary=summary, finals=finals,
            paired=paired, figs=figs, curves=curves,
            efficiency_section=dyn.efficiency_markdown(eff, order, paired, {lab: s["mean"] for lab, s in summary.items()},
                                                       metric_label),
            why_section=dyn.why_markdown(looks, roles, paired, metric_label, why_figure), paper_section=paper_section)
        _publish(staging, assets, report_md, _markdown(data))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless this call failed
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


def _markdown(d: ReportData) -> str:
    return "\n".join(_header(d) + _final_tables(d) + _paired_section(d) + d.efficiency_section + _spread_section(d)
                     + d.why_section + d.paper_section + _figures_section(d) + _methods_section()) + "\n"


def _header(d: ReportData) -> List[str]:
    L = [f"# Experiment report: `{d.exp.name}`\n"]
    cfg = next((r.config for r in d.runs if r.config), {})
    unfinished = [r for r in d.runs if not r.done]
    L.append(f"- runs: {len(d.runs)} in {len(d.order)} variant(s); unfinished (no DONE): {len(unfinished)}"
             + ("" if not unfinished else (" — included" if d.include_unfinished
                                           else " — excluded from the statistics")))
    if cfg:
        L.append(f"- dataset `{cfg.get('dataset', '?')}`, formulation `{cfg.get('formulation', '?')}`, preset "
                 f"`{cfg.get('preset', '') or 'none'}`, steps {cfg.get('steps', '?')}, batch {cfg.get('batch_size', '?')}")
    L.append(f"- score: **{d.metric_label}** (`{d.metric}`), lower is better. {_metric_context(d.runs, d.metric)}")
    L.append(f"- baseline for paired comparisons: `{d.baseline}`")
    L.append("")
    return L


def _final_tables(d: ReportData) -> List[str]:
    L = [f"## Final {d.metric_label}: mean ± std across seeds\n"]
    digits = d.metric == "fd_digits"
    extra_h = " FD floor (real test vs train) | classifier test acc |" if digits else ""
    L.append("| variant | n seeds | mean | std | std bootstrap 95% CI | final step(s) |" + extra_h)
    L.append("|---|---|---|---|---|---|" + ("---|---|" if digits else ""))
    for lab in d.order:
        s = d.summary[lab]
        extra = ""
        if digits:
            fl = [r.last("fd_floor") for r in d.all_groups[lab] if r.last("fd_floor") is not None]
            ac = [r.last("classifier_acc") for r in d.all_groups[lab] if r.last("classifier_acc") is not None]
            extra = f" {fmt(fl[0]) if fl else 'n/a'} | {fmt(ac[0]) if ac else 'n/a'} |"
        L.append(f"| {lab} | {s['n']} | {fmt(s['mean'])} | {fmt(s['std'])} | "
                 f"{fmt(s['std_ci'][0])} to {fmt(s['std_ci'][1])} | {', '.join(map(str, s['steps'])) or '-'} |" + extra)
    L.append("")
    L.append(f"## Per-seed final {d.metric_label}\n")
    L.append("| seed | " + " | ".join(d.order) + " |")
    L.append("|---|" + "---|" * len(d.order))
    for sd in sorted({r.seed for r in d.runs}):
        cells = []
        for lab in d.order:
            v = d.finals[lab].get(sd)
            run = next((r for r in d.all_groups[lab] if r.seed == sd), None)
            if v is not None:
                cells.append(fmt(v[1]))
            elif run is not None and not run.done:
                fv = run.final(d.metric)
                cells.append(f"({fmt(fv[1]) if fv else '-'}, unfinished)")
            else:
                cells.append("-")
        L.append(f"| {sd} | " + " | ".join(cells) + " |")
    L.append("")
    return L


def _paired_section(d: ReportData) -> List[str]:
    if not d.paired:
        return []
    L = [f"## Paired comparison with `{d.baseline}` (difference = variant − baseline, per seed)\n",
         "| variant | n | per-seed differences | mean diff | 95% t CI | wins (lower) | paired t p | Wilcoxon p |",
         "|---|---|---|---|---|---|---|---|"]
    for lab, res in d.paired.items():
        diffs = ", ".join(f"s{s}: {x:+.3g}" for s, x in zip(res.seeds, res.diffs)) or "-"
        L.append(f"| {lab} | {res.n} | {diffs} | {fmt(res.mean_diff)} | {fmt(res.ci_low)} to {fmt(res.ci_high)} | "
                 f"{res.wins}/{res.n} | {fmt(res.t_p, 2)} | {fmt(res.wilcoxon_p, 2)} |")
    L.append("")
    L.append("**Verdicts** (a variant is called better or worse only when the 95% t interval of the mean "
             "paired difference excludes 0):\n")
    L += [f"- {st.describe_paired(res, d.metric_label)}" for res in d.paired.values()]
    L.append("")
    return L


def _spread_section(d: ReportData) -> List[str]:
    L = ["## Spread across seeds\n"]
    for lab in d.order:
        x = [v for _, (_, v) in sorted(d.finals[lab].items())]
        base = _baseline_label(lab, d.baseline, d.order, d.meta)
        y = None
        if base and base != lab:
            common = sorted(set(d.finals[lab]) & set(d.finals[base]))
            x = [d.finals[lab][s][1] for s in common]
            y = [d.finals[base][s][1] for s in common]
        L.append(f"- {st.describe_spread(lab, x, base if y is not None else None, y, d.metric_label)}")
    L.append("")
    return L


def _figures_section(d: ReportData) -> List[str]:
    L = ["## Figures\n"]
    captions = {
        "metric_vs_step": f"{d.metric_label} vs training step (mean across seeds, band ±1 std; dashed: the "
                          f"steps-to-threshold threshold).",
        "paired_diff_vs_step": "Paired difference to the baseline vs step: thin lines per seed, thick the mean, "
                               "band its 95% t CI.",
        "loss_vs_logsnr": "Mean (left) and variance (right, log scale) of the unweighted per-sample loss by "
                          "log-SNR bin, mean ± stderr across seeds"
                          + (f" — {next(iter(d.curves.values()))['source']}." if d.curves else "."),
        "variance_heatmap": "Per-bin loss variance (colour, log10) by log-SNR bin and training step, per variant.",
        "vaw_weights": "VAW weight table vs log-SNR at several steps (runs that use VAW).",
    }
    if not d.figs:
        L.append("(no figure: the runs logged no usable series)")
    for key, path in d.figs.items():
        L.append(f"![{key}]({path})\n\n{captions[key]}\n")
    return L


def _methods_section() -> List[str]:
    L = ["## Methods\n"]
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
    return L
