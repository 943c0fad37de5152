"""Diffusion training pieces for varweight: U-Net, EDM/DDPM formulations, samplers, loss
weightings, data loading, per-stream RNG, and the trainer.

The trainer: ``loop.train`` (set-up, resume, the loop), ``cli`` (``train_cifar.py``),
``config`` (``TrainConfig``, flags, presets), ``builders`` (model, weighting, optimiser, EMA),
``state`` (what a checkpoint holds; ``checkpoint`` writes the file), ``run_dir`` (the run
folder and metrics), ``sampling`` (generation, grids, FID during training, ``--sample-only``),
``distributed`` (ranks, devices, collectives), ``signals`` (SIGINT/SIGTERM). ``trainer`` is
the old, deprecated import path and re-exports.

This subpackage imports the library core (``varweight_kernels``); the core never imports it.
Modules are imported on demand (``from varweight_kernels.training import unet``) so importing
the package itself stays cheap.
"""
