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
    module = _warm(VarianceAwareWeighting(num_bins=32, min_count=2))
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
    module = VarianceAwareWeighting(num_bins=8, min_count=0)
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
    eager = VarianceAwareWeighting(num_bins=16, min_count=2, backend="reference")
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
