"""The diffusion training loop (nanoGPT / EDM style: read ``train`` top to bottom).

``python train_cifar.py --preset digits-smoke --out runs/smoke`` reaches ``train(cfg)`` through
``cli.main``; tests call it in-process. One optimizer step:

    x0      <- next batch of the "data" stream (shuffle + optional flips), scaled to [-1, 1]
    level   <- noise sampler on the "levels" stream (default: the formulation's distribution;
               vaw-is: importance sampled, with per-sample importance weights)
    noise   <- N(0, I) on the "noise" stream
    terms   <- formulation.loss(model, x0, level, noise)      per-sample (B,) loss / mse / snr
    observer(terms.loss.detach(), lam)                        UNweighted per-bin statistics (a VAW
                                                              weighting's own: read, not recomputed)
    loss    <- weighting.objective(terms, lam, is_weight)     the chosen weighting's objective
    backward; all-reduce (DDP); clip; skip if non-finite; AdamW; EMA

The step reads one thing back from the device, whether it was finite (and whether a rank was
signalled to stop), and with vaw-is one more until its proposal is warm; the logged metrics are
summed on the device and read at log time.

RNG streams (``rng.derive_seed(seed, stream, rank)``), each its own ``torch.Generator`` on the
CPU (device-independent draws) except "noise" on CUDA, which draws the image-sized noise on the
device (still paired across weightings; CUDA and CPU runs see different noise): "init" (model
init through the global RNG, rank 0's on every rank), "data", "levels" (noise levels), "noise" (the Gaussian noise), "sample" (sampler noise;
re-created at every evaluation, so every evaluation and every method sees the same sampler
noise), "weighting" (edm2's Fourier features, created after the model), and the global RNG
(dropout), re-seeded after init from ``(seed, "dropout", rank)``. Levels and noise have
separate streams so that vaw-is, which draws levels differently, leaves the noise unchanged;
runs that differ only in weighting see identical init, batches, levels, noise and sampler noise.

Checkpoints (``state.py``) hold everything a step changes, so ``--resume`` continues bitwise
identically on CPU (parameters and metrics; only ``run_dir.TIMING_FIELDS`` differ).
SIGINT/SIGTERM finish the current step, write a checkpoint and exit 0.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional

import torch

from .. import LogSNRMonitor, VarianceAwareWeighting
from .builders import (EMA, autocast_context, build_batches, build_model, build_noise_sampler, build_optimizer,
                       build_weighting, load_data)
from .config import TrainConfig, TrainError
from .distributed import DistInfo, all_reduce_sum, average_gradients, init_distributed, resolve_device
from .rng import derive_seed, make_generators
from .run_dir import (MetricsLog, check_run_folder, clear_run, format_record, interval_record, latest_checkpoint,
                      mark_done, new_accumulator, release_run_folder, run_folder_held, say, write_run_config)
from .run_index import write_run_index
from .sampling import Evaluation
from .signals import StopSignal
from .state import TrainState, read_resume_point

__all__ = ["train", "Callbacks"]


class Callbacks:
    """Hooks into ``train`` (for tests and tools); every method is a no-op here. Subclass and
    override what you need."""

    def on_batch(self, step: int, batch: Dict[str, Any]) -> None:
        """Before the forward pass: ``x0``, ``level``, ``lam``, ``noise``, ``is_weight``, ``model``."""

    def on_terms(self, step: int, terms):
        """The per-sample ``LossTerms`` of the step; what it returns is trained on."""
        return terms

    def on_end(self, objects: Dict[str, Any]) -> None:
        """After the last step: ``model``, ``ema``, ``weighting``, ``observer`` (the VAW holding the observed
        statistics), ``monitor`` (the ``LogSNRMonitor`` over it), ``noise_sampler``, ``step``."""


def train(cfg: TrainConfig, callbacks: Optional[Callbacks] = None) -> Dict[str, Any]:
    """Run (or resume) training as configured. Returns a summary dict. Raises TrainError,
    ConfigError, CheckpointError or WriteError with a one-line message on user-facing failures.
    ``--out`` stays locked against other trainers until it returns."""
    held = run_folder_held(cfg.out)  # by another train() in this process: its lock, never released here
    try:
        return _train(cfg, callbacks)
    finally:
        if not held:
            release_run_folder(cfg.out)


def _train(cfg: TrainConfig, callbacks: Optional[Callbacks]) -> Dict[str, Any]:
    from .data import to_model_range
    from .formulations import make_formulation

    callbacks = callbacks or Callbacks()
    cfg = cfg.validate()
    d = DistInfo()
    out = cfg.out
    if cfg.batch_size % d.world:
        raise TrainError(f"--batch-size {cfg.batch_size} is not divisible by the world size {d.world}")
    local_bs = cfg.batch_size // d.world
    check_run_folder(cfg, d.main)  # before any training

    device = resolve_device(cfg, d)
    init_distributed(d, device)
    cuda = device.type == "cuda"
    if cuda:
        if cfg.amp != "fp32":  # fp32 keeps PyTorch's default TF32 switches, as the paper's code did
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    autocast = autocast_context(cfg, device)
    quiet = cfg.quiet or not d.main
    resume_point = read_resume_point(cfg, d) if cfg.resume else None  # before any data is read

    # -- the pieces ----------------------------------------------------------------------------
    images = load_data(cfg)
    shape = tuple(images.shape[1:])
    formulation = make_formulation(cfg.formulation, **cfg.formulation_kwargs())
    gens = make_generators(cfg.seed, d.rank, "cpu")
    if cuda:  # noise is drawn where it is used, from its own seeded stream (CPU runs keep the CPU one)
        gens["noise"] = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "noise", d.rank))
    raw_model = build_model(cfg, shape[0], shape[1], formulation).to(device)
    if cuda:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    torch.manual_seed(derive_seed(cfg.seed, "dropout", d.rank))  # global RNG: dropout only
    ema = EMA(raw_model, cfg.ema_decay)
    weighting = build_weighting(cfg, formulation, gens["weighting"]).to(device)
    observer = build_observer(cfg, weighting).to(device)
    noise_sampler = build_noise_sampler(cfg, formulation)
    importance_sampled = cfg.noise_sampling != "default"
    batches = build_batches(cfg, images.to(device), local_bs, gens["data"])
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
    weighting_params = [p for p in weighting.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, list(raw_model.parameters()) + weighting_params)
    state = TrainState(raw_model, ema, optimizer, weighting, observer, noise_sampler, gens, batches)

    # -- fresh, or from the latest good checkpoint ------------------------------------------------
    if resume_point is None and d.main and cfg.overwrite:
        clear_run(out)  # before MetricsLog opens tensorboard/: clearing it under an open writer broke the run
    log = MetricsLog(out, enabled=d.main)
    if resume_point is not None:
        state.resume(resume_point, d, device, cfg.seed)
        log.truncate_to(state.step, resume_point.config.log_every, keep_final=state.step >= cfg.steps)
        if resume_point.trajectory_changes:
            log.write({"step": state.step, "trajectory_change": resume_point.trajectory_changes})
        say(f"resumed from {resume_point.path} at step {state.step}", quiet)
    run_config = cfg.replace({"resume": False, "overwrite": False, "allow_trajectory_change": False}).to_dict()
    if d.main:
        write_run_config(out, run_config, state.step, cfg.steps)
    d.barrier()
    evaluation = Evaluation(cfg, formulation, shape, device, d, autocast)

    # -- the loop ------------------------------------------------------------------------------
    pbar = _progress(cfg, state.step, quiet)
    raw_model.train()
    weighting.train()
    observer.train()
    t_last = t_start = time.time()
    last_ckpt = None
    interval = IntervalSums(state, device)
    with StopSignal() as stop:
        while state.step < cfg.steps:
            step = state.step
            lr = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr

            # batch, noise levels and noise: each from its own stream
            x0 = to_model_range(next(batches))
            if cuda:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            level, lam, is_weight = noise_sampler.sample(x0.shape[0], gens["levels"], device)  # short last batch
            noise = torch.randn(x0.shape, generator=gens["noise"], device=gens["noise"].device).to(device)
            callbacks.on_batch(step, {"x0": x0, "level": level, "lam": lam, "noise": noise, "is_weight": is_weight,
                                      "model": raw_model})

            # forward: per-sample terms, unweighted statistics, the weighting's objective
            with autocast():
                terms = formulation.loss(model, x0, level, noise)
            terms = callbacks.on_terms(step, terms)
            if observer.updates:
                observer(terms.loss.detach().float(), lam)
            loss = weighting.objective(terms, lam, is_weight if importance_sampled else None)

            # backward (always: DDP's all-reduce is collective), then skip if non-finite
            loss.backward()
            average_gradients(weighting_params, d)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            sums = all_reduce_sum(torch.stack([
                terms.loss.detach().float().sum().double(), loss.detach().double(),
                (~torch.isfinite(loss.detach())).double(),
                torch.tensor(float(stop.signum is not None), dtype=torch.float64, device=loss.device)]), d)
            # the step's one host read: whether to skip it, whether to stop; the metrics stay on the device
            nonfinite, stop_votes = torch.stack([sums[2] + (~torch.isfinite(grad_norm)).double(), sums[3]]).tolist()
            finite = nonfinite == 0
            if finite:
                optimizer.step()
                ema.update(raw_model)
                state.consecutive = 0
            else:
                state.skipped += 1
                state.consecutive += 1
            optimizer.zero_grad(set_to_none=True)
            noise_sampler.update_from_vaw(observer.vaw)  # vaw-is adapts to the observed statistics
            state.step += 1
            step = state.step

            # bookkeeping
            interval.add(finite, torch.stack([sums[0] / (x0.shape[0] * d.world), sums[1] / d.world,
                                              grad_norm.double()]))
            if pbar is not None:
                pbar.update(1)
            if state.consecutive >= cfg.max_nonfinite:
                good = latest_checkpoint(out)
                where = f"; last good checkpoint: {good}" if good else "; no checkpoint was written yet"
                raise TrainError(f"{state.consecutive} consecutive non-finite losses (step {step}); stopping{where}")

            # log: every log_every steps, plus a "final" partial-interval record at the last step
            # (dropped again when a later --resume continues past it, so metrics stay bitwise)
            record: Dict[str, Any] = {}
            on_cadence = step % cfg.log_every == 0
            if on_cadence or step == cfg.steps:
                now = time.time()
                interval.flush()
                record = interval_record(step, state.log_accum, lr=lr, batch_size=cfg.batch_size,
                                         interval_s=now - t_last, elapsed_s=now - t_start, skipped_steps=state.skipped,
                                         nonfinite_samples=int(observer.vaw.nonfinite), epoch=batches.epoch)
                bin_weights = weighting.bin_weights()
                if bin_weights is not None:
                    record.update(vaw_weight_min=float(bin_weights.min()), vaw_weight_max=float(bin_weights.max()))
                if pbar is not None:
                    pbar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                if on_cadence:
                    t_last, state.log_accum = now, new_accumulator()
                    interval.reset()
                else:
                    record["final"] = True
                stats = observer.stats()  # one host copy of the bins for binstats.npz and TensorBoard
                log.add_bins(step, stats, bin_weights)
                log.tensorboard(lambda writer: observer.log_tensorboard(writer, step, stats=stats))
            if evaluation.due(step):
                record = record or {"step": step}
                evaluation(step, ema.module, record)
                t_last = time.time() if on_cadence else t_last  # keep eval time out of images_per_s
            if record:
                log.write(record)
                if pbar is None and len(record) > 1:
                    say(format_record(record, cfg.steps), quiet)

            interrupted = stop_votes > 0
            if step % cfg.ckpt_every == 0 or step == cfg.steps or interrupted:
                interval.flush()
                last_ckpt = state.save(out, run_config, shape, d, device, cfg.keep_ckpts)
            if interrupted:
                if pbar is not None:
                    pbar.close()
                log.close()
                say(f"stopped by {stop.name or 'a signal on another rank'} at step {step}; checkpoint "
                    f"{last_ckpt}; continue with --resume", not d.main)
                return {"status": "interrupted", "step": step, "checkpoint": last_ckpt}

    # -- the end: a final grid, the DONE marker, index.md ------------------------------------------
    if pbar is not None:
        pbar.close()
    last_ckpt = last_ckpt or latest_checkpoint(out)  # None: resumed a finished run
    if d.main:
        evaluation.finish(state.step, ema.module, images, raw_model, weighting)
        mark_done(out, state.step)
        write_run_index(out)
    log.close()
    callbacks.on_end({"model": raw_model, "ema": ema.module, "weighting": weighting, "observer": observer.vaw,
                      "monitor": observer,
                      "noise_sampler": noise_sampler, "step": state.step})
    d.barrier()
    say(f"done: {state.step} steps, {state.skipped} skipped; run folder {out}", quiet)
    return {"status": "done", "step": state.step, "checkpoint": last_ckpt, "skipped_steps": state.skipped}


def build_observer(cfg: TrainConfig, weighting: torch.nn.Module) -> LogSNRMonitor:
    """The always-on monitor of the UNweighted loss (binstats.npz, TensorBoard, vaw-is).

    A VAW weighting with a fixed power steps on the same loss, lam and config, so its statistics
    are the observer's bit for bit: the monitor reads them instead of computing them again (and,
    under DDP, all-reducing them again). Any other weighting gets a VAW of the run's settings in
    observe role, whose table is what VAW would weight with (vaw-is reads it; annealing
    changes the weighting's power, not this table).
    """
    vaw = getattr(weighting, "vaw", None)
    own = VarianceAwareWeighting(prior=None, **cfg.vaw_kwargs())
    if isinstance(vaw, VarianceAwareWeighting) and not getattr(weighting, "anneal_steps", 0) \
            and vaw.config == own.config and vaw.sync == own.sync:
        return LogSNRMonitor.of(vaw)
    return LogSNRMonitor.of(own, update=True)


class IntervalSums:
    """The log interval's sums of loss, weighted loss and grad norm, kept on the device so that a
    step reads nothing back for them; ``flush`` writes them into ``state.log_accum`` (the
    checkpointed accumulator) before a record or a checkpoint reads it. The float64 sums add in
    the order the host did, so CPU runs stay bitwise identical to host-side sums."""

    KEYS = ("loss", "wloss", "gnorm")

    def __init__(self, state: TrainState, device: torch.device) -> None:
        self.state, self.device = state, device
        self.reset()

    def reset(self) -> None:
        """Start from the accumulator as it is (zeros, or a resumed run's partial interval)."""
        acc = self.state.log_accum
        self.sums = torch.tensor([acc[k] for k in self.KEYS], dtype=torch.float64, device=self.device)

    def add(self, finite: bool, values: torch.Tensor) -> None:
        """One step: ``values`` (loss, weighted loss, grad norm) count only if the step was finite."""
        acc = self.state.log_accum
        acc["n"] += 1
        if finite:
            self.sums += values
            acc["finite"] += 1
        else:
            acc["nonfinite"] += 1

    def flush(self) -> None:
        self.state.log_accum.update(zip(self.KEYS, self.sums.tolist()))


def _progress(cfg: TrainConfig, step: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=step, unit="it", dynamic_ncols=True, smoothing=0.1)
