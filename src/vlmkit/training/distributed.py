"""torchrun support: process-group set-up, DDP and FSDP2 wrapping and rank-aware helpers.

Single-process runs never touch torch.distributed; under torchrun (RANK/WORLD_SIZE set)
the group is initialised once, and only rank 0 logs, draws progress bars and writes files.

Two ways to spread training (`train.distributed`):
- "ddp": every rank holds the whole model, optimizer state and gradients; gradients are
  averaged after the backward pass.
- "fsdp": the loop trains a copy sharded with FSDP2 (`fully_shard`): each rank keeps
  1/world of its weights, gradients and optimizer state, and gathers a block's weights only
  while it runs. The model the recipe built stays whole on every rank: it is brought up to
  date (`copy_into`) before it is saved or evaluated, so checkpoints are the same files as
  any other run's and load at any world size.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

STRATEGIES = ("ddp", "fsdp")


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
    value = torch.tensor([int(flag)], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each figure averaged over the ranks (unchanged in a single process)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(stacked)
    return {k: float(v) / world_size() for k, v in zip(keys, stacked)}


def gather_objects(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def _device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"   # NCCL moves GPU tensors only


def wrap_model(model: torch.nn.Module, strategy: str = "ddp") -> torch.nn.Module:
    """The module the loop trains: `model` itself in one process, DDP around it, or a
    sharded copy of it (FSDP2) that leaves `model` whole."""
    if strategy not in STRATEGIES:
        raise ValueError(f"train.distributed={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if world_size() == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)

    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():   # every rank starts from rank 0's weights, as DDP does
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, 0)
    sharded = copy.deepcopy(model)
    # One FSDP unit per repeated block (a transformer layer), so only one block's weights
    # are whole at a time; the rest (embeddings, norms, projector) forms the root unit.
    for module in sharded.modules():
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                fully_shard(block)
    # FSDP2 shards along the first dimension: a 0-d parameter (a logit scale) stays whole
    # on every rank, and its gradient is averaged by `average_unsharded_gradients`.
    fully_shard(sharded, ignored_params=set(unsharded_parameters(sharded)))
    return sharded


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local_size(tensor: torch.Tensor) -> int:
    """How many of a (possibly sharded) tensor's numbers this rank stores."""
    return tensor.to_local().numel() if hasattr(tensor, "to_local") else tensor.numel()


def unsharded_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.ndim == 0]


def average_unsharded_gradients(module: torch.nn.Module) -> None:
    """The ranks' mean gradient for the parameters FSDP leaves whole (gloo has no AVG)."""
    for p in unsharded_parameters(module):
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def clip_sharded_gradients(module: torch.nn.Module, max_norm: float) -> float:
    """clip_grad_norm_ for a sharded module: the norm over the whole gradient, every rank's
    shard counted once (the zero padding of a shard adds nothing), the whole parameters once."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    local = [g.to_local() for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    squares = sum((g.float().pow(2).sum() for g in local), torch.zeros((), device=grads[0].device))
    dist.all_reduce(squares)
    squares += sum((g.float().pow(2).sum() for g in whole), torch.zeros((), device=grads[0].device))
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return float(norm)


def copy_into(model: torch.nn.Module, sharded: torch.nn.Module) -> None:
    """The sharded copy's weights gathered into the whole `model`, on every rank (collective)."""
    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(state[name])


def copy_from(sharded: torch.nn.Module, model: torch.nn.Module) -> None:
    """The whole `model`'s weights (the same on every rank) cut into the sharded copy."""
    set_model_state_dict(sharded, model.state_dict(), options=StateDictOptions(full_state_dict=True))


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, whole (gathered from the shards), so it
    loads into a run of any world size and strategy. Collective when `module` is sharded;
    the state lands on rank 0 (other ranks get {})."""
    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if any(isinstance(key, int) for key in state["state"]):   # written before states were keyed by name
        if is_sharded(module):
            raise ValueError("this checkpoint's optimizer state is keyed by position; resume it with "
                             "train.distributed=ddp or in one process")
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
