"""torchrun support: process-group set-up, DDP wrapping and rank-aware helpers.

Single-process runs never touch torch.distributed; under torchrun (RANK/WORLD_SIZE set)
the group is initialised once, and only rank 0 logs, draws progress bars and writes files.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on one: a signal reaches the ranks at different steps,
    and all of them must stop after the same one."""
    if world_size() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each figure averaged over the ranks (unchanged in a single process)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"   # NCCL reduces GPU tensors only
    stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return {k: float(v) / world_size() for k, v in zip(keys, stacked)}


def wrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """DDP-wrap when running on several processes; the bare model otherwise."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)
