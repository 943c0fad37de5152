"""VarianceAwareWeighting's public surface (reference backend): autograd, modes, state, errors, compile."""
import copy

import pytest
import torch

from backend_cases import random_cases
from varweight_kernels import VarianceAwareWeighting, available_backends
from varweight_kernels.ops import STATE_NAMES


def _batch(seed, B=256, lo=-14.0, hi=14.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lam = lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)
    loss = torch.exp(torch.randn(B, generator=g, dtype=torch.float64)) * (1 + lam.abs() / 4)
    return loss.to(dtype), lam.to(dtype)


def _buffers(module):
    return {name: getattr(module, name).clone() for name in STATE_NAMES}


def _warm(module, steps=5):
    for s in range(steps):
        module(*_batch(100 + s))
    return module


def test_gradcheck_float64():
    module = _warm(VarianceAwareWeighting(num_bins=16, min_count=4, backend="reference"))
    module.eval()  # gradcheck calls forward many times; eval keeps the table fixed
    loss, lam = _batch(1, B=37, dtype=torch.float64)
    loss.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: module(x, lam), (loss,))
    out = module(loss, lam)
    (grad,) = torch.autograd.grad(out, loss)
    torch.testing.assert_close(grad, module.last_weights.double() / 37)


def test_gradient_is_weight_over_batch_in_training_and_dtype_kept():
    module = _warm(VarianceAwareWeighting(num_bins=16, min_count=4))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        loss, lam = _batch(2, B=64, dtype=dtype)
        loss.requires_grad_(True)
        table = module.weight.clone()
        out = module(loss, lam)
        assert out.dtype == dtype and out.dim() == 0
        out.backward()
        assert loss.grad.dtype == dtype
        w = module.last_weights
        torch.testing.assert_close(loss.grad.float(), (w / 64).to(dtype).float())
        assert not torch.equal(module.weight, table) or module.step <= 1  # the table moved on


def test_eval_mode_leaves_every_buffer_bitwise_unchanged():
    module = _warm(VarianceAwareWeighting(num_bins=32, min_count=2, prior=None))
    before = _buffers(module)
    module.eval()
    loss, lam = _batch(3)
    out = module(loss, lam)
    assert torch.isfinite(out)
    for name, value in before.items():
        assert torch.equal(getattr(module, name), value), name
    idx = torch.clamp(torch.floor((lam.float() + 12) * (32 / 24.0)), 0, 31).long()
    torch.testing.assert_close(module.last_weights, module.weight[idx])


def test_state_dict_round_trip_continues_bitwise():
    a = _warm(VarianceAwareWeighting(num_bins=24, min_count=3, ramp_steps=4))
    b = VarianceAwareWeighting(num_bins=24, min_count=3, ramp_steps=4)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for s in range(4):
        loss, lam = _batch(50 + s)
        assert torch.equal(a(loss, lam), b(loss, lam))
        assert torch.equal(a.last_weights, b.last_weights)
    for name, value in _buffers(a).items():
        assert torch.equal(getattr(b, name), value), name


def test_state_dict_survives_weights_only_save(tmp_path):
    a = _warm(VarianceAwareWeighting(num_bins=8))
    torch.save(a.state_dict(), tmp_path / "vaw.pt")
    b = VarianceAwareWeighting(num_bins=8)
    b.load_state_dict(torch.load(tmp_path / "vaw.pt", weights_only=True))
    assert torch.equal(a.weight, b.weight) and int(b.step) == 5


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: sd.update(M=torch.zeros(9)), "num_bins=9"),
    (lambda sd: sd["Q"].__setitem__(0, float("nan")), "NaN or inf"),
    (lambda sd: sd["C"].__setitem__(1, float("inf")), "NaN or inf"),
    (lambda sd: sd["_extra_state"].update(format_version=99), "format version 99"),
    (lambda sd: sd["_extra_state"]["config"].update(num_bins=12), "num_bins=12"),
    (lambda sd: sd["_extra_state"]["config"].update(logsnr_range=[-5.0, 5.0]), "logsnr_range"),
])
def test_load_state_dict_rejects_mismatch_and_leaves_state(mutate, match):
    source = _warm(VarianceAwareWeighting(num_bins=8))
    target = _warm(VarianceAwareWeighting(num_bins=8), steps=2)
    before = _buffers(target)
    sd = copy.deepcopy(source.state_dict())
    mutate(sd)
    with pytest.raises(RuntimeError, match=match):
        target.load_state_dict(sd)
    for name, value in before.items():
        assert torch.equal(getattr(target, name), value), name


def test_load_state_dict_names_both_bin_counts():
    with pytest.raises(RuntimeError, match="num_bins=8.*num_bins=16"):
        VarianceAwareWeighting(num_bins=16).load_state_dict(VarianceAwareWeighting(num_bins=8).state_dict())


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_bins=0), "num_bins"), (dict(num_bins=2.5), "num_bins"),
    (dict(logsnr_range=(1.0, 1.0)), "logsnr_range"), (dict(logsnr_range=(3.0, -3.0)), "logsnr_range"),
    (dict(decay=1.0), "decay"), (dict(decay=0.0), "decay"),
    (dict(weight_range=(0.0, 1.0)), "weight_range"), (dict(weight_range=(2.0, 1.0)), "weight_range"),
    (dict(eps=-1e-3), "eps"), (dict(min_count=-1), "min_count"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(ramp_steps=-2), "ramp_steps"),
])
def test_invalid_config_raises_value_error_naming_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VarianceAwareWeighting(**kwargs)


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="backend"):
        VarianceAwareWeighting(backend="fortran")
    if "cuda" not in available_backends():
        with pytest.raises(RuntimeError, match="cuda"):
            VarianceAwareWeighting(backend="cuda")
    assert "reference" in available_backends()
    assert VarianceAwareWeighting().resolved_backend(torch.device("cpu")) in ("cpp", "reference")


@pytest.mark.parametrize("loss, lam, error, match", [
    (torch.ones(4, 2), torch.ones(4, 2), ValueError, r"\(4, 2\)"),
    (torch.ones(4), torch.ones(5), ValueError, r"\(4,\).*\(5,\)"),
    (torch.ones(0), torch.ones(0), ValueError, r"\(0,\)"),
    (torch.ones(4, dtype=torch.int64), torch.ones(4), TypeError, "int64"),
    (torch.ones(4), torch.ones(4, dtype=torch.int32), TypeError, "int32"),
    (torch.ones(4, dtype=torch.complex64), torch.ones(4), TypeError, "complex64"),
    (torch.ones(4, device="meta"), torch.ones(4), RuntimeError, "meta"),
])
def test_bad_input_raises_and_leaves_state(loss, lam, error, match):
    module = _warm(VarianceAwareWeighting(num_bins=8), steps=2)
    before = _buffers(module)
    with pytest.raises(error, match=match):
        module(loss, lam)
    for name, value in before.items():
        assert torch.equal(getattr(module, name), value), name


def test_nonfinite_values_are_counted_not_absorbed():
    module = VarianceAwareWeighting(num_bins=8, min_count=0, prior=None)
    loss = torch.tensor([1.0, float("nan"), float("inf"), 2.0, 3.0])
    lam = torch.tensor([0.0, 0.0, 0.0, float("nan"), float("inf")])
    module(loss, lam)
    assert int(module.nonfinite) == 3
    for name in ("M", "Q", "Z", "C", "weight"):
        assert torch.isfinite(getattr(module, name)).all(), name
    assert module.last_weights[3] == 1.0


def test_warmup_then_ramp():
    module = VarianceAwareWeighting(num_bins=4, min_count=0, warmup_steps=2, ramp_steps=2, logsnr_range=(0.0, 4.0))
    loss = torch.tensor([1.0, 1.1, 5.0, 9.0, 0.1, 0.2, 30.0, 1.0])
    lam = torch.tensor([0.5, 0.5, 1.5, 1.5, 2.5, 2.5, 3.5, 3.5])
    tables = []
    for _ in range(5):
        module(loss, lam)
        tables.append(module.weight.clone())
    assert torch.equal(tables[0], torch.ones(4)) and torch.equal(tables[1], torch.ones(4))
    full = tables[4]
    torch.testing.assert_close(tables[2], 1 + 0.5 * (full - 1), rtol=1e-4, atol=1e-6)
    assert (full - 1).abs().max() > 0.1


def test_default_power_upweights_noisy_bins():
    """power=-1 gives the bin with the larger loss spread the larger weight (the paper's direction)."""
    module = VarianceAwareWeighting(num_bins=2, min_count=0, logsnr_range=(0.0, 2.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lam = torch.cat([torch.full((64,), 0.5), torch.full((64,), 1.5)])
        loss = torch.cat([1 + 0.01 * torch.randn(64, generator=g), 1 + 1.0 * torch.randn(64, generator=g).abs()])
        module(loss, lam)
    assert module.weight[1] > 2 * module.weight[0]
    inverse = VarianceAwareWeighting(num_bins=2, min_count=0, logsnr_range=(0.0, 2.0), power=1.0)
    inverse.load_state_dict(module.state_dict())
    inverse(loss, lam)
    assert inverse.weight[1] < inverse.weight[0]


def test_stats_are_cpu_tensors_with_edges():
    module = _warm(VarianceAwareWeighting(num_bins=10))
    stats = module.stats()
    assert set(stats) == {"bin_edges", "mean", "var", "count", "weight", "step", "nonfinite"}
    assert all(t.device.type == "cpu" for t in stats.values())
    assert stats["bin_edges"].shape == (11,) and stats["bin_edges"][0] == -12 and stats["bin_edges"][-1] == 12
    assert float(stats["count"].sum()) == 5 * 256 and int(stats["step"]) == 5
    assert (stats["var"] >= 0).all()


def test_same_inputs_give_bitwise_same_results():
    case = next(iter(random_cases(1, seed=3)))
    runs = []
    for _ in range(2):
        module = VarianceAwareWeighting(**case.config)
        outs = [module(l.float(), lam) for l, lam in case.batches]
        runs.append((outs, _buffers(module)))
    assert all(torch.equal(a, b) or (a.isnan() and b.isnan()) for a, b in zip(runs[0][0], runs[1][0]))
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_compile_fullgraph_matches_eager():
    """Bit for bit: under torch.compile the step is the opaque custom op ``varweight::vaw_step``, which
    runs the same eager backend code, so ``out``, the weights and the state cannot differ; the graph
    around it (``* 1.0``, ``* 2.0``, ``grad * w / B``) is exact or rounds once like eager."""
    eager = VarianceAwareWeighting(num_bins=16, min_count=2, backend="reference", prior=None)  # the op alone (a prior may round differently compiled)
    compiled_module = copy.deepcopy(eager)

    def train_step(module, loss, lam):
        return module(loss * 1.0, lam) * 2.0

    compiled = torch.compile(train_step, fullgraph=True)
    for s in range(3):
        loss, lam = _batch(10 + s)
        a_in = loss.clone().requires_grad_(True)
        b_in = loss.clone().requires_grad_(True)
        a = train_step(eager, a_in, lam)
        b = compiled(compiled_module, b_in, lam)
        a.backward()
        b.backward()
        assert torch.equal(b, a)
        assert torch.equal(b_in.grad, a_in.grad)
    for name, value in _buffers(eager).items():
        assert torch.equal(getattr(compiled_module, name), value), name


def test_dtype_casts_of_a_parent_model_keep_state_dtypes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.vaw = _warm(VarianceAwareWeighting(num_bins=8))
    weight = model.vaw.weight.clone()
    model.half()
    assert model[0].weight.dtype == torch.float16
    assert model.vaw.M.dtype == torch.float32 and model.vaw.C.dtype == torch.float64
    assert torch.equal(model.vaw.weight, weight)
    model.double()
    assert model.vaw.weight.dtype == torch.float32


def test_reconfigure_changes_the_next_table_and_keeps_the_statistics():
    fixed = _warm(VarianceAwareWeighting(num_bins=16, min_count=4, power=-1.0))
    changed = _warm(VarianceAwareWeighting(num_bins=16, min_count=4, power=-1.0))
    changed.reconfigure(power=1.0)
    assert changed.config.power == 1.0 and torch.equal(changed.M, fixed.M)
    batch = _batch(50)
    fixed(*batch)
    changed(*batch)
    assert torch.equal(changed.M, fixed.M) and torch.equal(changed.C, fixed.C)  # same statistics
    assert not torch.equal(changed.weight, fixed.weight)  # the table follows the new power
    expected = VarianceAwareWeighting(num_bins=16, min_count=4, power=1.0)
    expected.load_state_dict({**fixed.state_dict(), "_extra_state": expected.get_extra_state()})
    assert changed._params == expected._params
    with pytest.raises(ValueError, match="num_bins cannot change"):
        changed.reconfigure(num_bins=8)
    with pytest.raises(ValueError, match="decay"):
        changed.reconfigure(decay=2.0)


# ---------------------------------------------------------------------------- lam outside the range
def test_timesteps_passed_as_lam_warn_once_naming_the_range():
    module = VarianceAwareWeighting(num_bins=8, logsnr_range=(-10.0, 10.0))
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0)).float()
    with pytest.warns(UserWarning, match=r"of 64 finite lam lie outside logsnr_range \(-10, 10\)") as record:
        module(torch.rand(64), t)
        module(torch.rand(64), t)
    assert len([w for w in record if "logsnr_range" in str(w.message)]) == 1  # once per module


def test_lam_mostly_inside_the_range_does_not_warn(recwarn):
    module = VarianceAwareWeighting(num_bins=8, logsnr_range=(-10.0, 10.0))
    lam = torch.tensor([-20.0, 20.0, float("nan"), float("inf"), 0.0, 1.0, 2.0])  # 2 of 6 finite outside
    module(torch.rand(7), lam)
    assert not [w for w in recwarn if "logsnr_range" in str(w.message)]


def test_the_range_is_checked_on_the_first_calls_only(recwarn):
    from varweight_kernels.module import RANGE_CHECKS
    module = VarianceAwareWeighting(num_bins=8, logsnr_range=(-10.0, 10.0))
    for _ in range(RANGE_CHECKS):
        module(torch.rand(4), torch.zeros(4))
    module(torch.rand(4), torch.full((4,), 500.0))  # no host read left to spend on it
    assert not [w for w in recwarn if "logsnr_range" in str(w.message)]


# ---------------------------------------------------------------------------- loading, after the cast
def _refused(state, match):
    target = _warm(VarianceAwareWeighting(num_bins=8), steps=2)
    before = _buffers(target)
    with pytest.raises(RuntimeError, match=match):
        target.load_state_dict(state)
    for name, value in before.items():
        assert torch.equal(getattr(target, name), value), name


@pytest.mark.parametrize("name, value", [("M", 1e300), ("Q", 1e39)])
def test_float64_values_beyond_float32_are_refused(name, value):
    sd = _warm(VarianceAwareWeighting(num_bins=8)).state_dict()
    sd[name] = sd[name].double()
    sd[name][3] = value  # finite in float64, inf once stored as float32
    _refused(sd, "NaN or inf")


def test_a_weight_beyond_float32_is_refused_under_a_huge_saved_range():
    """A saved range up to 1e300 (float32 inf) is no config a module can have, so the state is refused."""
    sd = _warm(VarianceAwareWeighting(num_bins=8)).state_dict()
    sd["_extra_state"]["config"]["weight_range"] = [0.1, 1e300]
    sd["weight"] = sd["weight"].double()
    sd["weight"][2] = 1e300
    _refused(sd, "invalid config.*weight_range")


@pytest.mark.parametrize("value", [float("nan"), 1e30, float("inf"), 2.5, 2.0 ** 63])
def test_a_float_step_that_is_not_an_int64_is_refused(value):
    sd = _warm(VarianceAwareWeighting(num_bins=8)).state_dict()
    sd["step"] = torch.tensor(value, dtype=torch.float64)
    _refused(sd, "'step' holds a value that is not an integer")


def test_a_whole_float_step_loads_as_that_int():
    sd = _warm(VarianceAwareWeighting(num_bins=8)).state_dict()
    sd["step"] = torch.tensor(5.0)
    module = VarianceAwareWeighting(num_bins=8)
    module.load_state_dict(sd)
    assert module.step.dtype == torch.int64 and int(module.step) == 5


# ---------------------------------------------------------------------------- a state the module made loads
def test_state_after_reconfiguring_the_weight_range_loads():
    module = _warm(VarianceAwareWeighting(num_bins=8, min_count=1, weight_range=(0.1, 10.0)))
    assert float(module.weight.max()) > 2.0 or float(module.weight.min()) < 0.5  # outside the new range
    module.reconfigure(weight_range=(0.5, 2.0))
    state = module.state_dict()
    copy_ = VarianceAwareWeighting(num_bins=8, min_count=1, weight_range=(0.5, 2.0))
    copy_.load_state_dict(state)
    assert torch.equal(copy_.weight, module.weight)
    copy_.load_state_dict(copy_.state_dict())  # and the copy's own state loads too
    module(*_batch(99))  # the next update remakes the table under the new range
    assert "table_weight_range" not in module.state_dict()["_extra_state"]
    assert float(module.weight.max()) <= 2.0 and float(module.weight.min()) >= 0.5


def test_state_loaded_from_a_wider_range_saves_loadably():
    source = _warm(VarianceAwareWeighting(num_bins=8, min_count=1, weight_range=(0.01, 100.0)))
    source.weight[0] = 50.0  # possible under the saved range only
    module = VarianceAwareWeighting(num_bins=8, min_count=1)
    with pytest.warns(RuntimeWarning, match="weight_range"):
        module.load_state_dict(source.state_dict())
    VarianceAwareWeighting(num_bins=8, min_count=1).load_state_dict(module.state_dict())


def test_a_garbled_table_weight_range_is_refused():
    module = _warm(VarianceAwareWeighting(num_bins=8, min_count=1))
    module.reconfigure(weight_range=(0.5, 2.0))
    sd = module.state_dict()
    sd["_extra_state"]["table_weight_range"] = [5.0, 1.0]
    _refused(sd, "invalid table_weight_range")


# ---------------------------------------------------------------------------- safetensors
def test_state_saves_and_loads_as_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch", reason="save_state writes with the safetensors package")
    a = _warm(VarianceAwareWeighting(num_bins=8, power=1.0))
    a.save_state(str(tmp_path / "vaw.safetensors"))
    assert set(safetensors.load_file(str(tmp_path / "vaw.safetensors"))) == set(STATE_NAMES)  # plain tensors
    b = VarianceAwareWeighting(num_bins=8, power=1.0)
    b.load_state(str(tmp_path / "vaw.safetensors"))
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in STATE_NAMES)
    assert [p.name for p in tmp_path.iterdir()] == ["vaw.safetensors"]  # no temp file left
    with pytest.raises(RuntimeError, match="num_bins=8, this module has num_bins=4"):
        VarianceAwareWeighting(num_bins=4).load_state(str(tmp_path / "vaw.safetensors"))


def test_load_state_refuses_other_files_in_one_line(tmp_path):
    pytest.importorskip("safetensors.torch", reason="load_state reads with the safetensors package")
    from safetensors.torch import save_file
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"M": torch.zeros(8)}, str(tmp_path / "foreign.safetensors"))
    for name, match in [("junk", "cannot read a VAW state"), ("foreign", "not written by save_state"),
                        ("missing", "cannot read a VAW state")]:
        with pytest.raises(RuntimeError, match=match) as info:
            VarianceAwareWeighting(num_bins=8).load_state(str(tmp_path / f"{name}.safetensors"))
        assert "\n" not in str(info.value)


def test_a_state_saved_before_safetensors_still_loads(tmp_path):
    """The torch.save'd state_dict (config as a dict) loads as it always did."""
    a = _warm(VarianceAwareWeighting(num_bins=8))
    assert isinstance(a.state_dict()["_extra_state"], dict)
    torch.save(a.state_dict(), tmp_path / "old.pt")
    b = VarianceAwareWeighting(num_bins=8)
    b.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in STATE_NAMES)


@pytest.mark.parametrize("kwargs", [dict(logsnr_range=(-1e300, 1e300)), dict(logsnr_range=(-1e39, 1e39)),
                                    dict(logsnr_range=(1.0, 1.0 + 1e-12)), dict(weight_range=(0.1, 1e300)),
                                    dict(weight_range=(1e-50, 1.0)), dict(eps=1e39)])
def test_settings_that_overflow_float32_are_refused_at_construction(kwargs):
    """Finite as float64 but inf, 0 or equal bounds once the kernels store them in float32: the cpp
    backend crashed on logsnr_range=(-1e300, 1e300). Refused with the field's name instead."""
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        VarianceAwareWeighting(backend="cpp" if "cpp" in available_backends() else "reference", **kwargs)
