"""The library's drop-in weightings (varweight_kernels.weightings) against their published formulas,
VAW's ``prior=``, and the package's discoverability (attributes, help())."""
import math
import pydoc

import numpy as np
import pytest
import torch

import varweight_kernels as vk
from varweight_kernels.weightings import (CauchyWeighting, EDM2Weighting, MinSNRWeighting, P2Weighting,
                                          UniformWeighting, VarianceAwareWeighting)

SPELLINGS = {"eps": ("eps", "epsilon"), "v": ("v", "v_prediction"), "x0": ("x0", "sample")}


def _inputs(seed, B=64):
    g = torch.Generator().manual_seed(seed)
    lam = torch.rand(B, generator=g, dtype=torch.float64) * 24 - 12
    loss = torch.rand(B, generator=g, dtype=torch.float64) * 3 + 0.01
    return loss, lam


# The published weights, written out in numpy (float64) from REFERENCES.md, independently of the code.
def published_min_snr(lam, gamma, target):
    snr = np.exp(lam)
    return {"eps": np.minimum(snr, gamma) / snr, "v": np.minimum(snr, gamma) / (snr + 1),
            "x0": np.minimum(snr, gamma)}[target]


def published_p2_on_eps(lam, k, gamma):
    return 1.0 / (k + np.exp(lam)) ** gamma


def _check_drop_in(w, loss, lam, expected_weights):
    """Output, last_weights and gradient of ``w(loss, lam)`` are those of ``expected_weights``."""
    loss = loss.clone().requires_grad_(True)
    out = w(loss, lam)
    (grad,) = torch.autograd.grad(out, loss)
    expected = torch.as_tensor(expected_weights, dtype=torch.float64)
    torch.testing.assert_close(w.last_weights, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out, (expected * loss.detach()).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected / len(loss), rtol=1e-12, atol=0)
    assert out.dim() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", ["eps", "v", "x0"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_is_the_published_formula(seed, target, gamma):
    loss, lam = _inputs(seed)
    for spelling in SPELLINGS[target]:
        w = MinSNRWeighting(gamma, target=spelling)
        assert w.target == target
        _check_drop_in(w, loss, lam, published_min_snr(lam.numpy(), gamma, target))


def test_min_snr_avoids_the_known_bugs():
    lam = torch.log(torch.tensor([0.1, 4.5, 100.0], dtype=torch.float64))
    w = MinSNRWeighting(5.0, target="eps").weights(lam)
    assert w.tolist() == pytest.approx([1.0, 1.0, 0.05])  # min, not max (max: 50, 5/4.5, 1)
    v = MinSNRWeighting(5.0, target="v_prediction").weights(lam)
    assert v[1].item() == pytest.approx(4.5 / 5.5)  # min(SNR, g)/(SNR+1); min(SNR+1, g)/(SNR+1) gives 5/5.5


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k, gamma", [(1.0, 1.0), (1.0, 0.5), (0.5, 2.0)])
def test_p2_is_the_published_formula_on_the_eps_loss(seed, k, gamma):
    loss, lam = _inputs(seed)
    for spelling in SPELLINGS["eps"]:
        _check_drop_in(P2Weighting(k, gamma, target=spelling), loss, lam, published_p2_on_eps(lam.numpy(), k, gamma))


def _vp_losses(seed, B=64):
    """The eps, x0 and v MSEs of one random prediction under x = alpha x0 + sigma eps (VP)."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.rand(B, generator=g, dtype=torch.float64) * 16 - 8
    alpha, sigma = torch.sigmoid(lam).sqrt()[:, None], torch.sigmoid(-lam).sqrt()[:, None]
    x0, eps = torch.randn(B, 8, generator=g, dtype=torch.float64), torch.randn(B, 8, generator=g, dtype=torch.float64)
    x = alpha * x0 + sigma * eps
    x0_hat = x0 + 0.3 * torch.randn(B, 8, generator=g, dtype=torch.float64)  # one prediction, three targets
    eps_hat = (x - alpha * x0_hat) / sigma
    v, v_hat = alpha * eps - sigma * x0, alpha * eps_hat - sigma * x0_hat
    mse = {"eps": ((eps_hat - eps) ** 2).mean(1), "x0": ((x0_hat - x0) ** 2).mean(1), "v": ((v_hat - v) ** 2).mean(1)}
    return mse, lam


@pytest.mark.parametrize("make", [lambda t: P2Weighting(1.0, 1.0, target=t), lambda t: MinSNRWeighting(5.0, target=t)])
def test_every_target_gives_the_same_objective_for_the_same_prediction(make):
    """P2 is defined on the eps loss and min-SNR per target: given one prediction, weighting its x0
    or v MSE must give the eps-MSE objective (the conversions SNR and SNR/(SNR+1), exact for VP)."""
    mse, lam = _vp_losses(3)
    per_target = {t: make(t)(mse[t], lam) for t in ("eps", "x0", "v")}
    torch.testing.assert_close(per_target["x0"], per_target["eps"], rtol=1e-10, atol=0)
    torch.testing.assert_close(per_target["v"], per_target["eps"], rtol=1e-10, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("normalize", [False, True])
def test_cauchy_is_the_papers_batch_centred_weight(seed, normalize):
    loss, lam = _inputs(seed)
    lam_np = lam.numpy()
    expected = 1.0 / (1.0 + 0.05 * (lam_np - lam_np.mean()) ** 2)
    if normalize:
        expected = expected / expected.mean()
    _check_drop_in(CauchyWeighting(0.05, normalize=normalize), loss, lam, expected)


def test_uniform_is_the_plain_mean():
    loss, lam = _inputs(4)
    _check_drop_in(UniformWeighting(), loss, lam, np.ones(len(loss)))


def test_edm2_is_loss_over_exp_u_plus_u():
    loss, lam = _inputs(5, B=32)
    w = EDM2Weighting(channels=16, seed=3)
    with torch.no_grad():  # a trained-looking u
        w.weight.copy_(torch.randn(1, 16, generator=torch.Generator().manual_seed(9)))
        w.bias.fill_(0.3)
    c = -lam.numpy()[:, None] / 8.0
    feats = math.sqrt(2.0) * np.cos(2 * math.pi * (c * w.freqs.numpy() + w.phases.numpy()))
    u = feats @ w.weight.detach().numpy()[0] + 0.3
    out = w(loss, lam)
    expected = (loss.numpy() / np.exp(u) + u).mean()
    assert out.item() == pytest.approx(expected, rel=1e-5)  # u in float32, as EDM2 computes it
    torch.testing.assert_close(w.last_weights.double(), torch.as_tensor(np.exp(-u)), rtol=1e-5, atol=0)
    out.backward()
    assert w.weight.grad is not None and w.bias.grad is not None  # u learns with the model


def test_edm2_parameters_learn_the_log_loss():
    w = EDM2Weighting(channels=32, seed=0)
    lam = torch.tensor([-4.0] * 8 + [4.0] * 8)
    loss = torch.tensor([0.1] * 8 + [3.0] * 8)
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        w(loss, lam).backward()
        opt.step()
    assert w.logvar(torch.tensor([-4.0, 4.0])).tolist() == pytest.approx([math.log(0.1), math.log(3.0)], abs=0.1)


@pytest.mark.parametrize("make", [
    UniformWeighting, lambda: CauchyWeighting(0.1, normalize=True), lambda: MinSNRWeighting(2.0, target="v"),
    lambda: P2Weighting(0.5, 0.5, target="sample"), lambda: EDM2Weighting(channels=8, seed=1),
    lambda: VarianceAwareWeighting(num_bins=8, min_count=1, prior=MinSNRWeighting(target="eps")),
])
def test_state_dict_round_trips(make):
    loss, lam = _inputs(6)
    a = make()
    for _ in range(3):
        a(loss.float(), lam.float())
    if isinstance(a, EDM2Weighting):
        with torch.no_grad():
            a.weight.add_(1.0)
    b = make()
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items() if isinstance(v, torch.Tensor))
    a.eval(), b.eval()
    assert torch.equal(a(loss.float(), lam.float()), b(loss.float(), lam.float()))


@pytest.mark.parametrize("make", [lambda t: MinSNRWeighting(target=t), lambda t: P2Weighting(target=t)])
def test_a_bad_target_is_one_clear_error(make):
    with pytest.raises(ValueError, match="target must be one of .*'epsilon'.*got 'x_0'"):
        make("x_0")


@pytest.mark.parametrize("make, field", [
    (lambda: CauchyWeighting(alpha=-1.0), "alpha"), (lambda: MinSNRWeighting(0.0, target="eps"), "gamma"),
    (lambda: P2Weighting(k=-1.0, target="eps"), "k"), (lambda: P2Weighting(gamma=math.nan, target="eps"), "gamma"),
    (lambda: EDM2Weighting(channels=0), "channels"),
])
def test_bad_hyper_parameters_are_named(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_bad_inputs_get_one_line_errors():
    w = MinSNRWeighting(target="eps")
    with pytest.raises(ValueError, match="1-D of the same length"):
        w(torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError, match="lam must have a floating dtype"):
        w(torch.ones(3), torch.arange(3))


# ---------------------------------------------------------------------------- VAW's prior
@pytest.mark.parametrize("prior", [CauchyWeighting(0.05), MinSNRWeighting(5.0, target="epsilon"),
                                   P2Weighting(1.0, 0.5, target="v")])
def test_prior_multiplies_the_weights_and_leaves_the_statistics_alone(prior):
    kw = dict(num_bins=8, logsnr_range=(-12.0, 12.0), min_count=1, backend="reference")
    with_prior, plain = VarianceAwareWeighting(prior=prior, **kw), VarianceAwareWeighting(prior=None, **kw)
    for seed in range(4):
        loss, lam = (t.float() for t in _inputs(seed))
        loss.requires_grad_(True)
        out = with_prior(loss, lam)
        plain(loss.detach(), lam)
        expected_w = plain.last_weights * prior.weights(lam)
        torch.testing.assert_close(with_prior.last_weights, expected_w)
        torch.testing.assert_close(out, (expected_w * loss.detach()).mean())
        (grad,) = torch.autograd.grad(out, loss)
        torch.testing.assert_close(grad, expected_w / len(loss))
        for name in ("M", "Q", "Z", "C", "weight", "step"):  # statistics of the unweighted loss
            assert torch.equal(getattr(with_prior, name), getattr(plain, name)), name


def test_prior_must_be_a_fixed_rule():
    with pytest.raises(TypeError, match="prior must be a fixed-rule weighting"):
        VarianceAwareWeighting(prior=EDM2Weighting(channels=4))
    with pytest.raises(TypeError, match="prior must be a fixed-rule weighting"):
        VarianceAwareWeighting(prior=VarianceAwareWeighting())


# ---------------------------------------------------------------------------- discovery
def test_submodules_are_attributes_of_the_package():
    assert vk.logsnr.from_sigma(torch.tensor([1.0])).item() == 0.0
    assert vk.weightings.VarianceAwareWeighting is vk.VarianceAwareWeighting
    assert {"logsnr", "weightings"} <= set(vk.__all__)


@pytest.mark.parametrize("cls", [VarianceAwareWeighting, UniformWeighting, CauchyWeighting, MinSNRWeighting,
                                 P2Weighting, EDM2Weighting])
def test_init_and_forward_have_their_own_docstrings_in_help(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    for method in ("__init__", "forward"):
        func = getattr(cls, method)
        own = func.__doc__
        assert own and own != getattr(torch.nn.Module, method).__doc__, f"{cls.__name__}.{method}"
        assert own.strip().splitlines()[0] in text, f"{cls.__name__}.{method} not in help()"
