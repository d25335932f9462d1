"""Does `torch.compile` make vlmkit's decode step faster on a CPU? Not on the 2-core AVX2 machine.

    python -m experiments.decode_compile [--out runs/experiments] [--precision fp32]   # from the repository root

Question: would compiling the decode step (fusing the norms, rotary embeddings, residuals
and casts that take a large share of a step; see the `speed-profile` section of
docs/RESULTS.md) pay for itself?
Answer: see docs/experiments.md: the recorded run gives the compile time and the step time
eager against compiled.

Input: none. SmolLM2-135M's shape (the config read from the packaged GGUF file), random
weights, 260 cached positions, batch 1. The cache grows by one position per step, so the
compiled graph is asked for dynamic shapes (otherwise it would recompile every token).
Written to OUT/decode_compile.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.results import write_section
from vlmkit.convert.gguf import read_gguf, smollm2_path
from vlmkit.inference.precision import for_inference
from vlmkit.models.decoder import DecoderLM, KVCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/experiments")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"])
    args = parser.parse_args()
    cfg = read_gguf(smollm2_path(), max_positions=4096)[0]
    torch.manual_seed(0)
    lm = for_inference(DecoderLM(cfg), args.precision, "cpu")
    compiled = torch.compile(lm, dynamic=True)
    cache = KVCache(cfg, 1, 300, "cpu", lm.embed.weight.dtype)
    token, position = torch.tensor([[42]]), torch.tensor([[260]])
    rows = []
    with torch.inference_mode():
        lm(torch.randint(100, 40000, (1, 260)), cache=cache, last_only=True)

        def step(model):
            model(token, positions=position, cache=cache)
            cache.length -= 1

        started = time.perf_counter()
        step(compiled)
        rows.append(("first call of the compiled step (compiling), s", f"{time.perf_counter() - started:.0f}"))
        times = {"eager": [], "compiled": []}
        for model in (lm, compiled):
            for _ in range(3):
                step(model)
        for _ in range(5):   # interleaved
            for name, model in (("eager", lm), ("compiled", compiled)):
                started = time.perf_counter()
                for _ in range(5):
                    step(model)
                times[name].append((time.perf_counter() - started) / 5)
    for name, t in times.items():
        rows.append((f"decode step, {name}, ms (median of 5 x 5 steps)", f"{sorted(t)[2] * 1000:.1f}"))
    rows = [(f"{args.precision}, batch 1, 260 cached", *row) for row in rows]
    write_section("decode-compile", "Inference: does torch.compile speed up the decode step?", rows,
                  columns=("setting", "figure", "value"), target=Path(args.out) / "decode_compile.md",
                  notes="SmolLM2-135M shape, random weights; torch.compile(model, dynamic=True), inductor's "
                        "default mode, on the CPU.")


if __name__ == "__main__":
    main()
