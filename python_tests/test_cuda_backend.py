"""The CUDA backend ("cuda") on CUDA tensors: against the reference, deterministic, no host sync,
at most two kernel launches per step (one for the fused step). Skipped without a CUDA device.

The step tests run twice: today's kernels and the fused ones (``fused``: the one-launch training
step and the vectorised backward, switched on with VARWEIGHT_FUSED_KERNELS=1), to the same tolerances.

Tolerances as in test_cpp.py: grad, w and the whole state bit for bit (``bin_update.h`` rounds
exactly like the reference); only ``out`` is compared at a tolerance, because it is a sum of
``w * L`` taken in another order and precision (float32/float64 losses rtol 1e-6, float16 /
bfloat16 1e-3 / 8e-3: one ulp of the loss dtype). The per-bin moments are float64 sums in another
order than the reference's, compared at rtol 1e-12; fed the same moments, the update gives the
reference's bits. (The float32 state of a whole step is bitwise too: a last-bit difference of a
float64 moment reaches it only across a float32 rounding boundary, as test_cpp.py's matrix shows.)
"""
from __future__ import annotations


import pytest
import torch

from backend_cases import (assert_records_bitwise, assert_records_close_half, assert_records_equal, edge_cases,
                           fresh_state, random_cases, run_case)
from varweight_kernels import VarianceAwareWeighting, reference
from varweight_kernels.backends import backend_reason, get_backend
from varweight_kernels.config import VAWConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FUSED = [pytest.param(False, id="two-launch"), pytest.param(True, id="fused")]


@pytest.fixture
def fused(request, monkeypatch):
    monkeypatch.setattr(get_backend("cuda"), "fused", request.param)
    return request.param


@pytest.fixture(scope="module", autouse=True)
def cuda_backend_available():
    reason = backend_reason("cuda", torch.device("cuda"))
    if reason is not None:  # a GPU is here, so the CUDA build must be too
        pytest.fail(f"the cuda backend cannot run on this GPU machine: {reason}", pytrace=False)


@pytest.mark.parametrize("fused", FUSED, indirect=True)
@pytest.mark.parametrize("case", list(random_cases(24, seed=0)) + edge_cases(), ids=lambda c: c.name)
def test_matches_reference_float32(case, fused):
    expected = run_case(case, "reference")  # CPU reference
    actual = run_case(case, "cuda", device="cuda")
    assert_records_bitwise(actual, expected, out_rtol=1e-6, what=case.name)


@pytest.mark.parametrize("case", list(random_cases(6, seed=1, max_batch=4097)), ids=lambda c: c.name)
@pytest.mark.parametrize("loss_dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lam_dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("fused", FUSED, indirect=True)
def test_dtypes(case, loss_dtype, lam_dtype, fused):
    expected = run_case(case, "reference", loss_dtype=loss_dtype, lam_dtype=lam_dtype)
    actual = run_case(case, "cuda", device="cuda", loss_dtype=loss_dtype, lam_dtype=lam_dtype)
    assert_records_close_half(actual, expected, loss_dtype, f"{case.name} {loss_dtype} {lam_dtype}")


@pytest.mark.parametrize("fused", FUSED, indirect=True)
@pytest.mark.parametrize("case", edge_cases(), ids=lambda c: c.name)
def test_deterministic_and_equal_to_itself(case, fused):
    assert_records_equal(run_case(case, "cuda", device="cuda"), run_case(case, "cuda", device="cuda"), what=case.name)


def test_eval_mode_leaves_state_unchanged():
    vaw = VarianceAwareWeighting(num_bins=16, min_count=1, backend="cuda").cuda()
    for _ in range(2):
        vaw(torch.rand(300, device="cuda"), torch.randn(300, device="cuda") * 6)
    snapshot = {k: v.clone() for k, v in vaw.state_dict().items() if isinstance(v, torch.Tensor)}
    vaw.eval()
    vaw(torch.rand(300, device="cuda"), torch.randn(300, device="cuda") * 6)
    for k, v in snapshot.items():
        assert torch.equal(vaw.state_dict()[k], v), k


@pytest.mark.parametrize("K", [1, 64, 2048, 4096])
def test_split_path_equals_fused_and_moments_match(K):
    backend = get_backend("cuda")
    params = VAWConfig(num_bins=K, min_count=1).kernel_params()
    split, fused, ref = fresh_state(K, device="cuda"), fresh_state(K, device="cuda"), fresh_state(K, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(K)
    for _ in range(3):
        loss = torch.exp(torch.randn(50_000, device="cuda", generator=gen))
        lam = torch.randn(50_000, device="cuda", generator=gen) * 8
        loss[::97] = float("nan")
        out_s, w_s, m_s = backend.forward_moments(loss, lam, split[4], params[0], params[1], True)
        _, _, m_r = reference.forward_moments(loss, lam, ref[4], params[0], params[1], True)
        torch.testing.assert_close(m_s, m_r, rtol=1e-12, atol=0)  # float64 sums in another order
        backend.update(m_s, *split, params)
        reference.update(m_s, *ref, params)  # the same moments: the update must give the same bits
        out_f, w_f = backend.step(loss, lam, *fused, params, True)
        # bitwise; out is NaN here (the loss has NaNs) and must be NaN on both paths
        torch.testing.assert_close(out_s, out_f, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(w_s, w_f)
        for a, b, r in zip(split, fused, ref):
            assert torch.equal(a, b) and torch.equal(a, r)


@pytest.mark.parametrize("fused", FUSED, indirect=True)
def test_no_host_sync_and_at_most_two_launches(fused):
    backend = get_backend("cuda")
    K = 64
    params = VAWConfig(num_bins=K).kernel_params()
    state = fresh_state(K, device="cuda")
    loss = torch.rand(100_000, device="cuda")
    lam = torch.randn(100_000, device="cuda") * 6
    backend.step(loss, lam, *state, params, True)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            backend.step(loss, lam, *state, params, True)
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 1 <= len(kernels) <= (1 if fused else 2), [e.name for e in kernels]


@pytest.mark.parametrize("fused", FUSED, indirect=True)
def test_cuda_graph_capture(fused):
    backend = get_backend("cuda")
    K = 32
    params = VAWConfig(num_bins=K, min_count=1).kernel_params()
    state, eager = fresh_state(K, device="cuda"), fresh_state(K, device="cuda")
    loss = torch.rand(4096, device="cuda")
    lam = torch.randn(4096, device="cuda") * 6
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        backend.step(loss, lam, *[s.clone() for s in state], params, True)  # warm-up off the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, w_g = backend.step(loss, lam, *state, params, True)
    for _ in range(3):
        graph.replay()
        out_e, w_e = backend.step(loss, lam, *eager, params, True)
        torch.cuda.synchronize()
        assert torch.equal(out_g, out_e) and torch.equal(w_g, w_e)
        for a, b in zip(state, eager):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_large_batch_int64_indexing():
    """B = 2^26 (int64 offsets inside the kernel), K = 4096: agrees with the reference on the GPU."""
    B, K = 1 << 26, 4096
    params = VAWConfig(num_bins=K, min_count=1).kernel_params()
    gen = torch.Generator(device="cuda").manual_seed(0)
    loss = torch.rand(B, device="cuda", generator=gen)
    lam = torch.randn(B, device="cuda", generator=gen) * 8
    cuda_state, ref_state = fresh_state(K, device="cuda"), fresh_state(K, device="cuda")
    out_c, w_c = get_backend("cuda").step(loss, lam, *cuda_state, params, True)
    out_r, w_r = reference.step(loss, lam, *ref_state, params, True)
    torch.testing.assert_close(out_c, out_r, rtol=1e-5, atol=0)  # a float32 sum of 2^26 terms in another order
    assert torch.equal(w_c, w_r)
    for a, r in zip(cuda_state, ref_state):
        assert torch.equal(a, r)
    assert int(cuda_state[3].sum()) == B


def test_cpp_and_cuda_agree():
    case = next(iter(random_cases(1, seed=11)))
    assert_records_close_half(run_case(case, "cuda", device="cuda"), run_case(case, "cpp"), torch.float32, case.name)


@pytest.mark.parametrize("fused", FUSED, indirect=True)
def test_torch_compile_fullgraph_matches_eager(fused):
    torch._dynamo.reset()
    eager = VarianceAwareWeighting(num_bins=16, min_count=2, backend="cuda").cuda()
    compiled_mod = VarianceAwareWeighting(num_bins=16, min_count=2, backend="cuda").cuda()
    compiled = torch.compile(compiled_mod, fullgraph=True)
    for i in range(3):
        loss = torch.rand(64, device="cuda")
        lam = torch.randn(64, device="cuda") * 6
        assert torch.equal(eager(loss, lam), compiled(loss, lam))
    for name in ("M", "Q", "Z", "C", "weight", "step", "nonfinite"):
        assert torch.equal(getattr(eager, name), getattr(compiled_mod, name)), name


@pytest.mark.parametrize("lam_kind", ["uniform", "edm", "one bin"])
def test_fused_step_many_blocks(lam_kind, monkeypatch):
    """B = 2^20 (a full grid of fused blocks and the ticket), K = 64: the reference's values, and
    the same bits on a second run; the ticket is back to zero for the next step."""
    monkeypatch.setattr(get_backend("cuda"), "fused", True)
    B, K = 1 << 20, 64
    params = VAWConfig(num_bins=K, min_count=1).kernel_params()
    gen = torch.Generator(device="cuda").manual_seed(3)
    loss = torch.exp(torch.randn(B, device="cuda", generator=gen))
    lam = {"uniform": torch.rand(B, device="cuda", generator=gen) * 24 - 12,
           "edm": 2.4 - 2.4 * torch.randn(B, device="cuda", generator=gen),
           "one bin": torch.full((B,), 0.3, device="cuda")}[lam_kind]
    states = [fresh_state(K, device="cuda") for _ in range(3)]
    for _ in range(2):
        out_a, w_a = get_backend("cuda").step(loss, lam, *states[0], params, True)
        out_b, w_b = get_backend("cuda").step(loss, lam, *states[1], params, True)
        out_r, w_r = reference.step(loss, lam, *states[2], params, True)
        assert torch.equal(out_a, out_b) and torch.equal(w_a, w_b)
        torch.testing.assert_close(out_a, out_r, rtol=1e-5, atol=0)  # a float32 sum in another order
        assert torch.equal(w_a, w_r)
        for a, b, r in zip(*states):
            assert torch.equal(a, b) and torch.equal(a, r)


@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B", [1, 3, 4, 1027, 1 << 20])
def test_fused_backward_same_bits(loss_dtype, B, monkeypatch):
    """The vectorised backward gives the bits of today's (tails of B % 4 included)."""
    backend = get_backend("cuda")
    w = torch.rand(B, device="cuda") + 0.5
    grad = torch.tensor(0.37, device="cuda", dtype=loss_dtype)
    monkeypatch.setattr(backend, "fused", False)
    expected = backend.backward(grad, w, loss_dtype)
    monkeypatch.setattr(backend, "fused", True)
    assert torch.equal(backend.backward(grad, w, loss_dtype), expected)
    assert torch.equal(backend.backward(grad, w[1:], loss_dtype), reference.scale_grad(grad, w[1:], loss_dtype))
