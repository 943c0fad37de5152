"""Weights users can open: a run's network as a plain state dict, and ``load_pretrained``.

    python train_cifar.py --out RUN --export model.safetensors          # EMA weights (default)
    python train_cifar.py --out RUN --export raw.pt --export-weights raw

``PATH`` holds the tensors only: ``.safetensors`` (safetensors) or ``.pt`` / ``.pth``
(``torch.save`` of a dict of tensors, read with ``weights_only=True``). The sidecar ``PATH.json``
holds what rebuilds and samples the network, so neither file needs this repository's checkpoint
format (which stays for ``--resume``)::

    {"format": "varweight-weights", "version": 1, "arch": "ddpm", "network": {build_unet kwargs},
     "in_channels": 3, "image_size": 32, "which": "ema" | "raw", "step": 60000,
     "formulation": {"name": "edm", "kwargs": {...}},
     "sampling": {"sampler", "sample_steps", "rho", "seed"}, "weights_sha256": hex, ...}

``load_pretrained(PATH)`` returns the network (eval mode, loaded with ``strict=True``) and the
sidecar; ``generate_pretrained`` draws the samples ``--sample-only`` draws for the same seed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Dict, Optional, Tuple

import torch

from . import checkpoint as ckpt
from .config import TrainConfig, TrainError

__all__ = ["WEIGHTS_FORMAT", "WEIGHTS_VERSION", "WEIGHT_SUFFIXES", "WeightsError", "sidecar_path", "export_run",
           "load_pretrained", "make_pretrained_formulation", "generate_pretrained"]

WEIGHTS_FORMAT = "varweight-weights"
WEIGHTS_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
_REQUIRED = ("arch", "network", "in_channels", "image_size", "formulation", "sampling", "weights_sha256")


class WeightsError(TrainError):
    """An exported weights file or its sidecar is missing, malformed or does not fit; one line."""


def sidecar_path(path: str) -> str:
    """The JSON next to exported weights: ``PATH.json``."""
    return str(path) + ".json"


def _suffix(path: str) -> str:
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"weights file {path}: the name must end in {', '.join(WEIGHT_SUFFIXES)} "
                           "(.safetensors for safetensors, else a torch state dict)")
    return suffix


# -- writing -----------------------------------------------------------------------------------
def _encode(tensors: Dict[str, torch.Tensor], suffix: str) -> bytes:
    if suffix == ".safetensors":
        try:
            from safetensors.torch import save
        except ImportError:
            raise WeightsError("exporting .safetensors needs the safetensors package "
                               "(pip install safetensors, or varweight[train]); or export to .pt") from None
        return save(tensors)
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def export_run(cfg: TrainConfig) -> str:
    """``--export``: the ``cfg.export_weights`` weights of the latest good checkpoint in ``cfg.out``
    to ``cfg.export`` and its sidecar, both written atomically. Returns the weights path."""
    from .builders import network_spec
    from .distributed import DistInfo
    from .run_dir import say, write_json_atomic
    from .sampling import load_run_network

    if not DistInfo().main:
        return ""
    cfg = cfg.validate()
    path = cfg.export
    suffix = _suffix(path)
    run = load_run_network(cfg, cfg.export_weights)
    run_cfg = run.config
    # independent contiguous CPU copies: safetensors refuses shared or strided storage
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in run.net.state_dict().items()}
    data = _encode(tensors, suffix)
    arch, network = network_spec(run_cfg, run.formulation)
    in_channels, image_size, _ = run.image_shape
    sidecar = {
        "format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "arch": arch, "network": network,
        "in_channels": in_channels, "image_size": image_size, "which": cfg.export_weights, "step": run.step,
        "formulation": {"name": run_cfg.formulation, "kwargs": run_cfg.formulation_kwargs()},
        "sampling": {"sampler": run_cfg.resolved_sampler(), "sample_steps": run_cfg.sample_steps,
                     "rho": run_cfg.rho, "seed": run_cfg.seed},
        "trained": {"dataset": run_cfg.dataset, "weighting": run_cfg.weighting, "steps": run_cfg.steps,
                    "checkpoint": os.path.basename(run.checkpoint)},
        "weights_file": os.path.basename(path), "weights_sha256": hashlib.sha256(data).hexdigest(),
    }
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        ckpt.atomic_write_bytes(path, data)
        write_json_atomic(sidecar_path(path), sidecar)
    except OSError as exc:
        raise WeightsError(f"cannot write {path}: {exc.strerror or exc}") from None
    say(f"exported the {cfg.export_weights} weights of {run.checkpoint} (step {run.step}) to {path} "
        f"(+ {os.path.basename(sidecar_path(path))})", cfg.quiet)
    return path


# -- reading -----------------------------------------------------------------------------------
def _read_sidecar(path: str) -> Dict[str, Any]:
    side = sidecar_path(path)
    try:
        with open(side) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise WeightsError(f"{path} has no sidecar {side} (the config that rebuilds the network); "
                           "export with train_cifar.py --out RUN --export PATH") from None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read the sidecar {side}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(f"{side} is not a varweight weights sidecar (no '\"format\": \"{WEIGHTS_FORMAT}\"')")
    if meta.get("version") != WEIGHTS_VERSION:
        raise WeightsError(f"{side} has version {meta.get('version')!r}; this build reads version {WEIGHTS_VERSION}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise WeightsError(f"{side} lacks {', '.join(missing)}")
    return meta


def _decode(data: bytes, suffix: str, path: str) -> Dict[str, torch.Tensor]:
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load
            tensors = load(data)
        else:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except ImportError:
        raise WeightsError(f"reading {path} needs the safetensors package (pip install safetensors)") from None
    except Exception as exc:  # whatever a parser raises on a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"cannot read {path}: {first[:300]}") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in tensors.items()):
        raise WeightsError(f"{path} is not a state dict (a dict of named tensors)")
    return tensors


def load_pretrained(path, device="cpu") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The exported network at ``path``, rebuilt from its sidecar and loaded with ``strict=True``,
    on ``device`` in eval mode, and the sidecar dict. Raises ``WeightsError`` (one line) when the
    sidecar is missing or of another format, the file does not match it, or a tensor does not fit.
    The caller's global RNG is left as it was (building the network draws an init)."""
    from .unet import build_unet

    path = str(path)
    suffix = _suffix(path)
    meta = _read_sidecar(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise WeightsError(f"{path} does not match its sidecar (sha256 differs): corrupted, or another export's file")
    tensors = _decode(data, suffix, path)
    with torch.random.fork_rng(devices=[]):
        try:
            net = build_unet(meta["arch"], int(meta["in_channels"]), int(meta["image_size"]), **meta["network"])
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"{sidecar_path(path)} does not describe a network: {exc}") from None
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise WeightsError(f"{path} does not fit the network of its sidecar: {detail[:300]}") from None
    return net.to(device).eval(), meta


def make_pretrained_formulation(meta: Dict[str, Any]):
    """The formulation (EDM / DDPM preconditioning and noise levels) the exported network was
    trained with: ``formulation.denoise(net, x, level)`` is the denoiser."""
    from .formulations import make_formulation
    form = meta["formulation"]
    return make_formulation(form["name"], **form["kwargs"])


def generate_pretrained(net: torch.nn.Module, meta: Dict[str, Any], num_samples: int, seed: Optional[int] = None,
                        device="cpu", **sampling) -> torch.Tensor:
    """``num_samples`` uint8 (N, C, H, W) samples of an exported network with the run's sampler
    (``sampling`` overrides ``sampler``, ``sample_steps``, ``rho`` or ``amp``). With the run's seed
    (the default) and settings these are the samples ``--sample-only`` writes."""
    from .builders import autocast_context
    from .rng import sample_generator
    from .sampling import generate

    settings = {k: v for k, v in meta["sampling"].items() if k != "seed"}
    settings.update(sampling)
    seed = meta["sampling"]["seed"] if seed is None else seed
    form = meta["formulation"]
    edm_range = {k: form["kwargs"][k] for k in ("sigma_min", "sigma_max") if k in form["kwargs"]}
    cfg = TrainConfig().replace(dict(formulation=form["name"], **edm_range, **settings)).validate()
    device = torch.device(device)
    g = sample_generator(seed)
    shape = (int(meta["in_channels"]), int(meta["image_size"]), int(meta["image_size"]))
    return generate(cfg, make_pretrained_formulation(meta), net, num_samples, shape, device, g,
                    autocast=autocast_context(cfg, device))
