"""The confirmatory study (issue 22): Holm's procedure, the registered decision rule, the report
from run folders, and the GPU evidence step in miniature on the CPU."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from varweight_kernels.experiments.__main__ import main as experiments_main
from varweight_kernels.experiments.confirm import (PREREGISTRATION, VARIANTS, analyse, decide, holm, plan,
                                                    std_ratio_ci)
from tiny_runs import ROOT

REG_SEEDS = PREREGISTRATION["seeds"]


def test_holm_matches_the_step_down_by_hand():
    h = holm([0.01, 0.04, 0.03, 0.005], 0.05)
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    np.testing.assert_allclose(h["adjusted"], [0.03, 0.06, 0.06, 0.02])
    assert list(h["rank"]) == [2, 4, 3, 1]
    np.testing.assert_allclose(h["level_alpha"], [0.05 / 3, 0.05, 0.05 / 2, 0.05 / 4])
    assert holm([math.nan, 0.001], 0.05)["adjusted"][0] == 1.0  # an undefined test is never rejected


def test_std_ratio_is_the_ratio_of_sample_stds():
    x, y = [1.0, 2.0, 4.0, 7.0], [1.0, 1.5, 2.0, 2.5]
    r = std_ratio_ci(x, y)
    assert r["ratio"] == pytest.approx(np.std(x, ddof=1) / np.std(y, ddof=1))
    assert r["lo"] <= r["ratio"] <= r["hi"]


def test_registration_is_fresh_seeds_and_every_required_variant():
    assert len(REG_SEEDS) >= 10 and not set(REG_SEEDS) & {0, 1, 2, 3, 4}
    labels = {v.label for v in VARIANTS}
    for need in ("uniform", "vaw__power=-1", "vaw__power=0.5", "vaw__power=2", "min-snr__gamma=5", "p2", "edm2",
                 "uniform__vaw-is", "seed-cauchy__normalized", "vaw__cauchy_prior", "vaw__decay=0.999"):
        assert need in labels
    assert set(PREREGISTRATION["default_candidates"]) <= labels
    # every VAW run names its power, so a later default cannot change what these runs were
    for spec in plan(ROOT / "exp", [100]):
        if spec.method == "vaw":
            assert "--vaw-power" in spec.flags, spec.label


def _scores(shift: dict, noise=0.1, seeds=REG_SEEDS):
    rng = np.random.default_rng(0)
    base = {s: 6.0 + rng.normal(0, 0.5) for s in seeds}
    out = {}
    for v in VARIANTS:
        d = shift.get(v.label, 0.0)
        fin = {s: base[s] + d + rng.normal(0, noise) for s in seeds}
        out[v.label] = {"final": fin, "auc": {s: x + 1.0 for s, x in fin.items()}}
    return out


def test_decision_rule_one_picks_the_best_confirmed_vaw_setting():
    a = analyse(_scores({"vaw__power=0.5": -1.0, "vaw__decay=0.999": -2.0, "seed-cauchy__normalized": -3.0}))
    d = decide(a)
    assert d["rule"] == 1 and d["default"] == "vaw__decay=0.999"
    assert set(d["helps"]) == {"vaw__power=0.5", "vaw__decay=0.999", "seed-cauchy__normalized"}


def test_decision_rule_two_picks_the_not_worse_setting_closest_to_uniform():
    shift = {"vaw__power=-1": 1.0, "vaw__cauchy_prior": 0.05, "vaw__decay=0.999": 1.0, "vaw__power=0.5": 0.0,
             "vaw__power=2": 2.0, "min-snr__gamma=5": -1.0}
    a = analyse(_scores(shift, noise=0.02))
    assert a["verdicts"]["vaw__power=-1"]["worse"] and a["verdicts"]["vaw__power=0.5"]["not_worse"]
    d = decide(a)
    assert d["rule"] == 2 and d["default"] == "vaw__power=0.5" and d["helps"] == ["min-snr__gamma=5"]


def test_decision_rule_three_falls_back_to_power_zero():
    shift = {c: 1.0 for c in PREREGISTRATION["default_candidates"]}
    d = decide(analyse(_scores(shift, noise=0.02)))
    assert d["rule"] == 3 and d["default"] == "vaw__power=0" and d["helps"] == []


def _fake_run(root, label, seed, fds):
    run = root / "runs" / label / f"seed{seed}"
    run.mkdir(parents=True)
    recs = [{"step": st, "fd_digits": fd} for st, fd in zip((100, 200, 300, 400), fds)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "DONE").write_text("done\n")


def test_report_only_from_run_folders(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for v in VARIANTS:
        for s in REG_SEEDS:
            worse = 1.0 if v.label == "vaw__power=-1" else 0.0
            _fake_run(tmp_path, v.label, s, [9.0, 8.0, 7.0, 6.0 + worse + rng.normal(0, 0.05)])
    assert experiments_main(["confirm", "--out", str(tmp_path), "--report-only"]) == 0
    text = (tmp_path / "confirm.md").read_text()
    payload = json.loads((tmp_path / "confirm.json").read_text())
    assert "departs" not in text  # the registered seeds and every variant
    assert payload["verdicts"]["vaw__power=-1"]["worse"]
    assert "Holm" in text and "| `edm2` |" in text and "std ratio" in text
    assert "decision (rule" in capsys.readouterr().out


def test_report_names_a_departure_from_the_registration(tmp_path):
    for v in VARIANTS[:3]:
        for s in (1, 2, 3):
            _fake_run(tmp_path, v.label, s, [9.0, 8.0, 7.0, 6.0 + 0.1 * s])
    assert experiments_main(["confirm", "--out", str(tmp_path), "--report-only"]) == 0
    text = (tmp_path / "confirm.md").read_text()
    assert "departs from the registration" in text and "seeds [1, 2, 3]" in text


def test_gpu_evidence_step_runs_in_miniature(tmp_path):
    """benchmarks/evidence.py, the `evidence` step of gpu_check.sh, on the CPU at a tiny size."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import evidence
    finally:
        sys.path.pop(0)
    assert evidence.main(["--out", str(tmp_path), "--miniature", "--device", "cpu"]) == 0
    payload = json.loads((tmp_path / "evidence.json").read_text())
    labels = list(evidence.variants())
    assert set(payload["scores"]) == set(labels) and "uniform" in labels
    for label in labels:
        finals = payload["scores"][label]["final"]
        assert len(finals) == len(evidence.MINIATURE["seeds"]) and all(math.isfinite(x) for x in finals.values())
    text = (tmp_path / "evidence.md").read_text()
    assert "Holm" in text and all(f"`{label}`" in text for label in labels)
    assert "evidence" in (ROOT / "benchmarks" / "gpu_check.sh").read_text()
