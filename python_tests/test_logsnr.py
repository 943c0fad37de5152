"""``varweight_kernels.logsnr``: closed forms in float64, the ends, and the range helper."""
import math
from types import SimpleNamespace

import mpmath
import pytest
import torch

from varweight_kernels import logsnr

mpmath.mp.dps = 50


def uniform(lo, hi, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


# -- agreement with the closed forms on random inputs --------------------------------------------
def test_from_alphas_cumprod_matches_closed_form():
    abar = uniform(1e-3, 1 - 1e-3)
    torch.testing.assert_close(logsnr.from_alphas_cumprod(abar), torch.log(abar / (1 - abar)), rtol=1e-12, atol=1e-12)


def test_from_sigma_matches_closed_form_and_the_trainer_convention():
    sigma = torch.exp(uniform(-10, 10))
    torch.testing.assert_close(logsnr.from_sigma(sigma), -2 * torch.log(sigma), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(logsnr.from_sigma(sigma, sigma_data=0.5), torch.log(0.5**2 / sigma**2),
                               rtol=1e-12, atol=1e-12)


def test_from_flow_t_matches_closed_form():
    t = uniform(1e-3, 1 - 1e-3)
    torch.testing.assert_close(logsnr.from_flow_t(t), 2 * torch.log((1 - t) / t), rtol=1e-12, atol=1e-12)


def test_from_vp_cosine_matches_closed_form():
    t = uniform(1e-3, 1 - 1e-3)
    alpha, sigma = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
    torch.testing.assert_close(logsnr.from_vp_cosine(t), torch.log(alpha**2 / sigma**2), rtol=1e-12, atol=1e-12)


def test_from_vp_linear_matches_closed_form():
    t = uniform(1e-2, 1.0)
    abar = torch.exp(-(0.1 * t + 0.5 * (20.0 - 0.1) * t**2))
    torch.testing.assert_close(logsnr.from_vp_linear(t), torch.log(abar / (1 - abar)), rtol=1e-12, atol=1e-12)


def test_flow_shift_lowers_lam_by_two_log_shift():
    t, shift = uniform(1e-3, 1 - 1e-3), 3.0
    shifted = shift * t / (1 + (shift - 1) * t)
    torch.testing.assert_close(logsnr.from_flow_t(shifted), logsnr.from_flow_t(t) - 2 * math.log(shift),
                               rtol=1e-12, atol=1e-12)


def test_vp_linear_is_the_continuous_limit_of_ddpm_linear_betas():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    discrete = logsnr.from_alphas_cumprod(torch.cumprod(1 - betas, 0))
    continuous = logsnr.from_vp_linear(torch.arange(1, 1001, dtype=torch.float64) / 1000)
    assert (discrete - continuous).abs().max() < 0.1


# -- the ends, against 50-digit references ------------------------------------------------------
NEAR_ENDS = [1e-300, 1e-100, 1e-20, 1e-8, 0.25, 0.5, 0.75, 1 - 1e-8, 1 - 2**-52, 1 - 2**-53]
REFERENCES = {
    "from_alphas_cumprod": (logsnr.from_alphas_cumprod, lambda a: mpmath.log(a / (1 - a)), NEAR_ENDS + [5e-324]),
    "from_flow_t": (logsnr.from_flow_t, lambda t: 2 * mpmath.log((1 - t) / t), NEAR_ENDS + [5e-324]),
    "from_vp_cosine": (logsnr.from_vp_cosine, lambda t: -2 * mpmath.log(mpmath.tan(mpmath.pi * t / 2)), NEAR_ENDS),
    "from_vp_linear": (logsnr.from_vp_linear,
                       lambda t: -mpmath.log(mpmath.expm1(mpmath.mpf("0.1") * t + mpmath.mpf("9.95") * t * t)),
                       NEAR_ENDS + [1.0]),
    "from_sigma": (logsnr.from_sigma, lambda s: -2 * mpmath.log(s), [5e-324, 1e-300, 1e-8, 1.0, 80.0, 1e300, 1.7e308]),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_finite_and_accurate_near_the_ends(name):
    fn, reference, inputs = REFERENCES[name]
    got = fn(torch.tensor(inputs, dtype=torch.float64))
    assert torch.isfinite(got).all(), f"{name} is not finite at {inputs}"
    for x, value in zip(inputs, got.tolist()):
        exact = float(reference(mpmath.mpf(x)))
        assert value == pytest.approx(exact, rel=1e-12, abs=1e-12), f"{name}({x!r})"


@pytest.mark.parametrize("fn, at_signal, at_noise", [
    (logsnr.from_alphas_cumprod, 1.0, 0.0),
    (logsnr.from_flow_t, 0.0, 1.0),
    (logsnr.from_vp_cosine, 0.0, 1.0),
])
def test_exactly_infinite_at_the_end_points(fn, at_signal, at_noise):
    assert fn(torch.tensor([at_signal, at_noise], dtype=torch.float64)).tolist() == [math.inf, -math.inf]


def test_sigma_zero_and_vp_linear_t_zero_are_pure_signal():
    assert logsnr.from_sigma(0.0).item() == math.inf
    assert logsnr.from_vp_linear(0.0).item() == math.inf


@pytest.mark.parametrize("fn, outside", [
    (logsnr.from_alphas_cumprod, [-0.1, 1.1]), (logsnr.from_flow_t, [-0.1, 1.1]),
    (logsnr.from_sigma, [-1.0]), (logsnr.from_vp_cosine, [-0.5, 1.5, 4.2, 1000.0]),
    (logsnr.from_vp_linear, [-0.1, -1e-3, 1.5, 1000.0]),
])
def test_outside_the_valid_range_is_nan(fn, outside):
    assert torch.isnan(fn(torch.tensor(outside, dtype=torch.float64))).all()


# -- dtypes, devices, the scheduler object ------------------------------------------------------
def test_dtypes_follow_the_input():
    assert logsnr.from_flow_t(torch.tensor([0.3], dtype=torch.float32)).dtype == torch.float32
    assert logsnr.from_flow_t(0.3).dtype == torch.float64
    assert logsnr.from_sigma(torch.tensor([2])).dtype == torch.float64
    table32 = torch.tensor([0.999, 0.5, 1e-6], dtype=torch.float32)
    lam = logsnr.from_alphas_cumprod(table32)
    assert lam.dtype == torch.float32
    exact = logsnr.from_alphas_cumprod(table32.double())
    assert torch.equal(lam, exact.float()), "a float32 table gets float64 arithmetic, rounded once"


def test_accepts_a_scheduler_object_and_indexes_by_timesteps():
    table = torch.linspace(0.9999, 1e-4, 50, dtype=torch.float64)
    scheduler = SimpleNamespace(alphas_cumprod=table)
    timesteps = torch.tensor([0, 7, 49, 7], dtype=torch.int32)
    lam = logsnr.from_alphas_cumprod(scheduler, timesteps)
    assert torch.equal(lam, logsnr.from_alphas_cumprod(table)[timesteps.long()])
    assert torch.equal(logsnr.from_alphas_cumprod(scheduler, [3]), logsnr.from_alphas_cumprod(table)[[3]])


# -- suggest_logsnr_range ------------------------------------------------------------------------
def test_suggested_range_covers_every_finite_value_in_whole_numbers():
    lam = uniform(-9.3, 7.6, seed=1)
    lo, hi = logsnr.suggest_logsnr_range(lam)
    assert (lo, hi) == (-10.0, 8.0)
    assert logsnr.suggest_logsnr_range(torch.tensor([-math.inf, -3.2, 4.5, math.inf, math.nan])) == (-4.0, 5.0)
    assert logsnr.suggest_logsnr_range(torch.tensor([2.0, 2.0])) == (2.0, 3.0)


def test_coverage_trims_the_tails_to_quantiles():
    lam = 2 * torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lo, hi = logsnr.suggest_logsnr_range(lam, coverage=0.999)
    assert (lo, hi) == (-7.0, 7.0)  # +-3.29 standard deviations of 2, rounded outward
    assert ((lam >= lo) & (lam <= hi)).double().mean() >= 0.999
    assert logsnr.suggest_logsnr_range(lam) != (lo, hi)


@pytest.mark.parametrize("lam, coverage", [([1.0, 2.0], 0.0), ([1.0, 2.0], 1.5), ([math.inf, math.nan], 1.0)])
def test_suggested_range_rejects_bad_input(lam, coverage):
    with pytest.raises(ValueError):
        logsnr.suggest_logsnr_range(torch.tensor(lam), coverage=coverage)


@pytest.mark.parametrize("schedule", [
    {}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True},
])
def test_every_ddpm_scheduler_timestep_falls_in_the_suggested_range(schedule):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is in the [test] extra, which CI installs")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, **schedule)
    lam = logsnr.from_alphas_cumprod(scheduler, torch.arange(1000))
    assert torch.equal(lam, logsnr.from_alphas_cumprod(scheduler.alphas_cumprod))
    lo, hi = logsnr.suggest_logsnr_range(lam)
    finite = lam[torch.isfinite(lam)]
    assert len(finite) == 1000 - bool(schedule.get("rescale_betas_zero_snr"))  # zero terminal SNR: -inf
    if schedule.get("beta_schedule") == "squaredcos_cap_v2":  # beta clipped at 0.999: t = T stands alone
        assert lam[-1] < lo and lam[-2] >= lo and (lo, hi) == (-13.0, 11.0)
        finite = finite[:-1]  # it falls in the edge bin, as any lam below the range does
    assert ((finite >= lo) & (finite <= hi)).all()
    assert (lam[:-1] > lam[1:]).all(), "lam falls with the timestep"


# -- schedules with a clipped last timestep, and schedule objects ------------------------------------
def lucidrains_alphas_cumprod(schedule: str, timesteps: int = 1000) -> torch.Tensor:
    """denoising-diffusion-pytorch's tables from their published formulas (its GaussianDiffusion
    clips every beta to 0.999 and keeps the float64 cumulative product as a float32 buffer)."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    if schedule == "cosine":  # Nichol & Dhariwal, s = 0.008
        abar = torch.cos((t + 0.008) / 1.008 * math.pi * 0.5) ** 2
    else:  # sigmoid (Jabri et al. 2022): start -3, end 3, tau 1
        v_start, v_end = torch.tensor(-3.0).sigmoid(), torch.tensor(3.0).sigmoid()
        abar = (-(t * 6 - 3).sigmoid() + v_end) / (v_end - v_start)
    abar = abar / abar[0]
    betas = torch.clip(1 - abar[1:] / abar[:-1], 0, 0.999)
    return torch.cumprod(1 - betas, dim=0).float()


@pytest.mark.parametrize("schedule, before, last, expected", [
    ("sigmoid", -8.1, -15.0, (-9.0, 9.0)), ("cosine", -12.9, -19.8, (-13.0, 11.0))])
def test_a_clipped_last_timestep_does_not_take_the_bins(schedule, before, last, expected):
    lam = logsnr.from_alphas_cumprod(lucidrains_alphas_cumprod(schedule))
    assert round(lam[-2].item(), 1) == before and round(lam[-1].item(), 1) == last
    lo, hi = logsnr.suggest_logsnr_range(lam)
    assert (lo, hi) == expected
    assert ((lam[:-1] >= lo) & (lam[:-1] <= hi)).all()
    assert logsnr.suggest_logsnr_range(lam, keep_isolated=True) == (math.floor(lam[-1].item()), expected[1])
    assert logsnr.suggest_logsnr_range(lam.flip(0)) == expected  # either order of the table


def test_samples_and_smooth_tables_keep_their_extremes():
    g = torch.Generator().manual_seed(0)
    for n in (8, 100, 10_000):
        sample = 3 * torch.randn(n, generator=g, dtype=torch.float64)
        sample[0] = sample.max() + 20  # far out, but a sample (not monotone): kept
        assert logsnr.suggest_logsnr_range(sample)[1] == math.ceil(sample.max().item())
    linear = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    lam = logsnr.from_alphas_cumprod(linear)
    assert logsnr.suggest_logsnr_range(lam) == (-11.0, 10.0) == logsnr.suggest_logsnr_range(lam, keep_isolated=True)


def test_from_schedule_reads_diffusers_and_lucidrains_objects():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is in the [test] extra, which CI installs")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    t = torch.tensor([0, 500, 999])
    assert torch.equal(logsnr.from_schedule(scheduler, t), logsnr.from_alphas_cumprod(scheduler.alphas_cumprod)[t])
    assert torch.equal(logsnr.from_schedule(scheduler), logsnr.from_alphas_cumprod(scheduler))

    class GaussianDiffusion(torch.nn.Module):  # lucidrains keeps the table as a float32 buffer
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Identity()
            self.register_buffer("alphas_cumprod", lucidrains_alphas_cumprod("sigmoid"))

    diffusion = GaussianDiffusion()
    table = logsnr.from_alphas_cumprod(diffusion.alphas_cumprod)
    assert torch.equal(logsnr.from_schedule(diffusion, t), table[t])
    wrapped = SimpleNamespace(model=SimpleNamespace(module=diffusion))  # a Trainer around DDP
    assert torch.equal(logsnr.from_schedule(wrapped, t), table[t])
    continuous = SimpleNamespace(log_snr=lambda times: -torch.log(torch.expm1(1e-4 + 10 * times ** 2)))
    times = torch.tensor([0.1, 0.5])
    assert torch.equal(logsnr.from_schedule(continuous, times), continuous.log_snr(times))


@pytest.mark.parametrize("schedule, timesteps, error, match", [
    (SimpleNamespace(alphas_cumprod=torch.full((10,), 0.5)), torch.tensor([0.5]), TypeError, "integer indices"),
    (SimpleNamespace(alphas_cumprod=torch.full((10,), 0.5)), torch.tensor([10]), ValueError, r"lie in \[0, 9\]"),
    (SimpleNamespace(log_snr=lambda t: t), None, ValueError, "continuous in time"),
    (SimpleNamespace(sigma_data=0.5), torch.tensor([1]), TypeError, "no alphas_cumprod table"),
])
def test_from_schedule_refuses_what_it_cannot_read(schedule, timesteps, error, match):
    with pytest.raises(error, match=match):
        logsnr.from_schedule(schedule, timesteps)
