"""``TrainConfig``: every knob of a training run, the type of each, and its validation.

Each dataclass field is one command-line flag (``batch_size`` -> ``--batch-size``; ``flags.py``
builds the parser). ``validate`` checks every field (type, choice, range) and the ones that must
agree, with a one-line ``ConfigError`` naming the flag, before a run touches its folder; what
depends on the machine (the device, the VAW backend) is checked by ``cli.check_machine``.

The defaults take the paper's hyper-parameters (arXiv 2603.10391, see docs/REFERENCES.md): EDM with
sigma_data 0.5 and ln(sigma) ~ N(-1.2, 1.2); U-Net 128 channels, multipliers (1, 2, 4),
attention at 16x16 and 8x8, Fourier noise embedding; batch 128, AdamW lr 2e-4, weight decay 0,
grad clip 1.0, EMA 0.9995, 60k steps; Heun sampler, 50 Karras steps, rho 7. The network, the
precision and the epoch's last batch default to our faster variant (``--arch ddpm``, bf16 on
CUDA, the short batch dropped), so the defaults are not the paper's run; the ``seed-*`` presets
switch all three to the paper's code. VAW's default prior is the one issue 22's confirmatory
study supports (``--vaw-prior cauchy``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Tuple

from ..backends.registry import BACKEND_NAMES
from .presets import PRESETS
from .registry import (AMP_MODES, ARCHITECTURES, DATASETS, EMBEDDINGS, EXPORT_WEIGHTS, FORMULATIONS, IS_STATISTICS,
                       NOISE_SAMPLINGS, SAMPLERS, SNR_CONVENTIONS, VAW_PRIORS, WEIGHTINGS)

__all__ = ["TrainConfig", "ConfigError", "TrainError", "OLD_CONFIG_VALUES", "VAW_BACKENDS", "CHOICES", "BOUNDS",
           "check_choice", "flag_name", "format_value"]

VAW_BACKENDS = ("auto",) + BACKEND_NAMES


def _one_of(names) -> str:
    return " | ".join(names)


class ConfigError(ValueError):
    """A bad setting; the message is one line, fit for the CLI."""


class TrainError(RuntimeError):
    """A user-facing failure at run time; the CLI prints it as one line and exits non-zero."""


@dataclass
class TrainConfig:
    # ---- run management --------------------------------------------------------------------
    preset: str = field(default="", metadata={"help": "apply a named preset first (flags override it): "
                                                      + ", ".join(PRESETS)})
    out: str = field(default="runs/train", metadata={"help": "run folder (config, metrics, checkpoints, samples)"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest good checkpoint in --out"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing run's files in --out and start anew"})
    allow_trajectory_change: bool = field(default=False, metadata={
        "help": "let --resume change --amp, --compile or --device (the run then departs from its unbroken "
                "trajectory; recorded in metrics.jsonl)"})
    seed: int = field(default=0, metadata={"help": "base seed; every RNG stream derives from (seed, stream, rank)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar or log lines (errors still print)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the U-Net"})
    amp: str = field(default="auto", metadata={"help": "auto (bf16 autocast and TF32 on CUDA, fp32 on CPU) | bf16 | "
                                                      "fp32 (no autocast, PyTorch's default TF32 switches)"})
    # ---- data ------------------------------------------------------------------------------
    dataset: str = field(default="cifar10", metadata={"help": _one_of(DATASETS)})
    data_root: str = field(default="data", metadata={"help": "dataset folder (cache)"})
    download: bool = field(default=False, metadata={"help": "download the dataset into --data-root if missing"})
    flip: bool = field(default=False, metadata={"help": "random horizontal flips (the recipe uses none)"})
    drop_last: bool = field(default=True, metadata={"help": "drop each epoch's last partial batch (the paper's code "
                                                            "keeps it: --no-drop-last)"})
    # ---- formulation and noise levels ------------------------------------------------------
    formulation: str = field(default="edm", metadata={"help": _one_of(FORMULATIONS)})
    sigma_data: float = field(default=0.5, metadata={"help": "EDM sigma_data"})
    p_mean: float = field(default=-1.2, metadata={"help": "EDM: mean of ln(sigma)"})
    p_std: float = field(default=1.2, metadata={"help": "EDM: std of ln(sigma)"})
    sigma_min: float = field(default=0.002, metadata={"help": "EDM: smallest sigma (training clamp and sampler)"})
    sigma_max: float = field(default=80.0, metadata={"help": "EDM: largest sigma (training clamp and sampler)"})
    ddpm_timesteps: int = field(default=1000, metadata={"help": "DDPM: number of timesteps T"})
    beta_start: float = field(default=1e-4, metadata={"help": "DDPM: first beta of the linear schedule"})
    beta_end: float = field(default=0.02, metadata={"help": "DDPM: last beta of the linear schedule"})
    noise_sampling: str = field(default="default", metadata={
        "help": _one_of(NOISE_SAMPLINGS) + " (vaw-is: importance-sampled noise levels)"})
    is_mix: float = field(default=0.02, metadata={"help": "vaw-is: uniform mixture weight of the proposal"})
    is_statistic: str = field(default="rms", metadata={"help": "vaw-is: per-bin statistic " + _one_of(IS_STATISTICS)})
    is_power: float = field(default=1.0, metadata={"help": "vaw-is: power of the statistic in the proposal"})
    is_warmup: int = field(default=-1, metadata={"help": "vaw-is: losses seen before adapting (-1: vaw-bins * vaw-min-count)"})
    # ---- model -----------------------------------------------------------------------------
    arch: str = field(default="ddpm", metadata={"help": "U-Net: ddpm (our DDPM/ADM-style net; every model flag "
                                                       "applies) | paper (the paper code's net: a fixed layout, only "
                                                       "--channels applies, a multiple of 32; EDM only)"})
    channels: int = field(default=128, metadata={"help": "U-Net base channels"})
    channel_mults: Tuple[int, ...] = field(default=(1, 2, 4), metadata={"help": "U-Net channel multipliers, e.g. 1,2,4"})
    num_res_blocks: int = field(default=2, metadata={"help": "residual blocks per resolution"})
    attn_resolutions: Tuple[int, ...] = field(default=(16, 8), metadata={"help": "resolutions with self-attention, e.g. 16,8 (none: no attention)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the residual blocks"})
    embedding: str = field(default="auto", metadata={"help": "noise embedding: auto (the formulation's) | fourier | positional"})
    # ---- optimisation ----------------------------------------------------------------------
    steps: int = field(default=60000, metadata={"help": "total optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "global batch size (split across ranks)"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW eps"})
    lr_warmup: int = field(default=0, metadata={"help": "linear learning-rate warmup steps"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip (0: none)"})
    ema_decay: float = field(default=0.9995, metadata={"help": "EMA decay of the weights used for sampling"})
    max_nonfinite: int = field(default=10, metadata={"help": "stop after this many consecutive non-finite steps"})
    # ---- loss weighting --------------------------------------------------------------------
    weighting: str = field(default="uniform", metadata={"help": _one_of(WEIGHTINGS)})
    alpha: float = field(default=-1.0, metadata={"help": "seed-cauchy / seed-standardized alpha; -1: the weighting's "
                                                        "default (seed-cauchy 0.05 as the paper's code, seed-standardized 0.5)"})
    gamma: float = field(default=5.0, metadata={"help": "min-snr gamma"})
    snr_convention: str = field(default="published", metadata={
        "help": "min-snr / p2 under EDM: published (SNR = 1/sigma^2, as Hang et al. and Choi et al. define it) | "
                "sigma-data (SNR = sigma_data^2/sigma^2 = exp(lam), the trainer's convention before issue 15)"})
    p2_gamma: float = field(default=1.0, metadata={"help": "P2 gamma"})
    p2_k: float = field(default=1.0, metadata={"help": "P2 k"})
    edm2_channels: int = field(default=128, metadata={"help": "EDM2 learned log-variance: Fourier feature count"})
    backend: str = field(default="auto", metadata={"help": "VAW backend: " + _one_of(VAW_BACKENDS)})
    vaw_bins: int = field(default=64, metadata={"help": "VAW num_bins"})
    vaw_logsnr_range: Tuple[float, float] = field(default=(-12.0, 12.0), metadata={"help": "VAW logsnr_range LMIN LMAX"})
    vaw_decay: float = field(default=0.99, metadata={"help": "VAW decay"})
    vaw_power: float = field(default=-1.0, metadata={"help": "VAW power"})
    vaw_eps: float = field(default=1e-8, metadata={"help": "VAW eps"})
    vaw_min_count: int = field(default=16, metadata={"help": "VAW min_count"})
    vaw_weight_range: Tuple[float, float] = field(default=(0.1, 10.0), metadata={"help": "VAW weight_range WMIN WMAX"})
    vaw_warmup: int = field(default=0, metadata={"help": "VAW warmup_steps"})
    vaw_ramp: int = field(default=0, metadata={"help": "VAW ramp_steps"})
    vaw_power_end: float = field(default=-1.0, metadata={
        "help": "with --vaw-power-anneal N: the VAW power moves linearly from --vaw-power to this over N updates"})
    vaw_power_anneal: int = field(default=0, metadata={"help": "updates over which the VAW power anneals (0: fixed)"})
    vaw_prior: str = field(default="cauchy", metadata={
        "help": "cauchy (default, confirmed in issue 22) | none (the paper's reading: VAW's weights alone): multiply "
                "the VAW weights by the paper's batch-centred Cauchy weights (--alpha, default 0.05)"})
    seed_normalize: bool = field(default=False, metadata={
        "help": "seed-cauchy: divide the weights by their batch mean (mean weight 1, the learning rate of uniform)"})
    # ---- sampling and evaluation -----------------------------------------------------------
    sampler: str = field(default="auto", metadata={"help": "auto (EDM: heun, DDPM: ddpm) | heun | ddpm | ddim"})
    sample_steps: int = field(default=50, metadata={"help": "sampler steps"})
    rho: float = field(default=7.0, metadata={"help": "Karras schedule rho"})
    sample_every: int = field(default=0, metadata={"help": "write a sample grid every N steps (0: only at the end)"})
    grid_size: int = field(default=64, metadata={"help": "images in a sample grid"})
    analysis_batches: int = field(default=200, metadata={
        "help": "at the end, save the per-sample lam and losses (unweighted and weighted) of the EMA and the "
                "raw model over N batches to persample.npz (the paper's 200-batch variance analysis; 0: off)"})
    fid_every: int = field(default=0, metadata={"help": "FID (or the digits metric) every N steps (0: never)"})
    fid_samples: int = field(default=5000, metadata={"help": "samples per FID evaluation"})
    fid_steps: Tuple[int, ...] = field(default=(), metadata={
        "help": "extra steps with an FID (or digits metric) evaluation, e.g. 100,200,300 (denser early)"})
    fid_weights: str = field(default="", metadata={"help": "local Inception weights file for FID"})
    sample_only: bool = field(default=False, metadata={"help": "write samples.npz + PNG from the EMA weights of --out and exit"})
    num_samples: int = field(default=64, metadata={"help": "images for --sample-only"})
    export: str = field(default="", metadata={"help": "write the network weights of --out to PATH (.safetensors or "
                                                      ".pt; PATH.json: what rebuilds the network) and exit"})
    export_weights: str = field(default="ema", metadata={"help": "the weights --export writes: ema | raw"})
    # ---- logging / checkpoints -------------------------------------------------------------
    log_every: int = field(default=100, metadata={"help": "metrics.jsonl + binstats.npz every N steps"})
    ckpt_every: int = field(default=2000, metadata={"help": "checkpoint every N steps (and at the end)"})
    keep_ckpts: int = field(default=2, metadata={"help": "checkpoints kept (>= 2, so a previous good one survives)"})

    def __post_init__(self) -> None:
        for f in fields(self):  # lists (from JSON or a plain dict) -> the tuples the fields hold
            if isinstance(f.default, tuple) and not isinstance(getattr(self, f.name), tuple):
                setattr(self, f.name, _coerce(f, getattr(self, f.name)))

    # -- conversion --------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any], strict: bool = False) -> "TrainConfig":
        """A saved config; a field it predates takes the value that keeps its old behaviour
        (``OLD_CONFIG_VALUES``), else the default."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        cfg = cls()
        return cfg.replace({**OLD_CONFIG_VALUES, **d}, strict=strict)

    def replace(self, updates: Dict[str, Any], strict: bool = True) -> "TrainConfig":
        """A copy with ``updates`` applied (values coerced to the field types)."""
        known = {f.name: f for f in fields(self)}
        values = dataclasses.asdict(self)
        for key, value in updates.items():
            if key not in known:
                if strict:
                    raise ConfigError(f"unknown config field {key!r}")
                continue
            values[key] = _coerce(known[key], value)
        return TrainConfig(**values)

    # -- derived -----------------------------------------------------------------------------
    def formulation_kwargs(self) -> Dict[str, Any]:
        if self.formulation == "edm":
            return {"sigma_data": self.sigma_data, "P_mean": self.p_mean, "P_std": self.p_std,
                    "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}
        return {"num_timesteps": self.ddpm_timesteps, "beta_start": self.beta_start, "beta_end": self.beta_end}

    def vaw_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``VarianceAwareWeighting`` (the spec's names)."""
        return {"num_bins": self.vaw_bins, "logsnr_range": tuple(self.vaw_logsnr_range), "decay": self.vaw_decay,
                "power": self.vaw_power, "eps": self.vaw_eps, "min_count": self.vaw_min_count,
                "weight_range": tuple(self.vaw_weight_range), "warmup_steps": self.vaw_warmup,
                "ramp_steps": self.vaw_ramp, "backend": self.backend}

    def resolved_sampler(self) -> str:
        if self.sampler != "auto":
            return self.sampler
        return "heun" if self.formulation == "edm" else "ddpm"

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """``self`` if every field is well-typed, within its bounds and fits the others; else a
        one-line ``ConfigError`` naming the flag. Pure: it reads neither the disk nor the machine."""
        for f in fields(self):  # the types first (a dataclass does not check them)
            _coerce(f, getattr(self, f.name))
        for name, allowed in CHOICES.items():
            check_choice(name, getattr(self, name), allowed)
        if self.preset:
            check_choice("preset", self.preset, PRESETS)
        if not _DEVICE.fullmatch(self.device):
            _bad(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for f in fields(self):
            for value in _numbers(getattr(self, f.name)):
                _check_bounds(f.name, value)
        for name in ("out", "data_root"):
            if not getattr(self, name):
                _bad(f"{flag_name(name)} must name a folder")
        for name in ("out", "data_root", "fid_weights", "export"):
            if "\0" in getattr(self, name):
                _bad(f"{flag_name(name)} holds a NUL character")
        self._validate_together()
        return self

    def _validate_together(self) -> None:
        """The fields that must agree with each other."""
        if not self.sigma_min < self.sigma_max:
            _bad(f"--sigma-min {self.sigma_min} must be below --sigma-max {self.sigma_max}")
        if not self.beta_start <= self.beta_end:
            _bad(f"--beta-start {self.beta_start} must not exceed --beta-end {self.beta_end}")
        if self.alpha < 0 and self.alpha != -1:
            _bad(f"--alpha must be >= 0, or -1 for the weighting's default, got {self.alpha}")
        sampler = self.resolved_sampler()
        if (sampler == "heun") != (self.formulation == "edm"):
            _bad(f"--sampler {sampler} does not fit --formulation {self.formulation} "
                 "(edm: heun; ddpm: ddpm or ddim)")
        if self.arch == "paper" and self.formulation != "edm":
            _bad("--arch paper needs --formulation edm (the paper's net embeds ln(sigma)/4; DDPM passes timesteps)")
        if not self.channel_mults:
            _bad("--channel-mults must list at least one multiplier")
        lmin, lmax = self.vaw_logsnr_range
        if not lmin < lmax:
            _bad(f"--vaw-logsnr-range needs LO < HI, got {lmin} {lmax}")
        wmin, wmax = self.vaw_weight_range
        if not 0 < wmin <= wmax:
            _bad(f"--vaw-weight-range needs 0 < LO <= HI, got {wmin} {wmax}")
        try:  # the spec's own validation, should it check more than the bounds above
            from ..config import VAWConfig
            kw = self.vaw_kwargs()
            kw.pop("backend")
            VAWConfig(**kw)
        except ValueError as exc:
            _bad(f"invalid VAW setting: {exc}")


def flag_name(name: str) -> str:
    """The command-line flag of field ``name``."""
    return "--" + name.replace("_", "-")


def _bad(msg: str) -> None:
    raise ConfigError(msg)


def check_choice(name: str, value: str, allowed) -> None:
    """A ``ConfigError`` unless ``value`` is one of ``allowed`` (names of field ``name``)."""
    if value not in allowed:
        _bad(f"unknown {name.replace('_', '-')} {value!r}; {flag_name(name)} takes one of: {', '.join(allowed)}")


# Fields that take one of a list of names (registry.py holds the lists).
CHOICES = {"dataset": DATASETS, "weighting": WEIGHTINGS, "formulation": FORMULATIONS,
           "noise_sampling": NOISE_SAMPLINGS, "is_statistic": IS_STATISTICS, "sampler": SAMPLERS,
           "backend": VAW_BACKENDS, "embedding": EMBEDDINGS, "amp": AMP_MODES, "vaw_prior": VAW_PRIORS,
           "export_weights": EXPORT_WEIGHTS, "arch": ARCHITECTURES, "snr_convention": SNR_CONVENTIONS}

_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_INF = math.inf
_INT64 = 2 ** 63 - 1
_F32 = 3.4028234663852886e38
_SIGMA = 1e6  # sigma^2 stays finite in float32
# The range of each numeric field that has one, as an interval: (low, high, brackets[, why]).
# Upper bounds below infinity stop a value that sizes an allocation or a loop at one point (a
# tensor, a sampler run) from exhausting the machine; a run's length (--steps) is the user's.
# Every int must also fit in int64 and every float in float32 (the values reach tensors, the
# kernels' parameters and the float32 training arithmetic).
BOUNDS: Dict[str, Tuple[Any, ...]] = {
    # formulation and noise levels
    "sigma_data": (0, _SIGMA, "(]"), "p_std": (0, _INF, "()"), "sigma_min": (0, _SIGMA, "(]"),
    "sigma_max": (0, _SIGMA, "(]"), "ddpm_timesteps": (2, 100_000, "[]"), "beta_start": (0, 1, "()"),
    "beta_end": (0, 1, "()"), "is_mix": (0, 1, "(]"), "is_warmup": (-1, _INT64, "[]", "-1: the default"),
    # model
    "channels": (1, 4096, "[]"), "channel_mults": (1, 64, "[]"), "num_res_blocks": (1, 64, "[]"),
    "attn_resolutions": (1, 4096, "[]"), "dropout": (0, 1, "[)"),
    # optimisation
    "steps": (1, _INT64, "[]"), "batch_size": (1, 1 << 20, "[]"), "lr": (0, _INF, "()"),
    "weight_decay": (0, _INF, "[)"), "adam_beta1": (0, 1, "[)"), "adam_beta2": (0, 1, "[)"),
    "adam_eps": (0, _INF, "()"), "lr_warmup": (0, _INT64, "[]"), "grad_clip": (0, _INF, "[)", "0: none"),
    "ema_decay": (0, 1, "[)"), "max_nonfinite": (1, _INT64, "[]"),
    # loss weighting
    "gamma": (0, _INF, "()"), "p2_gamma": (0, _INF, "[)"), "p2_k": (0, _INF, "()"),
    "edm2_channels": (1, 65536, "[]"), "vaw_bins": (1, 65536, "[]"), "vaw_decay": (0, 1, "()"),
    "vaw_eps": (0, _INF, "[)"), "vaw_min_count": (0, _INT64, "[]"), "vaw_warmup": (0, _INT64, "[]"),
    "vaw_ramp": (0, _INT64, "[]"), "vaw_power_anneal": (0, _INT64, "[]"),
    "vaw_logsnr_range": (-1000, 1000, "[]"), "vaw_weight_range": (0, _INF, "()"),
    # sampling and evaluation
    "sample_steps": (1, 100_000, "[]"), "rho": (0, _INF, "()"), "sample_every": (0, _INT64, "[]"),
    "grid_size": (1, 10_000, "[]"), "analysis_batches": (0, 1_000_000, "[]"), "fid_every": (0, _INT64, "[]"),
    "fid_samples": (2, 1_000_000, "[]", "a Frechet distance needs 2 samples"), "fid_steps": (1, _INT64, "[]"),
    "num_samples": (1, 1_000_000, "[]"),
    # logging and checkpoints
    "log_every": (1, _INT64, "[]"), "ckpt_every": (1, _INT64, "[]"),
    "keep_ckpts": (2, _INT64, "[]", "a previous good checkpoint is always kept"),
}


def _numbers(value: Any) -> Tuple[Any, ...]:
    if isinstance(value, tuple):
        return value
    return (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else ()


def _check_bounds(name: str, value: Any) -> None:
    flag = flag_name(name)
    if isinstance(value, int) and abs(value) > _INT64:
        _bad(f"{flag} {value} does not fit in a 64-bit integer")
    if isinstance(value, float) and abs(value) > _F32:
        _bad(f"{flag} {value} is beyond float32's range (about 3.4e38)")
    if name not in BOUNDS:
        return
    lo, hi, brackets, *why = BOUNDS[name]
    above = value > lo if brackets[0] == "(" else value >= lo
    below = value < hi if brackets[1] == ")" else value <= hi
    if above and below:
        return
    if hi in (_INF, _INT64):
        rule = f"must be {'>' if brackets[0] == '(' else '>='} {lo}"
    else:
        rule = f"must lie in {brackets[0]}{lo}, {hi}{brackets[1]}"
    note = f" ({why[0]})" if why else ""
    _bad(f"{flag} {rule}{note}, got {value}")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """``value`` as the field's type, or ConfigError: strings are parsed (flags, "1,2,4"), an int
    widens to a float, but a float or bool is never truncated into an int, nor a number into a bool."""
    default = f.default
    flag = flag_name(f.name)
    if isinstance(default, tuple):
        if not isinstance(value, (str, list, tuple)):
            raise ConfigError(f"{flag}: expected a list, got {value!r}")
        raw = [value] if isinstance(value, str) else list(value)
        items = []
        for v in raw:  # accepts "1,2,4", ["1", "2", "4"], ["1,2,4"], [1, 2, 4] and "none"
            tokens = str(v).replace(",", " ").split() if isinstance(v, str) else [v]
            items.extend(t for t in tokens if not (isinstance(t, str) and t.lower() == "none"))
        elem = type(default[0]) if default else int
        return tuple(_scalar(flag, elem, v) for v in items)
    return _scalar(flag, type(default), value)


def _scalar(flag: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        raise ConfigError(f"{flag}: expected true/false, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{flag}: expected a string, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{flag}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind is int and isinstance(value, float):
        raise ConfigError(f"{flag}: expected an integer, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}: cannot read {value!r} as {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(number):
        raise ConfigError(f"{flag}: expected a finite number, got {value!r}")
    return number


# What a config saved before a field existed meant by its absence (where that is not the default).
OLD_CONFIG_VALUES = {"snr_convention": "sigma-data", "vaw_prior": "none"}


def format_value(v: Any) -> str:
    """A field's value as a person reads it (a tuple as "1,2,4", an empty one as "none")."""
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v) if v else "none"
    return repr(v)
