"""Where a decode step's time goes: vlmkit's SmolLM2-135M (llava-smol's language model), by precision.

    python -m benchmarks.speed_profile       # from the repository root

One decoded token at 260 cached positions (one image and a short question), batch 1 and
8, in each inference precision. torch.profiler splits each step into the weight matrix
products (reading the weights: what int8 and bf16 shrink), attention over the cache, and
everything else (norms, rotary embeddings, residuals, casts, and the Python between them).
The bytes of linear weights read per step over the time of those products gives the speed
at which the kernels read weights, to set against the machine's read speed (the `speed`
section's roofline rows). The context rows decode one token at 128 and at 2048 cached
positions and set the cost's growth beside the growth of the bytes a step reads (weights plus
keys and values): the floor of 1.3x at 2048 is within reach only where the bytes allow it.
"""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.results import write_section
from vlmkit.convert.gguf import read_gguf, smollm2_path
from vlmkit.inference.precision import for_inference
from vlmkit.models.decoder import DecoderLM, KVCache
from vlmkit.models.quant import Bf16Linear, Int8Linear

CACHED = 260
WEIGHT_PRODUCTS = {"aten::mm", "aten::addmm", "aten::_weight_int8pack_mm"}
ATTENTION = {"aten::bmm", "aten::_softmax", "aten::_scaled_dot_product_flash_attention_for_cpu"}


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of linear-layer weights one decode step reads (the embedding is looked up, not read)."""
    total = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, Bf16Linear, Int8Linear)):
            total += m.weight.numel() * m.weight.element_size()
    return total


def step_profile(lm: DecoderLM, batch: int, cached: int = CACHED) -> dict[str, float]:
    cache = KVCache(lm.cfg, batch, cached + 8, "cpu", lm.embed.weight.dtype)
    token = torch.full((batch, 1), 42)
    position = torch.full((batch, 1), cached)
    with torch.inference_mode():
        lm(torch.randint(100, 40000, (batch, cached)), cache=cache, last_only=True)

        def step():
            lm(token, positions=position, cache=cache)
            cache.length -= 1   # decode the same position again: every step sees `cached` keys

        for _ in range(3):
            step()
        started = time.perf_counter()
        for _ in range(20):
            step()
        wall = (time.perf_counter() - started) / 20
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 5 / 1e6
    products = sum(e.self_cpu_time_total for e in events if e.key in WEIGHT_PRODUCTS) / 5 / 1e6
    attention = sum(e.self_cpu_time_total for e in events if e.key in ATTENTION) / 5 / 1e6
    kv_bytes = 2 * cache.k[:, :, :, : cached + 1].numel() * cache.k.element_size()   # keys and values read
    return {"wall": wall, "total": total, "products": products, "attention": attention, "kv_bytes": kv_bytes}


def main() -> None:
    cfg = read_gguf(smollm2_path(), max_positions=4096)[0]
    rows = []
    for precision in ("fp32", "bf16", "int8"):
        torch.manual_seed(0)
        lm = for_inference(DecoderLM(cfg), precision, "cpu")
        size = linear_bytes(lm)
        for batch in (1, 8):
            p = step_profile(lm, batch)
            where = f"{precision}, batch {batch}"
            rest = p["total"] - p["products"] - p["attention"]
            rows += [
                (where, "decode step, ms (wall, mean of 20)", f"{p['wall'] * 1000:.1f}"),
                (where, "weight matrix products, ms (share of profiled time)",
                 f"{p['products'] * 1000:.1f} ({p['products'] / p['total']:.0%})"),
                (where, "attention over the cache, ms (share)",
                 f"{p['attention'] * 1000:.1f} ({p['attention'] / p['total']:.0%})"),
                (where, "everything else: norms, rotary, residuals, casts, Python, ms (share)",
                 f"{rest * 1000:.1f} ({rest / p['total']:.0%})"),
                (where, "weights read per step, MB / read speed during the products, GB/s",
                 f"{size / 1e6:.0f} / {size / p['products'] / 1e9:.1f}"),
            ]
        # Against context: a token at 2048 cached positions reads the weights and 16x the keys
        # and values of one at 128. If decoding is bound by bytes read, its cost grows as they do.
        short, long = step_profile(lm, 1, 128), step_profile(lm, 1, 2048)
        where = f"{precision}, batch 1, context"
        bound = (size + long["kv_bytes"]) / (size + short["kv_bytes"])
        rows += [
            (where, "decode step at 128 / 2048 cached positions, ms (wall)",
             f"{short['wall'] * 1000:.1f} / {long['wall'] * 1000:.1f}"),
            (where, "cost at 2048 / cost at 128", f"{long['wall'] / short['wall']:.2f}x"),
            (where, "keys and values read per step at 128 / 2048, MB",
             f"{short['kv_bytes'] / 1e6:.1f} / {long['kv_bytes'] / 1e6:.1f}"),
            (where, "bytes read at 2048 / at 128 (the ratio if bound by reading)", f"{bound:.2f}x"),
            (where, "attention over the cache at 2048, ms (share)",
             f"{long['attention'] * 1000:.1f} ({long['attention'] / long['total']:.0%})"),
        ]
    write_section("speed-profile", "Speed profile: where a vlmkit decode step's time goes", rows,
                  notes="SmolLM2-135M shape (30 layers, width 576), 260 cached positions, random weights "
                        "(time does not depend on their values); the context rows decode at 128 and 2048. Shares are of "
                        "the profiler's time; the wall "
                        "time is measured without the profiler. On a CPU without native bf16, bf16 and int8 "
                        "keep activations in fp32 and only store the weights smaller.",
                  columns=("precision and batch", "figure", "value"))


if __name__ == "__main__":
    main()
