"""Where the shapes Stage 2 model falls short: in the eyes or in the brain?

    python -m experiments.stage2_diagnostics --tower DIR [--out runs/experiments]   # from the repository root

Question: are the `shapes` Stage 2 model's wrong answers the tower's fault (its tokens lack the
facts) or the small LM's (it cannot look them up)?
Answer: mostly the LM's: probes read each cell's colour (1.000), grid cell (1.000) and shape (0.878)
off the tower's tokens, while the preset's LM, given the exact caption as text instead of the
image, answered only 0.679 of the questions after 1,200 steps. Recorded run: commit 8411f4f
(first at ebb51b1); figures in docs/experiments.md.

Input: --tower (required), a Stage 1 `shapes` model directory, e.g. from
`vlmkit train clip --preset shapes --out runs/shapes` (then `--tower runs/shapes/model`). The
recorded run read `runs/bench/shapes/model`, the tower the Stage 1 benchmark had trained. The
text half trains its own LM.

Two measurements, each on held-out scenes, written to OUT/stage2_diagnostics.md:

  eyes   probes on the frozen Stage 1 `shapes` tower's patch tokens (the features Stage 2
         reads): can each cell's colour, shape, grid position and box be read off its token?
  brain  the preset's small LM, from scratch, given a perfect text description instead of
         the image ("<caption> Q: <question> A:"): how well does it learn to look the answer
         up, after how many steps? No image is involved, so this bounds what the LM part of
         the recipe learns in a benchmark-sized budget.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.results import write_section
from vlmkit.checkpoint import read_vision_tower
from vlmkit.data.lm_tokenizer import LMTokenizer
from vlmkit.data.sources.shapes import (
    COLOURS,
    SHAPES,
    Shapes,
    caption,
    cell_bounds,
    render,
)
from vlmkit.data.sources.shapes_vqa import scene_questions
from vlmkit.models.decoder import DecoderLM
from vlmkit.models.vit import VisionTransformer
from vlmkit.presets import vlm_preset

SCENE = {"image_size": 48, "max_objects": 3}          # the Stage 2 preset's scenes
LOOKUP_KINDS = ("colour", "shape", "position", "relation", "exists")


def _cells(split: str, n: int, mean, std):
    """Pixels [n, 3, S, S] and per-cell targets: colour, shape (index; len() = empty), box offset."""
    src = Shapes(split, n, **SCENE)
    pixels, colour, shape, box = [], np.full((n, 9), len(COLOURS)), np.full((n, 9), len(SHAPES)), np.zeros((n, 9, 3))
    for i in range(n):
        scene = src.scene(i)
        a = np.asarray(render(scene), dtype=np.float32) / 255
        pixels.append((a - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32))
        for o in scene.objects:
            x0, y0, _, _ = cell_bounds(o.cell, scene.image_size)
            colour[i, o.cell], shape[i, o.cell] = list(COLOURS).index(o.colour), SHAPES.index(o.shape)
            box[i, o.cell] = (o.box[0] - x0, o.box[1] - y0, o.box[2] - o.box[0])   # offset in the cell, side
    return (torch.tensor(np.stack(pixels)).permute(0, 3, 1, 2), torch.tensor(colour), torch.tensor(shape),
            torch.tensor(box, dtype=torch.float32))


def eyes(tower_dir: Path, train: int, test: int) -> list[tuple[str, str, str]]:
    vision_cfg, state, pre = read_vision_tower(tower_dir)
    vit = VisionTransformer(vision_cfg)
    vit.load_state_dict(state)
    vit.eval()
    mean, std = pre.get("mean", (0.5,) * 3), pre.get("std", (0.5,) * 3)
    layer, data = vlm_preset("shapes").model.vision_layer, {}
    for split, n in (("train", train), ("test", test)):
        pixels, colour, shape, box = _cells(split, n, mean, std)
        with torch.no_grad():  # the block the Stage 2 preset reads, class token dropped
            tokens = torch.cat([vit(pixels[i:i + 256], layer=layer)[:, vit.prefix:] for i in range(0, n, 256)])
        cell = torch.arange(9).expand(n, 9)
        data[split] = [t.reshape(-1, *t.shape[2:]) for t in (tokens, colour, shape, box, cell)]
    x, colour, shape, box, cell = data["train"]
    mu, sd = x.mean(0), x.std(0) + 1e-5
    torch.manual_seed(0)
    # A small MLP reads all four targets from one token; linear heads read colour and cell as well.
    probe = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(),
                                torch.nn.Linear(256, len(COLOURS) + 1 + len(SHAPES) + 1 + 9 + 3))
    opt = torch.optim.Adam(probe.parameters(), 2e-3)
    c1, c2, c3 = len(COLOURS) + 1, len(COLOURS) + len(SHAPES) + 2, len(COLOURS) + len(SHAPES) + 11
    for _ in range(20):
        for idx in torch.randperm(len(x)).split(512):
            out, full = probe((x[idx] - mu) / sd), colour[idx] < len(COLOURS)
            loss = (F.cross_entropy(out[:, :c1], colour[idx]) + F.cross_entropy(out[:, c1:c2], shape[idx])
                    + F.cross_entropy(out[:, c2:c3], cell[idx]))
            if full.any():
                loss = loss + F.smooth_l1_loss(out[full, c3:], box[idx][full])
            opt.zero_grad()
            loss.backward()
            opt.step()
    x, colour, shape, box, cell = data["test"]
    with torch.no_grad():
        out = probe((x - mu) / sd)
    full = colour < len(COLOURS)

    def acc(logits, target, rows):
        return f"{(logits[rows].argmax(1) == target[rows]).float().mean().item():.3f}"

    err = (out[full, c3:] - box[full]).abs().mean(0).tolist()
    part = "eyes: probes on the tower's tokens"
    return [
        (part, f"colour of the object in a cell, from its token (n={int(full.sum())} objects)",
         acc(out[:, :c1], colour, full)),
        (part, "shape of the object in a cell, from its token", acc(out[:, c1:c2], shape, full)),
        (part, f"empty or not, from a cell's token (n={len(x)} cells)",
         f"{((out[:, :c1].argmax(1) == len(COLOURS)) == ~full).float().mean().item():.3f}"),
        (part, "grid cell (position) of a token holding an object", acc(out[:, c2:c3], cell, full)),
        *[(part, f"box offset inside the cell, mean abs error, {name} (px of 48)", f"{e:.2f}")
          for name, e in zip(("x", "y", "side"), err)],
    ]


def brain(steps: int, train_scenes: int, test_scenes: int, checkpoints: int = 3) -> list[tuple[str, str, str]]:
    def examples(split, n):
        src, out = Shapes(split, n, **SCENE), []
        for i in range(n):
            scene = src.scene(i)
            for qa in scene_questions(scene, random.Random(f"diagnostics/{split}/{i}"), LOOKUP_KINDS):
                out.append((f"{caption(scene)} Q: {qa.question} A:", f" {qa.answer}", qa.kind))
        return out

    train, test = examples("train", train_scenes), examples("test", test_scenes)
    tok = LMTokenizer.train([p + a for p, a, _ in train], vocab_size=600)
    torch.manual_seed(0)
    preset = vlm_preset("shapes")
    lm = DecoderLM(preset.model.decoder.replace(vocab_size=tok.vocab_size))
    rows = [(tok.encode(p), tok.encode(a) + [tok.eos_id]) for p, a, _ in train]
    tr = preset.instruct.train
    opt = torch.optim.AdamW(lm.parameters(), lr=tr.lr, betas=(0.9, tr.beta2), weight_decay=tr.weight_decay)
    rng, results, started = random.Random(0), [], time.perf_counter()
    marks = {round(steps * (k + 1) / checkpoints) for k in range(checkpoints)}
    for step in range(1, steps + 1):
        lr = tr.lr * min(1.0, step / tr.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = rng.sample(rows, tr.batch_size)
        T = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), T), tok.pad_id)
        labels = torch.full((len(batch), T), -100)
        for r, (p, a) in enumerate(batch):
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
            labels[r, len(p):len(p) + len(a)] = torch.tensor(a)
        logits = lm(ids)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), tr.clip_grad)
        opt.step()
        if step in marks:
            lm.eval()
            right: dict[str, list[bool]] = {}
            with torch.no_grad():
                for p, a, kind in test:   # greedy, up to the end token; answers are a word or two
                    ids = tok.encode(p)
                    start = len(ids)
                    for _ in range(4):
                        ids.append(lm(torch.tensor([ids]), last_only=True)[0, -1].argmax().item())
                        if ids[-1] == tok.eos_id:
                            break
                    right.setdefault(kind, []).append(tok.decode(ids[start:]).strip() == a.strip())
            lm.train()
            total = sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
            part = f"brain: the LM on caption text, after {step} steps x {tr.batch_size}"
            new = [(part, f"text lookup accuracy (n={len(test)})", f"{total:.3f}")]
            new += [(part, f"{k} questions", f"{sum(v) / len(v):.2f}") for k, v in right.items()]
            new.append((part, "wall time (min)", f"{(time.perf_counter() - started) / 60:.1f}"))
            print(*new, sep="\n", flush=True)
            results += new
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", required=True,
                        help="a Stage 1 `shapes` model directory (vlmkit train clip --preset shapes)")
    parser.add_argument("--out", default="runs/experiments", help="folder for stage2_diagnostics.md")
    parser.add_argument("--steps", type=int, default=1200, help="LM training steps for the text lookup test")
    parser.add_argument("--scenes", type=int, default=4000, help="training scenes for the probes")
    args = parser.parse_args()
    if not (Path(args.tower) / "config.json").exists():
        raise SystemExit(f"no Stage 1 model at {args.tower}; train one with "
                         "`vlmkit train clip --preset shapes --out runs/shapes` (then --tower runs/shapes/model)")
    rows = eyes(Path(args.tower), args.scenes, 1000)
    for r in rows:
        print(r, flush=True)
    rows += brain(args.steps, 16000, 300)
    write_section("stage2-diagnostics", "Stage 2 diagnostics: the shapes tower's features, and the small LM on text",
                  rows,
                  columns=("part", "figure", "value"), target=Path(args.out) / "stage2_diagnostics.md",
                  notes="Eyes: probes (one small MLP on each patch token, fit on training scenes, scored on held-out "
                        "ones) on the frozen Stage 1 tower, at the block the Stage 2 preset reads (`vision_layer` "
                        f"{vlm_preset('shapes').model.vision_layer}). Brain: the Stage 2 preset's decoder "
                        "(same size, learning rate, batch) trained from scratch to answer from the caption text "
                        "instead of the image. Answering the shapes questions needs both; when the eyes are near "
                        "perfect and the brain is not, the brain's training budget is the bottleneck.")


if __name__ == "__main__":
    main()
