"""The pieces of a training run, built from a ``TrainConfig``: data, U-Net, weighting, noise
sampler, optimiser, EMA and the autocast context. Each draws only from the RNG stream it is
given (``rng.py``), so runs that differ in one piece share everything else."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Dict, List, Tuple

import torch

from .config import TrainConfig, TrainError
from .rng import derive_seed

__all__ = ["load_data", "network_spec", "build_model", "build_weighting", "snr_scale", "build_noise_sampler",
           "build_batches", "build_optimizer", "EMA", "autocast_context"]


def load_data(cfg: TrainConfig) -> torch.Tensor:
    """The training images, uint8 NCHW."""
    from .data import DatasetUnavailable, load_dataset
    try:
        images, _ = load_dataset(cfg.dataset, cfg.data_root, cfg.download)
    except DatasetUnavailable as exc:
        raise TrainError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load dataset {cfg.dataset} from {cfg.data_root}: {exc}") from None
    return images


def network_spec(cfg: TrainConfig, formulation) -> Tuple[str, Dict[str, Any]]:
    """``(arch, kwargs)`` of ``unet.build_unet``: the network a config asks for, with nothing left
    to resolve ("auto" embedding made concrete), so exported weights can be rebuilt from it alone."""
    if cfg.arch == "paper":  # a fixed layout: only the width is a choice
        return "paper", {"base_channels": cfg.channels}
    embedding = formulation.recommended_embedding if cfg.embedding == "auto" else cfg.embedding
    return "ddpm", {"base_channels": cfg.channels, "channel_mults": list(cfg.channel_mults),
                    "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": list(cfg.attn_resolutions),
                    "dropout": cfg.dropout, "embedding": embedding}


def build_model(cfg: TrainConfig, in_channels: int, image_size: int, formulation) -> torch.nn.Module:
    """The U-Net ``cfg.arch``, initialised from the "init" stream (rank 0's on every rank; global RNG restored)."""
    from .unet import build_unet
    arch, kwargs = network_spec(cfg, formulation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init", 0))
        try:
            return build_unet(arch, in_channels, image_size, **kwargs)
        except ValueError as exc:
            raise TrainError(f"bad model size: {exc}") from None


def build_weighting(cfg: TrainConfig, formulation, generator: torch.Generator) -> torch.nn.Module:
    """The weighting ``cfg.weighting`` with its flags; ``generator`` is the "weighting" stream."""
    from .weightings import SeedCauchyWeighting, make_weighting
    name = cfg.weighting
    alpha = {} if cfg.alpha < 0 else {"alpha": cfg.alpha}
    if name == "vaw":
        variants = dict(power_end=cfg.vaw_power_end, anneal_steps=cfg.vaw_power_anneal) if cfg.vaw_power_anneal else {}
        if cfg.vaw_prior == "cauchy":
            variants["prior_alpha"] = alpha.get("alpha", SeedCauchyWeighting().alpha)
        return make_weighting("vaw", cfg.vaw_kwargs(), **variants)
    if name == "seed-cauchy":
        return make_weighting(name, normalize=cfg.seed_normalize, **alpha)
    if name == "seed-standardized":
        return make_weighting(name, **alpha)
    if name == "min-snr":
        return make_weighting(name, target=formulation.target, gamma=cfg.gamma, snr_scale=snr_scale(cfg))
    if name == "p2":
        return make_weighting(name, target=formulation.target, k=cfg.p2_k, gamma=cfg.p2_gamma,
                              snr_scale=snr_scale(cfg))
    if name == "edm2":
        return make_weighting(name, channels=cfg.edm2_channels, generator=generator)
    return make_weighting(name)


def snr_scale(cfg: TrainConfig) -> float:
    """The factor from ``exp(lam)`` to the SNR min-snr and p2 weight by. EDM's lam is
    log(sigma_data^2/sigma^2), so the published SNR = 1/sigma^2 of x = x0 + sigma n is
    exp(lam)/sigma_data^2; DDPM's exp(lam) = abar/(1-abar) is the published SNR already."""
    if cfg.formulation == "edm" and cfg.snr_convention == "published":
        return 1.0 / cfg.sigma_data ** 2
    return 1.0


def build_noise_sampler(cfg: TrainConfig, formulation):
    from .noise_sampling import make_noise_sampler
    if cfg.noise_sampling == "default":
        return make_noise_sampler("default", formulation)
    return make_noise_sampler("vaw-is", formulation, num_bins=cfg.vaw_bins, logsnr_range=tuple(cfg.vaw_logsnr_range),
                              mix=cfg.is_mix, statistic=cfg.is_statistic, power=cfg.is_power,
                              include_weight=(cfg.weighting == "vaw"), min_count=cfg.vaw_min_count,
                              warmup_samples=None if cfg.is_warmup < 0 else cfg.is_warmup)


def build_batches(cfg: TrainConfig, images: torch.Tensor, batch_size: int, generator: torch.Generator):
    """This rank's batch stream (shuffle and flips from the "data" stream)."""
    from .data import BatchIterator
    try:
        return BatchIterator(images, batch_size, generator, hflip=cfg.flip, drop_last=cfg.drop_last)
    except ValueError as exc:
        raise TrainError(f"--batch-size: {exc}") from None


def build_optimizer(cfg: TrainConfig, params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


def autocast_context(cfg: TrainConfig, device: torch.device) -> Callable:
    """A context factory: bf16 autocast for --amp bf16 (or auto on CUDA), else a no-op (fp32)."""
    if cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class EMA:
    """Exponential moving average of a module's parameters (buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
