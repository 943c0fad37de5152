"""Noise-level samplers: default and vaw-is (adaptive importance sampling, issue 6)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from varweight_kernels import VarianceAwareWeighting
from varweight_kernels.training.formulations import make_formulation
from varweight_kernels.training.noise_sampling import make_noise_sampler


def _toy_loss(lam: torch.Tensor) -> torch.Tensor:
    # a smooth, strongly lam-dependent "loss": large at low SNR, small at high SNR
    lam = lam.double()
    return 1.0 + 4.0 * torch.sigmoid(-lam) + 0.05 * lam ** 2


def _warm(sampler, seed=0, reps=4):
    """Feed toy losses over the whole log-SNR range to a VAW module on the sampler's grid, and
    hand its statistics over as the trainer does."""
    vaw = VarianceAwareWeighting(num_bins=sampler.K, logsnr_range=sampler.logsnr_range, min_count=sampler.min_count,
                                 backend="reference")
    g = torch.Generator().manual_seed(seed)
    lam = torch.linspace(-12.5, 12.5, 4001, dtype=torch.float64)
    for _ in range(reps):
        noise = 1.0 + 0.5 * torch.rand(lam.numel(), generator=g, dtype=torch.float64)
        vaw((_toy_loss(lam) * noise).float(), lam.float())
    sampler.update_from_vaw(vaw)
    assert sampler.warm
    return sampler


@pytest.mark.parametrize("form", ["edm", "ddpm"])
def test_default_sampler_matches_formulation(form):
    f = make_formulation(form)
    s = make_noise_sampler("default", f)
    lvl, lam, w = s.sample(64, torch.Generator().manual_seed(3), "cpu")
    ref = f.sample_levels(64, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(lvl, ref)
    assert torch.equal(lam, f.logsnr(ref))
    assert torch.equal(w, torch.ones(64))
    assert s.state_dict() == {}


@pytest.mark.parametrize("form", ["edm", "ddpm"])
def test_bin_frequencies_match_target_chi_square(form):
    f = make_formulation(form)
    s = _warm(make_noise_sampler("vaw-is", f, num_bins=32, logsnr_range=(-12.0, 12.0), mix=0.05))
    P = s.probs().numpy()
    assert abs(P.sum() - 1) < 1e-12 and (P[s.valid.numpy()] > 0).all() and (P[~s.valid.numpy()] == 0).all()
    # the proposal really is tilted away from the base distribution
    assert np.abs(P - s.base_probs().numpy()).sum() > 0.05
    n = 40000
    lvl, lam, w = s.sample(n, torch.Generator().manual_seed(1234), "cpu")
    bins = s.last_bins.numpy()
    obs = np.bincount(bins, minlength=s.K)
    keep = P > 0
    # merge tiny-expectation bins into one cell so the chi-square approximation holds
    exp = P * n
    big = keep & (exp >= 5)
    small = keep & ~big
    o = np.append(obs[big], obs[small].sum())
    e = np.append(exp[big], exp[small].sum())
    if e[-1] == 0:
        o, e = o[:-1], e[:-1]
    assert obs[~keep].sum() == 0
    p = stats.chisquare(o, e * o.sum() / e.sum()).pvalue
    assert p > 1e-3, p
    # bins recomputed from the returned lam agree (up to float32 rounding at the edges)
    assert (s.bin_index(lam).numpy() == bins).mean() > 0.99


@pytest.mark.parametrize("form", ["edm", "ddpm"])
def test_importance_weighted_loss_is_unbiased(form):
    f = make_formulation(form)
    s = _warm(make_noise_sampler("vaw-is", f, num_bins=48, logsnr_range=(-12.0, 12.0), mix=0.02))
    if form == "ddpm":
        target = float(_toy_loss(f.lams).mean())  # uniform over timesteps
    else:
        lo, hi = f.logsnr_bounds()
        grid = torch.linspace(lo, hi, 200001, dtype=torch.float64)
        dens = f.logsnr_density(grid).double()
        target = float(torch.trapezoid(dens * _toy_loss(grid), grid) / torch.trapezoid(dens, grid))
    lvl, lam, w = s.sample(200000, torch.Generator().manual_seed(7), "cpu")
    vals = w.double() * _toy_loss(lam.double())
    est = float(vals.mean())
    se = float(vals.std() / math.sqrt(vals.numel()))
    assert abs(est - target) < max(4 * se, 2e-3 * target), (est, target, se)
    assert abs(float(w.double().mean()) - 1.0) < 0.01
    # importance sampling should not blow up the variance relative to plain sampling here
    lvl0 = f.sample_levels(200000, torch.Generator().manual_seed(7), "cpu")
    plain = _toy_loss(f.logsnr(lvl0).double())
    assert float(vals.var()) < 1.5 * float(plain.var())


def test_deterministic_given_generator_and_state_roundtrip():
    f = make_formulation("edm")
    a = _warm(make_noise_sampler("vaw-is", f, num_bins=16))
    out1 = a.sample(256, torch.Generator().manual_seed(5), "cpu")
    out2 = a.sample(256, torch.Generator().manual_seed(5), "cpu")
    for x, y in zip(out1, out2):
        assert torch.equal(x, y)
    b = make_noise_sampler("vaw-is", f, num_bins=16)
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    b.load_state_dict(state)
    torch.testing.assert_close(b.probs(), a.probs(), rtol=0, atol=0)
    out3 = b.sample(256, torch.Generator().manual_seed(5), "cpu")
    for x, y in zip(out1, out3):
        assert torch.equal(x, y)
    # different generator state -> different draws; the sampler draws from nothing else
    torch.manual_seed(0)
    out4 = a.sample(256, torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(out1[0], out4[0])
    with pytest.raises(RuntimeError, match="bins"):
        make_noise_sampler("vaw-is", f, num_bins=8).load_state_dict(state)


def test_cold_sampler_is_default_and_update_from_vaw():
    f = make_formulation("edm")
    s = make_noise_sampler("vaw-is", f, num_bins=16, logsnr_range=(-12.0, 12.0))
    assert not s.warm
    lvl, lam, w = s.sample(32, torch.Generator().manual_seed(2), "cpu")
    assert torch.equal(lvl, f.sample_levels(32, torch.Generator().manual_seed(2), "cpu"))
    assert torch.equal(w, torch.ones(32))
    vaw = VarianceAwareWeighting(num_bins=16, logsnr_range=(-12.0, 12.0), min_count=4, backend="reference")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        level = f.sample_levels(128, g, "cpu")
        lam = f.logsnr(level)
        vaw(_toy_loss(lam).float() * (1 + torch.rand(128, generator=g)), lam)
    s.update_from_vaw(vaw)
    assert s.warm
    st = vaw.stats()
    torch.testing.assert_close(s.C, st["count"].double())
    P = s.probs()
    assert abs(float(P.sum()) - 1) < 1e-12
    # a rank that received the same (synced) statistics gets the same proposal
    s2 = make_noise_sampler("vaw-is", f, num_bins=16, logsnr_range=(-12.0, 12.0))
    s2.update_from_vaw(vaw)
    assert torch.equal(s2.probs(), P)


def test_invalid_arguments():
    f = make_formulation("edm")
    with pytest.raises(ValueError):
        make_noise_sampler("bogus", f)
    with pytest.raises(ValueError):
        make_noise_sampler("vaw-is", f, mix=0.0)
    with pytest.raises(ValueError):
        make_noise_sampler("vaw-is", f, statistic="median")


def _fed_vaw(num_bins=16, steps=20):
    f = make_formulation("edm")
    vaw = VarianceAwareWeighting(num_bins=num_bins, logsnr_range=(-12.0, 12.0), min_count=4, backend="reference")
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        lam = f.logsnr(f.sample_levels(128, g, "cpu"))
        vaw(_toy_loss(lam).float() * (1 + torch.rand(128, generator=g)), lam)
    return f, vaw


@pytest.mark.parametrize("bins", [16, 24])
def test_update_from_vaw_reads_the_buffers_without_stats(monkeypatch, bins):
    """The per-step update takes the buffers as they are (issue 25: it called stats(), five host
    copies); it agrees bit for bit with handing over stats() by hand, also across grids."""
    f, vaw = _fed_vaw()
    by_hand = make_noise_sampler("vaw-is", f, num_bins=bins, logsnr_range=(-12.0, 12.0))
    st = vaw.stats()
    by_hand.update_from_stats(st["mean"], st["var"] + st["mean"] ** 2, st["count"], st["weight"],
                              bin_edges=st["bin_edges"])
    monkeypatch.setattr(vaw, "stats", lambda: pytest.fail("update_from_vaw called stats()"))
    s = make_noise_sampler("vaw-is", f, num_bins=bins, logsnr_range=(-12.0, 12.0))
    s.update_from_vaw(vaw)
    assert s.warm and torch.equal(s.probs(), by_hand.probs())
    for x, y in zip(s.sample(64, torch.Generator().manual_seed(4)), by_hand.sample(64, torch.Generator().manual_seed(4))):
        assert torch.equal(x, y)


@pytest.mark.parametrize("form", ["edm", "ddpm"])
def test_update_from_vaw_stays_on_the_vaw_device(form, monkeypatch):
    """On a device the proposal and its CDF are rebuilt where the VAW buffers are: a meta VAW
    (which refuses any copy to the host or any read of a value) works, and after the first
    update nothing more is copied from the host to the device."""
    _, vaw = _fed_vaw()
    vaw = vaw.to("meta")
    s = make_noise_sampler("vaw-is", make_formulation(form), num_bins=16, logsnr_range=(-12.0, 12.0))
    s.update_from_vaw(vaw)
    assert s._P.device.type == "meta" and s._cdf.device.type == "meta" and s.C.device.type == "meta"
    copied = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copied.append(t.device.type) or real_to(t, *a, **k))
    s.update_from_vaw(vaw)
    assert "cpu" not in copied, copied
