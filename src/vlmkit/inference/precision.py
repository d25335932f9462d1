"""The precision a model runs inference in: fp32, bf16, or int8 weights, chosen for the device.

"bf16" on hardware that multiplies bf16 natively (a recent GPU, a CPU with AVX512-BF16 or
AMX) runs the whole model in bf16. On a CPU without those instructions it keeps the
language model's linear weights in bf16 (half the bytes to read per decoded token) but
computes in fp32, which is several times faster there than emulated bf16 (see
`models.quant`). "int8" stores those weights as int8: a quarter of fp32's bytes; the rest
runs in bf16 where that is native, else fp32. "auto" is bf16 for a model that decodes text on
any CPU, and wherever bf16 is native, else fp32; the environment variable VLMKIT_PRECISION
(fp32 or bf16) overrides it.
A checkpoint saved with int8 layers stays int8 whatever is asked.
"""
from __future__ import annotations

import logging
import os

import torch

from vlmkit.models.quant import bf16_weights, quantize_int8, quantized_layers
from vlmkit.runtime import native_bf16, resolve_precision

log = logging.getLogger(__name__)


def inference_precision(precision: str, device: torch.device, decodes: bool = True) -> str:
    """The precision "auto" (or a name) means for inference on `device`.

    Training's "auto" (`runtime.resolve_precision`) is bf16 only with native bf16, because
    there bf16 arithmetic is the point. For a model that decodes text on a CPU, bf16 weights
    halve what each token reads, with or without bf16 arithmetic; a model that only encodes
    (`decodes=False`) is bound by arithmetic, so it follows training's rule.
    """
    if precision == "auto" and decodes and device.type == "cpu" and not os.environ.get("VLMKIT_PRECISION"):
        return "bf16"
    return resolve_precision(precision, device)


def for_inference(model: torch.nn.Module, precision: str, device: torch.device | str) -> torch.nn.Module:
    """`model` on `device` in `precision` (see the module docstring), in eval mode."""
    device = torch.device(device)
    decodes = hasattr(model, "language_model") or hasattr(model, "lm_head")
    chosen = inference_precision(precision, device, decodes)
    if quantized_layers(model) and chosen != "int8":
        log.info("this checkpoint holds int8 weights; running it in int8")
        chosen = "int8"
    # The language model only: decoding reads it once per token. The vision tower runs once
    # per image, on many rows at a time, where smaller weights save nothing.
    lm = "language_model" if hasattr(model, "language_model") else ""
    if chosen == "int8" and not quantized_layers(model):
        quantize_int8(model, prefix=lm)
    native = native_bf16(device)
    floats = torch.bfloat16 if chosen in ("bf16", "int8") and native else torch.float32
    model = model.to(device=device, dtype=floats).eval()
    if chosen == "bf16" and not native:   # after the cast, which would turn these weights back to fp32
        bf16_weights(model, prefix=lm)
    return model
