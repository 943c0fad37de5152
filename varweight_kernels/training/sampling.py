"""Images from the EMA model: generation (one rank or all), PNG grids, the per-sample loss
dump, the evaluation during training (grids, FID), and ``--sample-only``.

Sampler noise comes from the "sample" stream (``rng.sample_generator``), re-created at every
evaluation, so every evaluation of every run with the same seed draws the same noise.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .builders import autocast_context, build_model
from .config import TrainConfig, TrainError
from .distributed import DistInfo, broadcast_object, resolve_device
from .rng import derive_seed, sample_generator
from .run_dir import checkpoint_dir, lock_run_folder, release_run_folder, say, warn

__all__ = ["to_uint8", "generate", "generate_distributed", "save_grid", "grid_scale", "save_persample", "make_scorer",
           "Evaluation", "RunNetwork", "load_run_network", "sample_only"]


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
    g = sample_generator(cfg.seed, d.rank)
    share = -(-n // d.world)
    imgs = generate(cfg, formulation, net, share, shape, device, g, autocast=autocast)
    if d.world == 1:
        return imgs[:n]
    t = imgs.to(device) if dist.get_backend() == "nccl" else imgs
    parts = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t)
    return torch.cat([p.cpu() for p in parts])[:n] if d.main else None


GRID_MIN_PIXELS = 64


def grid_scale(height: int, width: int) -> int:
    """The nearest-neighbour upscaling factor of a sample in a grid."""
    return max(1, -(-GRID_MIN_PIXELS // max(height, width)))


def save_grid(images: torch.Tensor, path: str) -> None:
    """A square PNG grid of uint8 (N, C, H, W) images, written atomically. Each sample is upscaled
    by an integer nearest-neighbour factor to at least ``GRID_MIN_PIXELS`` (8x8 digits 8x, 32x32
    CIFAR 2x), so a grid shows the pixels the model made, large enough to see, without smoothing."""
    n, c, h, w = images.shape
    cols = max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    scale = grid_scale(h, w)
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


def save_persample(cfg: TrainConfig, formulation, nets: Dict[str, torch.nn.Module], weighting,
                   images: torch.Tensor, device: torch.device, autocast, path: str) -> None:
    """The per-sample variance analysis: per-sample losses of each trained model in ``nets``
    ("ema", "raw") on ``cfg.analysis_batches`` batches at the default noise levels, from a stream
    of its own (the same batches for every model), both unweighted and weighted by the run's
    weighting as it stands at the end. Arrays: ``lam``; per model ``loss`` / ``weighted_loss``,
    prefixed with the model's name except for the EMA model (``loss``, ``raw_weighted_loss``...).
    The weighted loss is the weight times the term the weighting weighs (min-snr, p2: the MSE)."""
    from .data import to_model_range

    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "analysis", 0))
    arrays: Dict[str, list] = {"lam": []}
    for net in nets.values():
        net.eval()
    with torch.no_grad():
        for _ in range(cfg.analysis_batches):
            idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
            x0 = to_model_range(images[idx]).to(device)
            level = formulation.sample_levels(cfg.batch_size, g, device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            lam = formulation.logsnr(level).float()
            arrays["lam"].append(lam.cpu())
            for name, net in nets.items():
                with autocast():
                    terms = formulation.loss(net, x0, level, noise)
                weighted = weighting.analysis_weights(terms, lam.to(device)) * getattr(terms, weighting.term)
                prefix = "" if name == "ema" else f"{name}_"
                arrays.setdefault(f"{prefix}loss", []).append(terms.loss.float().cpu())
                arrays.setdefault(f"{prefix}weighted_loss", []).append(weighted.float().cpu())
    buf = io.BytesIO()
    np.savez(buf, **{key: torch.cat(parts).numpy() for key, parts in arrays.items()})
    ckpt.atomic_write_bytes(path, buf.getbuffer())


def make_scorer(cfg: TrainConfig, d: DistInfo):
    """FIDEvaluator on rank 0 if importable and usable (a stand-in on the other ranks), or None;
    the verdict is shared with every rank. Built before the first step, so a wrong --fid-weights
    file (not the published Inception weights) stops every rank there with one line."""
    scorer, ok, error = None, False, None
    if d.main:
        try:
            from ..evaluation.fid import FIDEvaluator, FIDWeightsError
        except ImportError as exc:
            warn(f"warning: FID disabled (evaluation module not importable: {exc})")
        else:
            try:
                cache = None if os.environ.get("VARWEIGHT_CACHE") else os.path.join(cfg.data_root, "varweight_cache")
                scorer = FIDEvaluator(cfg.dataset, weights_path=cfg.fid_weights or None, num_samples=cfg.fid_samples,
                                      cache_dir=cache, datasets_root=cfg.data_root, download=cfg.download)
                ok = scorer.available()
            except FIDWeightsError as exc:
                error = str(exc)
            except Exception as exc:  # the evaluator should warn itself; never let FID kill training
                warn(f"warning: FID disabled ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    ok, error = broadcast_object((ok, error), d)
    if error is not None:
        raise TrainError(f"--fid-weights: {error}")
    if not ok:
        return None
    return scorer if d.main else _RemoteScorer()


class _RemoteScorer:
    """Stand-in on ranks > 0: they generate their share of samples; rank 0 scores."""

    def score(self, images):
        return None


def _own_global_rng(device: torch.device):
    """A scope whose draws from the global RNG (a scorer initialising its nets) are undone after
    it, so that evaluating never moves the training's dropout stream."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


class Evaluation:
    """The EMA model during training: a grid every --sample-every steps, FID (or the digits
    metric) every --fid-every steps and at --fid-steps, and at the end a grid and the per-sample analysis."""

    def __init__(self, cfg: TrainConfig, formulation, shape, device: torch.device, d: DistInfo, autocast) -> None:
        self.cfg, self.formulation, self.shape, self.device, self.d = cfg, formulation, tuple(shape), device, d
        self.autocast = autocast
        with _own_global_rng(device):
            self.scorer = make_scorer(cfg, d) if cfg.fid_every > 0 or cfg.fid_steps else None

    def score_due(self, step: int) -> bool:
        cfg = self.cfg
        return bool((cfg.fid_every and step % cfg.fid_every == 0) or step in cfg.fid_steps)

    def due(self, step: int) -> bool:
        cfg = self.cfg
        return self.score_due(step) or bool(cfg.sample_every and step % cfg.sample_every == 0)

    def __call__(self, step: int, net: torch.nn.Module, record: Dict[str, Any]) -> None:
        """Run on every rank (they share the FID samples); scores go into ``record``."""
        cfg = self.cfg
        if cfg.sample_every and step % cfg.sample_every == 0 and self.d.main:
            self.write_step_grid(step, net)
        if self.scorer is not None and self.score_due(step):
            imgs = generate_distributed(cfg, self.formulation, net, cfg.fid_samples, self.shape, self.device, self.d,
                                        self.autocast)
            if self.d.main:
                with _own_global_rng(self.device):
                    scores = self.scorer.score(imgs)
                if scores:
                    record.update({k: float(v) for k, v in scores.items()})

    def write_step_grid(self, step: int, net: torch.nn.Module) -> None:
        """samples_stepXXXXXXXX.png: a grid from the "sample" stream, the same noise at every step."""
        cfg = self.cfg
        g = sample_generator(cfg.seed)
        grid = generate(cfg, self.formulation, net, cfg.grid_size, self.shape, self.device, g, autocast=self.autocast)
        save_grid(grid, os.path.join(cfg.out, f"samples_step{step:08d}.png"))

    def finish(self, step: int, net: torch.nn.Module, images: torch.Tensor, raw_net: torch.nn.Module,
               weighting) -> None:
        """Rank 0, after the last step: the final grid (EMA) and persample.npz (EMA and raw)."""
        self.write_step_grid(step, net)
        if self.cfg.analysis_batches:
            save_persample(self.cfg, self.formulation, {"ema": net, "raw": raw_net}, weighting, images, self.device,
                           self.autocast, os.path.join(self.cfg.out, "persample.npz"))


class RunNetwork(NamedTuple):
    """A run's network as its latest good checkpoint holds it (on the CPU, eval mode)."""
    net: torch.nn.Module
    config: TrainConfig      # the run's config; the caller's sampling and device fields win
    formulation: Any
    image_shape: Tuple[int, int, int]
    checkpoint: str
    step: int


def load_run_network(cfg: TrainConfig, which: str = "ema") -> RunNetwork:
    """The ``which`` ("ema" or "raw") weights of the latest good checkpoint in ``cfg.out``, loaded
    strictly into the network its saved config builds."""
    from .formulations import make_formulation
    from .state import checkpoint_config, read_latest_good

    path, state = read_latest_good(checkpoint_dir(cfg.out), warn=warn, quarantine=False)
    run_cfg = checkpoint_config(path, state).replace(
        {k: getattr(cfg, k) for k in ("device", "sampler", "sample_steps", "rho", "num_samples", "amp")})
    formulation = make_formulation(run_cfg.formulation, **run_cfg.formulation_kwargs())
    try:
        in_ch, size, _ = (int(v) for v in state["image_shape"])
    except (KeyError, TypeError, ValueError):
        raise TrainError(f"checkpoint {path} lacks the image shape") from None
    net = build_model(run_cfg, in_ch, size, formulation)
    try:
        net.load_state_dict(state["ema" if which == "ema" else "model"])
    except (KeyError, RuntimeError) as exc:
        raise TrainError(f"checkpoint {path} does not fit its config: {str(exc).splitlines()[0]}") from None
    return RunNetwork(net.eval(), run_cfg, formulation, (in_ch, size, size), path, int(state["step"]))


def sample_only(cfg: TrainConfig) -> str:
    """Write ``samples.npz`` (key "images", uint8 NHWC) and ``samples.png`` from the EMA weights of
    the latest good checkpoint in ``cfg.out``, holding the run's lock. Returns the npz path."""
    d = DistInfo()
    if not d.main:
        return ""
    cfg = cfg.validate()
    lock_run_folder(cfg.out)
    try:
        return _sample_only(cfg, d)
    finally:
        release_run_folder(cfg.out)


def _sample_only(cfg: TrainConfig, d: DistInfo) -> str:
    out = cfg.out
    run = load_run_network(cfg, "ema")
    run_cfg = run.config
    device = resolve_device(run_cfg, d)
    net = run.net.to(device)
    g = sample_generator(run_cfg.seed)
    imgs = generate(run_cfg, run.formulation, net, cfg.num_samples, run.image_shape, device, g,
                    autocast=autocast_context(run_cfg, device))
    npz = os.path.join(out, "samples.npz")
    buf = io.BytesIO()
    np.savez(buf, images=imgs.permute(0, 2, 3, 1).contiguous().numpy())
    ckpt.atomic_write_bytes(npz, buf.getbuffer())
    save_grid(imgs[: max(1, min(len(imgs), cfg.grid_size))], os.path.join(out, "samples.png"))
    say(f"wrote {len(imgs)} samples from {run.checkpoint} (EMA, step {run.step}) to {npz}", cfg.quiet)
    return npz
