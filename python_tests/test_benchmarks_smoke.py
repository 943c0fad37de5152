"""Smoke test of the benchmark scripts: the code paths run and print what they should (never timing)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
