"""Do batched answers equal one-at-a-time answers in every precision? Only where the kernels are batch invariant.

    python -m experiments.batch_invariance [--requests 16] [--out runs/experiments]   # from the repository root

Question: `vlmkit serve` answered every request of the serving benchmark exactly as alone
with llava-smol at fp32, but 30-31 of 32 under continuous batching at its default precision
(bf16 weights on a CPU). Is that continuous batching, or batching at all?
Method: llava-smol (benchmarks/speed.py's build) answers the serving benchmark's requests
(mixed max_tokens, greedy) three ways, in each precision: one at a time; all in one static
batch (`generate_batch`, left padded); and through `ContinuousChat`, two requests joining
every third step. Counted: answers equal to the one-at-a-time answer. Written to
OUT/batch_invariance.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import vlmkit
from benchmarks.serving import MAX_TOKENS_MIX, make_requests
from vlmkit.data.lm_tokenizer import IMAGE_TOKEN
from vlmkit.inference.assistant import Request
from vlmkit.inference.continuous import ContinuousChat


def continuous(assistant, requests: list[Request]) -> list[str]:
    chat, texts, waiting, step = ContinuousChat(assistant, 16), [""] * len(requests), list(range(len(requests))), 0
    while waiting or len(chat):
        deltas = []
        if step % 3 == 0:
            for key in waiting[:2]:
                deltas += chat.add(key, requests[key])
            del waiting[:2]
        for d in deltas + chat.step():
            texts[d.index] += d.text
        step += 1
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--out", default="runs/experiments")
    args = parser.parse_args()
    from benchmarks.speed import build_llava_smol

    out = Path(args.out)
    model_dir = out / "llava-smol" / "vlmkit-llava-smol"
    if not (model_dir / "config.json").exists():
        build_llava_smol(out / "llava-smol")
    requests = [Request([{"role": "user", "content": IMAGE_TOKEN + "\n" + r.question}], [r.image],
                        max_new_tokens=r.max_tokens) for r in make_requests(args.requests, MAX_TOKENS_MIX)]
    rows = ["| precision | static batch equal to alone | continuous equal to alone |", "|---|---|---|"]
    for precision in ("fp32", "auto"):
        assistant = vlmkit.load(model_dir, device="cpu", precision=precision)
        alone = [assistant.generate_batch([r])[0] for r in requests]
        static = assistant.generate_batch(requests)
        joined = continuous(assistant, requests)
        rows.append(f"| {precision} | {sum(a == b for a, b in zip(static, alone))} of {len(requests)} | "
                    f"{sum(a == b for a, b in zip(joined, alone))} of {len(requests)} |")
        print(rows[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_invariance.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
