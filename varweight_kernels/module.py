"""``VarianceAwareWeighting``: the drop-in ``nn.Module`` of SPEC.md."""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .backends import BACKEND_NAMES, available_backends, machine_reason, resolve_backend
from .config import VAWConfig
from .ops import STATE_NAMES, vaw
from .reference import bin_mean_var
from .rules import CauchyWeighting, check_loss_lam

STATE_FORMAT_VERSION = 1
STATISTIC_BUFFERS = ("M", "Q", "Z", "C", "weight")
NONNEGATIVE_BUFFERS = ("Q", "Z", "C", "weight", "step", "nonfinite")
RANGE_CHECKS = 8  # calls whose lam is compared with logsnr_range (one host read each on CUDA)
SAFETENSORS_KEY = "varweight_extra_state"  # save_state's metadata entry: the extra state as JSON
# The default prior: the paper's batch-centred Cauchy weights at this alpha. The pre-registered
# confirmatory study of issue 22 confirmed power -1 times this prior better than uniform
# (docs/results/digits-confirm); power -1 alone, the default before it, was confirmed worse.
DEFAULT_PRIOR_ALPHA = 0.05


class _DefaultPrior:
    """``prior``'s default, told apart from an explicit one: a module built with it resumes a
    saved state under the prior that state was trained with (none, for states older than the
    default)."""

    def __repr__(self) -> str:
        return f"CauchyWeighting(alpha={DEFAULT_PRIOR_ALPHA})"


DEFAULT_PRIOR: Any = _DefaultPrior()


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
                 ramp_steps: int = 0, sync: bool = True, backend: str = "auto", prior: Any = DEFAULT_PRIOR) -> None:
        """Build the module; every hyper-parameter is validated here and a bad one is named.

        num_bins, logsnr_range: ``K`` uniform bins of the standard log-SNR ``lam = log(alpha^2 /
        sigma^2)`` over ``(lmin, lmax)`` (values outside go to the edge bins; see
        ``varweight_kernels.logsnr`` to convert timesteps or sigmas). decay: per-sample EMA decay
        in a bin. power: weight ~ var^(-power/2) (-1: a bin's std). eps: added to the variance.
        min_count: samples a bin needs before its own estimate is used. weight_range: clamp of
        the normalised weight. warmup_steps, ramp_steps: weight 1 for that many updates, then a
        linear ramp to the full weight. sync: sum the statistics over DDP ranks. backend:
        "auto", "reference", "triton", "cpp" or "cuda".

        prior: by default ``CauchyWeighting(alpha=0.05)``, the setting the confirmatory study of
        issue 22 supports; ``prior=None`` is the paper's reading (VAW's weights alone). A module
        built with the default prior that loads a state adopts the prior that state was saved
        under (none for states written before this default), warning once. Any other
        fixed-rule weighting (``varweight_kernels.weightings``: ``CauchyWeighting``,
        ``MinSNRWeighting``, ``P2Weighting``, or any object with a ``weights(lam)`` method giving
        (B,) per-sample weights) whose weights multiply VAW's: the output is
        ``sum_i w_i p_i L_i / B``. The statistics still see the unweighted loss ``L_i``.
        """
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
        self._prior_is_default = prior is DEFAULT_PRIOR
        if self._prior_is_default:
            prior = CauchyWeighting(DEFAULT_PRIOR_ALPHA)
        if prior is not None and not callable(getattr(prior, "weights", None)):
            raise TypeError("prior must be a fixed-rule weighting with a weights(lam) method (e.g. "
                            f"varweight_kernels.weightings.MinSNRWeighting), got {type(prior).__name__}")
        self.sync = bool(sync)
        self.backend = backend
        self.prior = prior
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
        self._range_checks_left = RANGE_CHECKS
        # (weight_range, step): the range the table was made under, while it differs from the config's
        # (after reconfigure(weight_range=...) or loading a state saved under another range), until
        # the next update remakes the table; get_extra_state saves it so that the state loads.
        self._table_made: Optional[Tuple[Tuple[float, float], int]] = None

    # -- the step ---------------------------------------------------------------------------
    def forward(self, loss: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Weighted mean ``sum_i w_i L_i / B`` of the (B,) per-sample losses ``loss`` at log-SNR ``lam``.

        ``loss`` is the unweighted per-sample loss (any float dtype, may require grad); ``lam`` the
        (B,) standard log-SNR, ``log(alpha^2/sigma^2)``. ``w_i`` comes from the table as it was
        before this batch (times the prior's weight when there is one); in training mode the call
        then updates the statistics and the table. The gradient is ``w_i / B``.
        ``last_weights`` holds the (B,) weights used.

        On the first 8 calls (on any device; a host read each on CUDA, none after) the module
        warns once when more than half of the finite ``lam`` lie outside ``logsnr_range``: they
        would all land in the edge bins, as when timesteps 0..999 are passed instead of log-SNR.
        """
        self._check_inputs(loss, lam)
        # compiled code never reads the counter (no guard on it, no recompile as eager calls count down)
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()) and self._range_checks_left:
            self._check_range(lam)
        b = self._buffers  # direct dict access, spelled out: this runs every step and must stay cheap
        state = (b["M"], b["Q"], b["Z"], b["C"], b["weight"], b["step"], b["nonfinite"])  # STATE_NAMES
        out, w = vaw(loss, lam, state, self._params, self.training, self.sync, self.backend)
        if self.prior is not None:
            out, w = self._with_prior(loss, lam, w)
        if not torch.compiler.is_exporting():  # an exported program has no attribute to set
            self.__dict__["last_weights"] = w
        return out

    def _with_prior(self, loss: torch.Tensor, lam: torch.Tensor, w: torch.Tensor):
        """``sum_i w_i p_i L_i / B`` (accumulated in float32 or wider) and the weights ``w_i p_i``."""
        p = self.prior.weights(lam).detach().to(w.dtype)
        acc = torch.promote_types(loss.dtype, torch.float32)
        out = (w.to(acc) * p.to(acc) * loss.to(acc)).mean().to(loss.dtype)
        return out, w * p

    def _check_range(self, lam: torch.Tensor) -> None:
        """Warn once (see ``forward``) when most finite lam lie outside ``logsnr_range``."""
        if lam.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # no host read inside a CUDA graph
        self._range_checks_left -= 1
        lmin, lmax = self.config.logsnr_range
        finite = torch.isfinite(lam)
        outside = finite & ((lam < lmin) | (lam > lmax))
        n_finite, n_outside = torch.stack([finite.sum(), outside.sum()]).tolist()
        if 2 * n_outside <= n_finite:
            return
        self._range_checks_left = 0
        seen = lam[finite].double()
        warnings.warn(f"VarianceAwareWeighting: {n_outside} of {n_finite} finite lam lie outside logsnr_range "
                      f"({lmin:g}, {lmax:g}) (this batch spans [{float(seen.min()):.4g}, {float(seen.max()):.4g}]) "
                      "and land in the edge bins; lam must be the log-SNR log(alpha^2/sigma^2) "
                      "(varweight_kernels.logsnr converts timesteps and sigmas), or widen logsnr_range",
                      UserWarning, stacklevel=5)  # the caller of vaw(loss, lam)

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
        check_loss_lam(loss, lam)
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
        table_range = self._table_weight_range()
        self.config = dataclasses.replace(self.config, **changes)
        self._params = list(self.config.kernel_params())
        self._note_table_range(table_range)

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
        extra = {"format_version": STATE_FORMAT_VERSION, "config": self.config.to_dict()}
        if self.prior is not None:  # absent: no prior (all states saved before prior= existed)
            extra["prior"] = prior_spec(self.prior)
        table_range = self._table_weight_range()
        if table_range != self.config.weight_range:  # the table predates a weight_range change
            extra["table_weight_range"] = list(table_range)
        return extra

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        pass  # validated (before any buffer changes) in _load_from_state_dict

    def _table_weight_range(self) -> Tuple[float, float]:
        """The weight_range the current table was made under (a host read only after a change)."""
        if self._table_made is not None and self._table_made[1] == int(self.step):
            return self._table_made[0]
        return self.config.weight_range

    def _note_table_range(self, table_range: Tuple[float, float]) -> None:
        same = table_range == self.config.weight_range
        self._table_made = None if same else (tuple(table_range), int(self.step))

    def save_state(self, path: str) -> None:
        """Write the state to ``path`` as a ``.safetensors`` file (needs the ``safetensors`` package).

        The buffers are stored as tensors and the extra state (format version and config) as JSON in
        the file's metadata, so no pickle is involved; ``load_state`` reads it back. The bytes go to
        a fresh temp file in the same folder (never through a planted link), then are renamed over
        ``path``. (``state_dict()`` holds the config as a dict, which ``torch.save`` stores but
        ``safetensors.torch.save_file`` refuses: use this for safetensors.)
        """
        save = _safetensors().torch.save
        state = self.state_dict()
        extra = state.pop("_extra_state")
        data = save({k: v.detach().cpu().contiguous() for k, v in state.items()},
                    metadata={SAFETENSORS_KEY: json.dumps(extra)})
        folder, name = os.path.split(os.path.abspath(path))
        tmp = os.path.join(folder, f".tmp-{name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            with open(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def load_state(self, path: str) -> None:
        """Load a state written by ``save_state``, with every check ``load_state_dict`` makes."""
        safetensors = _safetensors()
        try:
            with safetensors.safe_open(path, framework="pt") as fh:
                extra = (fh.metadata() or {}).get(SAFETENSORS_KEY)
                state: Dict[str, Any] = {k: fh.get_tensor(k) for k in fh.keys()}
            if extra is None:
                raise ValueError(f"no {SAFETENSORS_KEY!r} metadata: not written by save_state")
            state["_extra_state"] = json.loads(extra)
        except (OSError, ValueError, safetensors.SafetensorError) as exc:  # ValueError: bad JSON too
            raise RuntimeError(f"cannot read a VAW state from {path}: {str(exc).splitlines()[0]}") from None
        self.load_state_dict(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        table_range = self._validate_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "weight" in state_dict:
            self._note_table_range(table_range)
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict):
            self._resume_prior(extra.get("prior"))

    def _resume_prior(self, saved: Any) -> None:
        """A default-built module takes the saved state's prior; an explicit prior stays, warned about."""
        if saved == prior_spec(self.prior):
            return
        if not self._prior_is_default:
            warnings.warn(f"loading a VAW state saved with prior {saved!r}; this module keeps its explicit prior "
                          f"{prior_spec(self.prior)!r}", RuntimeWarning, stacklevel=4)
            return
        rebuilt = prior_from_spec(saved)
        if rebuilt is False:
            raise RuntimeError(f"the VAW state was saved with prior {saved!r}, which a module built with the default "
                               "prior cannot rebuild; pass that prior= explicitly")
        self.prior = rebuilt
        warnings.warn(f"VarianceAwareWeighting built with the default prior resumes the saved state's prior "
                      f"{saved!r} (states saved before version 0.2 have none: the old default); pass prior= "
                      "to choose", RuntimeWarning, stacklevel=4)

    def _checked_cast(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` as the buffer's dtype, as loading will store it; refuses what the cast would garble."""
        dtype = getattr(self, name).dtype
        if value.is_complex():
            raise RuntimeError(f"VAW state buffer {name!r} is complex ({value.dtype}); refusing to load it")
        if not dtype.is_floating_point and value.dtype.is_floating_point:
            v = value.double()
            if not bool((torch.isfinite(v) & (v == v.round()) & (v.abs() < 2.0 ** 63)).all()):
                raise RuntimeError(f"VAW state buffer {name!r} holds a value that is not an integer in the "
                                   f"{dtype} range (NaN, inf, a fraction or too large); refusing to load it")
        return value.to(dtype)

    def _validate_state(self, state_dict: Dict[str, Any], prefix: str) -> Tuple[float, float]:
        """Refuse a state this module could never have produced, before any buffer changes.

        Values are judged as they will be stored: cast to the buffers' dtypes (float32 statistics,
        int64 counters) first. Returns the weight_range the saved table was made under."""
        extra = state_dict.get(prefix + "_extra_state")
        saved = self._saved_config(extra)
        table_range = self._saved_table_range(extra, saved)
        K = self.config.num_bins
        cast: Dict[str, torch.Tensor] = {}
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
            value = cast[name] = self._checked_cast(name, value)
            if name in STATISTIC_BUFFERS and not bool(torch.isfinite(value).all()):
                raise RuntimeError(f"VAW state buffer {name!r} holds NaN or inf (as {value.dtype}); "
                                   "refusing to load it")
            if name in NONNEGATIVE_BUFFERS and bool((value < 0).any()):
                raise RuntimeError(f"VAW state buffer {name!r} holds negative values, which no step produces")
        z = cast.get("Z")
        if z is not None and bool((z > 1).any()):
            raise RuntimeError("VAW state buffer 'Z' exceeds 1 (it is 1 - decay^n); refusing to load it")
        weight = cast.get("weight")
        if weight is not None:
            wmin, wmax = table_range
            # A table entry is a clamped weight, 1 (warm-up, no data) or between them (ramp), in float32.
            low, high = (float(torch.tensor(v, dtype=torch.float32)) for v in (min(wmin, 1.0), max(wmax, 1.0)))
            if bool(((weight < low) | (weight > high)).any()):
                raise RuntimeError(f"VAW state buffer 'weight' has entries outside [{low}, {high}] "
                                   f"(weight_range {table_range}); refusing to load it")
        return table_range

    @staticmethod
    def _saved_table_range(extra: Any, saved: VAWConfig) -> Tuple[float, float]:
        """The weight_range the saved table was made under: the saved config's unless it says otherwise."""
        rng = extra.get("table_weight_range") if isinstance(extra, dict) else None
        if rng is None:
            return saved.weight_range
        try:
            return VAWConfig(num_bins=saved.num_bins, logsnr_range=saved.logsnr_range, weight_range=rng).weight_range
        except (TypeError, ValueError) as exc:
            raise RuntimeError(f"VAW state carries an invalid table_weight_range ({exc})") from None

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


def _safetensors():
    """The optional ``safetensors`` package (with its torch helpers), or a one-line error."""
    try:
        import safetensors
        import safetensors.torch  # noqa: F401  (loads the submodule)
    except ImportError:
        raise ImportError("saving or loading a VAW state as .safetensors needs the safetensors package "
                          "(pip install safetensors)") from None
    return safetensors


def prior_spec(prior: Any) -> Optional[Dict[str, Any]]:
    """What a state records of VAW's prior: None, a Cauchy rule's parameters, or the rule's class name."""
    if prior is None:
        return None
    if isinstance(prior, CauchyWeighting):
        return {"rule": "cauchy", "alpha": float(prior.alpha), "normalize": bool(prior.normalize)}
    return {"rule": type(prior).__name__}


def prior_from_spec(spec: Any) -> Any:
    """The prior a recorded spec names (None for none), or False when it cannot be rebuilt."""
    if spec is None:
        return None
    if isinstance(spec, dict) and spec.get("rule") == "cauchy":
        try:
            return CauchyWeighting(float(spec["alpha"]), bool(spec.get("normalize", False)))
        except (KeyError, TypeError, ValueError):
            return False
    return False
