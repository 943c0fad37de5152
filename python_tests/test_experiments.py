"""Experiment statistics, the report on synthetic run folders, and run + report end to end."""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from varweight_kernels.experiments import stats as st
from varweight_kernels.experiments.report import build_report
from varweight_kernels.experiments.runner import build_command, parse_grid, plan_runs, run_state

REPO = Path(__file__).resolve().parents[1]

A = [14.2, 13.9, 14.8, 14.1, 14.5, 13.7]
B = [13.1, 13.2, 13.6, 13.3, 13.2, 12.9]


def test_stats_match_scipy():
    res = st.paired_comparison(dict(enumerate(B)), dict(enumerate(A)), "m", "b")
    d = np.array(B) - np.array(A)
    t = sps.ttest_rel(B, A)
    w = sps.wilcoxon(B, A)
    assert res.t_stat == pytest.approx(t.statistic, rel=1e-12)
    assert res.t_p == pytest.approx(t.pvalue, rel=1e-12)
    assert res.wilcoxon_stat == pytest.approx(w.statistic)
    assert res.wilcoxon_p == pytest.approx(w.pvalue, rel=1e-12)
    lo, hi = sps.t.interval(0.95, d.size - 1, loc=d.mean(), scale=sps.sem(d))
    assert (res.ci_low, res.ci_high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert res.mean_diff == pytest.approx(d.mean())
    assert res.wins == 6 and res.ties == 0 and res.n == 6
    m, lo2, hi2 = st.t_confidence_interval(A, 0.9)
    ref = sps.t.interval(0.9, len(A) - 1, loc=np.mean(A), scale=sps.sem(A))
    assert (lo2, hi2) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    # bootstrap std CI: fixed seed -> reproducible, brackets the sample std
    s1 = st.bootstrap_std_ci(A)
    assert s1 == st.bootstrap_std_ci(A)
    assert s1[0] == pytest.approx(np.std(A, ddof=1)) and s1[1] <= s1[0] <= s1[2]
    text = st.describe_paired(res, "FID")
    assert text.startswith("m vs b: better (lower) on 6/6 seeds")
    assert "95% t CI" in text and "paired t p=" in text and "Wilcoxon" in text


def test_stats_edge_cases():
    one = st.paired_comparison({0: 1.0}, {0: 2.0})
    assert one.n == 1 and math.isnan(one.ci_low) and "no claim" in st.describe_paired(one)
    same = st.paired_comparison({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same.wilcoxon_p == 1.0 and "no clear difference" in st.describe_paired(same)
    worse = st.paired_comparison({s: 10.0 + s * 0.01 + 1.0 for s in range(5)}, {s: 10.0 + s * 0.02 for s in range(5)})
    assert "worse (higher) on 5/5" in st.describe_paired(worse)
    assert st.paired_comparison({0: 1.0}, {1: 1.0}).n == 0


def _write_run(folder: Path, fids, seed: int, weight: bool = False, done: bool = True, persample: bool = False,
               steps=None, binstats=None):
    """A finished run folder with ``fids`` at ``steps`` (default 100, 200, ...); binstats random
    unless given."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    steps = steps or [100 * (i + 1) for i in range(len(fids))]
    with open(folder / "metrics.jsonl", "w") as fh:
        for s, f in zip(steps, fids):
            fh.write(json.dumps({"step": s, "loss": 0.5 + rng.random() * 0.01, "weighted_loss": 0.5, "lr": 2e-4,
                                 "grad_norm": 1.0, "images_per_s": 100.0, "nonfinite": 0, "skipped_steps": 0,
                                 "fid": f}) + "\n")
    K = 8
    edges = np.linspace(-12, 12, K + 1)
    T = len(steps)
    arrays = {"steps": np.array(steps, dtype=np.int64), "bin_edges": edges,
              "mean": 1.0 + rng.random((T, K)), "var": 0.1 + rng.random((T, K)),
              "count": np.tile(np.arange(K, dtype=np.float64) * 10, (T, 1))}
    if weight:
        arrays["weight"] = 0.5 + rng.random((T, K))
    np.savez(folder / "binstats.npz", **(binstats if binstats is not None else arrays))
    if persample:
        lam = rng.normal(1.0, 2.4, size=3000)
        np.savez(folder / "persample_step00000200.npz", lam=lam, loss=np.exp(-lam / 4) * rng.gamma(2.0, 0.5, 3000))
    (folder / "config.json").write_text(json.dumps({"dataset": "cifar10", "fid_samples": 5000, "steps": 200,
                                                    "formulation": "edm", "batch_size": 128}))
    if done:
        (folder / "DONE").write_text("step 200\n")


def _synthetic_experiment(root: Path, shift: float, noise) -> Path:
    base = [14.0, 13.6, 14.4, 14.1, 13.8]
    for s, b in enumerate(base):
        _write_run(root / "runs" / "uniform" / f"seed{s}", [b + 5.0, b], s, persample=True)
        _write_run(root / "runs" / "vaw" / f"seed{s}", [b + 5.0 + shift, b + shift + noise[s]], 100 + s,
                   weight=True, persample=True)
    # an unfinished run is listed but not counted
    _write_run(root / "runs" / "vaw" / "seed9", [20.0], 9, weight=True, done=False)
    return root


def test_report_finds_known_shift(tmp_path):
    exp = _synthetic_experiment(tmp_path / "shift", shift=-1.0, noise=[0.05, -0.1, 0.08, -0.03, 0.0])
    out = build_report(str(exp), baseline="uniform")
    assert out["metric"] == "fid"
    p = out["paired"]["vaw"]
    assert p["n"] == 5 and p["mean_diff"] == pytest.approx(-1.0, abs=0.05)
    assert p["ci_excludes_zero"] and p["ci_high"] < 0 and p["wins"] == 5
    verdict = out["verdicts"]["vaw"]
    assert "better (lower) on 5/5 seeds" in verdict and "no clear difference" not in verdict
    md = Path(out["report"]).read_text()
    assert "| uniform | 5 |" in md and "| vaw | 5 |" in md
    assert "cifar10-train" in md and "unfinished" in md
    for name in ("metric_vs_step", "paired_diff_vs_step", "loss_vs_logsnr", "variance_heatmap", "vaw_weights"):
        assert os.path.getsize(out["figures"][name]) > 1000
    for csv_name in ("per_seed.csv", "summary.csv", "paired.csv", "loss_vs_logsnr.csv"):
        assert (exp / "report" / csv_name).stat().st_size > 0
    summary = out["summary"]
    assert summary["uniform"]["mean"] == pytest.approx(np.mean([14.0, 13.6, 14.4, 14.1, 13.8]))
    # quantile bins from the per-sample files
    rows = (exp / "report" / "loss_vs_logsnr.csv").read_text().splitlines()
    assert sum(1 for r in rows if r.startswith("vaw,")) == 30


def test_report_does_not_claim_without_shift(tmp_path):
    exp = _synthetic_experiment(tmp_path / "noshift", shift=0.0, noise=[0.3, -0.2, 0.1, -0.25, 0.05])
    out = build_report(str(exp), baseline="uniform")
    p = out["paired"]["vaw"]
    assert not p["ci_excludes_zero"]
    verdict = out["verdicts"]["vaw"]
    assert "no clear difference" in verdict
    assert "better" not in verdict and "worse" not in verdict


EVAL_STEPS = [100, 200, 300, 400, 500]
SEED_OFFSETS = {"uniform": [0.0, 1.0, -1.0], "vaw": [0.0, 1.0, -0.5], "seed-cauchy": [0.0, 1.0, -1.0]}
CURVES = {"uniform": [10, 8, 6, 4, 2], "vaw": [8, 6, 4, 3, 1], "seed-cauchy": [12, 11, 10, 9, 8]}


def _known_binstats(weight=None):
    """4 bins, 10 samples per bin per logging interval; ``weight`` the same table at every step."""
    T = len(EVAL_STEPS)
    arrays = {"steps": np.array(EVAL_STEPS, dtype=np.int64), "bin_edges": np.array([-8.0, -4.0, 0.0, 4.0, 8.0]),
              "mean": np.ones((T, 4)), "var": np.tile([1.0, 1.0, 4.0, 4.0], (T, 1)),
              "count": np.outer(np.arange(1, T + 1), np.full(4, 10.0))}
    if weight is not None:
        arrays["weight"] = np.tile(np.asarray(weight, dtype=np.float64), (T, 1))
    return arrays


def _curves_experiment(root: Path, vaw_seed1_steps=None) -> Path:
    """uniform, a faster vaw and a slower seed-cauchy whose AUCs and crossings are known by hand."""
    weights = {"vaw": [2.0, 2.0, 0.5, 0.5]}
    for label, curve in CURVES.items():
        for seed, offset in enumerate(SEED_OFFSETS[label]):
            steps = vaw_seed1_steps if (label, seed) == ("vaw", 1) and vaw_seed1_steps else EVAL_STEPS
            _write_run(root / "runs" / label / f"seed{seed}", [c + offset for c in curve], seed, steps=steps,
                       binstats=_known_binstats(weights.get(label)))
    return root


def test_report_sample_efficiency_and_why_with_known_answers(tmp_path):
    exp = _curves_experiment(tmp_path / "curves")
    (exp / "elsewhere.md").write_text("keep me")
    (exp / "report.md").symlink_to(exp / "elsewhere.md")
    out = build_report(str(exp), baseline="uniform")
    eff = out["efficiency"]
    # threshold: mean uniform curve at step 300 (middle of 100..500) = 6
    assert eff.threshold["uniform"] == pytest.approx(6.0) and eff.threshold["vaw"] == pytest.approx(6.0)
    # AUC of a linear curve is its mean: 6 + offset; vaw ((8+6)/2 + (6+4)/2 + (4+3)/2 + (3+1)/2) / 4 = 4.375
    assert eff.auc["uniform"] == {0: pytest.approx(6.0), 1: pytest.approx(7.0), 2: pytest.approx(5.0)}
    assert eff.auc["vaw"] == {0: pytest.approx(4.375), 1: pytest.approx(5.375), 2: pytest.approx(3.875)}
    auc = eff.auc_paired["vaw"]
    assert auc.diffs == pytest.approx([-1.625, -1.625, -1.125]) and auc.mean_diff == pytest.approx(-4.375 / 3)
    # crossings of 6: uniform 300, 350 (7 -> 5), 250; vaw 200, 250, 175 (7.5 -> 5.5 at 100 -> 200)
    assert [c.step for c in eff.crossing["uniform"].values()] == pytest.approx([300, 350, 250])
    assert [c.step for c in eff.crossing["vaw"].values()] == pytest.approx([200, 250, 175])
    steps = eff.crossing_paired["vaw"]
    assert steps.result.diffs == pytest.approx([-100, -100, -75]) and steps.result.ci_high < 0
    # seed-cauchy never gets below 7: censored at 500 on every seed, paired as a bound
    slow = eff.crossing_paired["seed-cauchy"]
    assert all(c.censored for c in eff.crossing["seed-cauchy"].values())
    assert slow.method_censored == [0, 1, 2] and slow.result.diffs == pytest.approx([200, 150, 250])

    md = (exp / "report.md").read_text()
    assert not (exp / "report.md").is_symlink() and (exp / "elsewhere.md").read_text() == "keep me"
    assert "## Sample efficiency" in md and "**6** FID" in md
    assert "| uniform | 3 | 5 (steps 100 to 500) | 2 | 6 ± 1 | 300 | s0: 300, s1: 350, s2: 250 |" in md
    assert "s0: >500, s1: >500, s2: >500" in md and "3 censored: a lower bound" in md
    assert "| vaw | 3 | -0.8333 (" in md and "| -1.458 (" in md and "| -91.67 (" in md
    assert "- steps: vaw vs uniform: better (lower) on 3/3 seeds" in md and "bounds towards 0" in md

    # the look at why: vaw best, seed-cauchy worst (no weight table)
    assert out["why"]["roles"] == {"vaw": "best", "seed-cauchy": "worst"}
    d = out["why"]["diagnostics"]["vaw"]
    # 10 samples per bin, weights 2, 2, 0.5, 0.5: 50^2 / (40 * 85)
    assert d["ess"] == pytest.approx(np.full(5, 2500 / 3400))
    assert d["weighted_var"][-1] == pytest.approx([4.0, 4.0, 1.0, 1.0])
    assert d["weight_share"] == pytest.approx([0.4, 0.4, 0.1, 0.1])
    assert "`vaw` helps" in md
    assert "moves weight to log-SNR λ in [-8, 0) (mean weight 2.00), away from λ in [0, 8)" in md
    assert "`seed-cauchy` hurts" in md and "no weight table" in md
    assert "after weighting (w² var) 1 to 4 (max/min 4)" in md and "0.735 at step 500" in md
    assert os.path.getsize(out["why"]["figure"]) > 1000
    for name in ("efficiency_per_seed.csv", "efficiency_paired.csv", "why_bins.csv", "why_ess.csv"):
        assert (exp / "report" / name).stat().st_size > 0


def test_report_names_evaluation_steps_that_differ(tmp_path):
    exp = _curves_experiment(tmp_path / "mismatch", vaw_seed1_steps=[100, 200, 250, 400, 500])
    out = build_report(str(exp), baseline="uniform")
    md = (exp / "report.md").read_text()
    assert "vaw" not in out["efficiency"].auc and "vaw" not in out["efficiency"].auc_paired
    assert "**not computed**: `vaw`: evaluation steps differ" in md and "vaw seed 1" in md
    assert "steps 250 not in vaw seed 0" in md
    # the other variants and the final scores are still reported
    assert "seed-cauchy" in out["efficiency"].auc_paired and out["paired"]["vaw"]["n"] == 3


def test_grid_planning_and_resume_logic(tmp_path):
    methods = ["uniform", "vaw", "min-snr"]
    axes = parse_grid(["vaw.power=-1,1", "min-snr.gamma=5", "lr=1e-3"], methods)
    flags = {a.key: a.flag for a in axes}
    assert flags == {"vaw.power": "--vaw-power", "min-snr.gamma": "--gamma", "lr": "--lr"}
    runs = plan_runs(tmp_path, methods, [0, 1], axes)
    labels = sorted({r.label for r in runs})
    assert labels == ["min-snr__gamma=5__lr=1e-3", "uniform__lr=1e-3", "vaw__power=-1__lr=1e-3",
                      "vaw__power=1__lr=1e-3"]
    assert len(runs) == 8
    with pytest.raises(ValueError):
        parse_grid(["vaw.nonexistent_knob=1"], methods)
    r = next(r for r in runs if r.label.startswith("vaw__power=1"))
    d = Path(r.out)
    assert run_state(d) == "new"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    assert run_state(d) == "restart"
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "ckpt_00000010.pt").write_bytes(b"x")
    assert run_state(d) == "resume"
    cmd = build_command(r, Path("train_cifar.py"), "digits-smoke", ["--steps", "4"], "resume")
    assert cmd[-1] == "--resume" and "--vaw-power" in cmd and cmd[cmd.index("--vaw-power") + 1] == "1"
    assert cmd[cmd.index("--weighting") + 1] == "vaw" and cmd[cmd.index("--seed") + 1] == str(r.seed)
    (d / "DONE").write_text("")
    assert run_state(d) == "done"


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "train_cifar.py").exists(), reason="trainer not present")
def test_run_and_report_end_to_end(tmp_path):
    import subprocess

    exp = tmp_path / "exp"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "varweight_kernels.experiments", "run", "--preset", "digits-smoke",
           "--methods", "uniform", "vaw", "--seeds", "0", "1", "--out", str(exp), "--jobs", "2",
           "--", "--steps", "4", "--log-every", "2", "--quiet"]
    r = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 finished" in r.stdout
    for lab in ("uniform", "vaw"):
        for s in (0, 1):
            assert (exp / "runs" / lab / f"seed{s}" / "DONE").exists()
    # a second call (in-process) with the same flags skips the finished runs (other flags resume them)
    import io

    from varweight_kernels.experiments.runner import run_experiment

    log = io.StringIO()
    res = run_experiment(str(exp), ["uniform", "vaw"], [0, 1], preset="digits-smoke",
                         passthrough=["--steps", "4", "--log-every", "2", "--quiet"], stream=log)
    assert len(res["skipped"]) == 4 and not res["done"] and not res["failed"], log.getvalue()
    out = build_report(str(exp))
    assert out["metric"] == "loss"  # the smoke preset computes no FID
    md = (exp / "report.md").read_text()
    for lab in ("uniform", "vaw"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {lab} | 2 |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(c not in ("", "n/a") for c in cells[2:4]), row  # mean and std present
    pngs = list((exp / "report").glob("*.png"))
    assert {p.name for p in pngs} >= {"metric_vs_step.png", "loss_vs_logsnr.png", "variance_heatmap.png",
                                      "vaw_weights.png"}
    assert all(p.stat().st_size > 1000 for p in pngs)


# ---------------------------------------------------------------------------------------------
# issue 15: the paper's variance analysis as a report option
def test_paper_variance_bins_per_seed_with_population_variance():
    from varweight_kernels.experiments.variance import minus_two_log_sigma, per_seed_bins

    # 30 bins of two samples each, losses (k, k + 2): population variance 1 (ddof 1 would give 2)
    x = np.repeat(np.arange(30.0), 2) + np.tile([0.1, 0.2], 30)
    loss = np.repeat(np.arange(30.0), 2) + np.tile([0.0, 2.0], 30)
    out = per_seed_bins(x, loss)
    np.testing.assert_allclose(out["var"], 1.0)
    np.testing.assert_allclose(out["mean"], np.arange(30.0) + 1.0)
    # edges are the seed's own: a shifted seed fills all 30 bins too (pooled edges would not)
    shifted = per_seed_bins(x + 100.0, loss)
    assert np.isfinite(shifted["var"]).all() and shifted["center"][0] > 99
    # EDM's lam = log(sd^2/sigma^2): sigma = 1 is lam = 2 log 0.5, i.e. -2 log sigma = 0
    assert minus_two_log_sigma(np.array([2 * math.log(0.5)]), {"formulation": "edm", "sigma_data": 0.5})[0] == \
        pytest.approx(0.0, abs=1e-12)


def test_paper_analysis_report_from_a_tiny_digits_experiment(tmp_path):
    """Real runs (digits, 2 steps, uniform and seed-cauchy, 2 seeds) -> the per-seed quantile-binned
    variance figure beside our own analysis."""
    import torch

    from tiny_runs import tiny
    from varweight_kernels.training.loop import train

    exp = tmp_path / "exp"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("uniform", "seed-cauchy"):
            for seed in (0, 1):
                train(tiny(exp / "runs" / method / f"seed{seed}", weighting=method, seed=seed, steps=2,
                           analysis_batches=8))
    finally:
        torch.set_num_threads(threads)
    out = build_report(str(exp), paper_analysis=True)
    curves = out["paper_variance"]
    assert set(curves) == {"uniform", "seed-cauchy"}
    for c in curves.values():
        assert c["center"].shape == (30,) and (c["n"] == 2).all() and np.isfinite(c["var"]).all()
    figure = exp / "report" / "variance_comparison.png"
    assert figure.stat().st_size > 1000 and (exp / "report" / "loss_vs_logsnr.png").exists()
    md = (exp / "report.md").read_text()
    assert "## The paper's variance analysis" in md and "report/variance_comparison.png" in md
    rows = (exp / "report" / "variance_paper.csv").read_text().splitlines()
    assert rows[0].startswith("label,bin,minus_2_log_sigma_center") and len(rows) == 1 + 2 * 30
    # without the option the report is as before
    assert "paper_variance" in build_report(str(exp)) and "## The paper's" not in (exp / "report.md").read_text()
