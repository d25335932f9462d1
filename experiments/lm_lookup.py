"""Can the Stage 2 preset's small LM learn to look things up among image tokens? It depends on its init.

    python -m experiments.lm_lookup [--out runs/experiments]     # from the repository root

Question: can the `shapes` Stage 2 preset's decoder, trained from scratch, learn lookups among
image tokens ("find the red circle, read its cell"), and does its init scale matter?
Answer: yes, given a larger init: after 1,000 steps it answered "where is the C S?" right 0.880
of the time with init_std 1/sqrt(width) against 0.344 with Llama's 0.02, so the preset starts
its LM at 1/sqrt(width). Recorded run: commit 8411f4f (an earlier one at bcc93bf agreed);
figures in docs/experiments.md.

Input: none. The scenes are symbolic and the LM trains from scratch here; only the preset's
decoder settings are read from `vlmkit.presets`.

Most shapes questions need a lookup: find the image token that is "the red circle", then
read its position (or, for "what colour is at the top?", find a token by position and read
its colour). This test keeps only that: no pixels, no ViT. A scene is 9 "image tokens", one
per grid cell, each the sum of learned colour, shape and cell vectors (a ViT token carries
those three things), followed by a question; the LM answers with one token.

The decoder is the `shapes` Stage 2 preset's (width, depth, heads; learning rate, batch and
schedule as its trainer uses them), trained from scratch once with Llama's init_std of 0.02
and once with 1/sqrt(width); the image vectors start at the same scale. Scores are
exact-match accuracy on 2,000 held-out scenes. Written to OUT/lm_lookup.md.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.results import write_section
from vlmkit.models.decoder import DecoderLM
from vlmkit.presets import vlm_preset
from vlmkit.training.trainer import lr_lambda, param_groups

COLOURS, SHAPES, CELLS, OBJECTS = 6, 5, 9, 3
KINDS = ("where is the C S? (cell)", "what colour is at P?", "what shape is the C one?", "is there a C S? (yes/no)")


class Vocab:
    """Token ids: question words, then the answers (colour, shape and cell words, yes, no)."""

    def __init__(self):
        self.size = 0
        self.colour, self.shape, self.cell = self._take(COLOURS), self._take(SHAPES), self._take(CELLS)
        self.yes, self.no, self.where, self.what_colour, self.what_shape, self.exists, self.answer, self.pad = \
            self._take(8)
        self.filler = self._take(4)   # stands for the chat template between the question and the answer

    def _take(self, n: int) -> list[int]:
        ids = list(range(self.size, self.size + n))
        self.size += n
        return ids


def sample(rng: random.Random, v: Vocab) -> tuple[list[tuple[int, int]], list[int], int, int]:
    """(colour, shape) per cell (COLOURS, SHAPES = empty), question ids, answer id, kind."""
    cells = rng.sample(range(CELLS), OBJECTS)
    objects = {c: (rng.randrange(COLOURS), rng.randrange(SHAPES)) for c in cells}
    grid = [objects.get(c, (COLOURS, SHAPES)) for c in range(CELLS)]
    cell = rng.choice(cells)
    colour, shape = objects[cell]
    kind = rng.randrange(len(KINDS))
    if kind == 0 and list(objects.values()).count((colour, shape)) == 1:
        question, answer = [v.where, v.colour[colour], v.shape[shape]], v.cell[cell]
    elif kind == 2 and [c for c, _ in objects.values()].count(colour) == 1:
        question, answer = [v.what_shape, v.colour[colour]], v.shape[shape]
    elif kind == 3:
        if rng.random() < 0.5:
            question, answer = [v.exists, v.colour[colour], v.shape[shape]], v.yes
        else:  # a hard negative: shares the colour or the shape of an object present
            asked = (colour, shape)
            while asked in objects.values():
                asked = (colour, rng.randrange(SHAPES)) if rng.random() < 0.5 else (rng.randrange(COLOURS), shape)
            question, answer = [v.exists, v.colour[asked[0]], v.shape[asked[1]]], v.no
    else:
        kind, question, answer = 1, [v.what_colour, v.cell[cell]], v.colour[colour]
    return grid, question + v.filler + [v.answer], answer, kind


class LookupModel(torch.nn.Module):
    def __init__(self, decoder_cfg, init_std: float):
        super().__init__()
        self.vocab = Vocab()
        self.lm = DecoderLM(decoder_cfg.replace(vocab_size=self.vocab.size, init_std=init_std))
        width = decoder_cfg.width
        self.colour = torch.nn.Parameter(torch.randn(COLOURS + 1, width) * init_std)
        self.shape = torch.nn.Parameter(torch.randn(SHAPES + 1, width) * init_std)
        self.cell = torch.nn.Parameter(torch.randn(CELLS, width) * init_std)

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at each answer position, answers, kinds."""
        grids = torch.tensor([g for g, _, _, _ in batch])                 # [B, 9, 2]
        T = max(len(q) for _, q, _, _ in batch)
        questions = torch.tensor([q + [self.vocab.pad] * (T - len(q)) for _, q, _, _ in batch])
        image = self.colour[grids[..., 0]] + self.shape[grids[..., 1]] + self.cell
        logits = self.lm(embeds=torch.cat([image, self.lm.embed(questions)], 1))
        at = torch.tensor([CELLS + len(q) - 1 for _, q, _, _ in batch])
        return (logits[torch.arange(len(batch)), at], torch.tensor([a for _, _, a, _ in batch]),
                torch.tensor([k for _, _, _, k in batch]))


def optimizer_step(model: torch.nn.Module, tr) -> Callable[[torch.Tensor], None]:
    """step(loss) as the Stage 2 trainer takes it: its parameter groups, AdamW, schedule and clipping."""
    opt = torch.optim.AdamW(param_groups(model, tr.weight_decay), lr=tr.lr, betas=(0.9, tr.beta2))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tr))

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr.clip_grad)
        opt.step()
        schedule.step()
    return step


def run(init_std: float, steps: int, test_size: int = 2000) -> tuple[list[float], float]:
    preset = vlm_preset("shapes")
    tr = preset.instruct.train.replace(steps=steps)
    torch.manual_seed(0)
    model = LookupModel(preset.model.decoder, init_std)
    step = optimizer_step(model, tr)
    rng = random.Random(0)
    test = [sample(random.Random(f"lookup-test/{i}"), model.vocab) for i in range(test_size)]
    started = time.perf_counter()
    for _ in range(steps):
        logits, answers, _ = model([sample(rng, model.vocab) for _ in range(tr.batch_size)])
        step(F.cross_entropy(logits, answers))
    with torch.no_grad():
        logits, answers, kinds = model(test)
    right = logits.argmax(-1) == answers
    return [right[kinds == k].float().mean().item() for k in range(len(KINDS))], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default="runs/experiments", help="folder for lm_lookup.md")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    preset = vlm_preset("shapes")
    decoder = preset.model.decoder
    rows = []
    for std, label in ((0.02, "0.02 (Llama's)"), (decoder.width ** -0.5, f"1/sqrt({decoder.width})")):
        accs, seconds = run(std, args.steps)
        label += " (the preset's)" if math.isclose(std, decoder.init_std, rel_tol=0.02) else ""
        setting = f"init_std {label}, {args.steps} steps x {preset.instruct.train.batch_size}"
        rows += [(setting, k, f"{a:.3f}") for k, a in zip(KINDS, accs)]
        rows.append((setting, "wall time (min)", f"{seconds / 60:.1f}"))
        print(*rows[-len(KINDS) - 1:], sep="\n", flush=True)
    write_section("lm-lookup", "Stage 2 diagnostics: can the small LM learn lookups? (init scale)", rows,
                  columns=("setting", "figure", "value"), target=Path(args.out) / "lm_lookup.md",
                  notes="Symbolic scenes: 9 image tokens (learned colour + shape + cell vectors, 3 objects), then "
                        "a question; the `shapes` Stage 2 preset's decoder (its width, depth, heads, learning "
                        "rate and batch) learns from scratch to answer with one token. Chance is about 1/3 for "
                        "'where' and 'what shape' (one of the 3 objects), 1/2 for yes/no. Only init_std differs "
                        "between the rows.")


if __name__ == "__main__":
    main()
