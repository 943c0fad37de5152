"""The shared random matrix of VAW steps that every backend is compared on against the reference."""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional

import torch

from varweight_kernels import VarianceAwareWeighting
from varweight_kernels.ops import STATE_NAMES

FLOAT_LOSS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# ``out`` of half-precision losses against the reference (the compiled backends; Triton has its own).
HALF_OUT_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclasses.dataclass
class Case:
    """A config and a few batches (loss, lam) fed to a fresh module in training mode."""

    name: str
    config: Dict
    batches: List  # list of (loss float64 CPU, lam float64 CPU)


def _batch(gen: torch.Generator, batch: int, lmin: float, lmax: float, with_nonfinite: bool):
    span = lmax - lmin
    lam = lmin - 0.1 * span + 1.2 * span * torch.rand(batch, generator=gen, dtype=torch.float64)
    loss = torch.exp(0.7 * torch.randn(batch, generator=gen, dtype=torch.float64)) * (1 + (lam - lmin) / span)
    if with_nonfinite and batch >= 8:
        pos = torch.randperm(batch, generator=gen)[:6]
        lam[pos[0]] = float("inf")
        lam[pos[1]] = float("-inf")
        lam[pos[2]] = float("nan")
        loss[pos[3]] = float("nan")
        loss[pos[4]] = float("inf")
        loss[pos[5]] = float("-inf")
    return loss, lam


def random_cases(count: int, seed: int = 0, max_batch: int = 100_000, max_bins: int = 4096) -> Iterator[Case]:
    """``count`` random configs (every field varied) with 1-3 batches each, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    batch_sizes = [b for b in (1, 2, 7, 100, 1000, 1023, 1025, 4097, 33_333, 100_000) if b <= max_batch]
    bin_counts = [k for k in (1, 2, 3, 16, 64, 257, 1024, 4096) if k <= max_bins]
    for i in range(count):
        lmin = pick([-12.0, -5.0, -20.0, 0.5])
        lmax = lmin + pick([1.0, 10.0, 24.0])
        wmin = pick([0.1, 0.5, 1e-3])
        config = dict(num_bins=pick(bin_counts), logsnr_range=(lmin, lmax), decay=pick([0.5, 0.9, 0.99, 0.999]),
                      power=pick([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]), eps=pick([1e-8, 0.0, 1e-3]),
                      min_count=pick([0, 1, 16, 100]), weight_range=(wmin, pick([wmin, 2.0, 10.0, 1e3])),
                      warmup_steps=pick([0, 0, 1, 2]), ramp_steps=pick([0, 0, 1, 3]))
        steps = int(torch.randint(1, 4, (1,), generator=gen))
        batches = [_batch(gen, pick(batch_sizes), lmin, lmax, with_nonfinite=bool(torch.rand(1, generator=gen) < 0.5))
                   for _ in range(steps)]
        yield Case(f"random{i}", config, batches)


def edge_cases() -> List[Case]:
    """The named edge cases every backend must handle like the reference."""
    gen = torch.Generator().manual_seed(1234)
    cases = [
        Case("B=1", dict(num_bins=64, min_count=0), [_batch(gen, 1, -12, 12, False) for _ in range(3)]),
        Case("B not multiple of block", dict(num_bins=64, min_count=2), [_batch(gen, 1537, -12, 12, True)] * 2),
        Case("K=1", dict(num_bins=1, min_count=0), [_batch(gen, 300, -12, 12, True) for _ in range(2)]),
        Case("K=4096", dict(num_bins=4096, min_count=1), [_batch(gen, 20_000, -12, 12, True) for _ in range(2)]),
    ]
    loss = torch.exp(torch.randn(513, generator=gen, dtype=torch.float64))
    cases.append(Case("one bin", dict(num_bins=64, min_count=4), [(loss, torch.full((513,), 3.3, dtype=torch.float64))] * 2))
    # Losses around the largest |L| the statistics take (L * L at most the float32 maximum), and
    # subnormal ones; 2048 samples so the vectorised C++ stages see them too.
    limit = float.fromhex("0x1.fffffep+63")
    huge = torch.exp(torch.randn(2048, generator=gen, dtype=torch.float64))
    specials = torch.tensor([limit, -limit, float.fromhex("0x1.000000p+64"), 1e20, -1e30, 1e-40, 3e-45, 1e300],
                            dtype=torch.float64)
    huge[:len(specials) * 200:200] = specials
    cases.append(Case("huge and subnormal losses", dict(num_bins=16, min_count=1),
                      [(huge, torch.linspace(-12, 12, 2048, dtype=torch.float64))] * 2))
    nan_loss = torch.full((64,), float("nan"), dtype=torch.float64)
    cases.append(Case("all NaN", dict(num_bins=8, min_count=0), [(nan_loss, torch.linspace(-12, 12, 64, dtype=torch.float64))]))
    return cases


def run_case(case: Case, backend: str, device: str = "cpu", loss_dtype: torch.dtype = torch.float32,
             lam_dtype: torch.dtype = torch.float32, training: bool = True) -> List[Dict[str, torch.Tensor]]:
    """Feed the case's batches to a fresh module; after each call record out, grad, weights and buffers."""
    module = VarianceAwareWeighting(**case.config, backend=backend).to(device)
    module.train(training)
    records = []
    for loss64, lam64 in case.batches:
        loss = loss64.to(device=device, dtype=loss_dtype).detach().clone().requires_grad_(True)
        lam = lam64.to(device=device, dtype=lam_dtype)
        out = module(loss, lam)
        out.backward()
        record = {"out": out.detach().double().cpu(), "grad": loss.grad.double().cpu(),
                  "w": module.last_weights.double().cpu()}
        record.update({name: getattr(module, name).detach().double().cpu().clone() for name in STATE_NAMES})
        records.append(record)
    return records


def assert_records_close(actual, expected, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """Compare two run_case results entry by entry; NaN must match NaN."""
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        for key in e:
            torch.testing.assert_close(a[key], e[key], rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m, key=key, step=step: f"{what} step {step} {key}: {m}")


def assert_records_close_out_rtol(actual, expected, rtol: float, out_rtol: float, what: str = "") -> None:
    """assert_records_close with its own tolerance for ``out`` (half-precision losses round the mean
    to the loss dtype from a sum taken in another order; everything else keeps ``rtol``)."""
    assert_records_close([{k: v for k, v in r.items() if k != "out"} for r in actual],
                         [{k: v for k, v in r.items() if k != "out"} for r in expected], rtol=rtol, what=what)
    assert_records_close([{"out": r["out"]} for r in actual], [{"out": r["out"]} for r in expected],
                         rtol=out_rtol, what=what)


def _same_bits(a: torch.Tensor, e: torch.Tensor) -> bool:
    """Same float64 bits (so -0.0 differs from 0.0), any NaN matching any NaN."""
    return a.shape == e.shape and bool(((a.view(torch.int64) == e.view(torch.int64)) | (a.isnan() & e.isnan())).all())


def assert_records_bitwise(actual, expected, out_rtol: float, what: str = "",
                           grad_rtol: Optional[float] = None) -> None:
    """grad, w and the whole state bit for bit; only ``out`` gets ``out_rtol``: it is a sum of ``w * L``
    taken in another order (or precision) than the reference's, so its last bit may differ.
    ``grad_rtol``: a tolerance for ``grad`` too, for a backend whose backward rounds differently."""
    assert len(actual) == len(expected)
    loose = {"out": out_rtol} if grad_rtol is None else {"out": out_rtol, "grad": grad_rtol}
    for step, (a, e) in enumerate(zip(actual, expected)):
        for key in e:
            if key not in loose:
                assert _same_bits(a[key], e[key]), f"{what} step {step} {key}: not bitwise equal: {a[key]} vs {e[key]}"
    for key, rtol in loose.items():
        assert_records_close([{key: r[key]} for r in actual], [{key: r[key]} for r in expected], rtol=rtol, what=what)


def assert_records_close_half(actual, expected, loss_dtype: torch.dtype, what: str = "") -> None:
    """The compiled backends' contract: bitwise but ``out``, which gets rel 1e-6 (HALF_OUT_RTOL for half losses)."""
    assert_records_bitwise(actual, expected, out_rtol=HALF_OUT_RTOL.get(loss_dtype, 1e-6), what=what)


def fresh_state(K: int, C_dtype: torch.dtype = torch.float64, device="cpu") -> List[torch.Tensor]:
    """A new module state (M, Q, Z, C, weight, step, nonfinite) of K bins, for calling backends directly."""
    return [torch.zeros(K, device=device), torch.zeros(K, device=device), torch.zeros(K, device=device),
            torch.zeros(K, dtype=C_dtype, device=device), torch.ones(K, device=device),
            torch.zeros((), dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64, device=device)]


def assert_records_equal(actual, expected, what: str = "") -> None:
    """Bitwise equality (NaN payloads aside) of two run_case results."""
    for step, (a, e) in enumerate(zip(actual, expected)):
        for key in e:
            same = torch.equal(a[key], e[key]) or bool(((a[key] == e[key]) | (a[key].isnan() & e[key].isnan())).all())
            assert same, f"{what} step {step} {key} differs between runs"
