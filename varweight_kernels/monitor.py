"""``LogSNRMonitor``: per-log-SNR-bin statistics of any per-sample loss, for a training loop of your own.

Diffusion losses differ by orders of magnitude across noise levels, so a single loss curve hides
where training makes progress. The monitor keeps, per log-SNR bin, the loss statistics that
``VarianceAwareWeighting`` keeps, computed by the same kernels (any backend, one ``all_reduce``
per call under DDP), whatever weighting the loop trains with:

    monitor = LogSNRMonitor(num_bins=32, logsnr_range=(-11.0, 10.0)).to(device)
    ...
    monitor(per_sample.detach(), lam)          # every step, in training mode
    if step % 100 == 0:
        monitor.log_tensorboard(writer, step)  # per-bin mean, variance, count; loss-vs-lam heatmap

When the loop weights with VAW, ``LogSNRMonitor.of(vaw)`` reads VAW's own statistics instead of
computing (and all-reducing) them a second time.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .module import VarianceAwareWeighting

__all__ = ["LogSNRMonitor"]

# Viridis at five stops: dark blue (low loss) to yellow (high loss); empty bins are grey.
_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
_EMPTY = np.array([128, 128, 128], dtype=np.uint8)


class LogSNRMonitor(nn.Module):
    """Per-bin statistics of a per-sample loss over ``num_bins`` uniform log-SNR bins.

    In training mode ``monitor(loss, lam)`` folds a batch in (``loss`` and ``lam`` as for VAW:
    1-D, one value a sample; pass the loss you want to watch, weighted or not). Per bin, the
    mean and variance are exponential moving averages over the bin's samples (VAW's rule: a bin
    that receives ``n`` samples moves by ``1 - decay**n``; bias-corrected, so a bin's first batch
    is its estimate), and the count is the running total of samples the bin has received.
    Samples with a non-finite loss or NaN lam are left out and counted in ``nonfinite``; lam
    outside ``logsnr_range`` falls in the edge bins. In eval mode a call changes nothing; like
    VAW, a call under ``torch.no_grad()`` in training mode still updates, so call
    ``monitor.eval()`` around validation (or keep a second monitor for the validation loss).

    Under ``torch.distributed`` (world size > 1, ``sync=True``) every call sums the batch's
    per-bin moments over the ranks with one ``all_reduce``, so all ranks hold the same
    statistics; it is a collective, so every rank must call the monitor equally often.

    The state (``state_dict()``: the statistics under ``vaw.``) saves and loads like any
    module's; the heatmap's history of snapshots is not saved and restarts with the process.
    """

    def __init__(self, num_bins: int = 64, logsnr_range: Tuple[float, float] = (-12.0, 12.0), decay: float = 0.99,
                 sync: bool = True, backend: str = "auto", history: int = 256) -> None:
        super().__init__()
        # VAW's step with power 0 and weights clamped to [1, 1]: the statistics, and weights of exactly 1.
        stats_only = VarianceAwareWeighting(num_bins, logsnr_range, decay=decay, power=0.0, min_count=0,
                                            weight_range=(1.0, 1.0), sync=sync, backend=backend,
                                            prior=None)
        self._bind(stats_only, updates=True, weights=False, history=history)

    @classmethod
    def of(cls, vaw: VarianceAwareWeighting, update: bool = False, history: int = 256) -> "LogSNRMonitor":
        """A monitor of ``vaw``'s statistics, which ``stats()`` then reports with VAW's weight table.

        ``update=False`` (a view): ``vaw``'s own calls update the statistics, so the monitor adds
        no work and no second ``all_reduce``; calling the monitor is an error, and ``vaw`` stays
        its owner's to move, switch to eval and save. ``update=True``: the monitor owns ``vaw``
        and each call steps it on the loss given (its weighted output unused): the statistics
        plus the table VAW would weight with, in a run that weights otherwise.
        """
        if not isinstance(vaw, VarianceAwareWeighting):
            raise TypeError(f"LogSNRMonitor.of takes a VarianceAwareWeighting, got {type(vaw).__name__}")
        monitor = cls.__new__(cls)
        nn.Module.__init__(monitor)
        monitor._bind(vaw, updates=bool(update), weights=True, history=history)
        return monitor

    def _bind(self, vaw: VarianceAwareWeighting, updates: bool, weights: bool, history: int) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 2:
            raise ValueError(f"history must be an integer >= 2, got {history!r}")
        if updates:
            self.vaw = vaw  # a submodule: moved, switched to eval and saved with the monitor
        else:
            object.__setattr__(self, "vaw", vaw)  # not registered: its owner moves, switches and saves it
        self.updates = updates
        self._weights = weights
        self.history = history
        self._kept: List[Tuple[int, np.ndarray]] = []  # (step, means) of every ``_stride``-th snapshot
        self._newest: Optional[Tuple[int, np.ndarray]] = None  # the last snapshot when it is not kept
        self._stride = 1
        self._snapshots = 0

    @property
    def config(self):
        """The ``VAWConfig`` of the underlying step (``num_bins``, ``logsnr_range``, ``decay``, ...)."""
        return self.vaw.config

    def forward(self, loss: torch.Tensor, lam: torch.Tensor) -> None:
        """Fold a batch of per-sample losses into the per-bin statistics (training mode only)."""
        if not self.updates:
            raise RuntimeError("this monitor reads the statistics of the VarianceAwareWeighting it was made "
                               "from (LogSNRMonitor.of(vaw)); that module's own calls update them, so do not "
                               "call the monitor")
        self.vaw(loss.detach() if isinstance(loss, torch.Tensor) else loss,
                 lam.detach() if isinstance(lam, torch.Tensor) else lam)

    @torch.no_grad()
    def stats(self) -> Dict[str, torch.Tensor]:
        """CPU tensors: ``bin_edges`` (K + 1), per-bin ``mean``, ``var`` (EMA, float64) and ``count``
        (running total, float64), ``step`` (updates so far) and ``nonfinite`` (samples left out);
        for a monitor made by ``of``, also ``weight``, VAW's weight table."""
        st = self.vaw.stats()
        if not self._weights:
            del st["weight"]
        return st

    # -- the heatmap ------------------------------------------------------------------------
    def snapshot(self, step: int, stats: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Add the current per-bin means to the heatmap's history (``log_tensorboard`` calls it).
        Past ``history`` rows, every second one is dropped (and from then on every second snapshot
        is kept), so the rows stay evenly spaced over the whole run; the newest is always shown.
        ``stats``: this step's ``stats()`` when the caller already has them (no second host copy)."""
        st = self.stats() if stats is None else stats
        row = st["mean"].numpy().copy()
        row[st["count"].numpy() == 0] = np.nan
        entry = (int(step), row)
        if self._snapshots % self._stride == 0:
            self._kept.append(entry)
            self._newest = None
            if len(self._kept) > self.history:
                self._stride *= 2
                self._kept = self._kept[::2]
        else:
            self._newest = entry
        self._snapshots += 1

    def history_steps(self) -> List[int]:
        """The steps of the heatmap's rows, top to bottom."""
        return [step for step, _ in self._history()]

    def _history(self) -> List[Tuple[int, np.ndarray]]:
        return self._kept + ([self._newest] if self._newest is not None else [])

    def heatmap(self, cell: Tuple[int, int] = (0, 0)) -> np.ndarray:
        """The history of per-bin means as an RGB image (H, W, 3) uint8: a row per snapshot (time
        runs down), a column per bin (lam rises to the right), colour the log10 of the mean
        (the mean itself if any is <= 0) on one scale for the whole image, grey where a bin was
        empty. ``cell`` is the (height, width) in pixels of one entry; 0 picks a readable size."""
        history = self._history()
        if not history:
            raise RuntimeError("the heatmap has no history yet: call snapshot(step) or log_tensorboard first")
        values = np.stack([row for _, row in history])
        seen = np.isfinite(values)
        if seen.any() and (values[seen] > 0).all():
            values = np.where(seen, np.log10(np.where(seen, values, 1.0)), np.nan)
        lo, hi = (values[seen].min(), values[seen].max()) if seen.any() else (0.0, 1.0)
        u = np.where(seen, (values - lo) / (hi - lo if hi > lo else 1.0), 0.0) * (len(_STOPS) - 1)
        k = np.clip(np.floor(u).astype(np.int64), 0, len(_STOPS) - 2)
        rgb = _STOPS[k] + (u - k)[..., None] * (_STOPS[k + 1] - _STOPS[k])
        image = np.where(seen[..., None], np.rint(rgb), _EMPTY).astype(np.uint8)
        rows, cols = values.shape
        height = cell[0] or max(1, 256 // rows)
        width = cell[1] or max(1, 512 // cols)
        return np.repeat(np.repeat(image, height, axis=0), width, axis=1)

    # -- TensorBoard ------------------------------------------------------------------------
    def log_tensorboard(self, writer, step: int, tag: str = "logsnr",
                        stats: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Log the statistics to a ``torch.utils.tensorboard.SummaryWriter`` (on one rank).

        ``{tag}/mean``, ``{tag}/var``, ``{tag}/count`` (and ``{tag}/weight`` for VAW's table) go to
        the Histograms tab as histograms over lam whose bar heights are the per-bin values (one
        curve per logged step); ``{tag}/nonfinite`` is a scalar; ``{tag}/loss_heatmap`` is the
        image of ``heatmap()`` after a ``snapshot(step)``. ``stats``: this step's ``stats()`` when
        the caller already has them.
        """
        st = self.stats() if stats is None else stats
        edges = st["bin_edges"].numpy()
        centres = 0.5 * (edges[:-1] + edges[1:])
        for name in ("mean", "var", "count", "weight"):
            if name not in st:
                continue
            heights = st[name].double().numpy()
            writer.add_histogram_raw(f"{tag}/{name}", min=float(edges[0]), max=float(edges[-1]),
                                     num=float(heights.sum()), sum=float((heights * centres).sum()),
                                     sum_squares=float((heights * centres ** 2).sum()),
                                     bucket_limits=edges[1:].tolist(), bucket_counts=heights.tolist(),
                                     global_step=step)
        writer.add_scalar(f"{tag}/nonfinite", int(st["nonfinite"]), step)
        self.snapshot(step, st)
        writer.add_image(f"{tag}/loss_heatmap", self.heatmap(), step, dataformats="HWC")

    def extra_repr(self) -> str:
        c = self.config
        mode = "reads vaw" if not self.updates else ("steps vaw" if self._weights else "statistics")
        return f"num_bins={c.num_bins}, logsnr_range={c.logsnr_range}, decay={c.decay}, {mode}"
