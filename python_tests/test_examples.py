"""The examples train a few steps on digits with the real diffusers (and lucidrains' denoising-diffusion-pytorch)
and VAW and do what they claim.

For each: the bins fill as the schedule's lam distribution says (derived here from its closed
form, not from ``logsnr``), the weights move off 1, the loss falls, eval mode leaves the state
untouched, and the module round-trips through a checkpoint. The lucidrains example also keeps
VAW's state through its Trainer's save/load, and its hidden ``loss_weight`` stays off.
"""
import functools
import io
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is in the [test] extra, which CI installs")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import diffusers_ddpm  # noqa: E402
import edm  # noqa: E402
import flow_matching  # noqa: E402

from varweight_kernels import VarianceAwareWeighting  # noqa: E402

STEPS = 60


def normal_bin_fractions(mean, std, edges):
    """Bin probabilities of N(mean, std^2), the tails in the edge bins as VAW clamps them."""
    cdf = 0.5 * (1 + torch.erf((edges[1:-1] - mean) / (std * math.sqrt(2))))
    return torch.diff(torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf, torch.ones(1, dtype=cdf.dtype)]))


def ddpm_bin_fractions(result, edges):
    """Timesteps are uniform, so a bin's share is the share of timesteps whose lam falls in it."""
    abar = result["scheduler"].alphas_cumprod.double()
    lam = torch.log(abar / (1 - abar))
    num_bins = len(edges) - 1
    bins = ((lam - edges[0]) / (edges[-1] - edges[0]) * num_bins).floor().clamp(0, num_bins - 1).long()
    return torch.bincount(bins, minlength=num_bins).double() / len(lam)


@functools.lru_cache(maxsize=None)
def lucidrains_run():
    """One run of the lucidrains example, shared by the tests that read it (it trains through the Trainer)."""
    pytest.importorskip("denoising_diffusion_pytorch", reason="denoising-diffusion-pytorch is in the [test] extra")
    import lucidrains_ddpm
    return lucidrains_ddpm.main(steps=STEPS)


CASES = {
    "ddpm-epsilon": (lambda: diffusers_ddpm.main(steps=STEPS, prediction_type="epsilon"), ddpm_bin_fractions),
    "ddpm-v": (lambda: diffusers_ddpm.main(steps=STEPS, prediction_type="v_prediction"), ddpm_bin_fractions),
    # logit-normal t = sigmoid(u), u ~ N(0, 1): lam = -2 logit(t) = -2 u ~ N(0, 2^2)
    "flow": (lambda: flow_matching.main(steps=STEPS), lambda _, edges: normal_bin_fractions(0.0, 2.0, edges)),
    # ln sigma ~ N(-1.2, 1.2^2): lam = -2 ln sigma ~ N(2.4, 2.4^2)
    "edm": (lambda: edm.main(steps=STEPS), lambda _, edges: normal_bin_fractions(2.4, 2.4, edges)),
    # lucidrains' Trainer draws t uniformly too; its table is GaussianDiffusion's alphas_cumprod buffer
    "lucidrains": (lucidrains_run, ddpm_bin_fractions),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_trains_with_vaw(name):
    run, expected_fractions = CASES[name]
    result = run()
    vaw = result["vaw"]
    stats = vaw.stats()
    count = stats["count"]

    assert int(stats["step"]) == STEPS and int(stats["nonfinite"]) == 0
    observed = count / count.sum()
    expected = expected_fractions(result, stats["bin_edges"])
    total_variation = 0.5 * (observed - expected).abs().sum().item()
    assert total_variation < 0.08, f"bins filled unlike the schedule: {observed.tolist()} vs {expected.tolist()}"

    ready = count >= vaw.config.min_count
    assert ready.sum() >= vaw.config.num_bins // 2
    assert (stats["weight"][ready] - 1).abs().max() > 0.2, "the weights stayed at 1"
    assert not torch.equal(vaw.last_weights, torch.ones_like(vaw.last_weights))

    losses = result["losses"]
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), "the unweighted loss did not fall"

    assert result["eval_state_unchanged"]

    buffer = io.BytesIO()
    torch.save({"model": result["model"].state_dict(), "vaw": vaw.state_dict()}, buffer)
    buffer.seek(0)
    restored = VarianceAwareWeighting(num_bins=vaw.config.num_bins, logsnr_range=vaw.config.logsnr_range)
    restored.load_state_dict(torch.load(buffer, weights_only=True)["vaw"])
    for key, value in restored.stats().items():
        assert torch.equal(value, stats[key]), key


def test_lucidrains_trainer_keeps_vaw_and_loss_weight_stays_off():
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from test_logsnr import lucidrains_alphas_cumprod

    result = lucidrains_run()
    diffusion, reloaded, vaw = result["model"], result["reloaded"], result["vaw"]
    # the package's table is the published sigmoid schedule; its clipped t = T sits in the edge bin
    assert torch.equal(diffusion.alphas_cumprod, lucidrains_alphas_cumprod("sigmoid"))
    assert vaw.config.logsnr_range == (-9.0, 9.0)

    # Trainer.save / Trainer.load carried VAW's state in data["model"], bit for bit
    assert all(torch.equal(value, reloaded.vaw.stats()[key]) for key, value in vaw.stats().items())
    # the EMA's copy is not a VAW state: ema_pytorch never updates its integer buffers
    assert int(result["ema_vaw"].step) == 0 and int(vaw.step) == STEPS

    # the hidden SNR weighting: on in the plain class, off in the example and after any load
    plain = GaussianDiffusion(Unet(dim=16, dim_mults=(1, 2), channels=1), image_size=8)
    assert not torch.equal(plain.loss_weight, torch.ones_like(plain.loss_weight))  # pred_v: SNR / (SNR + 1)
    state = reloaded.state_dict()
    state["loss_weight"] = plain.loss_weight.clone()
    reloaded.load_state_dict(state)
    assert torch.equal(reloaded.loss_weight, torch.ones_like(reloaded.loss_weight))

    # what VAW receives is the unweighted v-prediction MSE, from its published formula
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, torch.randn(8, 1, 8, 8, generator=g)
    t = torch.tensor([0, 100, 300, 500, 700, 900, 998, 999])
    abar = diffusion.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    x_t, v = abar.sqrt() * x0 + (1 - abar).sqrt() * noise, abar.sqrt() * noise - (1 - abar).sqrt() * x0
    with torch.no_grad():
        expected = ((diffusion.model(x_t.float(), t) - v.float()) ** 2).mean(dim=(1, 2, 3))
        per_sample = diffusion.p_losses(x0, t, noise=noise, loss_reduction="none")
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-6)
