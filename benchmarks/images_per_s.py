"""Training throughput of a preset: our training loop against a minimal loop of the same network and loss.

    python benchmarks/images_per_s.py --device cuda --out DIR       # seed-cifar10: --arch paper, fp32
    python benchmarks/images_per_s.py --device cpu --preset digits-smoke --arch paper --channels 32 \\
        --image-size 8 --in-channels 1 --num-images 512 --warmup 2 --steps 4 --log-every 2 --out DIR

"ours" is ``training.loop.train`` itself with the preset (plus the flags given), on random uint8
images of the preset's shape (images/s do not depend on the pixels, and the GPU machine has no
CIFAR copy); FID, grids and the per-sample analysis are off, and images/s is the median of the
logged intervals after the warm-up. "minimal" is the same network (``build_model``), the same EDM
loss with uniform weighting, AdamW, gradient clipping and the EMA update, with data, noise levels
and noise drawn on the device and no host read in the loop; it is timed with a device sync at
both ends. The gap between the two is what our loop adds (observer, logging, checkpoints of the
RNG and data position, the step's one host read).

Writes ``OUT/images_per_s.json`` and ``OUT/images_per_s.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from varweight_kernels.training import loop  # noqa: E402
from varweight_kernels.training.builders import autocast_context, build_model  # noqa: E402
from varweight_kernels.training.checkpoint import atomic_write_bytes  # noqa: E402
from varweight_kernels.training.cli import parse_config  # noqa: E402
from varweight_kernels.training.config import TrainConfig  # noqa: E402
from varweight_kernels.training.formulations import make_formulation  # noqa: E402
from varweight_kernels.training.records import read_metrics  # noqa: E402


def random_images(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    shape = (args.num_images, args.in_channels, args.image_size, args.image_size)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def ours(cfg: TrainConfig, images: torch.Tensor, warmup: int) -> float:
    """Median images/s of the logged intervals after ``warmup`` steps of ``train(cfg)``."""
    original = loop.load_data
    loop.load_data = lambda _cfg: images
    try:
        loop.train(cfg)
    finally:
        loop.load_data = original
    records = read_metrics(str(Path(cfg.out) / "metrics.jsonl"))
    rates = [r["images_per_s"] for r in records if r["step"] > warmup and not r.get("final")]
    return statistics.median(rates)


def minimal(cfg: TrainConfig, images: torch.Tensor, device: torch.device, warmup: int, steps: int) -> float:
    """Images/s of a bare loop: the same network, EDM loss, AdamW, clipping and EMA; nothing else."""
    cuda = device.type == "cuda"
    formulation = make_formulation(cfg.formulation, **cfg.formulation_kwargs())
    model = build_model(cfg, images.shape[1], images.shape[2], formulation).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)  # as our loop does
    ema = copy.deepcopy(model).requires_grad_(False)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    autocast = autocast_context(cfg, device)
    data = images.to(device)
    g = torch.Generator(device).manual_seed(0)
    batch = cfg.batch_size
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        idx = torch.randint(data.shape[0], (batch,), generator=g, device=device)
        x0 = data[idx].float() / 127.5 - 1.0
        level = formulation.sample_levels(batch, g, device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        with autocast():
            loss = formulation.loss(model, x0, level, noise).loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), params, 1.0 - cfg.ema_decay)
    if cuda:
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="seed-cifar10")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=20, help="steps before timing starts")
    ap.add_argument("--steps", type=int, default=200, help="timed steps")
    ap.add_argument("--log-every", type=int, default=20, help="our loop's logging interval (one rate each)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--num-images", type=int, default=50000)
    ap.add_argument("--out", default="images_per_s_results")
    args, train_flags = ap.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.warmup % args.log_every:
        ap.error("--warmup must be a multiple of --log-every (timed intervals start after it)")
    cfg = parse_config(["--preset", args.preset, *train_flags]).replace({
        "device": args.device, "out": str(out / "run"), "overwrite": True, "quiet": True,
        "steps": args.warmup + args.steps, "log_every": args.log_every, "ckpt_every": args.warmup + args.steps,
        "fid_every": 0, "sample_every": 0, "analysis_batches": 0, "grid_size": 1, "sample_steps": 2})
    device = torch.device(args.device)
    images = random_images(args)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as our loop sets it; TF32 as cfg.amp decides there
    ours_rate = ours(cfg, images, args.warmup)
    minimal_rate = minimal(cfg, images, device, args.warmup, args.steps)
    result = {
        "preset": args.preset, "flags": train_flags, "arch": cfg.arch, "amp": cfg.amp, "channels": cfg.channels,
        "batch_size": cfg.batch_size, "image_shape": list(images.shape[1:]), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "ours_images_per_s": ours_rate, "minimal_images_per_s": minimal_rate,
        "ours_over_minimal": ours_rate / minimal_rate,
        "hours_per_60k_step_run": {"ours": 60000 * cfg.batch_size / ours_rate / 3600,
                                   "minimal": 60000 * cfg.batch_size / minimal_rate / 3600},
    }
    atomic_write_bytes(out / "images_per_s.json", (json.dumps(result, indent=2) + "\n").encode())
    md = (f"# Training images/s: {args.preset} {' '.join(train_flags)}\n\n"
          f"{result['device_name']}, torch {result['torch']}, arch {cfg.arch}, amp {cfg.amp}, batch {cfg.batch_size}, "
          f"images {'x'.join(map(str, result['image_shape']))} (random), {args.warmup} warm-up + {args.steps} timed "
          f"steps\n\n| loop | images/s | hours for 60k steps (training only) |\n|---|---|---|\n"
          f"| ours (train_cifar) | {ours_rate:.0f} | {result['hours_per_60k_step_run']['ours']:.2f} |\n"
          f"| minimal | {minimal_rate:.0f} | {result['hours_per_60k_step_run']['minimal']:.2f} |\n\n"
          f"ours / minimal: {result['ours_over_minimal']:.3f}\n")
    atomic_write_bytes(out / "images_per_s.md", md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
