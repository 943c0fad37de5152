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

An export is refused inside the run's own files and over a file that is not an earlier export.
It writes ``PATH.json.pending``, then ``PATH``, then renames the pending sidecar over
``PATH.json``; ``load_pretrained`` takes the pending one when it, not ``PATH.json``, matches the
weights, so an export killed at any moment leaves a pair that loads (the old or the new).
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

__all__ = ["WEIGHTS_FORMAT", "WEIGHTS_VERSION", "WEIGHT_SUFFIXES", "WeightsError", "sidecar_path",
           "pending_sidecar_path", "export_run",
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


def pending_sidecar_path(path: str) -> str:
    """The new sidecar of an export under way (``PATH.json.pending``), renamed over the sidecar
    once the weights are in place."""
    return sidecar_path(path) + ".pending"


# -- writing -----------------------------------------------------------------------------------
def _check_target(path: str, out: str) -> None:
    """Refuse an export path among the run's own files (its checkpoints, config.json,
    metrics.jsonl, ...), a folder, or a file that is not an earlier export (weights with a
    sidecar naming them): an export never replaces a file the trainer did not write."""
    from .run_dir import is_run_path

    side, pending = sidecar_path(path), pending_sidecar_path(path)
    for target in (path, side, pending):
        if is_run_path(out, target):
            raise WeightsError(f"--export {path}: {target} is one of the run's own files (in {out}); "
                               "export to a name of its own")
        if os.path.isdir(target) and not os.path.islink(target):
            raise WeightsError(f"--export {path}: {target} is a folder")
    earlier = {}
    for target in (side, pending):
        if os.path.lexists(target):
            earlier[target] = _sidecar_of(target)
            if earlier[target] is None:
                raise WeightsError(f"--export {path}: {target} is there and is not a weights sidecar; move it away "
                                   "or export to another name")
    if os.path.lexists(path) and not any(m.get("weights_file") == os.path.basename(path) for m in earlier.values()):
        raise WeightsError(f"--export {path}: a file is there that is not an earlier export (no sidecar "
                           f"{os.path.basename(side)} names it); move it away or export to another name")


def _sidecar_of(side: str) -> Optional[Dict[str, Any]]:
    """The sidecar at ``side`` if it is a regular file holding a varweight weights sidecar."""
    try:
        meta = json.loads(ckpt.read_regular(side))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == WEIGHTS_FORMAT else None


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
    _check_target(path, cfg.out)
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
        # the pair is replaced sidecar-first through a pending copy that load_pretrained accepts
        # when it matches the weights: a kill at any moment leaves the old pair or the new one
        write_json_atomic(pending_sidecar_path(path), sidecar)
        ckpt.atomic_write_bytes(path, data)
        os.replace(pending_sidecar_path(path), sidecar_path(path))
        ckpt.fsync_dir(folder)
    except ckpt.WriteError as exc:
        raise WeightsError(str(exc)) from None
    except OSError as exc:
        raise WeightsError(f"cannot write {path}: {exc.strerror or exc}") from None
    say(f"exported the {cfg.export_weights} weights of {run.checkpoint} (step {run.step}) to {path} "
        f"(+ {os.path.basename(sidecar_path(path))})", cfg.quiet)
    return path


# -- reading -----------------------------------------------------------------------------------
def _read_sidecar(path: str) -> Dict[str, Any]:
    return _parse_sidecar(sidecar_path(path), path)


def _parse_sidecar(side: str, path: str) -> Dict[str, Any]:
    try:
        meta = json.loads(ckpt.read_regular(side, follow_links=True))
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
        data = ckpt.read_regular(path, follow_links=True)
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["weights_sha256"]:
        meta = _pending_match(path, digest)
    tensors = _decode(data, suffix, path)
    _check_fits(meta, tensors, path, build_unet)
    with torch.random.fork_rng(devices=[]):
        net = build_unet(meta["arch"], int(meta["in_channels"]), int(meta["image_size"]), **meta["network"])
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise WeightsError(f"{path} does not fit the network of its sidecar: {detail[:300]}") from None
    return net.to(device).eval(), meta


def _pending_match(path: str, digest: str) -> Dict[str, Any]:
    """The pending sidecar of an export interrupted after its weights were renamed, if it is the
    one that matches them; else the mismatch is an error."""
    pending = pending_sidecar_path(path)
    if os.path.lexists(pending):
        try:
            meta = _parse_sidecar(pending, path)
        except WeightsError:
            meta = None
        if meta is not None and meta["weights_sha256"] == digest:
            return meta
    raise WeightsError(f"{path} does not match its sidecar (sha256 differs): corrupted, or another export's file")


def _check_fits(meta: Dict[str, Any], tensors: Dict[str, torch.Tensor], path: str, build_unet) -> None:
    """The sidecar's network, built on the meta device (nothing allocated), has exactly the
    tensors of the file: a sidecar naming a huge network is refused before any memory is taken.
    Sizes beyond what the file holds are refused before even that."""
    side = sidecar_path(path)
    elements = sum(t.numel() for t in tensors.values())
    sizes = [meta["in_channels"], meta["image_size"]]
    stack = [meta["network"]]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += list(item.values())
        elif isinstance(item, (list, tuple)):
            if len(item) > len(tensors):
                raise WeightsError(f"{side} does not describe the network of {path}: a list of {len(item)} entries")
            stack += list(item)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            sizes.append(item)
    big = [v for v in sizes if not isinstance(v, (int, float)) or not abs(v) <= max(elements, 1)]
    if big:
        raise WeightsError(f"{side} does not describe the network of {path}: sizes {big[:3]} exceed the "
                           f"{elements} numbers the file holds")
    try:
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            shell = build_unet(meta["arch"], int(meta["in_channels"]), int(meta["image_size"]), **meta["network"])
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise WeightsError(f"{side} does not describe a network: {' '.join(str(exc).split())[:300]}") from None
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}" for what, keys in
                           (("missing", missing), ("unexpected", extra), ("other shape", wrong)) if keys)
        raise WeightsError(f"{path} does not fit the network of its sidecar ({detail[:300]})")


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
