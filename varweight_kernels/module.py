"""``VarianceAwareWeighting``: the drop-in ``nn.Module`` of SPEC.md."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .backends import BACKEND_NAMES, available_backends, machine_reason, resolve_backend
from .config import VAWConfig
from .ops import STATE_NAMES, vaw
from .reference import bin_mean_var

STATE_FORMAT_VERSION = 1
STATISTIC_BUFFERS = ("M", "Q", "Z", "C", "weight")
NONNEGATIVE_BUFFERS = ("Q", "Z", "C", "weight", "step", "nonfinite")


class VarianceAwareWeighting(nn.Module):
    """Weights each sample's loss by a power of its log-SNR bin's running loss variance.

    ``out = vaw(loss, lam)`` returns the weighted mean ``sum_i w_i * loss_i / B`` and, in
    training mode, updates the per-bin statistics and the weight table used for the next
    call. All state lives in registered buffers, so ``state_dict``, ``.to()`` and DDP
    broadcasting work as for any module.
    """

    def __init__(self, num_bins: int = 64, logsnr_range: Tuple[float, float] = (-12.0, 12.0),
                 decay: float = 0.99, power: float = -1.0, eps: float = 1e-8, min_count: int = 16,
                 weight_range: Tuple[float, float] = (0.1, 10.0), warmup_steps: int = 0,
                 ramp_steps: int = 0, sync: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.config = VAWConfig(num_bins=num_bins, logsnr_range=logsnr_range, decay=decay, power=power, eps=eps,
                                min_count=min_count, weight_range=weight_range, warmup_steps=warmup_steps,
                                ramp_steps=ramp_steps)
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
        if backend != "auto":
            reason = machine_reason(backend)
            if reason is not None:
                raise RuntimeError(f"VAW backend {backend!r} cannot run on this machine: {reason}")
        self.sync = bool(sync)
        self.backend = backend
        self._params = list(self.config.kernel_params())  # the ops' float[]: a list parses fastest
        K = self.config.num_bins
        self.register_buffer("M", torch.zeros(K, dtype=torch.float32))
        self.register_buffer("Q", torch.zeros(K, dtype=torch.float32))
        self.register_buffer("Z", torch.zeros(K, dtype=torch.float32))
        self.register_buffer("C", torch.zeros(K, dtype=torch.float64))
        self.register_buffer("weight", torch.ones(K, dtype=torch.float32))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.int64))
        self.last_weights: Optional[torch.Tensor] = None

    # -- the step ---------------------------------------------------------------------------
    def forward(self, loss: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        self._check_inputs(loss, lam)
        b = self._buffers  # direct dict access, spelled out: this runs every step and must stay cheap
        state = (b["M"], b["Q"], b["Z"], b["C"], b["weight"], b["step"], b["nonfinite"])  # STATE_NAMES
        out, w = vaw(loss, lam, state, self._params, self.training, self.sync, self.backend)
        if not torch.compiler.is_exporting():  # an exported program has no attribute to set
            self.__dict__["last_weights"] = w
        return out

    def _check_inputs(self, loss: torch.Tensor, lam: torch.Tensor) -> None:
        # One expression for the common case (this runs every step); the messages only on failure.
        state = self._buffers["M"]
        try:
            ok = (loss.dim() == 1 and lam.shape == loss.shape and loss.numel() > 0
                  and loss.dtype.is_floating_point and lam.dtype.is_floating_point
                  and lam.get_device() == loss.get_device() == state.get_device()  # CUDA index, else -1
                  and lam.is_cpu == loss.is_cpu == state.is_cpu)
        except AttributeError:
            ok = False
        if not ok:
            self._raise_bad_inputs(loss, lam)

    def _raise_bad_inputs(self, loss, lam) -> None:
        if not isinstance(loss, torch.Tensor) or not isinstance(lam, torch.Tensor):
            raise TypeError(f"loss and lam must be tensors, got {type(loss).__name__} and {type(lam).__name__}")
        shape = loss.shape
        if len(shape) != 1 or lam.shape != shape or shape[0] == 0:
            raise ValueError("loss and lam must be 1-D of the same length B >= 1, got shapes "
                             f"loss {tuple(loss.shape)} and lam {tuple(lam.shape)}")
        if not (loss.dtype.is_floating_point and lam.dtype.is_floating_point):
            bad, t = ("loss", loss) if not loss.dtype.is_floating_point else ("lam", lam)
            raise TypeError(f"{bad} must have a floating dtype, got {t.dtype}")
        raise RuntimeError(f"loss, lam and the VAW state must be on one device, got loss on {loss.device}, "
                           f"lam on {lam.device} and the state on {self.M.device}")

    def _apply(self, fn, recurse=True):
        # ``model.half()`` / ``.double()`` must not change the state's dtypes (SPEC: float32 M, Q, Z,
        # weight; float64 C): keep each buffer's dtype and let the call only move it.
        before = {name: getattr(self, name) for name in STATE_NAMES}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def reconfigure(self, **changes: Any) -> None:
        """Change hyper-parameters mid-training (e.g. anneal ``power``), keeping the statistics.

        Any field but ``num_bins`` and ``logsnr_range`` (they define the bins); validated like
        the constructor's. The weight table in use was made under the old values: the new ones
        apply from the next update of the table.
        """
        fixed = {"num_bins", "logsnr_range"} & set(changes)
        if fixed:
            raise ValueError(f"{', '.join(sorted(fixed))} cannot change: they define the bins of the state")
        self.config = dataclasses.replace(self.config, **changes)
        self._params = list(self.config.kernel_params())

    # -- introspection ----------------------------------------------------------------------
    @staticmethod
    def available_backends() -> List[str]:
        return available_backends()

    def resolved_backend(self, device: Optional[torch.device] = None) -> str:
        """Name of the backend a call on ``device`` (default: the state's device) would run."""
        return resolve_backend(self.backend, device or self.M.device).name

    @torch.no_grad()
    def stats(self) -> Dict[str, torch.Tensor]:
        """Bin edges and per-bin mean, variance, count and weight, as CPU tensors."""
        lmin, lmax = self.config.logsnr_range
        mean, var = bin_mean_var(self.M.cpu(), self.Q.cpu(), self.Z.cpu())
        return {
            "bin_edges": torch.linspace(lmin, lmax, self.config.num_bins + 1, dtype=torch.float64),
            "mean": mean, "var": var, "count": self.C.detach().cpu().clone(),
            "weight": self.weight.detach().cpu().clone(), "step": self.step.detach().cpu().clone(),
            "nonfinite": self.nonfinite.detach().cpu().clone(),
        }

    def extra_repr(self) -> str:
        c = self.config
        return (f"num_bins={c.num_bins}, logsnr_range={c.logsnr_range}, decay={c.decay}, power={c.power}, "
                f"min_count={c.min_count}, weight_range={c.weight_range}, backend={self.backend!r}")

    # -- checkpointing ----------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        return {"format_version": STATE_FORMAT_VERSION, "config": self.config.to_dict()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        pass  # validated (before any buffer changes) in _load_from_state_dict

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        self._validate_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _validate_state(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """Refuse a state this module could never have produced, before any buffer changes."""
        saved = self._saved_config(state_dict.get(prefix + "_extra_state"))
        K = self.config.num_bins
        for name in STATE_NAMES:
            value = state_dict.get(prefix + name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise RuntimeError(f"VAW state buffer {name!r} is a {type(value).__name__}, not a tensor")
            expected = getattr(self, name).shape
            if tuple(value.shape) != tuple(expected):
                if name in STATISTIC_BUFFERS and value.dim() == 1:
                    raise RuntimeError(f"VAW state has num_bins={value.shape[0]} (buffer {name!r}), "
                                       f"this module has num_bins={K}")
                raise RuntimeError(f"VAW state buffer {name!r} has shape {tuple(value.shape)}, "
                                   f"expected {tuple(expected)}")
            if name in STATISTIC_BUFFERS and not bool(torch.isfinite(value).all()):
                raise RuntimeError(f"VAW state buffer {name!r} holds NaN or inf; refusing to load it")
            if name in NONNEGATIVE_BUFFERS and bool((value < 0).any()):
                raise RuntimeError(f"VAW state buffer {name!r} holds negative values, which no step produces")
        z = state_dict.get(prefix + "Z")
        if z is not None and bool((z > 1).any()):
            raise RuntimeError("VAW state buffer 'Z' exceeds 1 (it is 1 - decay^n); refusing to load it")
        weight = state_dict.get(prefix + "weight")
        if weight is not None:
            wmin, wmax = saved.weight_range
            # A table entry is a clamped weight, 1 (warm-up, no data) or between them (ramp), in float32.
            low, high = (float(torch.tensor(v, dtype=torch.float32)) for v in (min(wmin, 1.0), max(wmax, 1.0)))
            if bool(((weight < low) | (weight > high)).any()):
                raise RuntimeError(f"VAW state buffer 'weight' has entries outside [{low}, {high}] "
                                   f"(weight_range {saved.weight_range}); refusing to load it")

    def _saved_config(self, extra: Any) -> VAWConfig:
        """The config the state was saved under (this module's when the state carries none).

        num_bins and logsnr_range must match (the bins would mean something else); other
        differences are allowed, since changing e.g. the power mid-training can be intended, and
        warned about once per load, naming them.
        """
        if extra is None:
            return self.config
        if not isinstance(extra, dict) or extra.get("format_version") != STATE_FORMAT_VERSION:
            version = extra.get("format_version") if isinstance(extra, dict) else None
            raise RuntimeError(f"VAW state has format version {version!r}; this build reads "
                               f"version {STATE_FORMAT_VERSION}")
        fields = extra.get("config")
        try:
            saved = VAWConfig(**fields)
        except (TypeError, ValueError) as exc:
            raise RuntimeError(f"VAW state carries an invalid config ({exc})") from None
        if saved.num_bins != self.config.num_bins:
            raise RuntimeError(f"VAW state has num_bins={saved.num_bins}, this module has "
                               f"num_bins={self.config.num_bins}")
        if saved.logsnr_range != self.config.logsnr_range:
            raise RuntimeError(f"VAW state has logsnr_range={saved.logsnr_range}, this module has "
                               f"logsnr_range={self.config.logsnr_range}")
        changed = [f"{k}: saved {v!r}, now {getattr(self.config, k)!r}" for k, v in vars(saved).items()
                   if v != getattr(self.config, k)]
        if changed:
            warnings.warn("loading a VAW state saved under another config (" + "; ".join(changed) + "); the "
                          "statistics are kept and the next update applies this module's settings",
                          RuntimeWarning, stacklevel=4)
        return saved
