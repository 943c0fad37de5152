"""The ablation of issue #17: where does VAW help? Every variant against uniform, paired seeds.

``python -m varweight_kernels.experiments ablation --out EXP --seeds 0 1 2 3 4 --jobs 2 --report``
runs the preset ``digits-ablation`` (8x8 digits, 400 steps, the digits score at 100, 200, 300
and 400 steps) for every variant below; finished runs are skipped, interrupted ones resumed.

The variants, as plain data (label -> weighting and its flags):
- baselines and controls: ``uniform``; ``uniform`` at the learning rate scaled by the mean
  seed-cauchy weight (the paper's weights are not normalised, so part of any difference can be a
  smaller effective learning rate); ``seed-cauchy`` at alpha 0.05 and 0.01, and normalised.
- ``vaw`` with power -2, -1 (the default), -0.5, +0.5, +1; with decay, num_bins and min_count each
  varied around the preset's value.
- rules to test what early-training effects suggest: the VAW power fading from -1 to 0 over the
  run (weighting early, uniform late), and VAW times the paper's batch-centred Cauchy prior.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..training.config import PRESETS
from .runner import RunSpec, run_specs

PRESET = "digits-ablation"
PAPER_ALPHA = 0.05
# The VAW variants ran when VAW had no prior by default; spelt out so they stay what they were.
OLD_PRIOR = ("vaw-prior", "none")


class Variant(NamedTuple):
    label: str
    method: str
    flags: Tuple[Tuple[str, str], ...] = ()  # (trainer flag without "--", value; "" for a switch)


def mean_cauchy_weight(alpha: float, logsnr_std: float, batch: int, nodes: int = 80) -> float:
    """E[1 / (1 + alpha (lam - mean_batch lam)^2)] for normal lam of std ``logsnr_std``: the mean
    seed-cauchy weight (the deviation from the batch mean has variance std^2 (1 - 1/B))."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)  # probabilists' Gauss-Hermite: weight exp(-x^2/2)
    sd = logsnr_std * math.sqrt(1.0 - 1.0 / batch)
    return float(np.sum(w / (1.0 + alpha * (sd * x) ** 2)) / math.sqrt(2.0 * math.pi))


def variants() -> List[Variant]:
    """The ablation's variants, from the preset's own settings."""
    preset = PRESETS[PRESET]
    # EDM: lam = log(sigma_data^2) - 2 ln sigma with ln sigma ~ N(P_mean, P_std^2): std 2 * P_std.
    logsnr_std = 2.0 * 1.2
    matched_lr = preset["lr"] * mean_cauchy_weight(PAPER_ALPHA, logsnr_std, preset["batch_size"])
    bins, min_count = preset["vaw_bins"], preset["vaw_min_count"]
    out = [Variant("uniform", "uniform"),
           Variant(f"uniform__lr={matched_lr:.3g}", "uniform", (("lr", f"{matched_lr:.3g}"),)),
           Variant("seed-cauchy__alpha=0.05", "seed-cauchy", (("alpha", "0.05"),)),
           Variant("seed-cauchy__alpha=0.01", "seed-cauchy", (("alpha", "0.01"),)),
           Variant("seed-cauchy__normalized", "seed-cauchy", (("alpha", "0.05"), ("seed-normalize", "")))]
    out += [Variant(f"vaw__power={p}", "vaw", (("vaw-power", p), OLD_PRIOR)) for p in ("-2", "-1", "-0.5", "0.5", "1")]
    out += [Variant(f"vaw__decay={d}", "vaw", (("vaw-decay", d), OLD_PRIOR)) for d in ("0.9", "0.999")]
    out += [Variant(f"vaw__bins={k}", "vaw", (("vaw-bins", str(k)), OLD_PRIOR)) for k in (bins // 2, bins * 2)]
    out += [Variant(f"vaw__min_count={m}", "vaw", (("vaw-min-count", str(m)), OLD_PRIOR)) for m in (min_count // 4, min_count * 4)]
    out += [Variant("vaw__fade", "vaw", (("vaw-power-end", "0"), ("vaw-power-anneal", str(preset["steps"])), OLD_PRIOR)),
            Variant("vaw__cauchy_prior", "vaw", (("vaw-prior", "cauchy"), ("alpha", str(PAPER_ALPHA))))]
    return out


def plan(out: Path, seeds: Sequence[int], chosen: Optional[Sequence[str]] = None) -> List[RunSpec]:
    """One run a variant and seed, ``OUT/runs/LABEL/seedS`` (all flags recorded as the variant's own).
    Seed-major order: an interrupted ablation has every variant on its first seeds, so it is paired."""
    known = variants()
    labels = [v.label for v in known]
    unknown = sorted(set(chosen or ()) - set(labels))
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; choose from {labels}")
    return variant_specs(out, seeds, [v for v in known if not chosen or v.label in chosen])


def variant_specs(out: Path, seeds: Sequence[int], chosen: Sequence[Variant]) -> List[RunSpec]:
    """One run a variant and seed, ``OUT/runs/LABEL/seedS`` (all flags recorded as the variant's
    own), seed-major: an interrupted study has every variant on its first seeds, so it is paired."""
    specs = []
    for seed in seeds:
        for v in chosen:
            flags = [item for name, value in v.flags for item in ([f"--{name}"] + ([value] if value else []))]
            specs.append(RunSpec(label=v.label, method=v.method, seed=int(seed),
                                 out=str(out / "runs" / v.label / f"seed{int(seed)}"), flags=flags,
                                 scoped={name: value or "on" for name, value in v.flags}))
    return specs


def run_ablation(out: str, seeds: Sequence[int], jobs: int = 1, chosen: Optional[Sequence[str]] = None,
                 passthrough: Sequence[str] = (), trainer: Optional[str] = None, dry_run: bool = False,
                 python: str = sys.executable, stream=sys.stdout) -> Dict[str, List[str]]:
    """Run the ablation (resumable); returns {'done', 'skipped', 'failed'} lists of run dirs."""
    specs = plan(Path(out), seeds, chosen)
    return run_specs(out, specs, seeds, PRESET, passthrough, trainer, jobs, dry_run, python, stream,
                     {"ablation": [v.label for v in variants() if not chosen or v.label in chosen]})
