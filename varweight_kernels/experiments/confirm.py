"""The confirmatory study of issue 22: pre-registered, fresh seeds, Holm across every comparison.

``python -m varweight_kernels.experiments confirm --out EXP --jobs 2 --report`` runs every variant
below on the ``digits-ablation`` preset for the registered seeds (resumable: finished runs are
skipped, interrupted ones resumed) and writes ``EXP/confirm.md`` and ``EXP/confirm.json``.

``PREREGISTRATION`` is the decision rule as plain data. It was committed before any of these runs
started; :func:`decide` applies it to the numbers and nothing else, so the outcome (which VAW
setting becomes the default) follows from the data by a rule fixed in advance.

Every VAW variant spells out its power and prior: these runs stay what they were when the
default moves (they ran when the default was power -1 with no prior).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from scipy import stats as sps

from ..training.checkpoint import atomic_write_bytes
from .ablation import PRESET, Variant, variant_specs
from .runner import RunSpec, run_specs
from .runs import load_runs
from .stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, curve_auc, t_confidence_interval

PAPER_POWER = "-1"
NO_PRIOR = ("vaw-prior", "none")

VARIANTS = (
    Variant("uniform", "uniform"),
    # the shipped default before this study: the paper's reading
    Variant("vaw__power=-1", "vaw", (("vaw-power", PAPER_POWER), NO_PRIOR)),
    # the exploratory winners of docs/results/digits-ablation
    Variant("seed-cauchy__alpha=0.05", "seed-cauchy", (("alpha", "0.05"),)),
    Variant("seed-cauchy__normalized", "seed-cauchy", (("alpha", "0.05"), ("seed-normalize", ""))),
    Variant("vaw__cauchy_prior", "vaw", (("vaw-power", PAPER_POWER), ("vaw-prior", "cauchy"), ("alpha", "0.05"))),
    Variant("vaw__decay=0.999", "vaw", (("vaw-power", PAPER_POWER), ("vaw-decay", "0.999"), NO_PRIOR)),
    # evening out the gradient noise: inverse std^0.5 and the classical inverse-variance rule
    Variant("vaw__power=0.5", "vaw", (("vaw-power", "0.5"), NO_PRIOR)),
    Variant("vaw__power=2", "vaw", (("vaw-power", "2"), NO_PRIOR)),
    # the field's baselines
    Variant("min-snr__gamma=5", "min-snr", (("gamma", "5"),)),
    Variant("p2", "p2", (("p2-k", "1"), ("p2-gamma", "1"))),
    Variant("edm2", "edm2"),
    Variant("uniform__vaw-is", "uniform", (("noise-sampling", "vaw-is"),)),
)

PREREGISTRATION: Dict = {
    "issue": 22,
    "registered": "2026-12-04",
    "preset": PRESET,
    "seeds": list(range(100, 110)),  # fresh: the exploratory ablation used 0-4
    "baseline": "uniform",
    "variants": {v.label: {"method": v.method, "flags": [list(f) for f in v.flags]} for v in VARIANTS},
    "metrics": {
        "final": "digits FD (fd_digits) of the EMA model at the last evaluation (step 400); lower is better",
        "auc": "mean digits FD over training: trapezoid area under FD-vs-step at steps 100-400 / 300",
    },
    "test": "paired two-sided Student t-test on the per-seed differences variant - uniform",
    "alpha": 0.05,
    "correction": "Holm over all comparisons with uniform: every non-uniform variant x both metrics (22 tests)",
    "intervals": "Student t interval of the mean paired difference at level 1 - alpha / (m - r + 1), "
                 "r the comparison's rank in Holm's order (its step-down level)",
    "spread": "across-seed std of the final FD; ratio to uniform's with a paired percentile bootstrap 95% "
              "interval (seeds resampled jointly, 10,000 resamples); descriptive, not part of the decision",
    "non_inferiority_margin": 0.25,
    "default_candidates": ["vaw__power=-1", "vaw__cauchy_prior", "vaw__decay=0.999", "vaw__power=0.5",
                           "vaw__power=2"],
    "definitions": {
        "confirmed_better": "Holm-adjusted p of final FD < alpha with mean difference < 0, and not confirmed "
                            "worse on AUC",
        "confirmed_worse": "Holm-adjusted p < alpha with mean difference > 0 on final FD or on AUC",
        "not_worse": "upper end of the Holm-adjusted interval of the final FD difference below the margin "
                     "(0.25 FD, about half of uniform's across-seed std in the exploratory ablation), and not "
                     "confirmed worse on AUC",
    },
    "decision": [
        "1. If any default candidate is confirmed better than uniform, VarianceAwareWeighting's default "
        "becomes the confirmed-better candidate with the lowest mean final FD difference.",
        "2. Otherwise, if any candidate is not worse, the default becomes the not-worse candidate closest "
        "to uniform (smallest |mean final FD difference|).",
        "3. Otherwise the default becomes power = 0: weights 1 up to the rounding of the normaliser, the "
        "statistics still gathered (VAW as a diagnostic).",
        "In every outcome the paper's reading (power = -1) stays one keyword away, and the README names "
        "every variant, VAW or not, confirmed better than uniform as the rule that helps on this proxy.",
    ],
}


def variant_by_label() -> Dict[str, Variant]:
    return {v.label: v for v in VARIANTS}


def plan(out: Path, seeds: Sequence[int]) -> List[RunSpec]:
    """One run a variant and seed, ``OUT/runs/LABEL/seedS``, seed-major (an interrupted study is paired)."""
    return variant_specs(out, seeds, VARIANTS)


def run_confirm(out: str, seeds: Optional[Sequence[int]] = None, jobs: int = 1, trainer: Optional[str] = None,
                dry_run: bool = False, passthrough: Sequence[str] = (), python: str = sys.executable,
                stream=sys.stdout) -> Dict[str, List[str]]:
    """Run the study (resumable). ``seeds``/``passthrough`` other than the registered ones are for
    tests in miniature; the report says when a study departs from the registration."""
    seeds = list(PREREGISTRATION["seeds"] if seeds is None else seeds)
    return run_specs(out, plan(Path(out), seeds), seeds, PRESET, passthrough, trainer, jobs, dry_run, python,
                     stream, {"confirm": [v.label for v in VARIANTS], "preregistration": "issue 22"})


# ---------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------
def holm(pvalues: Sequence[float], alpha: float) -> Dict[str, np.ndarray]:
    """Holm's step-down procedure: adjusted p-values, the rank of each test in Holm's order (1 =
    smallest p) and each test's step-down level alpha / (m - rank + 1). NaN p-values count as 1."""
    p = np.array([1.0 if not math.isfinite(x) else float(x) for x in pvalues], dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    rank = np.empty(m, dtype=np.int64)
    rank[order] = np.arange(1, m + 1)
    adj_sorted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = adj_sorted
    return {"adjusted": adjusted, "rank": rank, "level_alpha": alpha / (m - rank + 1)}


def std_ratio_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95, n_boot: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> Dict[str, float]:
    """std(x) / std(y) over seeds (ddof=1) with a paired percentile bootstrap interval."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    sx, sy = float(x.std(ddof=1)), float(y.std(ddof=1))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    bx, by = x[idx].std(axis=1, ddof=1), y[idx].std(axis=1, ddof=1)
    ok = by > 0
    ratios = bx[ok] / by[ok]
    a = (1.0 - level) / 2.0
    lo, hi = (float(np.quantile(ratios, a)), float(np.quantile(ratios, 1 - a))) if ratios.size else (math.nan,) * 2
    return {"std": sx, "baseline_std": sy, "ratio": sx / sy if sy > 0 else math.nan, "lo": lo, "hi": hi}


def scores_per_seed(exp: Path, metric: str = "fd_digits") -> Dict[str, Dict[str, Dict[int, float]]]:
    """{label: {"final": {seed: score}, "auc": {seed: score}}} over finished runs."""
    runs, _ = load_runs(exp)
    out: Dict[str, Dict[str, Dict[int, float]]] = {}
    for r in runs:
        if not r.done:
            continue
        steps, vals = r.series(metric)
        if steps.size < 2:
            continue
        d = out.setdefault(r.label, {"final": {}, "auc": {}})
        d["final"][r.seed] = float(vals[-1])
        d["auc"][r.seed] = curve_auc(steps, vals)
    return out


def analyse(scores: Mapping[str, Mapping[str, Mapping[int, float]]], reg: Mapping = PREREGISTRATION) -> Dict:
    """Every comparison with the baseline, Holm-corrected together, and the spread ratios."""
    base = reg["baseline"]
    if base not in scores:
        raise ValueError(f"no finished {base!r} runs: nothing to compare with")
    alpha = float(reg["alpha"])
    labels = [v for v in reg["variants"] if v != base and v in scores]
    tests = []
    for label in labels:
        for metric in ("final", "auc"):
            a, b = scores[label][metric], scores[base][metric]
            seeds = sorted(set(a) & set(b))
            d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
            p = math.nan
            if d.size >= 2 and np.any(d != d[0]):
                p = float(sps.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
            elif d.size >= 2:
                p = 1.0 if d[0] == 0 else 0.0
            tests.append({"variant": label, "metric": metric, "seeds": seeds, "diffs": d.tolist(), "p": p,
                          "mean": float(d.mean()) if d.size else math.nan,
                          "wins": int((d < 0).sum()), "losses": int((d > 0).sum()), "n": int(d.size)})
    h = holm([t["p"] for t in tests], alpha)
    for t, adj, rank, lev in zip(tests, h["adjusted"], h["rank"], h["level_alpha"]):
        _, lo, hi = t_confidence_interval(t["diffs"], 1.0 - float(lev))
        t.update(p_holm=float(adj), holm_rank=int(rank), level=1.0 - float(lev), lo=lo, hi=hi,
                 rejected=bool(adj < alpha))
    by = {(t["variant"], t["metric"]): t for t in tests}
    spread = {}
    for label in [base] + labels:
        seeds = sorted(set(scores[label]["final"]) & set(scores[base]["final"]))
        x = [scores[label]["final"][s] for s in seeds]
        y = [scores[base]["final"][s] for s in seeds]
        spread[label] = std_ratio_ci(x, y) if len(seeds) >= 2 else {}
    verdicts = {}
    margin = float(reg["non_inferiority_margin"])
    for label in labels:
        fin, auc = by[(label, "final")], by[(label, "auc")]
        worse = any(t["rejected"] and t["mean"] > 0 for t in (fin, auc))
        auc_worse = auc["rejected"] and auc["mean"] > 0
        better = fin["rejected"] and fin["mean"] < 0 and not auc_worse
        not_worse = bool(math.isfinite(fin["hi"]) and fin["hi"] < margin and not auc_worse)
        verdicts[label] = {"better": bool(better), "worse": bool(worse), "not_worse": not_worse}
    return {"tests": tests, "spread": spread, "verdicts": verdicts, "labels": labels}


def decide(analysis: Mapping, reg: Mapping = PREREGISTRATION) -> Dict:
    """Apply the registered rule: the new default and which rules help."""
    by = {(t["variant"], t["metric"]): t for t in analysis["tests"]}
    verdicts = analysis["verdicts"]
    cands = [c for c in reg["default_candidates"] if c in verdicts]
    helps = [v for v in analysis["labels"] if verdicts[v]["better"]]
    better = [c for c in cands if verdicts[c]["better"]]
    if better:
        pick = min(better, key=lambda c: by[(c, "final")]["mean"])
        return {"rule": 1, "default": pick, "helps": helps}
    not_worse = [c for c in cands if verdicts[c]["not_worse"]]
    if not_worse:
        pick = min(not_worse, key=lambda c: abs(by[(c, "final")]["mean"]))
        return {"rule": 2, "default": pick, "helps": helps}
    return {"rule": 3, "default": "vaw__power=0", "helps": helps}


def _f(x: float, digits: int = 2, sign: bool = True) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return "-" if not math.isfinite(p) else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def markdown(scores, analysis: Mapping, decision: Mapping, reg: Mapping = PREREGISTRATION,
             departures: Sequence[str] = ()) -> str:
    base = reg["baseline"]
    by = {(t["variant"], t["metric"]): t for t in analysis["tests"]}
    seeds = sorted(scores[base]["final"])
    lines = ["# Confirmatory study (issue 22): every variant against uniform, Holm-corrected", "",
             f"Preset `{reg['preset']}`, seeds {seeds[0]}-{seeds[-1]} ({len(seeds)}), registered "
             f"{reg['registered']} in `varweight_kernels/experiments/confirm.py` before the runs. "
             f"Test: {reg['test']}; {reg['correction']}, family-wise alpha {reg['alpha']}. Intervals: "
             f"{reg['intervals']}. Differences are variant - uniform (lower is better).", ""]
    if departures:
        lines += ["**This study departs from the registration:** " + "; ".join(departures) + ".", ""]
    lines += ["## Decision", ""]
    rule_text = reg["decision"][decision["rule"] - 1]
    lines += [f"Outcome {decision['rule']}: {rule_text}", "",
              f"New default: **{decision['default']}**. Rules confirmed better than uniform on this proxy: "
              + (", ".join(f"`{h}`" for h in decision["helps"]) or "none") + ".", ""]
    lines += ["## Paired differences", "",
              "| variant | final FD mean ± std | final − uniform (Holm CI) | p (Holm) | lower on | "
              "AUC − uniform (Holm CI) | p (Holm) | lower on | std ratio to uniform (95% bootstrap) | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label in [base] + analysis["labels"]:
        fin = np.array(list(scores[label]["final"].values()))
        ms = f"{fin.mean():.2f} ± {fin.std(ddof=1):.2f}"
        if label == base:
            s = analysis["spread"][base]
            lines.append(f"| `{label}` | {ms} | - | - | - | - | - | - | 1 (std {s.get('std', math.nan):.2f}) | - |")
            continue
        f, a, s = by[(label, "final")], by[(label, "auc")], analysis["spread"][label]
        v = analysis["verdicts"][label]
        verdict = "better" if v["better"] else ("worse" if v["worse"] else ("not worse" if v["not_worse"] else "undecided"))
        lines.append(
            f"| `{label}` | {ms} | {_f(f['mean'])} ({_f(f['lo'])} to {_f(f['hi'])}) | {_p(f['p_holm'])} | "
            f"{f['wins']}/{f['n']} | {_f(a['mean'])} ({_f(a['lo'])} to {_f(a['hi'])}) | {_p(a['p_holm'])} | "
            f"{a['wins']}/{a['n']} | {_f(s['ratio'], 2, False)} ({_f(s['lo'], 2, False)} to {_f(s['hi'], 2, False)}) | "
            f"{verdict} |")
    lines += ["", "Verdicts: " + "; ".join(f"{k}: {v}" for k, v in reg["definitions"].items()) + ".", "",
              "## Per-seed values (final FD / AUC)", "",
              "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for label in [base] + analysis["labels"]:
        cells = [f"{scores[label]['final'].get(s, math.nan):.2f} / {scores[label]['auc'].get(s, math.nan):.2f}"
                 for s in seeds]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    lines += ["", "## The registered rule", ""] + [f"- {d}" for d in reg["decision"]] + [""]
    return "\n".join(lines)


def write_confirm_report(exp: str, out: Optional[str] = None, reg: Mapping = PREREGISTRATION) -> Dict:
    """Analyse the finished runs of ``exp`` and write ``confirm.md`` and ``confirm.json`` (into
    ``out``, default ``exp``). Returns the decision and the analysis."""
    expp = Path(exp)
    scores = scores_per_seed(expp)
    departures = []
    seeds = sorted(scores.get(reg["baseline"], {}).get("final", {}))
    if seeds != list(reg["seeds"]):
        departures.append(f"seeds {seeds} instead of the registered {list(reg['seeds'])}")
    missing = [v for v in reg["variants"] if v not in scores]
    if missing:
        departures.append(f"no finished runs of {missing}")
    analysis = analyse(scores, reg)
    decision = decide(analysis, reg)
    outp = Path(out) if out else expp
    outp.mkdir(parents=True, exist_ok=True)
    text = markdown(scores, analysis, decision, reg, departures)
    atomic_write_bytes(outp / "confirm.md", text.encode())
    payload = {"preregistration": dict(reg), "decision": decision, "departures": departures,
               "scores": {k: {m: {str(s): x for s, x in d.items()} for m, d in v.items()} for k, v in scores.items()},
               "tests": analysis["tests"], "spread": analysis["spread"], "verdicts": analysis["verdicts"]}
    atomic_write_bytes(outp / "confirm.json", json.dumps(payload, indent=1, default=float).encode())
    return {"decision": decision, "analysis": analysis, "report": str(outp / "confirm.md"), "departures": departures}
