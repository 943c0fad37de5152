"""Diffusion training pieces for varweight: U-Net, EDM/DDPM formulations, samplers, loss
weightings, data loading, per-stream RNG, and the trainer.

This subpackage imports the library core (``varweight_kernels``); the core never imports it.
Modules are imported on demand (``from varweight_kernels.training import unet``) so importing
the package itself stays cheap.
"""
