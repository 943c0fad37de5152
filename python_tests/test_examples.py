"""The examples train a few steps on digits with the real diffusers and VAW and do what they claim.

For each: the bins fill as the schedule's lam distribution says (derived here from its closed
form, not from ``logsnr``), the weights move off 1, the loss falls, eval mode leaves the state
untouched, and the module round-trips through a checkpoint.
"""
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


CASES = {
    "ddpm-epsilon": (lambda: diffusers_ddpm.main(steps=STEPS, prediction_type="epsilon"), ddpm_bin_fractions),
    "ddpm-v": (lambda: diffusers_ddpm.main(steps=STEPS, prediction_type="v_prediction"), ddpm_bin_fractions),
    # logit-normal t = sigmoid(u), u ~ N(0, 1): lam = -2 logit(t) = -2 u ~ N(0, 2^2)
    "flow": (lambda: flow_matching.main(steps=STEPS), lambda _, edges: normal_bin_fractions(0.0, 2.0, edges)),
    # ln sigma ~ N(-1.2, 1.2^2): lam = -2 ln sigma ~ N(2.4, 2.4^2)
    "edm": (lambda: edm.main(steps=STEPS), lambda _, edges: normal_bin_fractions(2.4, 2.4, edges)),
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
