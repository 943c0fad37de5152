"""The C++ CPU backend ("cpp") against the pure-PyTorch reference, and its contracts.

Tolerances: grad, w and the whole state bit for bit, for every loss and lam dtype, in training
and eval mode (``bin_update.h`` rounds exactly like the reference; float64 counts ``C``: with
int64 counts the reference forms ``C / sum(C)`` in float32, see ``test_int64_counts_state``).
Only ``out`` may differ in its last bit, because the reference sums ``w * L`` per sample in float32 and the kernel forms
``sum_k table[k] * s_k`` in float64 before rounding to the loss dtype: rtol 1e-6 for float32/float64
losses, 1e-3 (float16) and 8e-3 (bfloat16), one unit in the last place of the result.
"""
from __future__ import annotations

import contextlib
import copy
import operator
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from backend_cases import (assert_records_bitwise, assert_records_close_half, assert_records_close_out_rtol,
                           assert_records_equal, edge_cases, fresh_state, random_cases, run_case)
from varweight_kernels import VarianceAwareWeighting, available_backends, reference
from varweight_kernels.backends import compiled as cpp_backend
from varweight_kernels.backends import extension as _ext
from varweight_kernels.backends import backend_reason, get_backend, resolve_backend
from varweight_kernels.config import KernelParams, VAWConfig
from varweight_kernels.ops import STATE_NAMES

REASON = backend_reason("cpp", torch.device("cpu"))
# The CPU extension is always built (setup.py), so a missing one is a failure, not a skip.
if REASON is not None:
    pytest.fail(f"the cpp backend is unavailable: {REASON}", pytrace=False)


# -- the shared random matrix -----------------------------------------------------------------
@pytest.mark.parametrize("case", list(random_cases(24, seed=0)), ids=lambda c: c.name)
def test_random_matrix_float32(case):
    expected = run_case(case, "reference")
    actual = run_case(case, "cpp")
    # Bitwise equal except out: the pass forms sum_k table[k] * s_k, the reference sums per sample.
    assert_records_close_out_rtol(actual, expected, rtol=0.0, out_rtol=1e-6, what=case.name)


@pytest.mark.parametrize("case", list(random_cases(8, seed=1, max_batch=4097)), ids=lambda c: c.name)
@pytest.mark.parametrize("loss_dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lam_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_random_matrix_dtypes(case, loss_dtype, lam_dtype):
    expected = run_case(case, "reference", loss_dtype=loss_dtype, lam_dtype=lam_dtype)
    actual = run_case(case, "cpp", loss_dtype=loss_dtype, lam_dtype=lam_dtype)
    assert_records_close_half(actual, expected, loss_dtype, f"{case.name} {loss_dtype} {lam_dtype}")


@pytest.mark.parametrize("case", edge_cases(), ids=lambda c: c.name)
@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_edge_cases(case, loss_dtype):
    expected = run_case(case, "reference", loss_dtype=loss_dtype)
    actual = run_case(case, "cpp", loss_dtype=loss_dtype)
    assert_records_close_half(actual, expected, loss_dtype, case.name)


@pytest.mark.parametrize("case", edge_cases()[:3], ids=lambda c: c.name)
def test_eval_mode_matches_reference(case):
    expected = run_case(case, "reference", training=False)
    actual = run_case(case, "cpp", training=False)
    assert_records_bitwise(actual, expected, out_rtol=1e-6, what=case.name)


def test_int64_counts_state():
    """SPEC allows C as int64; the kernel updates it like the reference."""
    cfg = VAWConfig(num_bins=16, min_count=2)
    params = cfg.kernel_params()
    gen = torch.Generator().manual_seed(3)
    ref_state, cpp_state = fresh_state(16, torch.int64), fresh_state(16, torch.int64)
    for _ in range(3):
        loss = torch.rand(500, generator=gen)
        lam = torch.rand(500, generator=gen) * 30 - 15
        out_r, w_r = reference.step(loss, lam, *ref_state, params, True)
        out_c, w_c = get_backend("cpp").step(loss, lam, *cpp_state, params, True)
        # Not bitwise: for int64 C the reference's C / sum(C) promotes to float32, the kernel's is float64.
        torch.testing.assert_close(out_c, out_r, rtol=1e-6, atol=0)
        torch.testing.assert_close(w_c, w_r, rtol=1e-6, atol=0)
        for a, e in zip(cpp_state, ref_state):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=0)


# -- op level: the split path ------------------------------------------------------------------
def test_forward_moments_matches_reference():
    gen = torch.Generator().manual_seed(5)
    K = 37
    weight = torch.rand(K, generator=gen) + 0.5
    loss = torch.exp(torch.randn(10_000, generator=gen))
    lam = torch.randn(10_000, generator=gen) * 8
    loss[3], lam[4], lam[5], loss[6] = float("nan"), float("nan"), float("inf"), float("-inf")
    cfg = VAWConfig(num_bins=K)
    for training in (True, False):
        out_r, w_r, m_r = reference.forward_moments(loss, lam, weight, cfg.kernel_params()[0], cfg.bin_scale, training)
        out_c, w_c, m_c = get_backend("cpp").forward_moments(loss, lam, weight, cfg.kernel_params()[0],
                                                             cfg.bin_scale, training)
        torch.testing.assert_close(out_c, out_r, rtol=1e-6, atol=0, equal_nan=True)
        assert torch.equal(w_c, w_r)
        if training:
            assert m_c.dtype == torch.float64 and m_c.shape == (3 * K + 1,)
            torch.testing.assert_close(m_c, m_r, rtol=1e-12, atol=0)
            assert m_c[3 * K] == 3  # NaN loss, NaN lam, -inf loss (inf lam is valid: edge bin)
        else:
            assert m_c is None and m_r is None


@pytest.mark.parametrize("batch", [7, 100_000])
def test_split_path_equals_fused_step(batch):
    backend = get_backend("cpp")
    cfg = VAWConfig(num_bins=64, min_count=4, warmup_steps=1, ramp_steps=2)
    params = cfg.kernel_params()
    split, fused = fresh_state(64), fresh_state(64)
    gen = torch.Generator().manual_seed(batch)
    for _ in range(4):
        loss = torch.exp(torch.randn(batch, generator=gen))
        lam = torch.rand(batch, generator=gen) * 30 - 15
        out_s, w_s, moments = backend.forward_moments(loss, lam, split[4], params[0], params[1], True)
        backend.update(moments, *split, params)
        out_f, w_f = backend.step(loss, lam, *fused, params, True)
        assert torch.equal(out_s, out_f) and torch.equal(w_s, w_f)
        for a, b in zip(split, fused):
            assert torch.equal(a, b)


# -- determinism, eval, gradients --------------------------------------------------------------
def test_bitwise_same_for_any_thread_count():
    case = next(c for c in random_cases(40, seed=7, max_batch=100_000) if len(c.batches[0][0]) >= 33_333)
    big = [c for c in edge_cases() if c.name == "K=4096"]
    before = torch.get_num_threads()
    try:
        for c in [case] + big:
            torch.set_num_threads(1)
            one = run_case(c, "cpp")
            torch.set_num_threads(2)
            two = run_case(c, "cpp")
            assert_records_equal(two, one, what=c.name)
    finally:
        torch.set_num_threads(before)



@contextlib.contextmanager
def cpu_isa(name: str):
    """Run the C++ pass on one instruction set, then go back to the default."""
    cpp_backend.cpu_isa(name)
    try:
        yield
    finally:
        cpp_backend.cpu_isa("auto")


def supported_isas():
    best = cpp_backend.cpu_isa("auto")
    return cpp_backend.CPU_ISAS[:cpp_backend.CPU_ISAS.index(best) + 1]


ISA_CASES = (list(random_cases(12, seed=11, max_batch=5000)) + edge_cases()
             + [c for c in random_cases(40, seed=7, max_batch=100_000) if len(c.batches[0][0]) >= 33_333][:1])


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_instruction_set_gives_bitwise_the_scalar_result(isa, training):
    """The vectorised float32 passes stage what the scalar pass adds, in the same order."""
    if isa not in supported_isas():
        pytest.skip(f"this CPU has no {isa} (the widest it has is {cpp_backend.cpu_isa()})")
    bins = {c.config.get("num_bins") for c in ISA_CASES}
    assert {1, 4096} <= bins and any(k > 64 for k in bins) and any(8 < k <= 64 for k in bins)
    for case in ISA_CASES:
        with cpu_isa("scalar"):
            scalar = run_case(case, "cpp", training=training)
        with cpu_isa(isa):
            assert cpp_backend.cpu_isa() == isa
            vector = run_case(case, "cpp", training=training)
        assert_records_equal(vector, scalar, what=f"{case.name} {isa}")



@pytest.mark.parametrize("batch", [100, 5000], ids=["small", "vectorised"])
def test_table_entries_of_empty_bins_do_not_reach_the_output(batch):
    """The pass forms sum(w * L) from per-bin sums: a NaN/inf weight of a bin no sample falls in
    must not leak into out (the reference never reads it)."""
    table = torch.tensor([1.5, float("nan"), float("inf"), 0.5, float("-inf"), 2.0])
    gen = torch.Generator().manual_seed(9)
    loss = torch.rand(batch, generator=gen)
    lam = torch.where(torch.rand(batch, generator=gen) < 0.5, torch.tensor(0.5), torch.tensor(5.5))  # bins 0, 5
    lam[::7] = float("nan")
    for training in (True, False):
        expected = reference.forward_moments(loss, lam, table, 0.0, 1.0, training)
        actual = torch.ops.varweight_ext.forward_moments(loss, lam, table, 0.0, 1.0, training)
        assert torch.isfinite(actual[0]), actual[0]
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-6, atol=0)
        assert torch.equal(actual[1], expected[1])

def test_instruction_set_choice_is_checked():
    best = cpp_backend.cpu_isa("auto")
    assert best in cpp_backend.CPU_ISAS and cpp_backend.cpu_isa() == best
    with pytest.raises(RuntimeError, match="unknown CPU instruction set 'sse9'"):
        cpp_backend.cpu_isa("sse9")
    for name in set(cpp_backend.CPU_ISAS) - set(supported_isas()):
        with pytest.raises(RuntimeError, match=f"cannot run the '{name}' pass"):
            cpp_backend.cpu_isa(name)
    assert cpp_backend.cpu_isa() == best  # a refused request changes nothing

def test_eval_mode_leaves_state_unchanged():
    vaw = VarianceAwareWeighting(num_bins=16, min_count=1, backend="cpp")
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        vaw(torch.rand(300, generator=gen), torch.randn(300, generator=gen) * 6)
    snapshot = {k: v.clone() for k, v in vaw.state_dict().items() if isinstance(v, torch.Tensor)}
    vaw.eval()
    loss = torch.rand(300, generator=gen)
    lam = torch.randn(300, generator=gen) * 6
    out = vaw(loss, lam)
    for k, v in snapshot.items():
        assert torch.equal(vaw.state_dict()[k], v), k
    expected = (vaw.last_weights * loss).sum() / 300
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


def test_gradcheck_float64():
    vaw = VarianceAwareWeighting(num_bins=8, min_count=1, backend="cpp")  # state stays float32 (SPEC)
    gen = torch.Generator().manual_seed(1)
    lam = torch.randn(20, generator=gen, dtype=torch.float64) * 6
    for _ in range(3):  # non-trivial weights
        vaw(torch.rand(20, generator=gen, dtype=torch.float64), lam)
    vaw.eval()
    loss = torch.rand(20, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: vaw(x, lam), (loss,))
    # training mode with the state cloned for every evaluation
    vaw.train()
    state = [getattr(vaw, n) for n in STATE_NAMES]
    from varweight_kernels import vaw as vaw_fn

    def fresh_call(x):
        out, _ = vaw_fn(x, lam, [s.clone() for s in state], vaw._params, training=True, backend="cpp")
        return out

    assert torch.autograd.gradcheck(fresh_call, (loss,))


# -- errors ------------------------------------------------------------------------------------
def test_spec_errors_leave_state_untouched():
    vaw = VarianceAwareWeighting(num_bins=8, backend="cpp")
    vaw(torch.rand(10), torch.randn(10))
    before = copy.deepcopy(vaw.state_dict())
    with pytest.raises(ValueError, match="shape"):
        vaw(torch.rand(2, 3), torch.rand(2, 3))
    with pytest.raises(ValueError):
        vaw(torch.rand(4), torch.rand(5))
    with pytest.raises(ValueError):
        vaw(torch.rand(0), torch.rand(0))
    with pytest.raises(TypeError):
        vaw(torch.arange(4), torch.rand(4))
    with pytest.raises(TypeError):
        vaw(torch.rand(4), torch.rand(4, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="device"):
        vaw(torch.rand(4, device="meta"), torch.rand(4))
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(vaw.state_dict()[k], v), k


def test_op_rejects_bad_arguments():
    state = fresh_state(8)
    params = VAWConfig(num_bins=8).kernel_params()
    op = torch.ops.varweight_ext
    with pytest.raises(RuntimeError, match="same length"):
        op.step(torch.rand(4), torch.rand(5), *state, params, True)
    with pytest.raises(RuntimeError, match="10 floats") as info:
        op.step(torch.rand(4), torch.rand(4), *state, params[:3], True)
    assert "[" + ", ".join(KernelParams._fields) + "]" in str(info.value)  # C++ Params: the same names
    with pytest.raises(RuntimeError, match="float32"):
        op.forward_moments(torch.rand(4), torch.rand(4), torch.ones(8, dtype=torch.float64), 0.0, 1.0, True)
    with pytest.raises(RuntimeError, match="3K\\+1"):
        op.update(torch.zeros(5, dtype=torch.float64), *state, params)
    bad = fresh_state(8)
    bad[0] = torch.zeros(9)
    with pytest.raises(RuntimeError, match="bins"):
        op.step(torch.rand(4), torch.rand(4), *bad, params, True)
    with pytest.raises(RuntimeError, match="one-element float gradient"):
        op.scale_grad(torch.ones(2), torch.rand(4), torch.float32)
    with pytest.raises(RuntimeError, match="1-D float32 weights"):
        op.scale_grad(torch.ones(()), torch.rand(4, dtype=torch.float64), torch.float32)


@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_scale_grad_op_is_the_reference_backward(loss_dtype):
    w = torch.rand(1001) * 3
    grad = torch.tensor(0.37, dtype=loss_dtype)
    expected = reference.scale_grad(grad, w, loss_dtype)
    actual = torch.ops.varweight_ext.scale_grad(grad, w, loss_dtype)
    assert actual.dtype == loss_dtype and torch.equal(actual, expected)


def test_device_errors():
    with pytest.raises(RuntimeError, match="cpu"):
        resolve_backend("cpp", torch.device("cuda"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            VarianceAwareWeighting(backend="cuda")
        with pytest.raises(RuntimeError):
            resolve_backend("cuda", torch.device("cuda"))
        assert "cuda" not in available_backends()
    assert "cpp" in available_backends()
    assert VarianceAwareWeighting().resolved_backend(torch.device("cpu")) == "cpp"


# -- torch.compile / fake tensors ---------------------------------------------------------------
def test_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        loss, lam = torch.empty(10, dtype=torch.bfloat16), torch.empty(10)
        state = fresh_state(6)
        out, w, m = torch.ops.varweight_ext.forward_moments(loss, lam, state[4], 0.0, 1.0, True)
        assert out.shape == () and out.dtype == torch.bfloat16 and w.shape == (10,) and m.shape == (19,)
        out, w = torch.ops.varweight_ext.step(loss, lam, *state, [0.0] * 10, True)
        assert w.dtype == torch.float32
        grad = torch.ops.varweight_ext.scale_grad(torch.ones((), dtype=torch.bfloat16), w, torch.bfloat16)
        assert grad.shape == (10,) and grad.dtype == torch.bfloat16


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    eager = VarianceAwareWeighting(num_bins=16, min_count=2, backend="cpp", prior=None)
    compiled_mod = VarianceAwareWeighting(num_bins=16, min_count=2, backend="cpp", prior=None)
    compiled = torch.compile(compiled_mod, fullgraph=True)  # default (inductor)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        loss = torch.rand(64, generator=gen)
        lam = torch.randn(64, generator=gen) * 6
        loss_e, loss_c = loss.clone().requires_grad_(True), loss.clone().requires_grad_(True)
        a = eager(loss_e, lam)
        b = compiled(loss_c, lam)
        assert torch.equal(a, b)
        a.backward()
        b.backward()
        assert torch.equal(loss_e.grad, loss_c.grad)
    for name in STATE_NAMES:
        assert torch.equal(getattr(eager, name), getattr(compiled_mod, name)), name



class _RawStep(torch.nn.Module):
    """A module whose forward is the fused op alone, on its own VAW state."""

    def __init__(self, num_bins: int):
        super().__init__()
        self.vaw = VarianceAwareWeighting(num_bins=num_bins, min_count=2, backend="cpp")

    def forward(self, loss, lam):
        state = [getattr(self.vaw, name) for name in STATE_NAMES]
        return torch.ops.varweight_ext.step(loss, lam, *state, list(self.vaw._params), True)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_torch_export_sees_one_op(strict):
    """torch.export keeps the fused step as one node (its fake gives the shapes), and the exported
    program runs it: same out, w and state as eager."""
    gen = torch.Generator().manual_seed(5)
    loss, lam = torch.rand(300, generator=gen), torch.randn(300, generator=gen) * 6
    exported = torch.export.export(_RawStep(16), (loss, lam), strict=strict)
    calls = [n.target for n in exported.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    assert calls == [torch.ops.varweight_ext.step.default], calls
    module_calls = [n.target for n in torch.export.export(VarianceAwareWeighting(num_bins=16, backend="cpp"),
                                                          (loss, lam), strict=strict).graph.nodes
                    if n.op == "call_function" and "varweight" in str(n.target)]
    assert module_calls == [torch.ops.varweight.vaw_step.default], module_calls
    program, eager = exported.module(), _RawStep(16)
    for _ in range(2):
        for a, e in zip(program(loss, lam), eager(loss, lam)):
            assert torch.equal(a, e)
    buffers = dict(program.named_buffers())
    for name in STATE_NAMES:
        assert torch.equal(buffers[f"vaw.{name}"], getattr(eager.vaw, name)), name

def test_torch_compile_of_the_raw_op():
    """The fused op is a single op in the graph (auto-functionalised mutation of the state)."""
    torch._dynamo.reset()
    params = VAWConfig(num_bins=8).kernel_params()

    def fn(loss, lam, *state):
        out, w = torch.ops.varweight_ext.step(loss, lam, *state, params, True)
        return out * 2, w

    s_eager, s_comp = fresh_state(8), fresh_state(8)
    loss, lam = torch.rand(50), torch.randn(50) * 5
    for _ in range(2):
        a = fn(loss, lam, *s_eager)
        b = torch.compile(fn, fullgraph=True, backend="aot_eager")(loss, lam, *s_comp)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for x, y in zip(s_eager, s_comp):
        assert torch.equal(x, y)


# -- build / loader ------------------------------------------------------------------------------
def test_loaded_library_matches_torch():
    from varweight_kernels.backends import compiled as cpp_backend

    assert cpp_backend.build_info() == torch.__version__
    assert cpp_backend.EXTENSION.cpu_origin in ("prebuilt", "jit", "already loaded")


def test_version_marker_mismatch_is_detected(tmp_path):
    stale = tmp_path / "_C.so"
    stale.write_bytes(b"\x7fELF junk " + _ext.MARKER_PREFIX + b"1" + b"1.0.0+cpu".hex().encode() + b"\x00 more")
    assert _ext.read_marker(str(stale)) == "1.0.0+cpu"
    problem = _ext.library_problem(str(stale), _ext.CPU_MODULE)
    assert "1.0.0+cpu" in problem and torch.__version__ in problem
    plain = tmp_path / "plain.so"
    plain.write_bytes(b"\x7fELF nothing here")
    assert _ext.read_marker(str(plain)) is None
    assert "marker" in _ext.library_problem(str(plain), _ext.CPU_MODULE)
    assert "not installed" in _ext.library_problem(None, _ext.CPU_MODULE)


def test_marker_read_past_a_partial_copy(tmp_path):
    """Seen with GCC on an H200 machine: the library holds a cut-off copy of the marker (its first
    bytes followed by a digit table) before the whole one; the whole one must win."""
    real = b"1" + torch.__version__.encode().hex().encode()
    partial = _ext.MARKER_PREFIX + real[:21] + b"00010203040506070809101112131415161718198081\x00"
    lib = tmp_path / "_C.so"
    lib.write_bytes(b"\x7fELF " + partial + b"junk" + _ext.MARKER_PREFIX + real + b"\x00\x00")
    assert _ext.read_marker(str(lib)) == torch.__version__


def test_stale_build_without_jit_is_unavailable_not_a_crash(tmp_path):
    """In a fresh process: a stale library + VARWEIGHT_NO_JIT=1 -> cpp unavailable with the reason."""
    stale = tmp_path / "_C.so"
    stale.write_bytes(_ext.MARKER_PREFIX + b"1" + b"0.0.1".hex().encode() + b"\x00")
    script = textwrap.dedent(f"""
        import warnings, torch
        from varweight_kernels.backends import extension as _ext
        s = _ext.load_extensions(cpu_path={str(stale)!r}, allow_jit=False)
        assert s.cpu_reason is not None and "0.0.1" in s.cpu_reason and "{_ext.NO_JIT_ENV}" in s.cpu_reason, s
        assert s.cuda_reason is not None
        assert not _ext.ops_registered("CPU")
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_no_jit_env_makes_backend_unavailable_with_reason():
    """VARWEIGHT_FORCE_JIT=1 + VARWEIGHT_NO_JIT=1: the backend reports why, the reference still works."""
    script = textwrap.dedent("""
        import torch
        from varweight_kernels import VarianceAwareWeighting, available_backends
        from varweight_kernels.backends import backend_reason
        assert "cpp" not in available_backends() and "reference" in available_backends(), available_backends()
        reason = backend_reason("cpp", torch.device("cpu"))
        assert "VARWEIGHT_NO_JIT" in reason, reason
        try:
            VarianceAwareWeighting(backend="cpp")
        except RuntimeError as exc:
            assert "VARWEIGHT_NO_JIT" in str(exc)
        else:
            raise AssertionError("expected RuntimeError")
        out = VarianceAwareWeighting()(torch.rand(5), torch.rand(5))
        print("ok")
    """)
    env = dict(os.environ, VARWEIGHT_FORCE_JIT="1", VARWEIGHT_NO_JIT="1",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_an_installed_build_is_found_when_a_source_checkout_shadows_it(tmp_path, monkeypatch):
    """``pip install .`` then ``python train_cifar.py`` in the repository root: the package imported is
    the source tree (no library beside it); the loader must find the installed build, not JIT-build."""
    import importlib.metadata

    library = tmp_path / "site" / "varweight_kernels" / "_C.cpython-311-x86_64-linux-gnu.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"\x7fELF")

    class Entry(str):
        def locate(self):
            return tmp_path / "site" / self

    class Dist:
        files = [Entry("varweight_kernels/__init__.py"), Entry("varweight_kernels/_C.cpython-311-x86_64-linux-gnu.so")]

    monkeypatch.setattr(importlib.metadata, "distributions", lambda name=None: [Dist()] if name == "varweight" else [])
    monkeypatch.setattr(_ext.importlib.util, "find_spec", lambda name: None)
    assert _ext.find_library(_ext.CPU_MODULE) == str(library)
    assert _ext.find_library(_ext.CUDA_MODULE) is None
