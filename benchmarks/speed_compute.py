"""Where compute-bound time goes: image encoding, prefill and the Stage 1 step, vlmkit beside transformers.

    python -m benchmarks.speed_compute       # from the repository root, about 10 minutes

The `speed` section's floors ask 1.25x (encode, Stage 1 step) and 1.5x (prefill) against
transformers. These three workloads are matrix products above all, so torch.profiler splits
each side's time into the matrix kernels (matrix multiplies, attention, the patch
convolution, forward and backward) and everything else, and names the costliest other
operators. The ceiling row is the speed-up vlmkit would reach if everything but its matrix
kernels took no time at all: the peer's whole time over vlmkit's matrix-kernel time. Below a
floor, it says no rewrite of the Python around the kernels can reach that floor with these
kernels; only faster matrix arithmetic can (bf16 or int8 matrix units, which this CPU lacks).

Profiles alternate between the sides over ROUNDS rounds, and each side's median round is
reported: profiling one side after the other let the machine's drift (~15%) into the figures.
"""
from __future__ import annotations

import platform
import statistics

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from benchmarks.results import write_section
from benchmarks.speed import _towers, stage1_step

ROUNDS = 3
MATRIX = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int8pack_mm",
          "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
          "aten::mkldnn_convolution", "aten::convolution_backward"}


def _prefill_pair():
    """SmolLM2-135M (its real weights) in vlmkit and in transformers, and one prompt of 228 tokens:
    the llava-smol prompt's length (196 image tokens and 32 of text)."""
    from vlmkit.convert.gguf import read_gguf, smollm2_path
    from vlmkit.convert.hf_llama import decoder_config_to_hf, decoder_state_to_hf
    from vlmkit.models.decoder import DecoderLM

    cfg, state, _ = read_gguf(smollm2_path(), max_positions=4096)
    ours = DecoderLM(cfg).eval()
    ours.load_state_dict(state, strict=False)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**decoder_config_to_hf(cfg))).eval()
    theirs.load_state_dict(decoder_state_to_hf(state, cfg), strict=False)
    theirs.tie_weights()
    ids = torch.randint(100, 40000, (1, 228))
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids)[:, -1], theirs(input_ids=ids).logits[:, -1], atol=1e-3, rtol=1e-3)
    return lambda: ours(ids, last_only=True), lambda: theirs(input_ids=ids, logits_to_keep=1)


def _encode_pair():
    ours, theirs = _towers("siglip")
    pixels = torch.randn(8, 3, 224, 224)
    return lambda: ours(pixels), lambda: theirs(pixel_values=pixels)


WORKLOADS = {
    "image encoding, SigLIP-B/16 at 224 px, batch 8": (_encode_pair, True, 2),
    "prefill, SmolLM2-135M, 228 tokens, batch 1": (_prefill_pair, True, 6),
    "Stage 1 training step, CLIP ViT-B/32 shape, batch 32": (
        lambda: (stage1_step("vlmkit", "fp32"), stage1_step("transformers", "fp32")), False, 1),
}


def profiled(fn, iterations: int, inference: bool) -> dict:
    """ms per iteration: all operators' own time, the matrix kernels', and the costliest others."""
    context = torch.inference_mode if inference else torch.enable_grad
    with context():
        fn()   # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iterations):
                fn()
    events = prof.key_averages()
    per = 1000 / iterations / 1e6
    total = sum(e.self_cpu_time_total for e in events) * per
    matrix = sum(e.self_cpu_time_total for e in events if e.key in MATRIX) * per
    others = sorted((e for e in events if e.key not in MATRIX), key=lambda e: -e.self_cpu_time_total)[:3]
    return {"total": total, "matrix": matrix,
            "others": ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total * per:.0f}" for e in others)}


def median_round(rounds: list[dict]) -> dict:
    middle = statistics.median(r["total"] for r in rounds)
    return next(r for r in rounds if r["total"] == middle)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for title, (build, inference, iterations) in WORKLOADS.items():
        ours_fn, theirs_fn = build()
        rounds: dict[str, list[dict]] = {"vlmkit": [], "transformers": []}
        for r in range(ROUNDS):
            order = ("vlmkit", "transformers") if r % 2 == 0 else ("transformers", "vlmkit")
            for side in order:
                rounds[side].append(profiled(ours_fn if side == "vlmkit" else theirs_fn, iterations, inference))
        ours, theirs = median_round(rounds["vlmkit"]), median_round(rounds["transformers"])
        for side, p in (("vlmkit", ours), ("transformers", theirs)):
            rows += [
                (title, f"{side}: profiled ms per iteration (median of {ROUNDS} rounds)", f"{p['total']:.0f}"),
                (title, f"{side}: matrix kernels, ms (share)", f"{p['matrix']:.0f} ({p['matrix'] / p['total']:.0%})"),
                (title, f"{side}: costliest other operators, ms", p["others"]),
            ]
        rows += [
            (title, "profiled ratio vlmkit / transformers (speed)", f"{theirs['total'] / ours['total']:.2f}x"),
            (title, "ceiling: transformers' time / vlmkit's matrix-kernel time",
             f"{theirs['total'] / ours['matrix']:.2f}x"),
        ]
    write_section("speed-compute", "Speed: where compute-bound time goes, vlmkit and transformers (fp32)", rows,
                  notes=f"transformers {transformers.__version__}, {platform.machine()}. fp32 on both sides: this "
                        "CPU has no bf16 matrix units, where bf16 runs emulated and slower. A ceiling below a "
                        "floor means the floor needs faster matrix arithmetic, not less overhead: both sides "
                        "already spend most of their time in the same oneDNN/MKL kernels.",
                  columns=("workload", "figure", "value"))


if __name__ == "__main__":
    main()
