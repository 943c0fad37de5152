"""How the runs got to their final score (issue 17), two sections of the report.

* Sample efficiency: a final score hides early-training differences, so every run's score curve
  is also summarised by its normalised AUC and by the step at which it first reaches a threshold
  taken from the baseline, both compared with the baseline seed by seed (``stats``).
* A look at why: for the best and worst variant (by the paired final-score difference) what the
  weighting did per log-SNR bin: the weight table over training, the loss variance per bin
  before and after weighting, and how much of each batch the weights use.

``report.build_report`` calls these and writes what they return.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import stats as st
from .stats import fmt

if TYPE_CHECKING:
    from .runs import Run


def _interval(r: st.PairedResult) -> str:
    return f"{fmt(r.mean_diff)} ({fmt(r.ci_low)} to {fmt(r.ci_high)})"


# ---------------------------------------------------------------------------------------------
# sample efficiency
# ---------------------------------------------------------------------------------------------
@dataclass
class SampleEfficiency:
    """Per-seed AUC and crossing step of every variant, and their paired comparisons."""
    threshold: Dict[str, float] = field(default_factory=dict)  # label -> the threshold it was measured at
    threshold_source: Dict[str, str] = field(default_factory=dict)  # baseline label -> how it was chosen
    eval_steps: Dict[str, np.ndarray] = field(default_factory=dict)
    auc: Dict[str, Dict[int, float]] = field(default_factory=dict)
    crossing: Dict[str, Dict[int, st.Crossing]] = field(default_factory=dict)
    auc_paired: Dict[str, st.PairedResult] = field(default_factory=dict)
    crossing_paired: Dict[str, st.CrossingComparison] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)


def _named(label: str, curves: Mapping[int, st.Curve]) -> Dict[str, st.Curve]:
    return {f"{label} seed {s}": c for s, c in sorted(curves.items())}


def sample_efficiency(used: Mapping[str, Sequence["Run"]], pairs: Mapping[str, str], metric: str,
                      threshold: Optional[float] = None) -> SampleEfficiency:
    """AUC and steps-to-threshold of every run's ``metric`` curve and the paired comparisons along
    ``pairs`` (variant -> baseline). The threshold is ``threshold`` if given, else per baseline
    its mean score at mid-training (:func:`stats.baseline_threshold`), used for the baseline and
    every variant paired with it. What cannot be computed (evaluation steps that differ, fewer
    than 2 evaluations) is listed in ``problems`` and left out; the rest of the report stands."""
    eff = SampleEfficiency()
    curves = {lab: {r.seed: r.series(metric) for r in rs} for lab, rs in used.items()}
    curves = {lab: {s: c for s, c in cs.items() if c[0].size} for lab, cs in curves.items()}
    base_threshold: Dict[str, float] = {}
    for base in sorted(set(pairs.values())):
        if threshold is not None:
            base_threshold[base] = threshold
            eff.threshold_source[base] = "given"
            continue
        try:
            base_threshold[base], mid = st.baseline_threshold(_named(base, curves.get(base, {})))
            eff.threshold_source[base] = (f"mean of `{base}` across its seeds at step {mid:.0f}, the middle of its "
                                          f"evaluation range, linearly interpolated")
        except ValueError as exc:
            eff.problems.append(f"no threshold from `{base}`: {exc}")
    for lab, by_seed in curves.items():
        if not by_seed:
            continue
        base = pairs.get(lab, lab)
        thr = base_threshold.get(base, threshold)
        try:
            eff.eval_steps[lab] = st.require_same_eval_steps(_named(lab, by_seed))
            eff.auc[lab] = {s: st.curve_auc(*c) for s, c in by_seed.items()}
            if thr is not None:
                eff.crossing[lab] = {s: st.steps_to_threshold(*c, thr) for s, c in by_seed.items()}
                eff.threshold[lab] = thr
        except ValueError as exc:
            eff.problems.append(f"`{lab}`: {exc}")
    for lab, base in pairs.items():
        if lab not in eff.auc or base not in eff.auc:
            continue
        seeds = sorted(set(eff.auc[lab]) & set(eff.auc[base]))
        if not seeds:
            continue  # the final-score comparison already says no seed has both
        try:
            st.require_same_eval_steps({**_named(lab, {s: curves[lab][s] for s in seeds}),
                                        **_named(base, {s: curves[base][s] for s in seeds})})
        except ValueError as exc:
            eff.problems.append(f"`{lab}` vs `{base}`: {exc}")
            continue
        eff.auc_paired[lab] = st.paired_comparison(eff.auc[lab], eff.auc[base], lab, base)
        if lab in eff.crossing and base in eff.crossing:
            eff.crossing_paired[lab] = st.paired_crossing_comparison(eff.crossing[lab], eff.crossing[base], lab, base)
    return eff


def efficiency_csv_rows(eff: SampleEfficiency) -> Tuple[List[list], List[list]]:
    """Rows of ``efficiency_per_seed.csv`` and ``efficiency_paired.csv``."""
    per_seed = []
    for lab, aucs in eff.auc.items():
        for s, auc in sorted(aucs.items()):
            c = eff.crossing.get(lab, {}).get(s)
            per_seed.append([lab, s, auc, eff.threshold.get(lab, float("nan")), c.step if c else float("nan"),
                             ("yes" if c.censored else "no") if c else ""])
    paired = []
    for lab, r in eff.auc_paired.items():
        paired.append([lab, r.baseline, "auc", r.n, r.mean_diff, r.ci_low, r.ci_high, r.wins, r.t_p, r.wilcoxon_p,
                       "", "", "", st.describe_paired(r, "AUC")])
    for lab, c in eff.crossing_paired.items():
        r = c.result
        paired.append([lab, r.baseline, "steps_to_threshold", r.n, r.mean_diff, r.ci_low, r.ci_high, r.wins, r.t_p,
                       r.wilcoxon_p, " ".join(map(str, c.method_censored)), " ".join(map(str, c.baseline_censored)),
                       " ".join(map(str, c.neither)), st.describe_crossing(c)])
    return per_seed, paired


EFFICIENCY_PER_SEED_HEADER = ["label", "seed", "auc", "threshold", "steps_to_threshold", "censored"]
EFFICIENCY_PAIRED_HEADER = ["label", "baseline", "quantity", "n_pairs", "mean_diff", "t95_lo", "t95_hi", "wins",
                            "paired_t_p", "wilcoxon_p", "censored_variant_seeds", "censored_baseline_seeds",
                            "neither_seeds", "verdict"]


def efficiency_markdown(eff: SampleEfficiency, order: Sequence[str], final_paired: Mapping[str, st.PairedResult],
                        final_mean: Mapping[str, float], metric_label: str) -> List[str]:
    """The sample-efficiency section: per variant, then paired with the baseline beside the
    final-score difference, then the verdicts and what could not be computed."""
    L = [f"## Sample efficiency: area under the {metric_label} curve and steps to a threshold\n"]
    if not eff.auc:
        L.append("(nothing to compute: no variant has a usable score curve)\n")
    for base, source in eff.threshold_source.items():
        if base in eff.threshold:
            L.append(f"- threshold for `{base}` and the variants paired with it: **{fmt(eff.threshold[base])}** "
                     f"{metric_label} ({source}).")
    L.append("")
    if eff.auc:
        L.append("| variant | n | evaluations | final mean | AUC mean ± std | steps to threshold: mean | per seed |")
        L.append("|---|---|---|---|---|---|---|")
        for lab in order:
            if lab not in eff.auc:
                continue
            aucs = np.array(list(eff.auc[lab].values()))
            sd = float(aucs.std(ddof=1)) if aucs.size > 1 else float("nan")
            steps = eff.eval_steps[lab]
            cross = eff.crossing.get(lab, {})
            censored = sum(c.censored for c in cross.values())
            mean_step = (f"{np.mean([c.step for c in cross.values()]):.0f}"
                         + (f" ({censored} censored: a lower bound)" if censored else "")) if cross else "n/a"
            per_seed = ", ".join(f"s{s}: {c.text()}" for s, c in sorted(cross.items())) or "-"
            L.append(f"| {lab} | {aucs.size} | {steps.size} (steps {steps[0]} to {steps[-1]}) | "
                     f"{fmt(final_mean.get(lab))} | {fmt(aucs.mean())} ± {fmt(sd)} | {mean_step} | {per_seed} |")
        L.append("")
    if eff.auc_paired:
        L.append("Paired with the baseline (difference = variant − baseline per seed, mean with 95% t CI; lower "
                 "is better for all three):\n")
        L.append("| variant | n | final diff | AUC diff | AUC lower on | steps-to-threshold diff | sooner on | "
                 "censored seeds (variant / baseline / neither) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for lab, r in eff.auc_paired.items():
            fin = final_paired.get(lab)
            c = eff.crossing_paired.get(lab)
            steps_cells = (f"{_interval(c.result)} | {c.result.wins}/{c.result.n} | "
                           f"{len(c.method_censored)} / {len(c.baseline_censored)} / {len(c.neither)}") if c else \
                "n/a | - | -"
            L.append(f"| {lab} | {r.n} | {_interval(fin) if fin else 'n/a'} | {_interval(r)} | {r.wins}/{r.n} | "
                     f"{steps_cells} |")
        L.append("")
        L.append("**Verdicts** (called better or worse only when the 95% t interval excludes 0):\n")
        for lab, r in eff.auc_paired.items():
            L.append(f"- AUC: {st.describe_paired(r, f'AUC of {metric_label}')}")
            if lab in eff.crossing_paired:
                L.append(f"- steps: {st.describe_crossing(eff.crossing_paired[lab])}")
        L.append("")
    for problem in eff.problems:
        L.append(f"- **not computed**: {problem}")
    if eff.problems:
        L.append("")
    return L


EFFICIENCY_METHODS = [
    "- AUC: trapezoid area under score-vs-step over a run's evaluation points, divided by (last − first "
    "evaluation step): the mean score of the curve taken as linear between evaluations, in score units. Runs "
    "compared must have the same evaluation steps; where they differ the report says which and leaves them out.",
    "- Steps to threshold: the first step at which the score is ≤ the threshold, linearly interpolated between "
    "the last evaluation above it and the first at or below it (the same linear curve the AUC integrates; finer "
    "than the evaluation spacing, so paired differences are not multiples of it). The threshold is the "
    "baseline's mean score at the middle of its evaluation range: the baseline needs about half its budget to "
    "reach it, so faster variants and ones up to about twice as slow are resolved within the run, and it sits in "
    "the early part of training where weightings act. A run that never reaches it is censored (`>last step`).",
    "- Censored runs in the paired steps statistics: when only one run of a seed pair reached the threshold, the "
    "other enters at its last evaluation step, a bound, so that difference is at least as large in magnitude as "
    "shown (the mean is pulled towards 0); pairs where neither reached it are left out.",
]


# ---------------------------------------------------------------------------------------------
# a look at why: best and worst variant
# ---------------------------------------------------------------------------------------------
def best_and_worst(paired: Mapping[str, st.PairedResult]) -> List[str]:
    """The variants with the lowest and the highest mean paired final-score difference (one label
    when only one variant is compared)."""
    ranked = sorted((r.mean_diff, lab) for lab, r in paired.items() if r.n and math.isfinite(r.mean_diff))
    return list(dict.fromkeys([ranked[0][1], ranked[-1][1]])) if ranked else []


def _lam_ranges(ranges: Sequence[Tuple[float, float, float]]) -> str:
    return " and ".join(f"[{lo:.3g}, {hi:.3g}) (mean weight {w:.2f})" for lo, hi, w in ranges)


def describe_weight_shift(label: str, d: Mapping[str, np.ndarray], final: Optional[st.PairedResult],
                          metric_label: str) -> str:
    """Whether the variant helps (by the paired final score) and which log-SNR ranges its weights
    favour: bins whose weight, averaged over the logged steps, is above or below 1."""
    if final is None or final.n < 2:
        verdict = "has too few paired seeds for a verdict"
    elif final.ci_excludes_zero:
        verdict = (f"{'helps' if final.mean_diff < 0 else 'hurts'} (final {metric_label} difference "
                   f"{_interval(final)}, 95% t CI excludes 0)")
    else:
        verdict = f"is not shown to help or hurt (final {metric_label} difference {_interval(final)}, CI contains 0)"
    if "weight" not in d:
        return (f"`{label}` {verdict}; it logged no weight table (binstats.npz has no `weight`; only VAW runs "
                f"log one), so where it puts weight is not known from the runs.")
    ranges = st.weight_ranges(d["bin_edges"], d["mean_weight"], d["used"])
    where = f"moves weight to log-SNR λ in {_lam_ranges(ranges['up'])}" if ranges["up"] else \
        f"raises no bin's weight above {1 + st.WEIGHT_TOLERANCE:g}"
    if ranges["down"]:
        where += f", away from λ in {_lam_ranges(ranges['down'])}"
    return f"`{label}` {verdict}; averaged over training it {where}."


def describe_bins(d: Mapping[str, np.ndarray]) -> List[str]:
    """The variance spread across bins before and after weighting, and the effective sample fraction."""
    last = int(d["steps"][-1])

    def spread(v: np.ndarray) -> str:
        v = v[np.isfinite(v) & (v > 0)]
        return f"{fmt(v.min(), 3)} to {fmt(v.max(), 3)} (max/min {fmt(v.max() / v.min(), 3)})" if v.size else "n/a"

    lines = [f"per-bin loss variance at step {last}: before weighting {spread(d['var'][-1])}"
             + (f", after weighting (w² var) {spread(d['weighted_var'][-1])}" if "weighted_var" in d else "")]
    if "ess" in d:
        i = int(np.nanargmin(d["ess"])) if np.isfinite(d["ess"]).any() else -1
        lines.append(f"effective sample fraction (mean of {int(d['n_seeds'])} seeds): {fmt(d['ess'][-1], 3)} at "
                     f"step {last}, lowest {fmt(d['ess'][i], 3)} at step {int(d['steps'][i])}")
        gain = d["weight_share"] - d["sample_share"]
        if not np.isfinite(gain).any():
            return lines
        k = int(np.nanargmax(gain))
        lines.append(f"at step {last} the bin λ ∈ [{d['bin_edges'][k]:.3g}, {d['bin_edges'][k + 1]:.3g}) gains the "
                     f"most: {d['sample_share'][k]:.1%} of the samples carry {d['weight_share'][k]:.1%} of the weight")
    return lines


def why_csv_rows(looks: Mapping[str, Mapping[str, np.ndarray]], roles: Mapping[str, str]
                 ) -> Tuple[List[list], List[list]]:
    """Rows of ``why_bins.csv`` (per variant and bin, at the last logged step unless said) and
    ``why_ess.csv`` (per variant and step)."""
    bins, ess = [], []
    for lab, d in looks.items():
        e = d["bin_edges"]
        for k in range(e.size - 1):
            # (T, K) histories at the last logged step, (K,) summaries as they are; NaN when not logged
            cells = [(d[key][-1, k] if d[key].ndim == 2 else d[key][k]) if key in d else float("nan")
                     for key in ("sample_share", "mean_weight", "weight", "weight_share", "var", "weighted_var")]
            bins.append([lab, roles[lab], e[k], e[k + 1], "yes" if d["used"][k] else "no", *cells])
        if "ess" in d:
            for i, step in enumerate(d["steps"]):
                col = d["ess_seeds"][:, i]
                ess.append([lab, roles[lab], int(step), d["ess"][i], np.nanmin(col), np.nanmax(col), col.size])
    return bins, ess


WHY_BINS_HEADER = ["label", "role", "bin_low", "bin_high", "sampled", "sample_share", "mean_weight_over_training",
                   "weight_last", "weight_share_last", "var_last", "weighted_var_last"]
WHY_ESS_HEADER = ["label", "role", "step", "ess_fraction_mean", "ess_fraction_min_seed", "ess_fraction_max_seed",
                  "n_seeds"]


def why_markdown(looks: Mapping[str, Mapping[str, np.ndarray]], roles: Mapping[str, str],
                 final_paired: Mapping[str, st.PairedResult], metric_label: str, figure: Optional[str]) -> List[str]:
    """The look-at-why section for the variants in ``looks`` (label -> weight diagnostics)."""
    L = ["## A look at why: best and worst variant\n"]
    if not looks:
        L.append("(no paired variant has binstats.npz to look at)\n")
        return L
    L.append("Best and worst by the mean paired final-score difference; numbers from binstats.npz, mean across "
             "seeds. Weights are relative to uniform (VAW scales its table to mean 1 over the samples).\n")
    for lab, d in looks.items():
        L.append(f"- **{roles[lab]}**: {describe_weight_shift(lab, d, final_paired.get(lab), metric_label)}")
        for line in describe_bins(d):
            L.append(f"  - {line}")
    L.append("")
    L.append("Per bin and step: `report/why_bins.csv`, `report/why_ess.csv`.\n")
    if figure:
        L.append(f"![why_best_worst]({figure})\n")
        L.append("Per variant: weight table over training (log2, red = above uniform), per-bin loss variance before "
                 "(var) and after weighting (w² var) at the last logged step, and the effective sample fraction "
                 "(sum_k n_k w_k)² / (N sum_k n_k w_k²) with n_k the samples per bin in each logging interval "
                 "(thin: seeds). Within a bin every sample has the same weight, so per bin the CSV gives the share "
                 "of the weight against the share of the samples instead.\n")
    return L
