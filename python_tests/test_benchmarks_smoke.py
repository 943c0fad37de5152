"""The benchmark scripts run for real at a tiny size and print what they should (never a timing claim).

README's own benchmark commands (``compare.py --quick``, ``pytest benchmarks/bench_step.py``) run in
test_readme_commands.py; here the scripts' other paths: the compiled peer against the eager
reference, overhead.py and images_per_s.py on CPU, and bench_gpu.py / fused_step.py where a GPU is.
"""
from __future__ import annotations

import json

import pytest
import torch

from tiny_runs import load_script


def _load(name: str):
    return load_script(f"benchmarks/{name}.py")


@pytest.fixture(scope="module")
def compare():
    return _load("compare")


def test_compare_table_has_every_cpu_backend(compare):
    threads = torch.get_num_threads()
    try:
        info, cells, goals = compare.run(batches=(7, 64), bins=(4,), repeats=1, target_s=1e-4, threads=1,
                                         include_compiled=False, log=lambda s: None, warmup=1)
    finally:
        torch.set_num_threads(threads)
    peers = compare.cpu_peers(include_compiled=False)
    assert peers[0] == "reference" and "triton" not in peers
    assert info["peers"] == peers and info["threads"] == 1 and info["torch"] == torch.__version__
    assert [(c.batch, c.peer) for c in cells] == [(b, p) for b in (7, 64) for p in peers]
    for c in cells:
        for value in (c.fwd_us, c.bwd_us, c.step_us, c.grad_us, c.fwd_gbs):
            assert value > 0 and value == value
        assert c.step_us == pytest.approx(c.fwd_us + c.bwd_us)
        assert c.fwd_gbs == pytest.approx(12 * c.batch / (c.fwd_us * 1e3))
        if c.peer == "reference":
            assert c.speedup_step == pytest.approx(1.0) and c.speedup_fwd == pytest.approx(1.0)
    text = compare.report(info, cells, goals, "python benchmarks/compare.py --test")
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| B ")]
    assert len(table) == len(cells)
    for peer in peers:
        assert any(f"| {peer} |" in line for line in table)
    assert all(len(line.split("|")) == 12 for line in table)  # 10 columns
    for key in ("torch", "thread(s)", "goals:", "GB/s"):
        assert key in text
    assert {g["goal"] for g in goals} == {goal[0] for goal in compare.GOALS}
    json.dumps([vars(c) for c in cells])  # the --json payload serialises


def test_bandwidth_goal_counts_the_input_bytes(compare):
    """The CPU goal is 2 GB/s of input, 8 bytes per sample (not the 12 of the table's column)."""
    batch = 1 << 20
    cell = compare.Cell(batch, 64, "cpp", fwd_us=8 * batch / 2.0e3, bwd_us=1.0, step_us=1.0, grad_us=1.0,
                        xfixed_us=0.0, fwd_gbs=12 * batch / (8 * batch / 2.0), step_gbs=1.0)
    goal = next(g for g in compare.check_goals([cell]) if "GB/s" in g["goal"])
    assert goal["value"] == pytest.approx(2.0) and goal["met"]
    cell.fwd_us *= 1.01
    goal = next(g for g in compare.check_goals([cell]) if "GB/s" in g["goal"])
    assert not goal["met"]


def test_compare_steps_update_the_state(compare):
    runner = compare.make_runner("reference", 32, 8)
    before = int(runner.module.step)
    out = runner.fwd()
    assert out.requires_grad and int(runner.module.step) == before + 1
    grad = runner.bwd()
    assert grad.shape == (32,) and torch.allclose(grad, runner.module.last_weights / 32)
    auto = runner.grad()
    assert torch.allclose(auto, runner.module.last_weights / 32)


def test_compiled_peer_runs_the_modules_function_to_the_same_bits(compare):
    """compile(reference) runs through ops.VAWFunction (no copy of it in compare.py); traced by dynamo
    without code generation it must give the eager reference's output, gradient and state, bit for bit
    (the peer once crashed here: it passed a list where reference.step reads KernelParams)."""
    compiled = compare.make_runner(compare.COMPILED, 33, 8, compile_backend="eager")
    eager = compare.make_runner("reference", 33, 8)
    for _ in range(2):
        assert torch.equal(compiled.fwd(), eager.fwd())
        assert torch.equal(compiled.bwd(), eager.bwd())
    assert torch.equal(compiled.grad(), eager.grad())
    for name in ("M", "Q", "Z", "C", "weight", "step"):
        assert torch.equal(getattr(compiled.module, name), getattr(eager.module, name)), name
    assert int(compiled.module.step) == 3


def test_raw_peer_calls_the_backend_directly(compare):
    assert compare.cpu_peers(include_compiled=False, include_raw=True)[-1].startswith(compare.RAW)
    runner = compare.make_runner(compare.RAW + "reference", 16, 4)
    runner.fwd()
    assert int(runner.module.step) == 1 and runner.bwd().shape == (16,)


def test_bench_gpu_helpers():
    bench_gpu = _load("bench_gpu")
    assert bench_gpu.peak_gbs("NVIDIA H200") == 4800.0
    assert bench_gpu.peak_gbs("NVIDIA GH200 480GB") == 4000.0
    assert bench_gpu.peak_gbs("Some Unknown GPU") is None
    info = dict(device="NVIDIA H200", date="d", torch="t", triton="x", cuda="13.0", sms=132,
                backends=["reference"], peak_gbs=4800.0, peak_source="datasheet table", copy_gbs=4300.0, command="c")
    rows = [dict(batch=1024, bins=64, peer="reference", fwd_us=10.0, bwd_us=2.0, step_us=12.0, fwd_wall_us=30.0,
                 fwd_gbs=1.2, step_gbs=1.7, speedup_step=1.0, error=None),
            dict(batch=1024, bins=64, peer="graph(reference)", error="RuntimeError: boom")]
    checks = [dict(backend="reference", batch=1024, bins=64, sync_free=True, sync_error=None, capturable=False,
                   capture_error="RuntimeError: capture")]
    text = bench_gpu.markdown(info, rows, checks)
    assert "| 1024 | 64 | reference |" in text and "failed: RuntimeError: boom" in text
    assert "RuntimeError: capture" in text


def test_images_per_s_runs_both_loops_on_cpu(tmp_path):
    """The GPU throughput script's code paths, on CPU with the paper's net on 8x8 random images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _load("images_per_s").main(["--device", "cpu", "--preset", "digits-smoke", "--arch", "paper",
                                           "--channels", "32", "--image-size", "8", "--in-channels", "1",
                                           "--num-images", "64", "--warmup", "1", "--steps", "2", "--log-every", "1",
                                           "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "images_per_s.json").read_text())
    assert result["arch"] == "paper" and result["ours_images_per_s"] > 0 and result["minimal_images_per_s"] > 0
    assert "| ours (train_cifar) |" in (tmp_path / "images_per_s.md").read_text()


def test_overhead_runs_on_cpu(tmp_path):
    """benchmarks/overhead.py on CPU: uniform against vaw on each CPU backend, one block of one step."""
    threads = torch.get_num_threads()
    try:
        assert _load("overhead").main(["--preset", "digits-smoke", "--warmup", "1", "--blocks", "1",
                                       "--steps-per-block", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "overhead.json").read_text())
    assert result["command"].startswith("python ") and "digits-smoke" in result["command"]
    text = (tmp_path / "overhead.md").read_text()
    assert "| uniform |" in text and "| vaw (auto) |" in text


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="bench_gpu.py and fused_step.py need a CUDA device")


@needs_cuda
def test_bench_gpu_runs_one_shape(tmp_path):
    bench_gpu = _load("bench_gpu")
    assert bench_gpu.main(["--batches", "1024", "--bins", "64", "--no-compile", "--warmup-ms", "1", "--rep-ms", "2",
                           "--out", str(tmp_path)]) == 0
    assert "| 1024 | 64 |" in (tmp_path / "bench_gpu.md").read_text()


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fused_step_script(backend, capsys, monkeypatch):
    from varweight_kernels.backends import get_backend

    monkeypatch.setattr(get_backend(backend), "fused", get_backend(backend).fused)  # the script turns it on: undo
    _load("fused_step").main(backend)
    assert f"{backend} fused steps: 2" in capsys.readouterr().out
