"""Pins: a short run per weighting stays bitwise what it was (issues 23 and 25).

Refactors (the weightings moving into the library, one registry per list, dead RNG streams
removed) must not change a single bit of a run. Each case trains the tiny digits config for 6
steps and hashes its final checkpoint (model, EMA, optimizer, weighting, observer and RNG state;
not the config, which holds paths) and its metrics without timing fields. The hashes were
written by ``VARWEIGHT_WRITE_PINS=1 pytest python_tests/test_run_pins.py`` at commit
"Pin a short run per weighting", before any of those refactors.

Floating-point kernels differ between CPUs and torch builds, so the pins hold on the machine
kind they were written on; elsewhere the test says so and skips (the fingerprint names both).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from varweight_kernels.backends import cpu_name
from varweight_kernels.training.checkpoint import load_checkpoint
from varweight_kernels.training.loop import train
from varweight_kernels.training.rng import derive_seed
from tiny_runs import one_thread, read_metrics, strip_timing, tiny  # noqa: F401

PINS = Path(__file__).with_name("run_pins.json")
CASES = {
    "uniform": dict(weighting="uniform"),
    "vaw_power-1": dict(weighting="vaw", vaw_power=-1.0, vaw_prior="none"),
    "vaw_power0.5": dict(weighting="vaw", vaw_power=0.5, vaw_prior="none"),
    "vaw_cauchy_prior": dict(weighting="vaw", vaw_power=-1.0, vaw_prior="cauchy", alpha=0.05),
    "seed-cauchy": dict(weighting="seed-cauchy"),
    "seed-cauchy_normalized": dict(weighting="seed-cauchy", seed_normalize=True),
    "seed-standardized": dict(weighting="seed-standardized"),
    "min-snr": dict(weighting="min-snr"),
    "p2": dict(weighting="p2"),
    "edm2": dict(weighting="edm2"),
    "ddpm_min-snr": dict(weighting="min-snr", formulation="ddpm"),
    "ddpm_p2": dict(weighting="p2", formulation="ddpm"),
    "ddpm_vaw": dict(weighting="vaw", vaw_power=-1.0, vaw_prior="none", formulation="ddpm"),
    "vaw-is": dict(weighting="uniform", noise_sampling="vaw-is", is_warmup=0),
}


def fingerprint() -> str:
    """The CPU model and the torch build: what the bits of a run depend on besides the code."""
    return f"{cpu_name()} | torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()}"


def _feed(h, obj, path: str = "") -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{path}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if path == "" and k == "config":
                continue  # holds the run's own path
            _feed(h, obj[k], f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            _feed(h, x, f"{path}[{i}]")
    else:
        h.update(f"{path}={obj!r}".encode())


# The pins were written while checkpoints held two generators nothing drew from, "init" and
# "sample" (issue 25 dropped them). An undrawn generator's state is its seeded state, so the hash
# puts exactly that back: a run whose model, drawn streams and metrics are unchanged hashes as before.
DROPPED_STREAMS = ("init", "sample")


def _with_dropped_streams(state: dict, seed: int) -> dict:
    for rank, entry in enumerate(state["ranks"]):
        assert not set(DROPPED_STREAMS) & set(entry["rng"]), "a dropped stream is checkpointed again"
        for name in DROPPED_STREAMS:
            entry["rng"][name] = torch.Generator().manual_seed(derive_seed(seed, name, rank)).get_state()
    return state


def run_hash(out: Path, steps: int, case: dict) -> str:
    cfg = tiny(out, steps=steps, **case)
    res = train(cfg)
    assert res["status"] == "done"
    h = hashlib.sha256()
    _feed(h, _with_dropped_streams(load_checkpoint(res["checkpoint"]), cfg.seed))
    h.update(json.dumps(strip_timing(read_metrics(out)), sort_keys=True).encode())
    return h.hexdigest()


def _pins() -> dict:
    return json.loads(PINS.read_text()) if PINS.exists() else {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_short_run_is_pinned(tmp_path, name):
    digest = run_hash(tmp_path / name, 6, CASES[name])
    if os.environ.get("VARWEIGHT_WRITE_PINS") == "1":
        pins = _pins()
        if pins.get("fingerprint") not in (None, fingerprint()):
            pins = {}
        pins["fingerprint"] = fingerprint()
        pins.setdefault("runs", {})[name] = digest
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        return
    pins = _pins()
    assert name in pins.get("runs", {}), f"no pin for {name}: write them with VARWEIGHT_WRITE_PINS=1"
    if pins["fingerprint"] != fingerprint():
        pytest.skip(f"pins written on '{pins['fingerprint']}', this machine is '{fingerprint()}'")
    assert digest == pins["runs"][name], f"{name}: a 6-step run changed bits"
