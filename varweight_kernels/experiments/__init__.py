"""Experiment runner (grids of training runs over methods and seeds) and statistical report.

    python -m varweight_kernels.experiments run --preset digits-cpu --methods uniform vaw \\
        --seeds 0 1 2 --out exp/NAME [--grid vaw.power=-1,1] [-- --steps 500]
    python -m varweight_kernels.experiments report exp/NAME [--baseline uniform]
"""
from .report import build_report
from .runner import plan_runs, run_experiment
from .runs import load_runs
from .stats import (bootstrap_std_ci, describe_paired, describe_spread, paired_comparison,
                    t_confidence_interval)

__all__ = ["build_report", "load_runs", "plan_runs", "run_experiment", "bootstrap_std_ci", "describe_paired",
           "describe_spread", "paired_comparison", "t_confidence_interval"]
