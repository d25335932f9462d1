"""LoRA: train a low-rank update B @ A beside each frozen linear layer, then merge it in.

`inject_lora` wraps the chosen `nn.Linear`s of a module; only the adapters train.
`merge_lora` folds W + (alpha / r) B A back into plain linears, so a finished model has
the original parameter names and loads (and exports) like one trained in full. A model
saved with its adapters unmerged records them (`describe_lora`), and `restore_lora` wraps
the same layers again before its weights are loaded.
"""
from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_TARGETS = ("qkv", "out", "gate_up", "down")   # the decoder's attention and MLP projections


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        # A random, B zero: the wrapped layer starts exactly equal to the base layer.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def inject_lora(module: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS) -> int:
    """Wrap every `nn.Linear` whose attribute name is in `targets`; return how many were wrapped."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
                count += 1
    if count == 0:
        raise ValueError(f"no linear layer named any of {targets} to put LoRA adapters on")
    return count


def merge_lora(module: nn.Module) -> int:
    """Replace every `LoRALinear` with its merged linear; return how many were merged."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                count += 1
    return count


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, to save them apart from the (unchanged) base model."""
    return {k: v for k, v in module.state_dict().items() if ".lora_a" in k or ".lora_b" in k}


def describe_lora(module: nn.Module) -> dict | None:
    """Which layers carry adapters, and their rank and alpha (None: no adapters)."""
    layers = {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        return None
    shapes = {(m.lora_a.shape[0], m.scale * m.lora_a.shape[0]) for m in layers.values()}
    if len(shapes) != 1:
        raise ValueError(f"adapters of several ranks or alphas {sorted(shapes)}; one of each can be recorded")
    rank, alpha = shapes.pop()
    return {"rank": rank, "alpha": alpha, "layers": sorted(layers)}


def restore_lora(module: nn.Module, lora: dict) -> None:
    """Wrap the layers `describe_lora` named, so a saved state with adapters loads into `module`."""
    for name in lora["layers"]:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        layer = getattr(parent, child, None)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"the adapters name layer {name!r}, which is not a linear layer of this model")
        setattr(parent, child, LoRALinear(layer, int(lora["rank"]), float(lora["alpha"])))
