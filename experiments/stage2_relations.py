"""Which spatial relations does the shapes VLM get right, and for which layouts?

    python -m experiments.stage2_relations --model DIR [--out runs/experiments]   # from the repository root

Question: which of "left of", "right of", "above" and "below" does the `shapes` VLM answer
right, and for which layouts of the two objects?
Answer: on the 91c87fc benchmark model it answered "left of"/"right of" by whether the objects
share a row ("right of": all 79 same-row pairs whose answer is yes, 2 of the 79 whose answer is
no; 0.612 in all) while "above" and "below" were right 0.998 and 0.997. The preset then got the
`order` kind, which teaches columns; the recorded run, at commit f10c14b on the preset with it,
has "left of" 0.993, "right of" 0.992, "above" 0.985 and "below" 0.822, weakest on same-column
pairs whose answer is no (15 of 69). Figures in docs/experiments.md.

Input: --model (required), a trained `shapes` Stage 2 model directory, e.g. from
`vlmkit train vlm --preset shapes --vision-init runs/shapes/model --out runs/vlm` (then
`--model runs/vlm/model`). The recorded runs read `runs/bench/vlm-shapes/model`, the model
`python -m benchmarks.stage2_quality --tasks shapes` had trained.

Held-out scenes with two objects (distinct colours and shapes). The model is asked all four
relations both ways, "Is the A left of the B?" and so on, greedily, and scored per relation
and per layout: same row, same column or diagonal. A model that reads only the objects' rows
answers "left of"/"right of" by whether they share a row: right on same-row pairs when the
answer is yes, wrong when it is no. Written to OUT/stage2_relations.md.
"""
from __future__ import annotations

from collections import Counter

from benchmarks.results import write_section
from experiments.stage2_where import two_object_scenes
from vlmkit.data.sources.shapes import Obj, render

RELATIONS = ("left of", "right of", "above", "below")
LAYOUTS = ("same row", "same column", "diagonal")


def layout_and_truths(a: Obj, b: Obj) -> tuple[str, dict[str, bool]]:
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    layout = "same row" if ra == rb else "same column" if ca == cb else "diagonal"
    return layout, {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}


def main() -> None:
    assistant, args, scenes, target = two_object_scenes(__doc__, "stage2_relations")
    right, asked = Counter(), Counter()
    for scene in scenes:
        image = render(scene)
        for a, b in (scene.objects, scene.objects[::-1]):
            layout, truths = layout_and_truths(a, b)
            for rel in RELATIONS:
                answer = assistant.ask(image, f"Is the {a.colour} {a.shape} {rel} the {b.colour} {b.shape}?",
                                       max_new_tokens=3)
                key = (rel, layout, "yes" if truths[rel] else "no")
                asked[key] += 1
                right[key] += answer == key[2]
    rows = []
    for rel in RELATIONS:
        n = sum(v for k, v in asked.items() if k[0] == rel)
        r = sum(v for k, v in right.items() if k[0] == rel)
        new = [(f"'{rel}' (n={n})", "right", f"{r / n:.3f}")]
        new += [(f"'{rel}' (n={n})", f"right answers, {layout}, answer {truth} (n={asked[rel, layout, truth]})",
                 f"{right[rel, layout, truth]}")
                for layout in LAYOUTS for truth in ("yes", "no") if asked[rel, layout, truth]]
        print(*new, sep="\n", flush=True)
        rows += new
    write_section("stage2-relations", "Stage 2 diagnostics: spatial relations by layout (shapes VLM)", rows,
                  columns=("relation", "figure", "value"), target=target,
                  notes=f"Model: `{args.model}`. {len(scenes)} held-out scenes with two objects of different colours "
                        "and shapes; each relation is asked both ways, greedy. A layout row counts the right answers "
                        "among the n questions with that layout and true answer.")


if __name__ == "__main__":
    main()
