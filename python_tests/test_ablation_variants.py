"""The weighting variants of the ablation (issue #17): normalised seed-cauchy, a VAW power that
anneals, VAW times the paper's Cauchy prior, and evaluations at --fid-steps."""
import json

import pytest
import torch

from tiny_runs import one_thread, tiny  # noqa: F401  (autouse fixture)
from varweight_kernels.training.builders import build_weighting
from varweight_kernels.training.formulations import LossTerms, make_formulation
from varweight_kernels.training.loop import train
from varweight_kernels.training.weightings import make_weighting


def _terms(loss):
    loss = torch.as_tensor(loss, dtype=torch.float32)
    return LossTerms(loss, loss, torch.ones_like(loss))


def test_normalised_seed_cauchy_has_mean_weight_one_and_the_same_shape():
    lam = torch.tensor([-4.0, -1.0, 0.0, 2.0, 7.0])
    plain, normal = make_weighting("seed-cauchy"), make_weighting("seed-cauchy", normalize=True)
    plain(_terms([1.0] * 5), lam)
    normal(_terms([1.0] * 5), lam)
    assert float(normal.last_weights.mean()) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(normal.last_weights, plain.last_weights / plain.last_weights.mean())
    assert float(plain.last_weights.mean()) < 0.9


def test_vaw_power_anneals_linearly_over_updates():
    w = make_weighting("vaw", num_bins=4, logsnr_range=(-4.0, 4.0), min_count=1, power=-1.0, backend="reference",
                       power_end=1.0, anneal_steps=4)
    powers = []
    for _ in range(6):
        w(_terms(torch.rand(16) + 0.5), torch.linspace(-3.5, 3.5, 16))
        powers.append(w.vaw.config.power)
    assert powers == [-1.0, -0.5, 0.0, 0.5, 1.0, 1.0]  # set before each update from the updates so far


def test_vaw_power_anneal_reads_the_step_once(monkeypatch):
    """Issue 25: int(vaw.step) every step was a host sync; the count is kept on the host and read
    again only after a state load."""
    kw = dict(num_bins=4, logsnr_range=(-4.0, 4.0), min_count=1, power=-1.0, backend="reference", power_end=1.0,
              anneal_steps=4)
    w = make_weighting("vaw", **kw)
    reads = []
    real_int = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(t.shape) or real_int(t))
    lam = torch.linspace(-3.5, 3.5, 16)
    for _ in range(3):
        w(_terms(torch.rand(16) + 0.5), lam)
    assert len(reads) == 1
    resumed = make_weighting("vaw", **kw)
    with pytest.warns(RuntimeWarning, match="another config"):  # the saved power is the annealed one
        resumed.load_state_dict(w.state_dict())
    resumed(_terms(torch.rand(16) + 0.5), lam)
    assert len(reads) == 2 and resumed.vaw.config.power == 0.5  # 3 updates done: -1 + 3/4 * 2


def test_vaw_with_cauchy_prior_multiplies_the_weights():
    kw = dict(num_bins=4, logsnr_range=(-4.0, 4.0), min_count=1, backend="reference")
    prior = make_weighting("vaw", prior_alpha=0.05, **kw)
    plain = make_weighting("vaw", **kw)
    cauchy = make_weighting("seed-cauchy", alpha=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        terms, lam = _terms(torch.rand(32, generator=g) + 0.5), torch.rand(32, generator=g) * 8 - 4
        out = prior.objective(terms, lam)
        plain.objective(terms, lam)
        cauchy.objective(terms, lam)
        expected = plain.last_weights * cauchy.last_weights
        torch.testing.assert_close(prior.last_weights, expected)
        torch.testing.assert_close(out, (expected * terms.loss).mean())
    assert torch.equal(prior.vaw.M, plain.vaw.M)  # the statistics see the raw loss either way


def test_config_flags_reach_the_weightings(tmp_path):
    formulation = make_formulation("edm")
    gen = torch.Generator()
    vaw = build_weighting(tiny(tmp_path, weighting="vaw", vaw_power_anneal=10, vaw_power_end=0.5, vaw_prior="cauchy",
                               alpha=0.01), formulation, gen)
    assert (vaw.anneal_steps, vaw.power_end, vaw.prior.alpha) == (10, 0.5, 0.01)
    cauchy = build_weighting(tiny(tmp_path, weighting="seed-cauchy", seed_normalize=True), formulation, gen)
    assert cauchy.normalize and cauchy.alpha == 0.05


def test_fid_steps_add_evaluations(tmp_path):
    cfg = tiny(tmp_path / "run", steps=4, fid_steps=(1, 3), fid_samples=32, analysis_batches=0)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = [r["step"] for r in records if "fd_digits" in r]
    assert scored == [1, 3]


def test_mean_cauchy_weight_matches_monte_carlo():
    from varweight_kernels.experiments.ablation import mean_cauchy_weight

    g = torch.Generator().manual_seed(0)
    lam = 2.4 * torch.randn(20000, 64, generator=g, dtype=torch.float64)
    w = 1.0 / (1.0 + 0.05 * (lam - lam.mean(dim=1, keepdim=True)) ** 2)
    assert mean_cauchy_weight(0.05, 2.4, 64) == pytest.approx(float(w.mean()), abs=2e-3)
    assert 0.82 < mean_cauchy_weight(0.05, 2.4, 64) < 0.84  # "about 0.83", as the issue says


def test_ablation_plan_is_paired_and_every_command_parses(tmp_path):
    from varweight_kernels.experiments.ablation import PRESET, plan, variants
    from varweight_kernels.experiments.report import _baseline_label
    from varweight_kernels.training.cli import parse_config

    specs = plan(tmp_path, [0, 1])
    labels = [v.label for v in variants()]
    assert len(set(labels)) == len(labels) >= 18
    assert [s.seed for s in specs[:len(labels)]] == [0] * len(labels)  # seed-major
    meta = {"variants": {s.label: {"method": s.method, "scoped": s.scoped, "global": s.global_} for s in specs}}
    for spec in specs[:len(labels)]:
        if spec.label != "uniform":
            assert _baseline_label(spec.label, "uniform", labels, meta) == "uniform", spec.label
        cfg = parse_config(["--preset", PRESET, "--weighting", spec.method, "--out", spec.out, *spec.flags])
        assert cfg.weighting == spec.method and cfg.fid_steps == (100, 200, 300, 400)
    with pytest.raises(ValueError, match="unknown ablation variants"):
        plan(tmp_path, [0], ["nope"])
