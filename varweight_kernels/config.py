"""Validated configuration of the variance-aware weighting (names as in SPEC.md)."""
from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass
from typing import NamedTuple, Tuple


class KernelParams(NamedTuple):
    """The scalars of a step, by the names every backend uses (the C++ ``Params``, the Triton
    kernels' parameter offsets). A tuple of floats, so it passes as a ``float[]`` to the ops."""

    lmin: float
    bin_scale: float
    decay: float
    power: float
    eps: float
    min_count: float
    wmin: float
    wmax: float
    warmup: float
    ramp: float


def as_kernel_params(params) -> KernelParams:
    """Names a plain sequence of the ten floats (the ops pass lists: the compiled ops parse them fastest)."""
    return params if isinstance(params, KernelParams) else KernelParams._make(params)


# Far beyond any useful resolution of log-SNR, and small enough that every backend's per-bin
# buffers stay a few MB: a typo such as num_bins=10**9 is refused instead of exhausting memory.
MAX_NUM_BINS = 65536


FLOAT32_MAX = 3.4028234663852886e38


def _float32_finite(x: float) -> bool:
    """Finite once stored in float32, as the kernels and the state store it."""
    return math.isfinite(x) and abs(x) <= FLOAT32_MAX


@dataclass(frozen=True)
class VAWConfig:
    """Hyper-parameters of VAW. Construction validates every field and names the bad one."""

    num_bins: int = 64
    logsnr_range: Tuple[float, float] = (-12.0, 12.0)
    decay: float = 0.99
    power: float = -1.0
    eps: float = 1e-8
    min_count: int = 16
    weight_range: Tuple[float, float] = (0.1, 10.0)
    warmup_steps: int = 0
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "logsnr_range", tuple(float(v) for v in self.logsnr_range))
        object.__setattr__(self, "weight_range", tuple(float(v) for v in self.weight_range))
        if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, int) or not 1 <= self.num_bins <= MAX_NUM_BINS:
            raise ValueError(f"num_bins must be an integer in [1, {MAX_NUM_BINS}], got {self.num_bins!r}")
        if len(self.logsnr_range) != 2:
            raise ValueError(f"logsnr_range must be a pair (lmin, lmax), got {self.logsnr_range!r}")
        lmin, lmax = self.logsnr_range
        if not (_float32_finite(lmin) and _float32_finite(lmax) and lmin < lmax):
            raise ValueError(f"logsnr_range must be finite in float32 with lmin < lmax, got {self.logsnr_range!r}")
        # the kernels bin with float32 lmin and K / (lmax - lmin): both must survive the rounding
        scale32 = struct.unpack("f", struct.pack("f", self.num_bins / (lmax - lmin)))[0] if lmax - lmin < math.inf else 0.0
        lo32, hi32 = (struct.unpack("f", struct.pack("f", v))[0] for v in (lmin, lmax))
        if not (lo32 < hi32 and 0.0 < scale32 < math.inf):
            raise ValueError(f"logsnr_range {self.logsnr_range!r} with num_bins={self.num_bins} cannot be binned in "
                             "float32 (the bounds round together, or the bin width over- or underflows)")
        if not (0.0 < self.decay < 1.0):
            raise ValueError(f"decay must lie in (0, 1), got {self.decay!r}")
        if not math.isfinite(self.power):
            raise ValueError(f"power must be finite, got {self.power!r}")
        if not (self.eps >= 0.0 and _float32_finite(self.eps)):
            raise ValueError(f"eps must be finite and >= 0, got {self.eps!r}")
        if len(self.weight_range) != 2:
            raise ValueError(f"weight_range must be a pair (wmin, wmax), got {self.weight_range!r}")
        wmin, wmax = self.weight_range
        if not (wmin > 0.0 and wmin <= wmax and _float32_finite(wmax) and struct.unpack("f", struct.pack("f", wmin))[0] > 0):
            raise ValueError(f"weight_range must satisfy 0 < wmin <= wmax, both finite and nonzero in float32, got "
                             f"{self.weight_range!r}")
        for name in ("min_count", "warmup_steps", "ramp_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    @property
    def bin_scale(self) -> float:
        """K / (lmax - lmin): binning multiplies by this (rounded to float32) in every backend."""
        lmin, lmax = self.logsnr_range
        return self.num_bins / (lmax - lmin)

    def kernel_params(self) -> KernelParams:
        """The scalars every backend's kernels take."""
        lmin, _ = self.logsnr_range
        wmin, wmax = self.weight_range
        return KernelParams(lmin=float(lmin), bin_scale=float(self.bin_scale), decay=float(self.decay),
                            power=float(self.power), eps=float(self.eps), min_count=float(self.min_count),
                            wmin=float(wmin), wmax=float(wmax), warmup=float(self.warmup_steps),
                            ramp=float(self.ramp_steps))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["logsnr_range"] = list(self.logsnr_range)
        d["weight_range"] = list(self.weight_range)
        return d
