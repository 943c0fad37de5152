"""One registry per list of names (issue 25 item 4): every module that builds named things
(weightings, formulations, networks, noise samplers, datasets) agrees with ``training/registry.py``,
and every registered name builds through the path a run takes."""
from __future__ import annotations

import pytest
import torch

from varweight_kernels.evaluation import fid
from varweight_kernels.training import config, data, formulations, noise_sampling, registry, schema, unet, weightings
from varweight_kernels.training.builders import build_model, build_noise_sampler, build_weighting


def test_the_lists_are_the_registry_s():
    assert data.DATASETS is registry.DATASETS and fid.DATASETS is registry.DATASETS
    assert noise_sampling.NOISE_SAMPLERS is registry.NOISE_SAMPLINGS
    assert noise_sampling.STATISTICS is registry.IS_STATISTICS
    assert unet.ARCHITECTURES is registry.ARCHITECTURES
    for name in ("DATASETS", "WEIGHTINGS", "FORMULATIONS", "NOISE_SAMPLINGS", "SAMPLERS", "ARCHITECTURES",
                 "SNR_CONVENTIONS"):
        assert getattr(config, name) is getattr(registry, name), name
    assert schema.CHOICES["is_statistic"] is registry.IS_STATISTICS


def test_every_builder_table_holds_exactly_the_registered_names():
    assert tuple(unet.NETWORKS) == registry.ARCHITECTURES
    assert set(formulations.FORMULATIONS) == set(registry.FORMULATIONS)
    assert set(weightings.WEIGHTINGS) == set(registry.WEIGHTINGS)


@pytest.mark.parametrize("name", registry.WEIGHTINGS)
def test_every_weighting_builds(name):
    cfg = config.TrainConfig(weighting=name).validate()
    formulation = formulations.make_formulation(cfg.formulation, **cfg.formulation_kwargs())
    assert build_weighting(cfg, formulation, torch.Generator().manual_seed(0)) is not None


@pytest.mark.parametrize("formulation", registry.FORMULATIONS)
@pytest.mark.parametrize("sampling", registry.NOISE_SAMPLINGS)
def test_every_noise_sampling_and_statistic_builds(formulation, sampling):
    for statistic in registry.IS_STATISTICS:
        cfg = config.TrainConfig(formulation=formulation, noise_sampling=sampling, is_statistic=statistic).validate()
        form = formulations.make_formulation(formulation, **cfg.formulation_kwargs())
        assert build_noise_sampler(cfg, form) is not None


@pytest.mark.parametrize("arch", registry.ARCHITECTURES)
def test_every_architecture_builds(arch):
    cfg = config.TrainConfig(arch=arch, channels=32, channel_mults=(1,), num_res_blocks=1, attn_resolutions=())
    form = formulations.make_formulation(cfg.formulation, **cfg.formulation_kwargs())
    assert isinstance(build_model(cfg.validate(), 1, 8, form), torch.nn.Module)
