"""Names between vlmkit and other checkpoint formats: the tensor-key rules and the activations.

A format describes an architecture once, as a list of `Rule`s: each ties one vlmkit tensor
to one foreign tensor (`pair`, reshaped where the two layouts differ) or to several that it
concatenates along dim 0 (`fused`: Q|K|V, gate|up). `to_ours` and `to_theirs` read the same
rules, so import and export cannot drift apart, and both check every shape: an error names
the key and both shapes. `check` and `reject_unexpected` report a whole state's missing and
unexpected tensors. No format stores a tensor transposed (GGUF lists dimensions in reverse,
but its data is row-major as PyTorch's), so a rule reshapes at most.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from vlmkit.convert.hf_io import ConversionError

Shape = tuple[int, ...]

# Hugging Face `hidden_act` -> vlmkit `act`. transformers has two names for tanh GELU; the
# later one is what transformers itself writes, so it is the one exported.
ACTS_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
ACTS_TO_HF = {ours: theirs for theirs, ours in ACTS_FROM_HF.items()}


def act_from_hf(act: str, key: str) -> str:
    """The vlmkit activation for HF's `act`, read from config key `key` (named in the error)."""
    if act not in ACTS_FROM_HF:
        raise ConversionError(f"{key} {act!r} is not supported; supported: {sorted(ACTS_FROM_HF)}")
    return ACTS_FROM_HF[act]


@dataclass(frozen=True)
class Rule:
    """One vlmkit tensor <-> the foreign tensor(s) holding the same numbers."""

    ours: str
    theirs: tuple[str, ...]    # one key, or the parts a fused tensor stacks on dim 0, in order
    shapes: tuple[Shape, ...]  # the foreign tensors' shapes
    our_shape: Shape
    optional: bool = False     # a bias some checkpoints leave out: absent means zeros
    note: str = ""             # why the tensor is expected, said when it is missing


def pair(ours: str, theirs: str, shape: Shape, our_shape: Shape | None = None, optional: bool = False,
         note: str = "") -> Rule:
    """The same numbers under two names; `our_shape` where vlmkit holds them reshaped."""
    return Rule(ours, (theirs,), (shape,), shape if our_shape is None else our_shape, optional, note)


def fused(ours: str, parts: Sequence[tuple[str, Shape]], optional: bool = False) -> Rule:
    """One vlmkit tensor that is the foreign `parts` (key, shape) concatenated along dim 0."""
    keys, shapes = zip(*parts)
    return Rule(ours, keys, shapes, (sum(s[0] for s in shapes), *shapes[0][1:]), optional)


def weight_bias(ours: str, theirs: str | Sequence[str], shape: Shape, optional_bias: bool = False) -> list[Rule]:
    """`.weight` and `.bias` of a Linear, Conv or LayerNorm; several `theirs` fuse into one."""
    if isinstance(theirs, str):
        return [pair(f"{ours}.weight", f"{theirs}.weight", shape),
                pair(f"{ours}.bias", f"{theirs}.bias", shape[:1], optional=optional_bias)]
    return [fused(f"{ours}.weight", [(f"{t}.weight", shape) for t in theirs]),
            fused(f"{ours}.bias", [(f"{t}.bias", shape[:1]) for t in theirs], optional=optional_bias)]


def block_rules(depth: int, theirs: str, names: Mapping[str, str], width: int, mlp_dim: int,
                optional_qkv_bias: bool = False) -> list[Rule]:
    """vlmkit's encoder `Block`s (`blocks.i`) <-> a format's layers `{theirs}.i`, whose parts
    `names` gives for "q", "k", "v", "attn.out", "norm1", "norm2", "mlp.fc1", "mlp.fc2"."""
    D, M = width, mlp_dim
    rules: list[Rule] = []
    for i in range(depth):
        s, d = f"{theirs}.{i}.", f"blocks.{i}."
        rules += weight_bias(d + "attn.qkv", [s + names[n] for n in "qkv"], (D, D), optional_qkv_bias)
        for ours, shape in (("attn.out", (D, D)), ("norm1", (D,)), ("norm2", (D,)), ("mlp.fc1", (M, D)),
                            ("mlp.fc2", (D, M))):
            rules += weight_bias(d + ours, s + names[ours], shape)
    return rules


def prefixed(rules: Iterable[Rule], ours: str = "", theirs: str = "") -> list[Rule]:
    return [replace(r, ours=ours + r.ours, theirs=tuple(theirs + k for k in r.theirs)) for r in rules]


def their_shapes(rules: Iterable[Rule]) -> dict[str, Shape]:
    return {key: shape for r in rules for key, shape in zip(r.theirs, r.shapes)}


def _shape_error(what: str, key: str, got: Sequence[int], want: Sequence[int]) -> ConversionError:
    return ConversionError(f"{what}: {key} has shape {list(got)}, the config expects {list(want)}")


def _listed(keys: list[str]) -> str:
    return f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"


def take(src: MutableMapping[str, Any], key: str, shape: Shape, what: str, note: str = "",
         read: Callable[[str, Any], torch.Tensor] | None = None) -> torch.Tensor:
    """Pop `key` from `src` (through `read`, for lazily stored tensors), checking its shape."""
    if key not in src:
        raise ConversionError(f"{what}: missing tensor {key} (expected shape {list(shape)})"
                              + (f" ({note})" if note else ""))
    tensor = src.pop(key) if read is None else read(key, src.pop(key))
    if tuple(tensor.shape) != shape:
        raise _shape_error(what, key, tensor.shape, shape)
    return tensor


def to_ours(rules: Iterable[Rule], src: MutableMapping[str, Any], what: str,
            read: Callable[[str, Any], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Pop every rule's foreign tensors from `src` -> vlmkit tensors.

    What stays in `src` is the caller's to judge (other towers' tensors, buffers it ignores).
    """
    out = {}
    for r in rules:
        if r.optional and not any(k in src for k in r.theirs):
            out[r.ours] = torch.zeros(r.our_shape)  # a missing bias adds zero: the same function
            continue
        parts = [take(src, k, s, what, r.note, read) for k, s in zip(r.theirs, r.shapes)]
        out[r.ours] = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(r.our_shape)
    return out


def to_theirs(rules: Sequence[Rule], state: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """vlmkit tensors -> foreign ones; `state` must hold exactly the rules' tensors."""
    check(state, {r.ours: r.our_shape for r in rules}, what)
    out = {}
    for r in rules:
        tensor = state[r.ours].detach()
        if len(r.theirs) == 1:
            out[r.theirs[0]] = tensor.reshape(r.shapes[0])
        else:  # cloned: safetensors refuses tensors that share storage
            pieces = tensor.split([s[0] for s in r.shapes])
            out.update((k, piece.clone()) for k, piece in zip(r.theirs, pieces))
    return out


def check(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor | Sequence[int]],
          what: str) -> None:
    """Missing, unexpected or mis-shaped tensors are one error naming keys and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{what}: missing tensors {_listed(missing)}, unexpected tensors {_listed(unexpected)}")
    for key, tensor in state.items():
        want = expected[key]
        want = tuple(want.shape) if isinstance(want, torch.Tensor) else tuple(want)
        if tuple(tensor.shape) != want:
            raise _shape_error(what, key, tensor.shape, want)


def reject_unexpected(keys: Iterable[str], what: str) -> None:
    """Foreign tensors that no rule took are an error naming them."""
    left = sorted(keys)
    if left:
        raise ConversionError(f"unexpected {what} tensors {_listed(left)}: this config has no place for them")
