"""The Triton backend against the reference, on CUDA and, through Triton's interpreter, on CPU.

Without a CUDA device this module sets ``TRITON_INTERPRET=1`` before anything imports Triton or
``varweight_kernels.backends.triton`` (Triton picks interpreter or compiler when a kernel is defined),
so the kernels run on CPU tensors; with a CUDA device they are compiled and tested on it.
The interpreter is slow, so it gets a small slice of the random matrix; CUDA gets all of it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

from backend_cases import (assert_records_bitwise, assert_records_equal,  # noqa: E402
                           edge_cases, random_cases, run_case)
from varweight_kernels import VarianceAwareWeighting, available_backends, reference  # noqa: E402
from varweight_kernels.backends import get_backend, resolve_backend, triton_interpret  # noqa: E402
from varweight_kernels.ops import STATE_NAMES  # noqa: E402

from varweight_kernels.backends import triton as triton_vaw  # noqa: E402

if triton_vaw.triton is None:
    pytest.skip(f"the Triton backend cannot run: {triton_vaw._IMPORT_ERROR}", allow_module_level=True)

INTERPRETED = triton_interpret() and triton_vaw.KERNELS_INTERPRETED
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETED, reason="CPU tensors need TRITON_INTERPRET=1 set before import (a CUDA device is present, "
                                "so the kernels are compiled for it instead)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
# w and the whole state match the reference bit for bit (the backend's promise). Two values have a
# tolerance. ``out`` is sum(w * L) / B reduced over the sample programs in another order than
# torch's sum, so float32 and float64 losses may differ in the last few ulps (RTOL, about 80 float32
# ulps: the error of reordering a sum of up to 10^5 positive terms), and half-precision losses,
# rounded to their dtype from that float32 sum, one ulp of that dtype (bf16: 2^-8, fp16: 2^-11).
# ``grad``: the backward kernel multiplies by float32(1 / B) where the reference divides by B, two
# roundings instead of one, so up to two float32 ulps (GRAD_RTOL; exact when B is a power of two),
# and a half-precision loss, rounded from that, one ulp of its dtype.
RTOL = 1e-5
OUT_RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: RTOL, torch.float64: RTOL}
GRAD_RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2.5e-7, torch.float64: 2.5e-7}
# The training step of both kernel sets: today's two launches, and the one-launch fused kernel
# (VARWEIGHT_FUSED_KERNELS=1). Same tolerances, same determinism.
FUSED = [pytest.param(False, id="two-launch"), pytest.param(True, id="fused")]


@pytest.fixture
def fused(request, monkeypatch):
    monkeypatch.setattr(get_backend("triton"), "fused", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _quiet_numpy():
    # The interpreter runs on numpy, which warns when inf - inf makes NaN (an expected result here).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _compare(actual, expected, loss_dtype, what):
    assert_records_bitwise(actual, expected, out_rtol=OUT_RTOL[loss_dtype], grad_rtol=GRAD_RTOL[loss_dtype], what=what)


def _case_params():
    """(device, case) pairs: the named edge cases plus a slice of the random matrix sized for the device."""
    params = []
    for device in DEVICES:
        cases = list(random_cases(40)) if device.values[0] == "cuda" else list(
            random_cases(24, seed=3, max_batch=4097, max_bins=1024))
        params += [pytest.param(device.values[0], case, marks=device.marks, id=f"{device.values[0]}-{case.name}")
                   for case in edge_cases() + cases]
    return params


@pytest.mark.parametrize("fused", FUSED, indirect=True)
@pytest.mark.parametrize("device, case", _case_params())
def test_matches_reference(device, case, fused):
    _compare(run_case(case, "triton", device=device), run_case(case, "reference"), torch.float32, case.name)


@pytest.mark.parametrize("fused", FUSED, indirect=True)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_dtype, lam_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float64),
                                                   (torch.float64, torch.bfloat16), (torch.float32, torch.float16)])
def test_dtypes(device, loss_dtype, lam_dtype, fused):
    for case in (edge_cases()[1], next(iter(random_cases(1, seed=7, max_batch=1025, max_bins=257)))):
        actual = run_case(case, "triton", device=device, loss_dtype=loss_dtype, lam_dtype=lam_dtype)
        expected = run_case(case, "reference", loss_dtype=loss_dtype, lam_dtype=lam_dtype)
        _compare(actual, expected, loss_dtype, f"{case.name} {loss_dtype} {lam_dtype}")


@pytest.mark.parametrize("fused", FUSED, indirect=True)
@pytest.mark.parametrize("device", DEVICES)
def test_two_runs_bitwise_equal(device, fused):
    for case in (edge_cases()[1], next(iter(random_cases(1, seed=11, max_batch=4097, max_bins=257)))):
        assert_records_equal(run_case(case, "triton", device=device), run_case(case, "triton", device=device),
                             what=case.name)


def _trained(backend, device, case):
    module = VarianceAwareWeighting(**case.config, backend=backend, prior=None).to(device)
    for loss, lam in case.batches:
        module(loss.float().to(device), lam.float().to(device))
    return module


@pytest.mark.parametrize("device", DEVICES)
def test_eval_leaves_state_unchanged(device):
    case = edge_cases()[1]
    module = _trained("triton", device, case).eval()
    expected = _trained("reference", "cpu", case).eval()
    before = {name: getattr(module, name).clone() for name in STATE_NAMES}
    loss, lam = case.batches[0]
    out = module(loss.float().to(device), lam.float().to(device))
    ref_out = expected(loss.float(), lam.float())
    for name in STATE_NAMES:
        assert torch.equal(getattr(module, name), before[name]), f"eval changed {name}"
    torch.testing.assert_close(out.cpu(), ref_out, rtol=RTOL, atol=0, equal_nan=True)
    assert torch.equal(module.last_weights.cpu(), expected.last_weights)


def _fresh_state(case, device):
    module = VarianceAwareWeighting(**case.config, backend="reference", prior=None).to(device)
    return [getattr(module, name).clone() for name in STATE_NAMES], module.config.kernel_params()


@pytest.mark.parametrize("device", DEVICES)
def test_distributed_split_equals_fused_step(device):
    """forward_moments + update (what DDP runs around its all_reduce) is the fused step, bit for bit."""
    backend = get_backend("triton")
    case = edge_cases()[1]
    fused, params = _fresh_state(case, device)
    split, _ = _fresh_state(case, device)
    for loss64, lam64 in case.batches:
        loss, lam = loss64.float().to(device), lam64.float().to(device)
        out_f, w_f = backend.step(loss, lam, *fused, params, True)
        out_s, w_s, moments = backend.forward_moments(loss, lam, split[4], params[0], params[1], True)
        ref_out, ref_w, ref_moments = reference.forward_moments(loss.cpu(), lam.cpu(), split[4].cpu(), params[0],
                                                                params[1], True)
        torch.testing.assert_close(moments.cpu(), ref_moments, rtol=1e-12, atol=0, equal_nan=True)
        torch.testing.assert_close(out_s.cpu(), ref_out, rtol=RTOL, atol=0, equal_nan=True)
        assert torch.equal(w_s.cpu(), ref_w)
        backend.update(moments, *split, params)
        torch.testing.assert_close(out_f, out_s, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(w_f, w_s)
        for name, a, b in zip(STATE_NAMES, fused, split):
            assert torch.equal(a, b), f"split and fused steps differ in {name}"


@pytest.mark.parametrize("device", DEVICES)
def test_eval_forward_moments_has_no_moments(device):
    weight = torch.rand(16, device=device) + 0.5
    loss, lam = torch.rand(100, device=device), torch.randn(100, device=device) * 8
    out, w, moments = get_backend("triton").forward_moments(loss, lam, weight, -12.0, 16 / 24, False)
    ref_out, ref_w, _ = reference.forward_moments(loss.cpu(), lam.cpu(), weight.cpu(), -12.0, 16 / 24, False)
    assert moments is None and torch.equal(w.cpu(), ref_w)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=RTOL, atol=0, equal_nan=True)


class _CountingKernel:
    """Stands in for a Triton kernel and counts its launches."""

    def __init__(self, kernel, counter):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        self.counter.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("fused", FUSED, indirect=True)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_launches_per_step(device, training, fused, monkeypatch):
    """Two launches; one for a fused training step (eval keeps the two-launch forward)."""
    launches = []
    for name in ("_bin_partials_kernel", "_finalize_kernel", "_fused_step_kernel"):
        monkeypatch.setattr(triton_vaw, name, _CountingKernel(getattr(triton_vaw, name), launches))
    module = VarianceAwareWeighting(num_bins=32, min_count=0, backend="triton", prior=None).to(device).train(training)
    module(torch.rand(300, device=device), torch.randn(300, device=device) * 6)
    assert len(launches) == (1 if fused and training else 2)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_ticket_is_zero_after_every_step(device, monkeypatch):
    """The last program of a fused step resets its ticket, with several programs and bin tiles."""
    backend = get_backend("triton")
    monkeypatch.setattr(backend, "fused", True)
    case = edge_cases()[3]  # K = 4096: several bin tiles; B = 20,000: several programs
    batch = case.batches[0][0].numel()
    programs, _, _, _, tiles, _ = triton_vaw.fused_geometry(batch, case.config["num_bins"], INTERPRETED)
    assert programs > 1 and tiles > 1
    _compare(run_case(case, "triton", device=device), run_case(case, "reference"), torch.float32, case.name)
    assert int(backend._ticket(torch.device(device))) == 0


def test_fused_switch_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("VARWEIGHT_FUSED_KERNELS", "1")
    assert triton_vaw.TritonBackend().fused
    monkeypatch.delenv("VARWEIGHT_FUSED_KERNELS")
    assert not triton_vaw.TritonBackend().fused


def test_scalar_cache_is_bounded():
    """Issue 25: one device tensor per distinct parameter set, forever; an annealed power (a
    reconfigure every step) grew it by one a step. Now the most recently used few are kept."""
    backend = triton_vaw.TritonBackend()
    cpu = torch.device("cpu")
    first = backend._scalar_tensor([1.0, 2.0], cpu)
    for power in range(100):
        backend._scalar_tensor([1.0, float(power)], cpu)
        assert backend._scalar_tensor([1.0, 2.0], cpu) is first  # in use every step: kept, not re-uploaded
    assert len(backend._scalars) <= triton_vaw.SCALAR_SLOTS


def test_fused_geometry_is_bounded():
    """Fused geometry: at most max_programs programs covering every sample, bin tiles covering every bin."""
    for batch in (1, 31, 1537, 100_000, 2 ** 24, 2 ** 26):
        for num_bins in (1, 64, 65, 256, 257, 4096):
            programs, per_program, block_b, hi, tiles, _ = triton_vaw.fused_geometry(batch, num_bins, False)
            assert programs <= triton_vaw.FUSED_COMPILED_GEOMETRY.max_programs and 2 * hi >= 16
            assert tiles * hi * triton_vaw.FUSED_LO >= num_bins > (tiles - 1) * hi * triton_vaw.FUSED_LO
            assert programs * per_program * block_b >= batch > (programs - 1) * per_program * block_b


def test_launch_geometry_is_bounded():
    """Compiled geometry: bounded program count and whole sample coverage up to B = 2^26, K = 4096."""
    for batch in (1, 31, 32, 1537, 100_000, 2 ** 18 + 1, 2 ** 26):
        for num_bins in (1, 64, 65, 4096):
            programs, per_program, block_b, tiles, block_k, _ = triton_vaw.launch_geometry(batch, num_bins, True, False)
            assert programs * tiles <= 1056 and tiles * block_k >= num_bins
            assert programs * per_program * block_b >= batch > (programs - 1) * per_program * block_b


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter path (TRITON_INTERPRET=1, no CUDA device)")
def test_available_under_interpreter():
    assert "triton" in available_backends()
    assert resolve_backend("auto", torch.device("cpu")).name != "triton"  # auto prefers cpp/reference on CPU
    assert resolve_backend("triton", torch.device("cpu")).name == "triton"


def test_explicit_triton_where_it_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton"):
        resolve_backend("triton", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device or TRITON_INTERPRET=1"):
            VarianceAwareWeighting(backend="triton")


def test_import_without_triton():
    """``import varweight_kernels`` works without Triton, and the backend says why it is missing."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import varweight_kernels\n"
            "from varweight_kernels.backends import backend_reason\n"
            "assert 'triton' not in varweight_kernels.available_backends()\n"
            "print(backend_reason('triton', 'cpu'))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "triton cannot be imported" in result.stdout


@pytest.mark.parametrize("fused", FUSED, indirect=True)
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device, fused):
    case = edge_cases()[1]
    module = VarianceAwareWeighting(**case.config, backend="triton", prior=None).to(device)
    expected = VarianceAwareWeighting(**case.config, backend="reference", prior=None)
    compiled = torch.compile(module, fullgraph=True)
    for loss64, lam64 in case.batches:
        loss = loss64.float().to(device).requires_grad_(True)
        ref_loss = loss64.float().requires_grad_(True)
        out = compiled(loss, lam64.float().to(device))
        ref_out = expected(ref_loss, lam64.float())
        out.backward()
        ref_out.backward()
        torch.testing.assert_close(out.detach().cpu(), ref_out.detach(), rtol=RTOL, atol=0, equal_nan=True)
        torch.testing.assert_close(loss.grad.cpu(), ref_loss.grad, rtol=GRAD_RTOL[torch.float32], atol=0)
    for name in STATE_NAMES:
        assert torch.equal(getattr(module, name).cpu(), getattr(expected, name)), name
