"""Tests of the diffusion-training parts: weightings, U-Net, formulations, samplers, data, RNG."""
import math

import numpy as np
import pytest
import torch

from varweight_kernels.training.config import TrainConfig
from varweight_kernels.training.data import (BatchIterator, DatasetUnavailable, from_model_range, load_dataset,
                                             to_model_range)
from varweight_kernels.training.formulations import LossTerms, make_formulation
from varweight_kernels.training.rng import STREAMS, derive_seed, get_rng_states, make_generators, set_rng_states
from varweight_kernels.training.samplers import ddim, ddpm_ancestral, heun_karras, karras_sigmas
from varweight_kernels.training.sampling import generate
from varweight_kernels.training.unet import UNet
from varweight_kernels.training.weightings import make_weighting

from tiny_runs import write_fake_cifar10

D = torch.float64


def terms(loss, mse=None, snr=None):
    loss = torch.tensor(loss, dtype=D)
    mse = loss.clone() if mse is None else torch.tensor(mse, dtype=D)
    snr = torch.ones_like(loss) if snr is None else torch.tensor(snr, dtype=D)
    return LossTerms(loss, mse, snr)


def tiny_unet(embedding="fourier", in_channels=1):
    return UNet(in_channels, 8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), embedding=embedding)


# ---------------------------------------------------------------------------- weightings
SNR = [0.5, 5.0, 20.0]
MSE = [1.0, 2.0, 4.0]


@pytest.mark.parametrize("target,expected", [
    ("eps", 4.0 / 3.0),     # w = min(snr,5)/snr = [1, 1, 1/4]; (1 + 2 + 1)/3   (max would give 16/3)
    ("x0", 30.5 / 3.0),     # w = min(snr,5) = [0.5, 5, 5]; (0.5 + 10 + 20)/3  (max would give (10 + 10 + 80)/3)
    ("v", 62.0 / 63.0),     # w = min(snr,5)/(snr+1) = [1/3, 5/6, 5/21]; (1/3 + 5/3 + 20/21)/3
])
def test_min_snr_hand_values(target, expected):
    w = make_weighting("min-snr", target=target)
    out = w(terms([9.0, 9.0, 9.0], MSE, SNR), torch.zeros(3, dtype=D))  # applies to mse, not loss
    assert out.item() == pytest.approx(expected, rel=1e-12)


def test_min_snr_clamps_with_min_not_max():
    w = make_weighting("min-snr", target="eps", gamma=5.0)
    w(terms([1.0, 1.0], [1.0, 1.0], [0.1, 100.0]), torch.zeros(2, dtype=D))
    # min: low SNR keeps weight 1, high SNR is cut to 5/100; max would give 50 and 1.
    assert w.last_weights.tolist() == pytest.approx([1.0, 0.05])


def test_p2_hand_values():
    t = terms([9.0, 9.0, 9.0], MSE, SNR)
    # eps: w = 1/(1+snr) = [2/3, 1/6, 1/21]; (2/3 + 1/3 + 4/21)/3 = 25/63
    assert make_weighting("p2", target="eps")(t, torch.zeros(3)).item() == pytest.approx(25 / 63, rel=1e-12)
    # x0: eps-MSE = snr * x0-MSE, so w = snr/(1+snr) = [1/3, 5/6, 20/21]; (1/3 + 5/3 + 80/21)/3 = 122/63
    assert make_weighting("p2", target="x0")(t, torch.zeros(3)).item() == pytest.approx(122 / 63, rel=1e-12)
    # gamma = 0.5: w = (1+snr)^-0.5
    exp = sum(m / math.sqrt(1 + s) for m, s in zip(MSE, SNR)) / 3
    assert make_weighting("p2", target="eps", gamma=0.5)(t, torch.zeros(3)).item() == pytest.approx(exp)


def test_seed_cauchy_hand_values():
    w = make_weighting("seed-cauchy")  # alpha = 0.05
    out = w(terms([1.0, 2.0, 3.0]), torch.tensor([-2.0, 0.0, 2.0], dtype=D))
    # lam - mean = [-2, 0, 2]; w = [1/1.2, 1, 1/1.2]; (1/1.2 + 2 + 3/1.2)/3 = 16/9
    assert out.item() == pytest.approx(16 / 9, rel=1e-6)
    assert w.last_weights.tolist() == pytest.approx([1 / 1.2, 1.0, 1 / 1.2], rel=1e-6)


def test_seed_standardized_hand_values_and_detached_weight():
    w = make_weighting("seed-standardized", alpha=0.5)
    loss = torch.tensor([1.0, 2.0, 3.0], dtype=D, requires_grad=True)
    out = w(LossTerms(loss, loss, torch.ones(3, dtype=D)), torch.zeros(3, dtype=D))
    std = math.sqrt(2 / 3)  # population std of [1, 2, 3]
    # sum w*l = 6 + (0.5/std) * sum((l - 2) * l) = 6 + 1/std
    assert out.item() == pytest.approx((6 + 1 / std) / 3, rel=1e-12)
    out.backward()
    expected_w = [1 - 0.5 / std, 1.0, 1 + 0.5 / std]
    assert loss.grad.tolist() == pytest.approx([x / 3 for x in expected_w], rel=1e-12)  # weight is detached


def test_seed_standardized_guards():
    w = make_weighting("seed-standardized", alpha=0.5)
    assert w(terms([5.0]), torch.zeros(1)).item() == 5.0                      # B = 1
    assert w(terms([2.0, 2.0, 2.0]), torch.zeros(3)).item() == 2.0            # std = 0
    assert w.last_weights.tolist() == [1.0, 1.0, 1.0]
    big = make_weighting("seed-standardized", alpha=10.0)                      # clamped at 0
    big(terms([0.0, 0.0, 0.0, 100.0]), torch.zeros(4))
    assert float(big.last_weights.min()) == 0.0


def test_uniform_and_vaw():
    t = terms([1.0, 2.0, 6.0])
    assert make_weighting("uniform")(t, torch.zeros(3)).item() == pytest.approx(3.0)
    v = make_weighting("vaw", num_bins=4, logsnr_range=(-4.0, 4.0), min_count=1, backend="reference")
    t32 = LossTerms(t.loss.float(), t.mse.float(), t.snr.float())
    assert v(t32, torch.tensor([-3.0, 0.5, 3.0])).item() == pytest.approx(3.0)  # first table is all ones
    assert int(v.vaw.step) == 1 and v.last_weights.shape == (3,)
    assert "vaw.M" in v.state_dict()
    v2 = make_weighting("vaw", {"vaw": {"num_bins": 8, "backend": "reference"}})
    assert v2.vaw.config.num_bins == 8


def test_make_weighting_from_cfg_mapping():
    w = make_weighting("min-snr", {"gamma": 2.0, "alpha": 0.3, "target": "x0"})
    assert w.gamma == 2.0 and w.target == "x0"
    with pytest.raises(ValueError):
        make_weighting("nope")


def test_edm2_learns_log_loss_and_keeps_global_rng():
    torch.manual_seed(123)
    ref = torch.rand(4)
    torch.manual_seed(123)
    w = make_weighting("edm2", seed=7)
    assert torch.equal(torch.rand(4), ref)  # construction did not touch the global RNG
    lam = torch.tensor([-4.0] * 8 + [4.0] * 8)
    loss = torch.tensor([0.1] * 8 + [3.0] * 8)
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        w(LossTerms(loss, loss, torch.ones(16)), lam).backward()
        opt.step()
    u = w.logvar(torch.tensor([-4.0, 4.0]))
    assert u.tolist() == pytest.approx([math.log(0.1), math.log(3.0)], abs=0.1)
    assert w.last_weights.shape == (16,)



@pytest.mark.parametrize("name", ["uniform", "vaw", "seed-cauchy", "seed-standardized", "min-snr", "p2", "edm2"])
def test_objective_with_importance_weights(name):
    """One interface for every weighting: without importance weights ``objective`` is the plain
    call; with them each sample's weighted term is scaled by its importance weight, bitwise as
    the trainer computed it before (the weighting's statistics see the raw terms)."""
    kw = {"num_bins": 4, "logsnr_range": (-4.0, 4.0), "min_count": 1, "backend": "reference"} if name == "vaw" else {}
    g = torch.Generator().manual_seed(0)
    loss, mse = torch.rand(6, generator=g) + 0.1, torch.rand(6, generator=g) + 0.1
    lam = torch.linspace(-3.0, 3.0, 6)
    t = LossTerms(loss, mse, torch.exp(lam))
    is_weight = torch.rand(6, generator=g) + 0.5
    plain, weighted = make_weighting(name, **kw), make_weighting(name, **kw)
    assert torch.equal(plain.objective(t, lam), make_weighting(name, **kw)(t, lam))
    out = weighted.objective(t, lam, is_weight)
    if name == "edm2":
        u = weighted.logvar(lam)
        expected = (is_weight * (loss / torch.exp(u) + u)).mean()
    else:
        term = mse if name in ("min-snr", "p2") else loss
        expected = (weighted.last_weights * is_weight * term).mean()
    assert torch.equal(out, expected)
    assert torch.equal(weighted.last_weights, plain.last_weights)  # same statistics, same weights
    assert (weighted.bin_weights() is not None) == (name == "vaw")


# ---------------------------------------------------------------------------- U-Net
@pytest.mark.parametrize("embedding", ["fourier", "positional"])
def test_unet_tiny_shape_determinism_zero_init(embedding):
    torch.manual_seed(0)
    a = tiny_unet(embedding)
    torch.manual_seed(0)
    b = tiny_unet(embedding)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    x = torch.randn(3, 1, 8, 8)
    c = torch.tensor([0.1, -0.5, 3.0]) if embedding == "fourier" else torch.tensor([0.0, 10.0, 999.0])
    out = a(x, c)
    assert out.shape == x.shape and torch.all(out == 0)  # zero-init output conv
    with torch.no_grad():
        a.conv_out.weight.normal_(generator=torch.Generator().manual_seed(0))
    out = a(x, c)
    assert torch.isfinite(out).all() and torch.equal(out, a(x, c)) and out.abs().sum() > 0


def test_unet_validates_and_supports_three_channels():
    with pytest.raises(ValueError):
        UNet(3, 10, base_channels=16, channel_mults=(1, 2, 2))
    m = UNet(3, 16, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
    assert m(torch.randn(2, 3, 16, 16), torch.zeros(2)).shape == (2, 3, 16, 16)


# ---------------------------------------------------------------------------- formulations
def test_edm_formulation():
    f = make_formulation("edm")
    assert f.target == "x0"
    sig = torch.tensor([0.5, 1.0, 0.002, 80.0])
    lam = f.logsnr(sig)
    assert lam.dtype == torch.float32
    assert lam.tolist() == pytest.approx([0.0, math.log(0.25), math.log(0.25 / 0.002 ** 2), math.log(0.25 / 6400)],
                                         rel=1e-6)
    assert f.level_from_logsnr(lam).tolist() == pytest.approx(sig.tolist(), rel=1e-5)
    assert f.logsnr_bounds() == pytest.approx((math.log(0.25 / 6400), math.log(0.25 / 0.002 ** 2)))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s = f.sample_levels(4096, g1, "cpu")
    assert torch.equal(s, f.sample_levels(4096, g2, "cpu"))
    assert s.min() >= 0.002 and s.max() <= 80
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.06) and s.log().std().item() == pytest.approx(1.2, abs=0.06)
    xs = np.linspace(*f.logsnr_bounds(), 20001)
    assert np.trapezoid(f.logsnr_density(torch.tensor(xs)).numpy(), xs) == pytest.approx(1.0, abs=1e-3)
    torch.manual_seed(0)
    m = tiny_unet("fourier")
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn(4, 1, 8, 8)
    t = f.loss(m, x0, sig, noise)
    assert all(v.shape == (4,) and torch.isfinite(v).all() for v in t)
    wt = (sig ** 2 + 0.25) / (sig * 0.5) ** 2
    assert torch.allclose(t.loss, wt * t.mse, rtol=1e-5)
    assert torch.allclose(t.snr, lam.exp(), rtol=1e-5)
    # zero-init network: D = c_skip * x_noisy
    c_skip = (0.25 / (sig ** 2 + 0.25)).reshape(-1, 1, 1, 1)
    expect = ((c_skip * (x0 + sig.reshape(-1, 1, 1, 1) * noise) - x0) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(t.mse, expect, rtol=1e-5, atol=1e-7)


def test_ddpm_formulation():
    f = make_formulation("ddpm")
    assert f.target == "eps" and f.num_timesteps == 1000
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    t = torch.tensor([0, 1, 500, 999])
    assert f.logsnr(t).tolist() == pytest.approx(np.log(abar / (1 - abar))[[0, 1, 500, 999]].tolist(), rel=1e-5)
    assert f.logsnr(torch.tensor([0.0]))[0].item() == pytest.approx(math.log((1 - 1e-4) / 1e-4), rel=1e-6)
    all_t = torch.arange(1000)
    assert torch.equal(f.level_from_logsnr(f.logsnr(all_t)), all_t)
    assert f.level_probs().sum().item() == pytest.approx(1.0)
    xs = np.linspace(*f.logsnr_bounds(), 200001)
    assert np.trapezoid(f.logsnr_density(torch.tensor(xs)).numpy(), xs) == pytest.approx(1.0, abs=1e-3)
    lv = f.sample_levels(64, torch.Generator().manual_seed(0), "cpu")
    assert lv.dtype == torch.int64 and lv.min() >= 0 and lv.max() < 1000
    torch.manual_seed(0)
    m = tiny_unet("positional")
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn(4, 1, 8, 8)
    terms_ = f.loss(m, x0, t, noise)
    assert all(v.shape == (4,) and torch.isfinite(v).all() for v in terms_)
    # zero-init network predicts eps = 0, so the eps MSE is mean(noise^2)
    assert torch.allclose(terms_.loss, (noise ** 2).mean(dim=(1, 2, 3)), rtol=1e-6)
    assert torch.equal(terms_.loss, terms_.mse)


# ---------------------------------------------------------------------------- samplers
def test_heun_karras_reproduces_gaussian_std():
    s = 0.5
    den = lambda x, sig: x * s ** 2 / (s ** 2 + sig.reshape(-1, 1, 1, 1) ** 2)  # noqa: E731
    x = heun_karras(den, (2000, 1, 10, 10), torch.Generator().manual_seed(0), steps=50)
    assert x.std().item() == pytest.approx(s, rel=0.01)
    again = heun_karras(den, (2000, 1, 10, 10), torch.Generator().manual_seed(0), steps=50)
    assert torch.equal(x, again)
    sig = karras_sigmas(5)
    assert sig[0].item() == pytest.approx(80) and sig[4].item() == pytest.approx(0.002) and sig[5] == 0


def test_ddpm_samplers_gaussian_and_tiny_model():
    f = make_formulation("ddpm")
    s = 0.5
    acp = f.alphas_cumprod.float()

    def den(x, t):
        a = acp[t].reshape(-1, 1, 1, 1)
        return x * a.sqrt() * s ** 2 / (a * s ** 2 + 1 - a)  # exact x0 posterior mean

    x = ddpm_ancestral(den, (500, 1, 4, 4), torch.Generator().manual_seed(0), f.alphas_cumprod, clip_denoised=False)
    assert x.std().item() == pytest.approx(s, rel=0.03)
    x = ddim(den, (500, 1, 4, 4), torch.Generator().manual_seed(0), f.alphas_cumprod, steps=250, clip_denoised=False)
    assert x.std().item() == pytest.approx(s, rel=0.03)
    torch.manual_seed(0)
    m = tiny_unet("positional")
    for sampler in ("ddim", "ddpm"):
        a = _generate("ddpm", sampler, m, 3, batch=2)
        assert a.shape == (3, 1, 8, 8) and a.dtype == torch.uint8
        assert torch.equal(a, _generate("ddpm", sampler, m, 3, batch=2))  # the generator alone decides


def _generate(formulation, sampler, model, n, batch, seed=1):
    """The trainer's dispatcher, as evaluations and --sample-only call it (5 sampler steps)."""
    cfg = TrainConfig(formulation=formulation, sampler=sampler, sample_steps=5)
    return generate(cfg, make_formulation(formulation), model, n, (1, 8, 8), torch.device("cpu"),
                    torch.Generator().manual_seed(seed), batch=batch)


def test_generate_edm():
    torch.manual_seed(0)
    m = tiny_unet("fourier")
    x = _generate("edm", "auto", m, 5, batch=2, seed=2)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.uint8
    # Heun draws its noise once per batch, in order: batches of 2 see the noise of one batch of 5
    assert torch.equal(x, _generate("edm", "heun", m, 5, batch=5, seed=2))
    assert not torch.equal(x, _generate("edm", "heun", m, 5, batch=5, seed=3))


# ---------------------------------------------------------------------------- data
def test_digits_loader_and_ranges():
    x, k = load_dataset("digits")
    assert k == 10 and x.dtype == torch.uint8 and x.shape == (1797, 1, 8, 8)
    assert x.min() == 0 and x.max() == 255
    y = to_model_range(x)
    assert y.dtype == torch.float32 and y.min() == -1 and y.max() == 1
    assert torch.equal(from_model_range(y), x)


def test_missing_cifar_error_names_options(tmp_path):
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset("cifar10", root=str(tmp_path), download=False)
    msg = str(err.value)
    assert "--data-root" in msg and "--download" in msg and "--dataset digits" in msg
    assert isinstance(err.value, RuntimeError)


def test_cifar_extracted_folder_is_parsed(tmp_path, monkeypatch):
    """Fabricated batches, read through torchvision once their MD5s are the published ones."""
    def data_of(i):
        data = np.full((2, 3072), i, dtype=np.uint8)
        data[:, 1024:2048] = 100 + i  # green plane
        return data

    write_fake_cifar10(tmp_path / "cifar-10-batches-py", data_of, monkeypatch)
    x, k = load_dataset("cifar10", root=str(tmp_path))
    assert k == 10 and x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8
    assert x[0, 0].max() == 0 and x[0, 1].min() == 100 and x[9, 1, 5, 5] == 104
    xt, _ = load_dataset("cifar10", root=str(tmp_path), split="test")
    assert xt.shape == (2, 3, 32, 32) and xt[0, 0, 0, 0] == 5


def test_batch_iterator_deterministic_and_resumable():
    data = torch.arange(10 * 2 * 3, dtype=torch.uint8).reshape(10, 1, 2, 3)

    def run(n, resume_at=None):
        it = BatchIterator(data, 3, torch.Generator().manual_seed(5), hflip=True)
        out = []
        for i in range(n):
            if resume_at is not None and i == resume_at:
                state = it.state_dict()
                it = BatchIterator(data, 3, torch.Generator().manual_seed(999), hflip=True)
                it.load_state_dict(state)
            out.append(next(it))
        return out, it

    ref, it = run(8)
    assert it.batches_per_epoch == 3 and it.epoch == 2 and it.index == 2
    res, _ = run(8, resume_at=4)
    assert all(torch.equal(a, b) for a, b in zip(ref, res))
    first_epoch = torch.cat(ref[:3])
    assert len({int(img.sum()) for img in first_epoch}) == 9  # no repeats within an epoch
    flipped = 0
    for img in torch.cat(ref):
        k = int(img.min()) // 6  # source image (values 6k..6k+5)
        assert torch.equal(img, data[k]) or torch.equal(img, data[k].flip(-1))
        flipped += int(not torch.equal(img, data[k]))
    assert 0 < flipped < 24


# ---------------------------------------------------------------------------- rng
def test_rng_streams():
    assert derive_seed(0, "init") == 3907432356807734457  # stable across processes and versions
    assert derive_seed(42, "noise", 1) == 4771989624550308665
    assert len({derive_seed(0, s) for s in STREAMS}) == len(STREAMS)
    assert derive_seed(0, "data", 0) != derive_seed(0, "data", 1)
    g1, g2 = make_generators(0, 0), make_generators(0, 0)
    draws = {s: torch.rand(4, generator=g1[s]) for s in STREAMS}
    assert all(torch.equal(draws[s], torch.rand(4, generator=g2[s])) for s in STREAMS)
    assert len({tuple(v.tolist()) for v in draws.values()}) == len(STREAMS)
    # drawing from one stream does not move another
    g3 = make_generators(0, 0)
    torch.rand(100, generator=g3["weighting"])
    assert torch.equal(torch.rand(4, generator=g3["noise"]), draws["noise"])
    states = get_rng_states(g1)
    nxt = torch.rand(3, generator=g1["data"])
    set_rng_states(g1, states)
    assert torch.equal(torch.rand(3, generator=g1["data"]), nxt)
    assert all(v.dtype == torch.uint8 for v in states.values())


def test_batch_iterator_keeps_the_short_last_batch():
    data = torch.arange(10).reshape(10, 1)
    it = BatchIterator(data, 4, torch.Generator().manual_seed(0), drop_last=False)
    sizes = [next(it).shape[0] for _ in range(6)]
    assert sizes == [4, 4, 2, 4, 4, 2] and it.epoch == 1 and it.batches_per_epoch == 3
    assert BatchIterator(data, 4, torch.Generator()).batches_per_epoch == 2  # the default drops it


# ---------------------------------------------------------------------------- SNR conventions
def test_published_snr_under_edm_is_one_over_sigma_squared():
    from varweight_kernels.training.builders import snr_scale
    from varweight_kernels.training.config import TrainConfig
    f = make_formulation("edm", sigma_data=0.5)
    sigma = torch.tensor([0.1, 0.5, 2.0])
    snr = LossTerms(torch.ones(3), torch.ones(3), f.logsnr(sigma).exp()).snr
    published = TrainConfig()
    assert published.snr_convention == "published" and snr_scale(published) == 4.0
    torch.testing.assert_close(snr * snr_scale(published), 1.0 / sigma ** 2)
    assert snr_scale(published.replace({"snr_convention": "sigma-data"})) == 1.0
    assert snr_scale(published.replace({"formulation": "ddpm"})) == 1.0  # exp(lam) = abar/(1-abar) already
    # a run saved before the option existed keeps the convention it trained with
    assert TrainConfig.from_dict({}).snr_convention == "sigma-data"


def test_sigma_data_convention_makes_min_snr_5_act_like_min_snr_20():
    snr = torch.tensor([0.5, 5.0, 10.0, 40.0, 200.0], dtype=D)  # exp(lam) with sigma_data 0.5
    old = make_weighting("min-snr", target="x0", gamma=5.0).weights(snr)
    published20 = make_weighting("min-snr", target="x0", gamma=20.0, snr_scale=4.0).weights(snr)
    torch.testing.assert_close(4.0 * old, published20)  # the same clip point, up to a constant
    p2 = make_weighting("p2", target="eps", snr_scale=4.0).weights(snr)
    torch.testing.assert_close(p2, 1.0 / (1.0 + 4.0 * snr))  # knee at published SNR 1, sigma = 1
    with pytest.raises(ValueError, match="snr_scale"):
        make_weighting("p2", snr_scale=0.0)


def test_analysis_weights_leave_the_weighting_as_it_is():
    """The per-sample analysis weighs a trained model's losses without moving VAW's statistics."""
    lam = torch.linspace(-4, 4, 16)
    t = LossTerms(torch.rand(16, generator=torch.Generator().manual_seed(0)), torch.ones(16), torch.ones(16))
    for kw in ({}, {"prior_alpha": 0.05}):
        w = make_weighting("vaw", num_bins=4, min_count=1, backend="reference", **kw)
        plain = make_weighting("vaw", num_bins=4, min_count=1, backend="reference")  # the same table
        for _ in range(3):
            w.objective(t, lam)
            plain.objective(t, lam)
        before = {k: v.clone() for k, v in w.state_dict().items() if isinstance(v, torch.Tensor)}
        weights = w.analysis_weights(t, lam)
        assert w.vaw.training and all(torch.equal(v, w.state_dict()[k]) for k, v in before.items())
        cauchy = make_weighting("seed-cauchy", alpha=0.05).sample_weights(t, lam) if kw else torch.ones(16)
        torch.testing.assert_close(weights, plain.analysis_weights(t, lam) * cauchy)
    edm2 = make_weighting("edm2", channels=4)
    torch.testing.assert_close(edm2.analysis_weights(t, lam), torch.exp(-edm2.logvar(lam)).detach())
