"""The module's state stays finite and loadable whatever the input, and impossible states are refused."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend_cases import fresh_state
from varweight_kernels import VarianceAwareWeighting, available_backends
from varweight_kernels.config import MAX_NUM_BINS, VAWConfig
from varweight_kernels.ops import STATE_NAMES

CPU_BACKENDS = [b for b in ("reference", "cpp", "triton") if b in available_backends()]
LIMIT = float.fromhex("0x1.fffffep+63")  # the largest float32 |L| whose square is finite in float32


def _state_is_finite(module) -> bool:
    return all(bool(torch.isfinite(getattr(module, n).double()).all()) for n in STATE_NAMES)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch", [8, 2048])
def test_one_huge_finite_loss_is_excluded_and_counted(backend, batch):
    module = VarianceAwareWeighting(num_bins=8, min_count=1, backend=backend)
    lam = torch.linspace(-11, 11, batch)
    loss = torch.ones(batch)
    loss[3] = 1e20  # finite, but its square overflows float32
    loss[5] = LIMIT  # the largest that still counts
    module(loss, lam)
    assert int(module.nonfinite) == 1
    assert float(module.C.sum()) == batch - 1
    assert _state_is_finite(module)
    for _ in range(3):
        module(torch.ones(batch), lam)
    assert _state_is_finite(module) and bool((module.weight <= module.config.weight_range[1]).all())
    VarianceAwareWeighting(num_bins=8, min_count=1, backend=backend).load_state_dict(module.state_dict())


def _trained(**config):
    module = VarianceAwareWeighting(num_bins=8, min_count=1, **config)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        module(torch.rand(256, generator=g) * 3, torch.rand(256, generator=g) * 24 - 12)
    return module


@pytest.mark.parametrize("name, value, message", [
    ("weight", -1.0, "negative"), ("C", -5.0, "negative"), ("step", -1, "negative"), ("nonfinite", -2, "negative"),
    ("Q", -0.5, "negative"), ("Z", 1.5, "exceeds 1"), ("weight", 50.0, "outside"), ("weight", 0.01, "outside"),
])
def test_load_state_dict_refuses_impossible_states(name, value, message):
    source = _trained()
    state = source.state_dict()
    bad = state[name].clone()
    if bad.dim():
        bad[2] = value
    else:
        bad.fill_(value)
    state[name] = bad
    target = VarianceAwareWeighting(num_bins=8, min_count=1)
    before = {n: getattr(target, n).clone() for n in STATE_NAMES}
    with pytest.raises(RuntimeError, match=message):
        target.load_state_dict(state)
    assert all(torch.equal(getattr(target, n), before[n]) for n in STATE_NAMES)  # nothing half-loaded


def test_load_state_dict_warns_naming_config_differences():
    state = _trained(warmup_steps=0).state_dict()
    target = VarianceAwareWeighting(num_bins=8, min_count=1, warmup_steps=100, power=1.0)
    with pytest.warns(RuntimeWarning, match="warmup_steps: saved 0, now 100.*power: saved -1.0, now 1.0|"
                                            "power: saved -1.0, now 1.0.*warmup_steps: saved 0, now 100"):
        target.load_state_dict(state)
    assert torch.equal(target.C, _trained().C)


def test_weights_of_a_wider_saved_range_are_judged_by_the_saved_range():
    state = _trained(weight_range=(0.01, 100.0)).state_dict()
    state["weight"][0] = 50.0  # possible under the saved range, impossible under the target's
    target = VarianceAwareWeighting(num_bins=8, min_count=1)
    with pytest.warns(RuntimeWarning, match="weight_range"):
        target.load_state_dict(state)


def test_load_state_dict_refuses_a_garbled_extra_state():
    state = _trained().state_dict()
    state["_extra_state"] = {"format_version": 1, "config": ["not", "a", "dict"]}
    with pytest.raises(RuntimeError, match="invalid config"):
        VarianceAwareWeighting(num_bins=8, min_count=1).load_state_dict(state)


def test_num_bins_has_a_documented_upper_bound():
    with pytest.raises(ValueError, match=f"num_bins must be an integer in \\[1, {MAX_NUM_BINS}\\]"):
        VAWConfig(num_bins=10**9)
    assert VAWConfig(num_bins=MAX_NUM_BINS).num_bins == MAX_NUM_BINS


LOSS_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                        st.sampled_from([0.0, 1e-45, 1e-310, LIMIT, 2.0 ** 64, 1e20, -1e20, 65504.0]),
                        st.floats(min_value=0.0, max_value=10.0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(backend=st.sampled_from(CPU_BACKENDS),
       num_bins=st.integers(1, 40), decay=st.floats(0.01, 0.999), power=st.floats(-3.0, 3.0),
       min_count=st.integers(0, 5), warmup=st.integers(0, 2), ramp=st.integers(0, 2),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       batches=st.lists(st.lists(st.tuples(LOSS_VALUES, st.floats(-15.0, 15.0) | st.just(math.nan)),
                                 min_size=1, max_size=40), min_size=1, max_size=3))
def test_state_stays_finite_and_round_trips(backend, num_bins, decay, power, min_count, warmup, ramp, dtype,
                                            batches):
    module = VarianceAwareWeighting(num_bins=num_bins, decay=decay, power=power, min_count=min_count,
                                    warmup_steps=warmup, ramp_steps=ramp, backend=backend)
    for batch in batches:
        loss = torch.tensor([v for v, _ in batch], dtype=torch.float64).to(dtype)
        lam = torch.tensor([l for _, l in batch], dtype=torch.float64).to(dtype)
        module(loss, lam)
        assert _state_is_finite(module), {n: getattr(module, n) for n in STATE_NAMES}
    copy = VarianceAwareWeighting(num_bins=num_bins, decay=decay, power=power, min_count=min_count,
                                  warmup_steps=warmup, ramp_steps=ramp, backend=backend)
    copy.load_state_dict(module.state_dict())
    assert all(torch.equal(getattr(copy, n), getattr(module, n)) for n in STATE_NAMES)


def test_cpp_takes_exactly_the_losses_the_reference_takes_at_the_limit():
    """The boundary itself: L = LIMIT counts, the next float32 up does not (cpp against the reference)."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("needs the cpp backend (the compiled extension is unavailable here)")
    from varweight_kernels import reference
    loss = torch.tensor([LIMIT, 2.0 ** 64, 1.0] * 400)
    lam = torch.zeros(1200)
    params = VAWConfig(num_bins=4, logsnr_range=(-1.0, 1.0)).kernel_params()
    _, _, expected = reference.forward_moments(loss, lam, torch.ones(4), params.lmin, params.bin_scale, True)
    _, _, actual = torch.ops.varweight_ext.forward_moments(loss, lam, fresh_state(4)[4], params.lmin,
                                                           params.bin_scale, True)
    assert expected[-1] == 400 and expected[2] == 800  # 2**64 excluded; LIMIT and 1.0 counted
    assert torch.equal(actual[:4], expected[:4]) and actual[-1] == 400
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0.0)  # sums: another order of addition
