"""Speed of vlmkit's towers against Hugging Face transformers on the same shapes, side by side.

    python -m benchmarks.speed_towers [--repeats 7]     # from the repository root

Both implementations get the same config and the same inputs; timings alternate between
them (A B A B ...) and the medians are compared as a ratio, because this machine is
shared and noisy. Figures: training steps/s (forward + backward + AdamW) and inference
samples/s, for a ViT (vs `CLIPVisionModel`) and the all-MiniLM-L6-v2 text tower (vs
`BertModel`).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from benchmarks.results import write_section
from vlmkit.config import VisionConfig
from vlmkit.models.text_encoder import TextEncoder
from vlmkit.models.vit import VisionTransformer

VIT = dict(image_size=96, patch_size=16, width=384, depth=6, heads=6, mlp_dim=1536)
BATCH = 64
TEXT_LEN = 32


def _time(fn, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _train_step(model, forward):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = forward()
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _infer(forward):
    def run():
        with torch.no_grad():
            forward()

    return run


def compare(name: str, ours: dict, theirs: dict, repeats: int) -> list[tuple[str, str]]:
    """ours/theirs: {"train": fn, "infer": fn}; returns table rows."""
    rows = []
    for kind, unit in (("train", "steps/s"), ("infer", "samples/s")):
        a, b = [], []
        for _ in range(repeats):  # interleaved so drift in machine load hits both alike
            a.append(_time(ours[kind]))
            b.append(_time(theirs[kind]))
        scale = 1 if kind == "train" else BATCH
        ta, tb = statistics.median(a), statistics.median(b)
        rows += [(f"{name} {kind} {unit}, vlmkit", f"{scale / ta:.2f}"),
                 (f"{name} {kind} {unit}, transformers", f"{scale / tb:.2f}"),
                 (f"{name} {kind} speed ratio vlmkit / transformers", f"{tb / ta:.2f}x")]
    return rows


def vit_models():
    torch.manual_seed(0)
    ours = VisionTransformer(VisionConfig(**VIT, norm_pre=True, patch_bias=False, act="quick_gelu", norm_eps=1e-5))
    hf_cfg = transformers.CLIPVisionConfig(image_size=VIT["image_size"], patch_size=VIT["patch_size"],
                                           hidden_size=VIT["width"], num_hidden_layers=VIT["depth"],
                                           num_attention_heads=VIT["heads"], intermediate_size=VIT["mlp_dim"])
    theirs = transformers.CLIPVisionModel(hf_cfg)
    pixels = torch.randn(BATCH, 3, VIT["image_size"], VIT["image_size"])
    return (
        {"train": _train_step(ours, lambda: ours(pixels)), "infer": _infer(lambda: ours(pixels))},
        {"train": _train_step(theirs, lambda: theirs(pixel_values=pixels).last_hidden_state),
         "infer": _infer(lambda: theirs(pixel_values=pixels).last_hidden_state)},
    )


def text_models():
    from vlmkit.convert.bert import load_bert, minilm_path

    path = minilm_path()
    cfg, state, _ = load_bert(path)
    ours = TextEncoder(cfg)
    ours.load_state_dict(state)
    theirs = transformers.BertModel.from_pretrained(str(path))
    ids = torch.randint(1000, 20000, (BATCH, TEXT_LEN))
    mask = torch.ones_like(ids)
    mask[::2, TEXT_LEN // 2:] = 0  # half the batch padded, as real captions are
    return (
        {"train": _train_step(ours, lambda: ours(ids, mask)), "infer": _infer(lambda: ours(ids, mask))},
        {"train": _train_step(theirs, lambda: theirs(input_ids=ids, attention_mask=mask).last_hidden_state),
         "infer": _infer(lambda: theirs(input_ids=ids, attention_mask=mask).last_hidden_state)},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows = compare(f"ViT {VIT['width']}x{VIT['depth']} @{VIT['image_size']}px/{VIT['patch_size']}, batch {BATCH}",
                   *vit_models(), args.repeats)
    rows += compare(f"MiniLM-L6 text tower, batch {BATCH}x{TEXT_LEN}", *text_models(), args.repeats)
    write_section("speed-towers", "Speed: vlmkit towers vs transformers (same config, same inputs, fp32)", rows,
                  notes=f"transformers {transformers.__version__}, its default attention implementation. "
                        "Ratios above 1 mean vlmkit is faster. Medians of interleaved repeats.")
