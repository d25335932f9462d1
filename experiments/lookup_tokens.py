"""Are the Stage 1 tower's patch tokens as easy to look things up in as clean symbolic ones?

    python -m experiments.lookup_tokens --tower DIR [--out runs/experiments]   # from the repository root

Question: can the `shapes` Stage 2 LM look things up among the real Stage 1 tower's patch
tokens as well as among symbolic ones, and does the tower block it reads matter?
Answer: no, the real tokens were harder: after 600 steps "where is the C S?" was right 0.625 of
the time on the last block's tokens against 0.936 on symbolic ones, falling towards 1/n with
n objects (the LM found the objects, not the one asked about); after 2,000 steps the second
block's tokens answered "what shape is the C one?" 0.883 against 0.674 for the last block's.
Recorded run: commit 24a41a6; figures in docs/experiments.md.

Input: --tower (required), a Stage 1 `shapes` model directory, e.g. from
`vlmkit train clip --preset shapes --out runs/shapes` (then `--tower runs/shapes/model`). The
recorded run read `runs/bench/shapes/model`, the tower the Stage 1 benchmark had trained by then
(the `shapes` preset before its hard negatives).

`experiments/lm_lookup.py` shows the small LM can learn "find the red circle, read its cell"
from symbolic image tokens. This test asks the same one-token questions about real `shapes`
scenes (1-3 objects, as Stage 2 sees them) and gives the LM either
- symbolic tokens: learned colour + shape + cell vectors per grid cell, or
- the frozen Stage 1 tower's patch tokens through an MLP projector, one token per grid cell,
  from the last block and from an earlier one (--layers), or
- the least-squares fit of those tokens from their own object's colour x shape and cell, which
  drops everything else they carry.
The decoder is the `shapes` Stage 2 preset's, with init_std 1/sqrt(width) (lm_lookup's better
row). "where" is also scored by the number of objects: chance is 1/n when the LM finds the
objects but not the one asked about. Written to OUT/lookup_tokens.md.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.results import write_section
from experiments.lm_lookup import CELLS, COLOURS, KINDS, SHAPES, LookupModel, optimizer_step
from vlmkit.checkpoint import load_model
from vlmkit.data.images import ImageTransform
from vlmkit.data.sources import shapes as world
from vlmkit.presets import vlm_preset

EMPTY = (COLOURS, SHAPES)


def scenes(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered scenes [n, 3, 48, 48] and their grids [n, 9, 2] of (colour, shape) ids per cell."""
    source = world.Shapes(split, n, image_size=48, max_objects=3)
    transform, colours = ImageTransform(size=48), list(world.COLOURS)
    pixels, grids = [], []
    for i in range(n):
        scene = source.scene(i)
        grid = [EMPTY] * CELLS
        for o in scene.objects:
            grid[o.cell] = (colours.index(o.colour), world.SHAPES.index(o.shape))
        pixels.append(transform(world.render(scene)))
        grids.append(grid)
    return torch.stack(pixels), torch.tensor(grids)


def ask(rng: random.Random, v, grid: list[list[int]]) -> tuple[list[int], int, int]:
    """One question about `grid` (lm_lookup's four kinds): question ids, answer id, kind."""
    objects = {c: tuple(g) for c, g in enumerate(grid) if tuple(g) != EMPTY}
    cell = rng.choice(list(objects))
    colour, shape = objects[cell]
    present = list(objects.values())
    kind = rng.randrange(len(KINDS))
    if kind == 0 and present.count((colour, shape)) == 1:
        question, answer = [v.where, v.colour[colour], v.shape[shape]], v.cell[cell]
    elif kind == 2 and [c for c, _ in present].count(colour) == 1:
        question, answer = [v.what_shape, v.colour[colour]], v.shape[shape]
    elif kind == 3:
        asked = (colour, shape)
        if rng.random() < 0.5:
            answer = v.yes
        else:  # a hard negative: shares the colour or the shape of an object present
            while asked in present:
                asked = (colour, rng.randrange(SHAPES)) if rng.random() < 0.5 else (rng.randrange(COLOURS), shape)
            answer = v.no
        question = [v.exists, v.colour[asked[0]], v.shape[asked[1]]]
    else:
        kind, question, answer = 1, [v.what_colour, v.cell[cell]], v.colour[colour]
    return question + v.filler + [v.answer], answer, kind


class TokenLookup(LookupModel):
    """LookupModel whose image tokens are either symbolic or projected tower tokens."""

    def __init__(self, decoder_cfg, init_std: float, tower_width: int | None):
        super().__init__(decoder_cfg, init_std)
        w = decoder_cfg.width
        self.projector = (torch.nn.Sequential(torch.nn.Linear(tower_width, w), torch.nn.GELU(), torch.nn.Linear(w, w))
                          if tower_width else None)

    def answer_logits(self, grids: torch.Tensor, tokens: torch.Tensor | None, questions: list) -> torch.Tensor:
        if self.projector is not None:
            image = self.projector(tokens)
        else:
            image = self.colour[grids[..., 0]] + self.shape[grids[..., 1]] + self.cell
        T = max(len(q) for q, _, _ in questions)
        ids = torch.tensor([q + [self.vocab.pad] * (T - len(q)) for q, _, _ in questions])
        logits = self.lm(embeds=torch.cat([image, self.lm.embed(ids)], 1))
        at = torch.tensor([CELLS + len(q) - 1 for q, _, _ in questions])
        return logits[torch.arange(len(questions)), at]


def attribute_fit(grids: torch.Tensor, tokens: torch.Tensor, fit: torch.Tensor | None = None):
    """Each token's least-squares fit from its own colour x shape and cell (one-hot); returns (fitted, map).

    The fit keeps what a token says about its own object's colour, shape and cell, and drops
    the rest (size, where in the cell, the other objects, anything non-linear).
    """
    occupied = grids[..., 0] != COLOURS
    combo = (grids[..., 0].clamp(max=COLOURS - 1) * SHAPES + grids[..., 1].clamp(max=SHAPES - 1)).unsqueeze(-1)
    a = torch.zeros(*grids.shape[:2], COLOURS * SHAPES + CELLS + 1)
    a.scatter_(2, combo, occupied.unsqueeze(-1).float())
    a[:, torch.arange(CELLS), COLOURS * SHAPES + torch.arange(CELLS)] = 1.0
    a[..., -1] = 1.0
    if fit is None:
        x, y = a.reshape(-1, a.shape[-1]).double(), tokens.reshape(-1, tokens.shape[-1]).double()
        fit = torch.linalg.solve(x.T @ x + 1e-3 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y).float()
    return a @ fit, fit


def run(data: dict, tokens: str | int | None, steps: int) -> tuple[list[float], list[float], float]:
    """Accuracy per kind, "where" accuracy for 1/2/3 objects, minutes.

    `tokens`: None (symbolic), "fit" or a tower block (a key of `data`).
    """
    preset = vlm_preset("shapes")
    decoder, tr = preset.model.decoder, preset.instruct.train.replace(steps=steps)
    torch.manual_seed(0)
    model = TokenLookup(decoder, decoder.width ** -0.5, data["train"][tokens].shape[-1] if tokens else None)
    step = optimizer_step(model, tr)
    rng = random.Random(0)
    train_grids, train_tokens = data["train"]["grids"], data["train"].get(tokens)
    test_grids, test_tokens = data["test"]["grids"], data["test"].get(tokens)
    test = [ask(random.Random(f"lookup-tokens/{i}"), model.vocab, g) for i, g in enumerate(test_grids.tolist())]
    started = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(train_grids), (tr.batch_size,))
        questions = [ask(rng, model.vocab, train_grids[i].tolist()) for i in idx.tolist()]
        logits = model.answer_logits(train_grids[idx], None if train_tokens is None else train_tokens[idx], questions)
        step(F.cross_entropy(logits, torch.tensor([a for _, a, _ in questions])))
    with torch.no_grad():
        logits = model.answer_logits(test_grids, test_tokens, test)
    right = logits.argmax(-1) == torch.tensor([a for _, a, _ in test])
    kinds = torch.tensor([k for _, _, k in test])
    n_objects = (test_grids[..., 0] != COLOURS).sum(1)
    per_kind = [right[kinds == k].float().mean().item() for k in range(len(KINDS))]
    where_by_n = [right[(kinds == 0) & (n_objects == n)].float().mean().item() for n in (1, 2, 3)]
    return per_kind, where_by_n, (time.perf_counter() - started) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", required=True,
                        help="a Stage 1 `shapes` model directory (vlmkit train clip --preset shapes)")
    parser.add_argument("--steps", type=int, nargs="+", default=[600, 2000], help="budgets for the tower tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1, -3],
                        help="tower blocks to read, as model.vision_layer; the first also gets the fit row")
    parser.add_argument("--out", default="runs/experiments", help="folder for lookup_tokens.md")
    args = parser.parse_args()
    if not (Path(args.tower) / "config.json").exists():
        raise SystemExit(f"no Stage 1 model at {args.tower}; train one with "
                         "`vlmkit train clip --preset shapes --out runs/shapes` (then --tower runs/shapes/model)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    vlm = vlm_preset("shapes")
    tower = load_model(args.tower).vision
    blocks = len(tower.blocks)
    data, fit = {}, None
    for split, n in (("train", 16000), ("test", 2000)):
        pixels, grids = scenes(split, n)
        data[split] = {"grids": grids}
        with torch.no_grad():   # patch tokens only, as Stage 2 reads them
            for layer in args.layers:
                data[split][layer] = torch.cat([tower(p, layer=layer)[:, tower.prefix:] for p in pixels.split(500)])
        data[split]["fit"], fit = attribute_fit(grids, data[split][args.layers[0]], fit)  # fit on training scenes
    labels = {None: "symbolic tokens", "fit": f"block {range(blocks)[args.layers[0]] + 1} tokens' fit from own "
                                             "colour x shape and cell"}
    for layer in args.layers:
        preset = " (vision_layer the preset reads)" if layer == vlm.model.vision_layer else ""
        labels[layer] = f"Stage 1 tower tokens, block {range(blocks)[layer] + 1} of {blocks}{preset}"
    rows = []
    short = min(args.steps)
    for tokens, steps in [(None, short), ("fit", short)] + [(layer, s) for layer in args.layers for s in args.steps]:
        per_kind, where_by_n, minutes = run(data, tokens, steps)
        setting = f"{labels[tokens]}, {steps} steps x {vlm.instruct.train.batch_size}"
        new = [(setting, k, f"{a:.3f}") for k, a in zip(KINDS, per_kind)]
        new += [(setting, f"where, with {n} object{'s' if n > 1 else ''}", f"{a:.3f}")
                for n, a in zip((1, 2, 3), where_by_n)]
        new.append((setting, "wall time (min)", f"{minutes:.1f}"))
        print(*new, sep="\n", flush=True)
        rows += new
    write_section("lookup-tokens", "Stage 2 diagnostics: lookups in real tower tokens vs symbolic ones", rows,
                  columns=("image tokens", "figure", "value"), target=Path(args.out) / "lookup_tokens.md",
                  notes="Same held-out shapes scenes (2,000; 1-3 objects), same questions and decoder (the `shapes` "
                        "Stage 2 preset's, init_std 1/sqrt(width)); only the image tokens differ. "
                        f"Tower: `{args.tower}`, frozen; block k is `model.vision_layer` k - 1 (0-based). The fit "
                        "row replaces each tower token by its least-squares fit from its own object's colour x shape "
                        "and its cell (fit on the training scenes): what is left out is size, the place inside the "
                        "cell, the other objects and anything non-linear. 'where' at 1/n with n objects means "
                        "the LM finds the objects but not the one asked about.")


if __name__ == "__main__":
    main()
