"""The default from the confirmatory study (issue 22): power -1 times the paper's Cauchy prior
(alpha 0.05) in the library, SPEC and the trainer; runs, configs and states written under the old
default (no prior) resume with it."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from varweight_kernels import VarianceAwareWeighting
from varweight_kernels.config import VAWConfig
from varweight_kernels.module import DEFAULT_PRIOR_ALPHA
from varweight_kernels.training.checkpoint import load_checkpoint
from varweight_kernels.training.cli import main, parse_config
from varweight_kernels.training.config import TrainConfig
from varweight_kernels.weightings import CauchyWeighting
from tiny_runs import ROOT, assert_runs_equal, one_thread, tiny  # noqa: F401
from varweight_kernels.training.loop import train


def _batch(seed=0, B=128):
    g = torch.Generator().manual_seed(seed)
    lam = torch.randn(B, generator=g) * 3
    return torch.rand(B, generator=g) * (1 + lam.abs()), lam


def _warm(m, n=6):
    for i in range(n):
        m(*_batch(i))
    return m


def test_library_default_is_the_confirmed_setting():
    vaw = VarianceAwareWeighting()
    assert vaw.config.power == VAWConfig().power == -1.0
    assert isinstance(vaw.prior, CauchyWeighting) and vaw.prior.alpha == DEFAULT_PRIOR_ALPHA == 0.05
    assert not vaw.prior.normalize
    # the paper's reading is one keyword away
    assert VarianceAwareWeighting(prior=None).prior is None
    # and the default's output is VAW's table times the batch-centred Cauchy weight
    a, b = _warm(VarianceAwareWeighting(num_bins=16, min_count=2)), _warm(VarianceAwareWeighting(num_bins=16, min_count=2, prior=None))
    loss, lam = _batch(99)
    a(loss, lam), b(loss, lam)
    cauchy = 1.0 / (1.0 + 0.05 * (lam - lam.mean()) ** 2)
    torch.testing.assert_close(a.last_weights, b.last_weights * cauchy, rtol=0, atol=0)


def test_trainer_and_spec_defaults_follow():
    assert TrainConfig().vaw_prior == "cauchy" and TrainConfig().vaw_power == -1.0
    assert parse_config(["--weighting", "vaw"]).vaw_prior == "cauchy"
    assert parse_config(["--weighting", "vaw", "--vaw-prior", "none"]).vaw_prior == "none"
    spec = (ROOT / "docs" / "SPEC.md").read_text()
    assert re.search(r"\| prior \| `CauchyWeighting\(alpha=0\.05\)`", spec), "SPEC's prior row"


def test_a_config_saved_before_the_prior_existed_resumes_without_it():
    old = TrainConfig(vaw_prior="none").to_dict()
    del old["vaw_prior"]
    assert TrainConfig.from_dict(old).vaw_prior == "none"


def test_a_run_started_under_the_old_default_resumes_with_it(tmp_path):
    """A run whose config says vaw_prior none (every run before the default moved) resumes with
    none when --resume is given without flags, bitwise like an unbroken run."""
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny(full, weighting="vaw", vaw_prior="none", steps=6))
    train(tiny(part, weighting="vaw", vaw_prior="none", steps=3))
    assert main(["--out", str(part), "--resume", "--steps", "6", "--quiet"]) == 0
    state = load_checkpoint(str(part / "checkpoints" / "ckpt_00000006.pt"))
    assert state["config"]["vaw_prior"] == "none"
    assert_runs_equal(full, part, 6)


def test_a_state_saved_under_the_old_default_resumes_without_the_prior():
    old = _warm(VarianceAwareWeighting(num_bins=16, min_count=2, prior=None))
    sd = old.state_dict()
    assert "prior" not in sd["_extra_state"]  # as every state written before prior= existed
    new = VarianceAwareWeighting(num_bins=16, min_count=2)
    with pytest.warns(RuntimeWarning, match="resumes the saved state's prior None"):
        new.load_state_dict(sd)
    assert new.prior is None
    loss, lam = _batch(7)
    torch.testing.assert_close(new(loss, lam), old(loss, lam), rtol=0, atol=0)


def test_a_state_saved_under_the_new_default_keeps_it_and_explicit_priors_win():
    a = _warm(VarianceAwareWeighting(num_bins=16, min_count=2))
    sd = a.state_dict()
    assert sd["_extra_state"]["prior"] == {"rule": "cauchy", "alpha": 0.05, "normalize": False}
    b = VarianceAwareWeighting(num_bins=16, min_count=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.load_state_dict(sd)
    assert isinstance(b.prior, CauchyWeighting) and b.prior.alpha == 0.05
    explicit = VarianceAwareWeighting(num_bins=16, min_count=2, prior=None)
    with pytest.warns(RuntimeWarning, match="keeps its explicit prior"):
        explicit.load_state_dict(sd)
    assert explicit.prior is None
