"""Two gloo processes: VAW state is synchronised with one all_reduce per step."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from varweight_kernels import VarianceAwareWeighting
from varweight_kernels.ops import STATE_NAMES

STEPS = 4
CONFIG = dict(num_bins=16, min_count=4)


def _batches(rank):
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(STEPS):
        lam = -14 + 28 * torch.rand(300, generator=g)
        loss = torch.exp(torch.randn(300, generator=g)) * (1 + lam.abs() / 4)
        loss[::37] = float("nan")
        out.append((loss, lam))
    return out


def _worker(rank, world, port, result_dir, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module = VarianceAwareWeighting(**CONFIG, backend=backend)
        for loss, lam in _batches(rank):
            module(loss, lam)
        torch.save({name: getattr(module, name) for name in STATE_NAMES}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_agree_and_match_concatenated_batches(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), "reference"), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "1.pt", weights_only=True)
    for name in STATE_NAMES:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"

    single = VarianceAwareWeighting(**CONFIG)
    for (l0, m0), (l1, m1) in zip(_batches(0), _batches(1)):
        single(torch.cat([l0, l1]), torch.cat([m0, m1]))
    for name in STATE_NAMES:
        torch.testing.assert_close(rank0[name], getattr(single, name), rtol=1e-6, atol=0, msg=name)
    assert int(rank0["nonfinite"]) == 2 * STEPS * len(range(0, 300, 37))
    assert not torch.equal(rank0["weight"], torch.ones(16))
