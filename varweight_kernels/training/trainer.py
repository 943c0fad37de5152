"""The diffusion training loop (nanoGPT / EDM style: read it top to bottom).

``python train_cifar.py --preset digits-smoke --out runs/smoke`` calls ``main``; tests call
``train(cfg)`` in-process. One optimizer step:

    x0      <- next batch of the "data" stream (shuffle + optional flips), scaled to [-1, 1]
    level   <- noise sampler on the "levels" stream (default: the formulation's distribution;
               vaw-is: importance sampled, with per-sample importance weights)
    noise   <- N(0, I) on the "noise" stream
    terms   <- formulation.loss(model, x0, level, noise)      per-sample (B,) loss / mse / snr
    observer(terms.loss.detach(), lam)                        UNweighted per-bin statistics
    loss    <- weighting.objective(terms, lam, is_weight)     the chosen weighting's objective
    backward; all-reduce (DDP); clip; skip if non-finite; AdamW; EMA

RNG streams (``rng.derive_seed(seed, stream, rank)``), each its own ``torch.Generator`` on the
CPU (device-independent draws): "init" (model init through the global RNG, rank 0's on every
rank), "data", "levels" (noise levels), "noise" (the Gaussian noise), "sample" (sampler noise;
re-created at every evaluation, so every evaluation and every method sees the same sampler
noise), "weighting" (edm2's Fourier features, created after the model), and the global RNG
(dropout), re-seeded after init from ``(seed, "dropout", rank)``. Levels and noise have
separate streams so that vaw-is, which draws levels differently, leaves the noise unchanged;
runs that differ only in weighting see identical init, batches, levels, noise and sampler noise.

Run folder: see docs/DESIGN.md. Checkpoints (``checkpoint.py``) hold model, EMA, optimizer,
weighting, observer and noise-sampler state, every rank's RNG states and data position, the
log accumulators, the step and the config, so ``--resume`` continues bitwise identically on CPU
(parameters and metrics; only the timing fields ``images_per_s`` / ``elapsed_s`` differ).
SIGINT/SIGTERM finish the current step, write a checkpoint and exit 0.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import VarianceAwareWeighting
from . import checkpoint as ckpt
from .checkpoint import CheckpointError
from .config import (ConfigError, TrainConfig, build_parser, config_diff, explicit_flags, resolve_config)

__all__ = ["train", "sample_only", "main", "TrainError", "TIMING_FIELDS", "RNG_STREAMS"]

STATE_VERSION = 1
RNG_STREAMS = ("init", "data", "levels", "noise", "sample", "weighting")
TIMING_FIELDS = ("images_per_s", "elapsed_s")
_LOG_FIELDS = ("loss", "weighted_loss", "lr", "grad_norm", "images_per_s", "elapsed_s", "nonfinite", "skipped_steps",
               "nonfinite_samples", "epoch", "vaw_weight_min", "vaw_weight_max", "final")
RUN_FILES = ("config.json", "metrics.jsonl", "binstats.npz", "persample.npz", "DONE", "samples.npz", "samples.png")
# Test hook: from this step on, every per-sample loss is NaN (to exercise --max-nonfinite).
NONFINITE_ENV = "VARWEIGHT_TEST_NONFINITE_FROM"


class TrainError(RuntimeError):
    """A user-facing failure; ``main`` prints it as one line and exits non-zero."""


def _log(msg: str, quiet: bool = False, file=None) -> None:
    if not quiet:
        print(msg, file=file or sys.stdout, flush=True)


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ==============================================================================================
# Distributed setup (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# ==============================================================================================
class DistInfo:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.initialized_here = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def resolve_device(cfg: TrainConfig, d: DistInfo) -> torch.device:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {cfg.device} asked for CUDA, but no GPU is available here")
        if dev.index is None:
            dev = torch.device("cuda", d.local_rank if d.world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(d: DistInfo, device: torch.device) -> None:
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        d.initialized_here = True


# ==============================================================================================
# Run folder
# ==============================================================================================
def _ckpt_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def run_exists(out: str) -> bool:
    if not os.path.isdir(out):
        return False
    return (os.path.exists(os.path.join(out, "config.json")) or os.path.exists(os.path.join(out, "metrics.jsonl"))
            or bool(ckpt.list_checkpoints(_ckpt_dir(out))))


def check_writable(out: str) -> None:
    """Create ``out`` (and checkpoints/) and prove a file can be written there, or raise TrainError."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainError(f"--out {out} exists and is not a folder")
    try:
        os.makedirs(_ckpt_dir(out), exist_ok=True)
        for folder in (out, _ckpt_dir(out)):
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise TrainError(f"--out {out} is not writable: {exc.strerror or exc}") from None


def clear_run(out: str) -> None:
    """--overwrite: remove the files a run writes (and nothing else) from ``out``."""
    for name in RUN_FILES:
        p = os.path.join(out, name)
        if os.path.isfile(p):
            os.unlink(p)
    for name in os.listdir(out):
        if name.startswith("samples_step") and name.endswith(".png"):
            os.unlink(os.path.join(out, name))
    for name in ("checkpoints", "tensorboard"):
        p = os.path.join(out, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
    os.makedirs(_ckpt_dir(out), exist_ok=True)


def write_json_atomic(path: str, obj: Any) -> None:
    ckpt.atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_saved_config(out: str) -> TrainConfig:
    path = os.path.join(out, "config.json")
    try:
        with open(path) as fh:
            saved = json.load(fh)
    except FileNotFoundError:
        raise TrainError(f"no run in {out} (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot read {path}: {exc}") from None
    return TrainConfig.from_dict(saved)


class MetricsLog:
    """metrics.jsonl (appended, flushed each line) and binstats.npz (rewritten atomically)."""

    def __init__(self, out: str, enabled: bool) -> None:
        self.out, self.enabled = out, enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.bin_path = os.path.join(out, "binstats.npz")
        self.bins: Dict[str, List[np.ndarray]] = {"steps": [], "mean": [], "var": [], "count": [], "weight": []}
        self.bin_edges: Optional[np.ndarray] = None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                self.tb = SummaryWriter(log_dir=os.path.join(out, "tensorboard"))
            except Exception:
                self.tb = None

    def truncate_to(self, step: int, log_every: int) -> None:
        """On resume from ``step``: drop what was logged after it, and the "final" partial-interval
        record / bin snapshot written at ``step`` if it was off the (saved run's) log cadence."""
        if not self.enabled:
            return
        if os.path.exists(self.path):
            keep = []
            with open(self.path) as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a crash
                    if rec.get("step", 0) > step:
                        continue
                    if rec.get("final"):
                        rec = {k: v for k, v in rec.items() if k == "step" or k not in _LOG_FIELDS}
                        if len(rec) == 1:
                            continue
                    keep.append(json.dumps(rec) + "\n")
            ckpt.atomic_write_bytes(self.path, "".join(keep).encode())
        if os.path.exists(self.bin_path):
            try:
                with np.load(self.bin_path, allow_pickle=False) as z:
                    data = {k: z[k] for k in z.files}
                sel = (data["steps"] < step) | ((data["steps"] == step) & (step % log_every == 0))
                self.bin_edges = data["bin_edges"]
                for k in self.bins:
                    if k in data:
                        self.bins[k] = list(data[k][sel])
            except Exception as exc:
                _warn(f"warning: {self.bin_path} unreadable ({exc}); its history restarts here")

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def add_bins(self, step: int, stats: Dict[str, torch.Tensor], weight: Optional[torch.Tensor]) -> None:
        if not self.enabled:
            return
        self.bin_edges = stats["bin_edges"].numpy()
        self.bins["steps"].append(np.int64(step))
        for k in ("mean", "var", "count"):
            self.bins[k].append(stats[k].double().numpy())
        if weight is not None:
            self.bins["weight"].append(weight.double().cpu().numpy())
        arrays = {"steps": np.asarray(self.bins["steps"], dtype=np.int64), "bin_edges": self.bin_edges}
        for k in ("mean", "var", "count"):
            arrays[k] = np.stack(self.bins[k])
        if self.bins["weight"]:
            arrays["weight"] = np.stack(self.bins["weight"])
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        ckpt.atomic_write_bytes(self.bin_path, buf.getbuffer())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ==============================================================================================
# Building blocks
# ==============================================================================================
def load_data(cfg: TrainConfig):
    from .data import DatasetUnavailable, load_dataset
    try:
        images, _ = load_dataset(cfg.dataset, cfg.data_root, cfg.download)
    except DatasetUnavailable as exc:
        raise TrainError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load dataset {cfg.dataset} from {cfg.data_root}: {exc}") from None
    return images


def build_model(cfg: TrainConfig, in_channels: int, image_size: int, formulation) -> torch.nn.Module:
    """The U-Net, initialised from the "init" stream (rank 0's on every rank; global RNG restored)."""
    from .rng import derive_seed
    from .unet import UNet
    embedding = formulation.recommended_embedding if cfg.embedding == "auto" else cfg.embedding
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init", 0))
        try:
            return UNet(in_channels, image_size, base_channels=cfg.channels, channel_mults=cfg.channel_mults,
                        num_res_blocks=cfg.num_res_blocks, attn_resolutions=cfg.attn_resolutions,
                        dropout=cfg.dropout, embedding=embedding)
        except ValueError as exc:
            raise TrainError(f"bad model size: {exc}") from None


def build_weighting(cfg: TrainConfig, formulation, generator: torch.Generator) -> torch.nn.Module:
    from .weightings import make_weighting
    name = cfg.weighting
    if name == "vaw":
        return make_weighting("vaw", cfg.vaw_kwargs())
    if name in ("seed-cauchy", "seed-standardized"):
        return make_weighting(name, **({} if cfg.alpha < 0 else {"alpha": cfg.alpha}))
    if name == "min-snr":
        return make_weighting(name, target=formulation.target, gamma=cfg.gamma)
    if name == "p2":
        return make_weighting(name, target=formulation.target, k=cfg.p2_k, gamma=cfg.p2_gamma)
    if name == "edm2":
        return make_weighting(name, channels=cfg.edm2_channels, generator=generator)
    return make_weighting(name)


def build_noise_sampler(cfg: TrainConfig, formulation):
    from .noise_sampling import make_noise_sampler
    if cfg.noise_sampling == "default":
        return make_noise_sampler("default", formulation)
    return make_noise_sampler("vaw-is", formulation, num_bins=cfg.vaw_bins, logsnr_range=tuple(cfg.vaw_logsnr_range),
                              mix=cfg.is_mix, statistic=cfg.is_statistic, power=cfg.is_power,
                              include_weight=(cfg.weighting == "vaw"), min_count=cfg.vaw_min_count,
                              warmup_samples=None if cfg.is_warmup < 0 else cfg.is_warmup)


def weighted_objective(cfg: TrainConfig, weighting, terms, lam: torch.Tensor, is_weight: Optional[torch.Tensor]):
    """Old name, kept for benchmarks/overhead.py: ``weighting.objective(terms, lam, is_weight)``."""
    return weighting.objective(terms, lam, is_weight)


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


class StopSignal:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, checkpoints and exits 0.
    A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


# ==============================================================================================
# Sampling
# ==============================================================================================
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def generate(cfg: TrainConfig, formulation, net: torch.nn.Module, n: int, shape, device: torch.device,
             generator: torch.Generator, batch: int = 256, autocast=contextlib.nullcontext) -> torch.Tensor:
    """``n`` samples from ``net`` (the EMA weights) as uint8 (n, C, H, W) on the CPU."""
    from . import samplers
    sampler = cfg.resolved_sampler()
    out = []
    net.eval()
    for start in range(0, n, batch):
        b = min(batch, n - start)
        shp = (b,) + tuple(shape)

        def den(x, level):
            with autocast():
                return formulation.denoise(net, x, level).float()

        if sampler == "heun":
            x = samplers.heun_karras(den, shp, generator, steps=cfg.sample_steps, sigma_min=cfg.sigma_min,
                                     sigma_max=cfg.sigma_max, rho=cfg.rho, device=device)
        elif sampler == "ddpm":
            x = samplers.ddpm_ancestral(den, shp, generator, formulation.alphas_cumprod, steps=cfg.sample_steps,
                                        device=device)
        else:
            x = samplers.ddim(den, shp, generator, formulation.alphas_cumprod, steps=cfg.sample_steps, device=device)
        out.append(to_uint8(x).cpu())
    return torch.cat(out)


def generate_distributed(cfg, formulation, net, n, shape, device, d: DistInfo, autocast) -> Optional[torch.Tensor]:
    """Every rank draws its share with its own "sample" stream; rank 0 gets all ``n`` images."""
    from .rng import derive_seed
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "sample", d.rank))
    share = -(-n // d.world)
    imgs = generate(cfg, formulation, net, share, shape, device, g, autocast=autocast)
    if d.world == 1:
        return imgs[:n]
    t = imgs.to(device) if dist.get_backend() == "nccl" else imgs
    parts = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t)
    return torch.cat([p.cpu() for p in parts])[:n] if d.main else None


def save_persample(cfg: TrainConfig, formulation, net: torch.nn.Module, images: torch.Tensor,
                   device: torch.device, autocast, path: str) -> None:
    """The paper's variance analysis: unweighted per-sample losses of the trained (EMA) model on
    ``cfg.analysis_batches`` batches at the default noise levels, from a stream of its own."""
    from .data import to_model_range
    from .rng import derive_seed

    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "analysis", 0))
    lams, losses = [], []
    net.eval()
    with torch.no_grad():
        for _ in range(cfg.analysis_batches):
            idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
            x0 = to_model_range(images[idx]).to(device)
            level = formulation.sample_levels(cfg.batch_size, g, device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            with autocast():
                terms = formulation.loss(net, x0, level, noise)
            lams.append(formulation.logsnr(level).float().cpu())
            losses.append(terms.loss.detach().float().cpu())
    tmp = path + ".tmp.npz"
    np.savez(tmp, lam=torch.cat(lams).numpy(), loss=torch.cat(losses).numpy())
    os.replace(tmp, path)


def save_grid(images: torch.Tensor, path: str) -> None:
    """A square PNG grid of uint8 (N, C, H, W) images (upscaled to >= 32 px), written atomically."""
    n, c, h, w = images.shape
    cols = max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    scale = max(1, 32 // max(h, w))
    pad = 1
    grid = torch.zeros(c, rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        img = images[i].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        y, x = pad + r * (h * scale + pad), pad + k * (w * scale + pad)
        grid[:, y:y + h * scale, x:x + w * scale] = img
    arr = grid.permute(1, 2, 0).numpy()
    if c == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    try:
        from PIL import Image
        Image.fromarray(arr).save(buf, format="PNG")
    except ImportError:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.imsave(buf, arr, format="png", cmap="gray" if c == 1 else None)
    ckpt.atomic_write_bytes(path, buf.getbuffer())


# ==============================================================================================
# Training
# ==============================================================================================
def train(cfg: TrainConfig, hooks: Optional[Dict[str, Callable]] = None) -> Dict[str, Any]:
    """Run (or resume) training as configured. Returns a summary dict. Raises TrainError,
    ConfigError or CheckpointError with a one-line message on user-facing failures."""
    from .formulations import make_formulation
    from .rng import derive_seed, get_rng_states, make_generators, set_rng_states
    from .data import BatchIterator, to_model_range

    hooks = hooks or {}
    cfg = cfg.validate()
    d = DistInfo()
    out = cfg.out
    if cfg.batch_size % d.world:
        raise TrainError(f"--batch-size {cfg.batch_size} is not divisible by the world size {d.world}")
    local_bs = cfg.batch_size // d.world

    # -- run folder: refuse to clobber, prove writability, all BEFORE any training ------------
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume and --overwrite exclude each other")
    exists = run_exists(out)
    if exists and not (cfg.resume or cfg.overwrite):
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    if cfg.resume and not exists:
        raise TrainError(f"--resume: no run in {out} to continue")
    if d.main:
        check_writable(out)
    saved_cfg = read_saved_config(out) if cfg.resume else None
    if saved_cfg is not None:
        diffs = config_diff(saved_cfg, cfg)
        if diffs:
            raise TrainError(f"cannot resume {out}: the config differs from the saved run in " + "; ".join(diffs))

    device = resolve_device(cfg, d)
    init_distributed(d, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    quiet = cfg.quiet or not d.main

    # -- the pieces ----------------------------------------------------------------------------
    images = load_data(cfg)
    shape = tuple(images.shape[1:])
    formulation = make_formulation(cfg.formulation, **cfg.formulation_kwargs())
    gens = make_generators(cfg.seed, d.rank, "cpu", streams=RNG_STREAMS)
    raw_model = build_model(cfg, shape[0], shape[1], formulation).to(device)
    if cuda:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    torch.manual_seed(derive_seed(cfg.seed, "dropout", d.rank))  # global RNG: dropout only
    ema = EMA(raw_model, cfg.ema_decay)
    weighting = build_weighting(cfg, formulation, gens["weighting"]).to(device)
    observer = VarianceAwareWeighting(**cfg.vaw_kwargs()).to(device)  # observe role: output ignored
    noise_sampler = build_noise_sampler(cfg, formulation)
    try:
        batches = BatchIterator(images.to(device), local_bs, gens["data"], hflip=cfg.flip)
    except ValueError as exc:
        raise TrainError(f"--batch-size: {exc}") from None

    model = torch.compile(raw_model) if cfg.compile else raw_model
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
    weighting_params = [p for p in weighting.parameters() if p.requires_grad]
    params = list(raw_model.parameters()) + weighting_params
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)

    # -- state: fresh, or from the latest good checkpoint -------------------------------------
    step, skipped, consecutive = 0, 0, 0
    acc = _new_accumulator()
    log = MetricsLog(out, enabled=d.main)
    if cfg.resume:
        if d.main:
            ckpt.clean_temp_files(_ckpt_dir(out))  # a save killed half-way leaves one
        d.barrier()
        path, state = ckpt.load_latest_good(_ckpt_dir(out), warn=_warn if d.main else (lambda m: None),
                                            quarantine=d.main)
        saved = TrainConfig.from_dict(state.get("config", {}))
        diffs = config_diff(saved, cfg)
        if diffs:
            raise TrainError(f"cannot resume from {path}: the config differs in " + "; ".join(diffs))
        try:
            raw_model.load_state_dict(state["model"])
            ema.module.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            weighting.load_state_dict(state["weighting"])
            observer.load_state_dict(state["observer"])
            noise_sampler.load_state_dict(state["noise_sampler"])
            ranks = state["ranks"]
            if len(ranks) == d.world:
                mine = ranks[d.rank]
                set_rng_states(gens, mine["rng"])
                batches.load_state_dict(mine["data"])
                torch.set_rng_state(mine["global_rng"])
                if cuda and mine.get("cuda_rng") is not None and mine["cuda_rng"].numel():
                    torch.cuda.set_rng_state(mine["cuda_rng"], device)
            else:
                _warn(f"warning: world size changed from {len(ranks)} to {d.world}; data order and noise "
                      "streams restart from re-derived seeds (the run continues, not bitwise as before)")
                for name, g in gens.items():
                    g.manual_seed(derive_seed(cfg.seed, f"{name}@{state['step']}", d.rank))
            step = int(state["step"])
            skipped = int(state["counters"]["skipped_steps"])
            consecutive = int(state["counters"]["consecutive_nonfinite"])
            acc = dict(state["log_accum"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise TrainError(f"checkpoint {path} does not fit this run: {str(exc).splitlines()[0]}") from None
        log.truncate_to(step, saved.log_every)
        _log(f"resumed from {path} at step {step}", quiet)
    elif d.main and cfg.overwrite:
        clear_run(out)
    run_config = cfg.replace({"resume": False, "overwrite": False}).to_dict()
    if d.main:
        write_json_atomic(os.path.join(out, "config.json"), run_config)
        done = os.path.join(out, "DONE")
        if os.path.exists(done) and step < cfg.steps:
            os.unlink(done)
    d.barrier()

    # -- optional FID hook ------------------------------------------------------------------------
    evaluator = _make_evaluator(cfg, d) if cfg.fid_every > 0 else None

    def save(at_step: int) -> str:
        rank_state = {"rng": get_rng_states(gens), "data": batches.state_dict(),
                      "global_rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state(device) if cuda else torch.empty(0, dtype=torch.uint8)}
        ranks = [rank_state]
        if d.world > 1:
            ranks = [None] * d.world
            dist.all_gather_object(ranks, rank_state)
        path = ckpt.checkpoint_path(_ckpt_dir(out), at_step)
        if d.main:
            state = {"version": STATE_VERSION, "step": at_step, "config": run_config,
                     "model": raw_model.state_dict(), "ema": ema.module.state_dict(),
                     "optimizer": optimizer.state_dict(), "weighting": weighting.state_dict(),
                     "observer": observer.state_dict(), "noise_sampler": noise_sampler.state_dict(),
                     "ranks": ranks, "world_size": d.world, "image_shape": list(shape), "log_accum": dict(acc),
                     "counters": {"skipped_steps": skipped, "consecutive_nonfinite": consecutive}}
            ckpt.save_checkpoint(state, path)
            ckpt.prune_checkpoints(_ckpt_dir(out), cfg.keep_ckpts)
        d.barrier()
        return path

    def evaluate(at_step: int, record: Dict[str, Any]) -> None:
        if cfg.sample_every and at_step % cfg.sample_every == 0 and d.main:
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "sample", 0))
            grid = generate(cfg, formulation, ema.module, cfg.grid_size, shape, device, g, autocast=autocast)
            save_grid(grid, os.path.join(out, f"samples_step{at_step:08d}.png"))
        if evaluator is not None and at_step % cfg.fid_every == 0:
            imgs = generate_distributed(cfg, formulation, ema.module, cfg.fid_samples, shape, device, d, autocast)
            if d.main:
                scores = evaluator.score(imgs)
                if scores:
                    record.update({k: float(v) for k, v in scores.items()})

    # -- the loop ------------------------------------------------------------------------------
    nan_from = int(os.environ[NONFINITE_ENV]) if os.environ.get(NONFINITE_ENV) else None
    pbar = _progress(cfg, step, quiet)
    raw_model.train()
    weighting.train()
    observer.train()
    t_last, t_start = time.time(), time.time()
    last_ckpt = None
    with StopSignal() as stop:
        while step < cfg.steps:
            lr = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr

            # batch, noise levels and noise: each from its own stream
            x0 = to_model_range(next(batches))
            if cuda:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            level, lam, is_weight = noise_sampler.sample(local_bs, gens["levels"], device)
            noise = torch.randn(x0.shape, generator=gens["noise"]).to(device)
            if "on_batch" in hooks:
                hooks["on_batch"](step, {"x0": x0, "level": level, "lam": lam, "noise": noise,
                                         "is_weight": is_weight, "model": raw_model})

            # forward: per-sample terms, unweighted statistics, the weighting's objective
            with autocast():
                terms = formulation.loss(model, x0, level, noise)
            if nan_from is not None and step >= nan_from:
                terms = terms._replace(loss=terms.loss * float("nan"), mse=terms.mse * float("nan"))
            observer(terms.loss.detach().float(), lam)
            loss = weighting.objective(terms, lam, is_weight if cfg.noise_sampling != "default" else None)

            # backward (always: DDP's all-reduce is collective), then skip if non-finite
            loss.backward()
            if d.world > 1 and weighting_params:
                for p in weighting_params:
                    dist.all_reduce(p.grad)
                    p.grad /= d.world
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            packed = torch.stack([terms.loss.detach().float().sum().double(), loss.detach().double(),
                                  (~torch.isfinite(loss.detach())).double(),
                                  torch.tensor(float(stop.signum is not None), dtype=torch.float64,
                                               device=loss.device)])
            if d.world > 1:
                dist.all_reduce(packed)
            packed = packed.tolist()
            mean_loss, mean_wloss = packed[0] / cfg.batch_size, packed[1] / d.world
            gnorm = float(grad_norm)
            finite = packed[2] == 0 and math.isfinite(gnorm)
            if finite:
                optimizer.step()
                ema.update(raw_model)
                consecutive = 0
            else:
                skipped += 1
                consecutive += 1
            optimizer.zero_grad(set_to_none=True)
            if cfg.noise_sampling != "default":
                noise_sampler.update_from_vaw(observer, include_weight=(cfg.weighting == "vaw"))
            step += 1

            # bookkeeping
            acc["n"] += 1
            if finite:
                acc["loss"] += mean_loss
                acc["wloss"] += mean_wloss
                acc["gnorm"] += gnorm
                acc["finite"] += 1
            else:
                acc["nonfinite"] += 1
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            if consecutive >= cfg.max_nonfinite:
                good = ckpt.list_checkpoints(_ckpt_dir(out))
                where = f"; last good checkpoint: {good[0][1]}" if good else "; no checkpoint was written yet"
                raise TrainError(f"{consecutive} consecutive non-finite losses (step {step}); stopping{where}")

            # log: every log_every steps, plus a "final" partial-interval record at the last step
            # (dropped again when a later --resume continues past it, so metrics stay bitwise)
            record: Dict[str, Any] = {}
            on_cadence = step % cfg.log_every == 0
            if on_cadence or step == cfg.steps:
                now = time.time()
                n_fin = max(acc["finite"], 1)
                record = {"step": step, "loss": acc["loss"] / n_fin if acc["finite"] else float("nan"),
                          "weighted_loss": acc["wloss"] / n_fin if acc["finite"] else float("nan"),
                          "lr": lr, "grad_norm": acc["gnorm"] / n_fin if acc["finite"] else float("nan"),
                          "images_per_s": acc["n"] * cfg.batch_size / max(now - t_last, 1e-9),
                          "elapsed_s": now - t_start, "nonfinite": acc["nonfinite"], "skipped_steps": skipped,
                          "nonfinite_samples": int(observer.nonfinite), "epoch": batches.epoch}
                bin_weights = weighting.bin_weights()
                if bin_weights is not None:
                    record.update(vaw_weight_min=float(bin_weights.min()), vaw_weight_max=float(bin_weights.max()))
                if on_cadence:
                    t_last = now
                    acc = _new_accumulator()
                else:
                    record["final"] = True
                log.add_bins(step, observer.stats(), bin_weights)
            evaluate_now = (cfg.fid_every and step % cfg.fid_every == 0) or \
                           (cfg.sample_every and step % cfg.sample_every == 0)
            if evaluate_now:
                if not record:
                    record = {"step": step}
                evaluate(step, record)
                t_last = time.time() if on_cadence else t_last  # keep eval time out of images_per_s
            if record:
                log.write(record)
                if pbar is None and len(record) > 1:
                    _log(_format_record(record, cfg.steps), quiet)

            interrupted = packed[3] > 0
            if step % cfg.ckpt_every == 0 or step == cfg.steps or interrupted:
                last_ckpt = save(step)
            if interrupted:
                if pbar is not None:
                    pbar.close()
                log.close()
                _log(f"stopped by {stop.name or 'a signal on another rank'} at step {step}; checkpoint "
                     f"{last_ckpt}; continue with --resume", not d.main)
                return {"status": "interrupted", "step": step, "checkpoint": last_ckpt}

    # -- the end: a final grid, the DONE marker ---------------------------------------------------
    if pbar is not None:
        pbar.close()
    if last_ckpt is None:  # resumed a finished run
        found = ckpt.list_checkpoints(_ckpt_dir(out))
        last_ckpt = found[0][1] if found else None
    if d.main:
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "sample", 0))
        grid = generate(cfg, formulation, ema.module, cfg.grid_size, shape, device, g, autocast=autocast)
        save_grid(grid, os.path.join(out, f"samples_step{step:08d}.png"))
        if cfg.analysis_batches:
            save_persample(cfg, formulation, ema.module, images, device, autocast, os.path.join(out, "persample.npz"))
        with open(os.path.join(out, "DONE"), "w") as fh:
            fh.write(f"step {step}\n")
    log.close()
    if "on_end" in hooks:
        hooks["on_end"]({"model": raw_model, "ema": ema.module, "weighting": weighting, "observer": observer,
                         "noise_sampler": noise_sampler, "step": step})
    d.barrier()
    _log(f"done: {step} steps, {skipped} skipped; run folder {out}", quiet)
    return {"status": "done", "step": step, "checkpoint": last_ckpt, "skipped_steps": skipped}


def _new_accumulator() -> Dict[str, Any]:
    return {"n": 0, "finite": 0, "nonfinite": 0, "loss": 0.0, "wloss": 0.0, "gnorm": 0.0}


def _progress(cfg: TrainConfig, step: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=step, unit="it", dynamic_ncols=True, smoothing=0.1)


def _format_record(rec: Dict[str, Any], total: int) -> str:
    parts = [f"step {rec['step']}/{total}"]
    for k in ("loss", "weighted_loss", "grad_norm", "images_per_s", "fid", "fd_digits"):
        if k in rec:
            parts.append(f"{k} {rec[k]:.4g}")
    if rec.get("skipped_steps"):
        parts.append(f"skipped {rec['skipped_steps']}")
    return " | ".join(parts)


def _make_evaluator(cfg: TrainConfig, d: DistInfo):
    """FIDEvaluator on rank 0 if importable and usable; the verdict is shared with every rank."""
    ev, ok = None, False
    if d.main:
        try:
            from ..evaluation.fid import FIDEvaluator
            cache = None if os.environ.get("VARWEIGHT_CACHE") else os.path.join(cfg.data_root, "varweight_cache")
            ev = FIDEvaluator(cfg.dataset, weights_path=cfg.fid_weights or None, num_samples=cfg.fid_samples,
                              cache_dir=cache, datasets_root=cfg.data_root, download=cfg.download)
            ok = ev.available()
        except ImportError as exc:
            _warn(f"warning: FID disabled (evaluation module not importable: {exc})")
        except Exception as exc:  # the evaluator should warn itself; never let FID kill training
            _warn(f"warning: FID disabled ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if d.world > 1:
        flag = [ok]
        dist.broadcast_object_list(flag, src=0)
        ok = flag[0]
    if not ok:
        return None
    return ev if d.main else _RemoteEvaluator()


class _RemoteEvaluator:
    """Placeholder on ranks > 0: they generate their share of samples; rank 0 scores."""

    def score(self, images):
        return None


# ==============================================================================================
# --sample-only
# ==============================================================================================
def sample_only(cfg: TrainConfig) -> str:
    """Write ``samples.npz`` (key "images", uint8 NHWC) and ``samples.png`` from the EMA weights of
    the latest good checkpoint in ``cfg.out``. Returns the npz path."""
    from .formulations import make_formulation
    from .rng import derive_seed
    d = DistInfo()
    if not d.main:
        return ""
    cfg = cfg.validate()
    out = cfg.out
    path, state = ckpt.load_latest_good(_ckpt_dir(out), warn=_warn, quarantine=False)
    run_cfg = TrainConfig.from_dict(state.get("config", {})).replace(
        {k: getattr(cfg, k) for k in ("device", "sampler", "sample_steps", "rho", "num_samples", "amp")})
    device = resolve_device(run_cfg, d)
    formulation = make_formulation(run_cfg.formulation, **run_cfg.formulation_kwargs())
    ema_sd = state["ema"]
    try:
        in_ch, size, _ = (int(v) for v in state["image_shape"])
    except (KeyError, TypeError, ValueError):
        raise TrainError(f"checkpoint {path} lacks the image shape") from None
    net = build_model(run_cfg, in_ch, size, formulation)
    try:
        net.load_state_dict(ema_sd)
    except RuntimeError as exc:
        raise TrainError(f"checkpoint {path} does not fit its config: {str(exc).splitlines()[0]}") from None
    net = net.to(device).eval()
    use_bf16 = run_cfg.amp == "bf16" or (run_cfg.amp == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    g = torch.Generator().manual_seed(derive_seed(run_cfg.seed, "sample", 0))
    imgs = generate(run_cfg, formulation, net, cfg.num_samples, (in_ch, size, size), device, g, autocast=autocast)
    npz = os.path.join(out, "samples.npz")
    buf = io.BytesIO()
    np.savez(buf, images=imgs.permute(0, 2, 3, 1).contiguous().numpy())
    ckpt.atomic_write_bytes(npz, buf.getbuffer())
    save_grid(imgs[: max(1, min(len(imgs), cfg.grid_size))], os.path.join(out, "samples.png"))
    _log(f"wrote {len(imgs)} samples from {path} (EMA, step {state['step']}) to {npz}", cfg.quiet)
    return npz


# ==============================================================================================
# CLI entry point
# ==============================================================================================
def parse_config(argv: Optional[List[str]] = None, prog: str = "train_cifar.py") -> TrainConfig:
    """flag > preset > default; on --resume / --sample-only the saved run's config replaces the defaults."""
    args = build_parser(prog).parse_args(argv)
    flags = explicit_flags(args)
    base = None
    if flags.get("resume") or flags.get("sample_only"):
        out = flags.get("out", TrainConfig().out)
        base = read_saved_config(out)
        base = base.replace({"resume": False, "overwrite": False, "sample_only": False})
    return resolve_config(flags, base)


def main(argv: Optional[List[str]] = None) -> int:
    d = DistInfo()
    try:
        cfg = parse_config(argv)
        if cfg.sample_only:
            sample_only(cfg)
        else:
            train(cfg)
        return 0
    except (TrainError, ConfigError, CheckpointError) as exc:
        if d.main or not isinstance(exc, ConfigError):
            prefix = "error" if d.world == 1 else f"error (rank {d.rank})"
            print(f"{prefix}: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("aborted by a second interrupt; no checkpoint written for the current step", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
