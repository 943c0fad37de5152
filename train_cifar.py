#!/usr/bin/env python
"""Train a diffusion model on CIFAR-10/100 (or sklearn digits) with a chosen loss weighting.

    python train_cifar.py --preset digits-smoke --out runs/smoke
    python train_cifar.py --preset seed-cifar10 --weighting vaw --data-root data --out runs/c10-vaw
    python train_cifar.py --out runs/c10-vaw --resume            # continue after a stop or crash
    python train_cifar.py --out runs/c10-vaw --sample-only --num-samples 5000
    torchrun --nproc_per_node 4 train_cifar.py --preset seed-cifar10 --out runs/c10-ddp

Every flag and its default: ``python train_cifar.py --help``. A thin entry point to
``varweight_kernels.training.cli`` (flags: ``training.config.TrainConfig``; the loop: ``training.loop``).
"""
import sys

from varweight_kernels.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
