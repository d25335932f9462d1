"""Weight-only low precision: linear layers that store bf16 or int8 weights and compute
with whatever activations they get.

Decoding one token reads every weight of the language model once, so its speed is set by
how many bytes the weights take: bf16 reads half of fp32's, int8 a quarter. The
activations are not quantised, so every row of a batch is computed on its own, as in the
float model. Int8 weights are rounded to the nearest of 255 steps of each output row's
largest magnitude (symmetric, per output channel).

A few rows (a decode step) go through PyTorch's bf16 / int8-weight kernels; many rows (a
prompt) turn the weights into the activations' dtype and multiply, because there the
arithmetic costs the time, and on a CPU without bf16 instructions fp32 arithmetic is
several times faster than bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows at once (decode steps, batches up to 16) the small-weight kernels are
# used; beyond it (prompts), the weights are dequantised and multiplied in the activations'
# dtype, where the arithmetic, not the reading, sets the time. Chosen on an AVX2 CPU.
KERNEL_ROWS = 16


class Bf16Linear(nn.Module):
    """A drop-in `nn.Linear` for inference holding bf16 weights, for float32 activations."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() <= KERNEL_ROWS:
            y = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 weights"


class Int8Linear(nn.Module):
    """A drop-in `nn.Linear` for inference holding int8 weights [out, in] and bf16 scales [out].

    The scales stay bf16 whatever dtype the model is cast to, because the int8 kernel takes
    them so (a bf16 scale is exact to 0.4%, finer than the int8 steps it scales).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.scale = self.scale.to(torch.bfloat16)   # `model.to(torch.float32)` must not move it
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None).to(w.device)
        if linear.bias is not None:
            q.bias.data = q.bias.data.to(linear.bias.dtype)
        q.weight.copy_((w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        q.scale.copy_(scale.to(torch.bfloat16))
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if rows <= KERNEL_ROWS and x.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
            # The CPU kernel is vectorised for bf16 activations (fp32 ones take a slow path).
            y = torch._weight_int8pack_mm(x.reshape(rows, -1).to(torch.bfloat16), self.weight, self.scale)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module, prefix: str = "") -> list[str]:
    """Replace every `nn.Linear` under `model` (names starting with `prefix`) by an `Int8Linear`.

    Returns the replaced modules' names (what a checkpoint records to rebuild them). A
    linear that shares its weight with another module (a tied LM head) gets its own int8
    copy; the other module keeps the float weight.
    """
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and name.startswith(prefix)]
    for name in names:
        _replace(model, name, Int8Linear.from_linear(model.get_submodule(name)))
    return names


def bf16_weights(model: nn.Module, prefix: str = "") -> None:
    """Store every `nn.Linear` under `model` (names starting with `prefix`) in bf16, computing in fp32."""
    for name in [name for name, m in model.named_modules() if type(m) is nn.Linear and name.startswith(prefix)]:
        _replace(model, name, Bf16Linear(model.get_submodule(name)))


def int8_layers(model: nn.Module, names: list[str]) -> None:
    """Swap the named linears for empty `Int8Linear`s, to be filled from a quantised checkpoint."""
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is not a linear layer; cannot hold int8 weights")
        _replace(model, name, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None))


def quantized_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
