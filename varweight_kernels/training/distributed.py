"""Ranks and devices: what torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK) says, the
device a rank trains on, and the few collectives the trainer needs. Every collective is a
no-op on a single process, so the loop calls them unconditionally."""
from __future__ import annotations

import os
from typing import Any, List

import torch
import torch.distributed as dist

from .config import TrainConfig, TrainError

__all__ = ["DistInfo", "resolve_device", "init_distributed", "average_gradients", "all_reduce_sum",
           "all_gather_objects", "broadcast_object"]


class DistInfo:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def resolve_device(cfg: TrainConfig, d: DistInfo) -> torch.device:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {cfg.device} asked for CUDA, but no GPU is available here")
        if dev.index is None:
            dev = torch.device("cuda", d.local_rank if d.world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(d: DistInfo, device: torch.device) -> None:
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def average_gradients(params: List[torch.Tensor], d: DistInfo) -> None:
    """Average gradients over ranks, for parameters DDP does not wrap (the weighting's)."""
    if d.world > 1:
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= d.world


def all_reduce_sum(t: torch.Tensor, d: DistInfo) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


def all_gather_objects(obj: Any, d: DistInfo) -> List[Any]:
    """Every rank's ``obj``, in rank order."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, d: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if d.world > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj
