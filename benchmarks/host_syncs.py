"""The host syncs of issue 25 (item 6), measured on the CPU.

For a 200-step digits run with ``--noise-sampling vaw-is`` and one with ``--vaw-power-anneal``:
the wall time of ``train`` (the best of ``--repeat``) and the tensor-to-host reads per step that
varweight's own code makes (calls of ``item``, ``tolist``, ``cpu``, ``bool``, ``int`` and
``float`` on a tensor from a ``varweight_kernels`` module: on a GPU each one waits for the
device; counted here on the CPU, where they cost little). Then the peak memory
``save_checkpoint`` adds, in units of the state's size, and the checkpoint reads of ``--resume``.

    python benchmarks/host_syncs.py [--steps 200] [--repeat 3] [--out /tmp/host_syncs]

Runs on the code it imports, so the same script measures another checkout with
``PYTHONPATH=that/checkout``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

RUN = dict(dataset="digits", channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(), batch_size=64,
           lr=1e-3, log_every=50, ckpt_every=100, sample_steps=2, grid_size=4, analysis_batches=0, quiet=True)
CASES = {"vaw-is": dict(weighting="uniform", noise_sampling="vaw-is"),
         "power-anneal": dict(weighting="vaw", vaw_power_anneal=200, vaw_power_end=0.5)}
READS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__")
SAVE_PEAK = """
import os, tempfile, torch
from varweight_kernels.training.checkpoint import save_checkpoint
def peak_kib():  # this process's own high-water mark (ru_maxrss would include the forking parent's)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
n = 64 << 20
state = {"w": torch.ones(n // 4)}
before = peak_kib()
save_checkpoint(state, os.path.join(tempfile.mkdtemp(), "c.pt"))
print((peak_kib() - before) * 1024 / n)
"""


def save_peak(env=None) -> float:
    """The peak memory ``save_checkpoint`` adds in a fresh process, in units of the state's size."""
    proc = subprocess.run([sys.executable, "-c", SAVE_PEAK], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "save_peak failed")
    return float(proc.stdout)


@contextlib.contextmanager
def counting_reads():
    """Count the tensor-to-host reads varweight's code makes inside the block (not torch's own,
    e.g. AdamW's per-parameter step counts, which live on the CPU on every device)."""
    counts = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(fn):
        def counted(self, *args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("varweight_kernels"):
                counts["n"] += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def run_case(name: str, steps: int, root: str, repeat: int) -> dict:
    from varweight_kernels.training.config import TrainConfig
    from varweight_kernels.training.loop import train

    out = os.path.join(root, name)
    for folder in (out, out + "-short"):
        shutil.rmtree(folder, ignore_errors=True)
    cfg = TrainConfig(**{**RUN, **CASES[name], "out": out, "steps": steps})
    with counting_reads() as short:  # the set-up and the end, to subtract
        train(cfg.replace({"out": out + "-short", "steps": 1}))
    with counting_reads() as reads:
        train(cfg)
    seconds = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        train(cfg)
        seconds.append(time.perf_counter() - t0)
    return {"seconds": min(seconds), "reads_per_step": (reads["n"] - short["n"]) / (steps - 1)}


def resume_reads(root: str) -> int:
    from varweight_kernels.training import checkpoint as ckpt
    from varweight_kernels.training.cli import main

    out = os.path.join(root, "power-anneal")
    reads = []
    real = ckpt.load_checkpoint
    ckpt.load_checkpoint = lambda path: reads.append(path) or real(path)
    try:
        main(["--out", out, "--resume", "--steps", "201", "--quiet"])
    finally:
        ckpt.load_checkpoint = real
    return len(reads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="/tmp/host_syncs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import varweight_kernels
    print(f"code: {os.path.dirname(varweight_kernels.__file__)}; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for name in CASES:
        r = run_case(name, args.steps, args.out, args.repeat)
        print(f"{name}: {args.steps} steps in {r['seconds']:.1f} s (best of {args.repeat}), "
              f"{r['reads_per_step']:.2f} host reads per step")
    print(f"--resume: the checkpoint read {resume_reads(args.out)} time(s)")
    print(f"save_checkpoint: peak memory added = {save_peak():.2f} x the state (64 MiB)")


if __name__ == "__main__":
    main()
