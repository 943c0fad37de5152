"""What VAW costs in a training step: the trainer's step with ``uniform`` vs ``vaw`` weighting.

    python benchmarks/overhead.py                      # CPU: the digits-cpu preset (digits data)
    python benchmarks/overhead.py --device cuda        # GPU: seed-cifar10 recipe, random 32x32x3 data
    python benchmarks/overhead.py --preset digits-smoke --blocks 3 --steps-per-block 2 --out DIR

The step is the body of ``varweight_kernels.training.loop.train``'s loop, built from the
trainer's own pieces (``build_model``, ``build_weighting``, ``build_noise_sampler``,
``Weighting.objective``, ``EMA``, ``BatchIterator``): batch, noise levels, noise, the
formulation's per-sample loss (under bf16 autocast on CUDA, as the trainer does), the observer
(the trainer's unweighted-statistics VAW, present in every run), the weighting's objective,
backward, gradient clipping, the trainer's one host read of the step's numbers, AdamW and the
EMA update. Logging, checkpoints and evaluation are left out (they are not per step).

Configurations: ``uniform`` and ``vaw`` with each backend in ``--vaw-backends`` (default: the
auto pick, plus the eager reference when auto picks something else). Each configuration has its
own model, optimiser and EMA from the same seed; after a warm-up they run in interleaved blocks
of steps (so all see the same machine load), and the time per step is the median over blocks.
Reported: ms/step, images/s, the step-time ratio against ``uniform`` and, on CUDA, the peak
memory allocated during a configuration's blocks (all configurations stay resident, so the
peaks share one baseline); on CPU the process's peak RSS, which is shared, and the host time of
the weighting call and of the observer call inside the step (on a busy shared CPU the step-time
ratio is noisy; these show the VAW share directly).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import varweight_kernels  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
    import varweight_kernels  # noqa: F401

from varweight_kernels import VarianceAwareWeighting  # noqa: E402
from varweight_kernels.backends import cpu_name, resolve_backend  # noqa: E402


def make_config(preset: str, device: str, batch_size: Optional[int], backend: str, weighting: str):
    from varweight_kernels.training.config import resolve_config
    flags = {"preset": preset, "device": device, "weighting": weighting, "backend": backend, "quiet": True,
             "out": "/tmp/varweight-overhead"}
    if batch_size:
        flags["batch_size"] = batch_size
    return resolve_config(flags).validate()


def load_images(cfg, random_data: bool, device: torch.device) -> torch.Tensor:
    if random_data:  # CIFAR-shaped random data: no dataset on the machine, the step costs the same
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (max(4 * cfg.batch_size, 1024), 3, 32, 32), generator=gen,
                             dtype=torch.uint8).to(device)
    from varweight_kernels.training.builders import load_data
    return load_data(cfg).to(device)


class TrainStep:
    """One configuration: the trainer's model, weighting, observer, optimiser, EMA and data."""

    def __init__(self, label: str, cfg, images: torch.Tensor, device: torch.device) -> None:
        from varweight_kernels.training import builders as T
        from varweight_kernels.training.rng import STREAMS
        from varweight_kernels.training.weightings import VAWWeighting
        from varweight_kernels.training.data import BatchIterator
        from varweight_kernels.training.formulations import make_formulation
        from varweight_kernels.training.rng import derive_seed, make_generators

        self.label, self.cfg, self.device = label, cfg, device
        self.cuda = device.type == "cuda"
        self.formulation = make_formulation(cfg.formulation, **cfg.formulation_kwargs())
        self.gens = make_generators(cfg.seed, 0, "cpu", streams=STREAMS)
        shape = tuple(images.shape[1:])
        self.model = T.build_model(cfg, shape[0], shape[1], self.formulation).to(device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        torch.manual_seed(derive_seed(cfg.seed, "dropout", 0))
        self.ema = T.EMA(self.model, cfg.ema_decay)
        self.weighting = T.build_weighting(cfg, self.formulation, self.gens["weighting"]).to(device)
        self.observer = VarianceAwareWeighting(prior=None, **cfg.vaw_kwargs()).to(device)
        self.noise_sampler = T.build_noise_sampler(cfg, self.formulation)
        self.batches = BatchIterator(images, cfg.batch_size, self.gens["data"], hflip=cfg.flip)
        params = list(self.model.parameters()) + [p for p in self.weighting.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and self.cuda)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext
        self.model.train()
        self.weighting.train()
        self.observer.train()
        self.backend = self.weighting.vaw.resolved_backend(device) if isinstance(self.weighting, VAWWeighting) else "-"
        self.observer_backend = self.observer.resolved_backend(device)
        self.observer_s: List[float] = []
        self.weighting_s: List[float] = []

    def step(self) -> float:
        """One optimiser step, as the trainer's loop body; returns the unweighted mean loss."""
        from varweight_kernels.training.data import to_model_range
        cfg, bs = self.cfg, self.cfg.batch_size
        x0 = to_model_range(next(self.batches))
        if self.cuda:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        level, lam, is_weight = self.noise_sampler.sample(bs, self.gens["levels"], self.device)
        noise = torch.randn(x0.shape, generator=self.gens["noise"]).to(self.device)
        with self.autocast():
            terms = self.formulation.loss(self.model, x0, level, noise)
        t0 = time.perf_counter()
        self.observer(terms.loss.detach().float(), lam)
        t1 = time.perf_counter()
        loss = self.weighting.objective(terms, lam, is_weight if cfg.noise_sampling != "default" else None)
        if not self.cuda:  # host clock is device time on CPU; on CUDA these calls only launch kernels
            self.observer_s.append(t1 - t0)
            self.weighting_s.append(time.perf_counter() - t1)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        packed = torch.stack([terms.loss.detach().float().sum().double(), loss.detach().double(),
                              (~torch.isfinite(loss.detach())).double(), grad_norm.detach().double()]).tolist()
        if packed[2] == 0 and math.isfinite(packed[3]):
            self.optimizer.step()
            self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return packed[0] / bs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(preset: str, device: torch.device, random_data: bool, vaw_backends: List[str], warmup: int, blocks: int,
        steps_per_block: int, batch_size: Optional[int] = None, log=print) -> Dict[str, object]:
    cfg0 = make_config(preset, str(device), batch_size, "auto", "uniform")
    images = load_images(cfg0, random_data, device)
    configs = [TrainStep("uniform", cfg0, images, device)]
    for backend in vaw_backends:
        cfg = make_config(preset, str(device), batch_size, backend, "vaw")
        configs.append(TrainStep(f"vaw ({backend})", cfg, images, device))
    for c in configs:  # warm-up: allocator, cudnn autotuning, Triton/compile caches
        for _ in range(warmup):
            c.step()
    _sync(device)
    times: Dict[str, List[float]] = {c.label: [] for c in configs}
    peaks: Dict[str, int] = {c.label: 0 for c in configs}
    losses: Dict[str, float] = {}
    for block in range(blocks):
        order = configs[block % len(configs):] + configs[:block % len(configs)]
        for c in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps_per_block):
                losses[c.label] = c.step()
            _sync(device)
            times[c.label].append((time.perf_counter() - start) / steps_per_block)
            if device.type == "cuda":
                peaks[c.label] = max(peaks[c.label], torch.cuda.max_memory_allocated(device))
        log(f"block {block + 1}/{blocks}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()))
    base = statistics.median(times["uniform"])
    rows = []
    for c in configs:
        ms = statistics.median(times[c.label]) * 1e3
        rows.append({"config": c.label, "weighting_backend": c.backend, "observer_backend": c.observer_backend,
                     "ms_per_step": ms, "images_per_s": c.cfg.batch_size / (ms / 1e3),
                     "ratio_vs_uniform": ms / (base * 1e3), "overhead_pct": 100.0 * (ms / (base * 1e3) - 1.0),
                     "peak_mem_mib": peaks[c.label] / 2**20 if device.type == "cuda" else None,
                     "weighting_ms": _median_ms(c.weighting_s), "observer_ms": _median_ms(c.observer_s),
                     "block_ms": [t * 1e3 for t in times[c.label]], "last_loss": losses.get(c.label)})
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "preset": preset, "data": "random uint8 3x32x32" if random_data else cfg0.dataset,
            "batch_size": cfg0.batch_size, "channels": cfg0.channels, "channel_mults": list(cfg0.channel_mults),
            "params_m": sum(p.numel() for p in configs[0].model.parameters()) / 1e6,
            "amp": "bf16" if device.type == "cuda" and cfg0.amp in ("auto", "bf16") else cfg0.amp,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "warmup": warmup, "blocks": blocks,
            "steps_per_block": steps_per_block,
            "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return {"info": info, "rows": rows}


def _median_ms(values: List[float]) -> Optional[float]:
    return statistics.median(values) * 1e3 if values else None


def markdown(result: Dict[str, object], command: str) -> str:
    info = result["info"]
    lines = [
        f"# Training-step overhead of VAW: {info['device']} ({info['date']})",
        f"preset {info['preset']}, data {info['data']}, batch {info['batch_size']}, U-Net {info['params_m']:.2f}M "
        f"params (channels {info['channels']}, mults {info['channel_mults']}), amp {info['amp']}, "
        f"{info['threads']} thread(s), torch {info['torch']}",
        f"median of {info['blocks']} interleaved blocks of {info['steps_per_block']} steps after {info['warmup']} "
        f"warm-up steps; every configuration also runs the trainer's observer VAW",
        f"command: {command}",
        "",
        "| config | weighting backend | observer backend | ms/step | images/s | x uniform | overhead | peak MiB "
        "| weighting ms | observer ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    opt = (lambda v, f="{:.0f}": "-" if v is None else f.format(v))
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['weighting_backend']} | {r['observer_backend']} | {r['ms_per_step']:.2f} "
                     f"| {r['images_per_s']:.0f} | {r['ratio_vs_uniform']:.3f} | {r['overhead_pct']:+.1f}% "
                     f"| {opt(r['peak_mem_mib'])} | {opt(r['weighting_ms'], '{:.3f}')} "
                     f"| {opt(r['observer_ms'], '{:.3f}')} |")
    if result["rows"][0]["weighting_ms"] is not None:
        lines.append("\nweighting ms / observer ms: host time of the weighting's objective and of the observer call "
                     "inside the step (CPU only; medians over all timed steps)")
    if result["rows"][0]["peak_mem_mib"] is None:
        lines.append(f"\nprocess peak RSS (all configurations together): {info['process_max_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--preset", default=None, help="default: digits-cpu on CPU, seed-cifar10 on CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--random-data", action="store_true", default=None,
                        help="random CIFAR-shaped images (default on CUDA; the CIFAR presets need no dataset then)")
    parser.add_argument("--vaw-backends", nargs="*", default=None,
                        help="backends of the vaw configurations (default: auto, plus reference if auto differs)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--steps-per-block", type=int, default=None)
    parser.add_argument("--out", default=None, help="writes overhead.json and overhead.md there")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("overhead.py --device cuda needs a CUDA device", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    if cuda:  # as the trainer does
        torch.cuda.set_device(device.index or 0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    elif not cuda:  # one thread: on a shared 2-core machine two OpenMP threads oversubscribe
        torch.set_num_threads(1)
    preset = args.preset or ("seed-cifar10" if cuda else "digits-cpu")
    random_data = args.random_data if args.random_data is not None else (cuda or not preset.startswith("digits"))
    backends = args.vaw_backends
    if backends is None:
        auto = resolve_backend("auto", device).name
        backends = ["auto"] + (["reference"] if auto != "reference" else [])
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 3)
    blocks = args.blocks if args.blocks is not None else (6 if cuda else 5)
    steps = args.steps_per_block if args.steps_per_block is not None else (10 if cuda else 4)
    command = "python " + " ".join([os.path.relpath(__file__)] + list(argv if argv is not None else sys.argv[1:]))
    result = run(preset, device, random_data, backends, warmup, blocks, steps, args.batch_size,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    result["command"] = command
    text = markdown(result, command)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "overhead.json").write_text(json.dumps(result, indent=1))
        (out / "overhead.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
