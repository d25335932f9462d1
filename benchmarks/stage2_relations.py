"""Which spatial relations does the shapes VLM get right, and for which layouts?

    python benchmarks/stage2_relations.py     # after stage2_quality.py --tasks shapes

Held-out scenes with two objects (distinct colours and shapes). The trained benchmark model
(`runs/bench/vlm-shapes/model`) is asked all four relations both ways, "Is the A left of the
B?" and so on, greedily, and scored per relation and per layout: same row, same column or
diagonal. A model that reads only the objects' rows answers "left of"/"right of" by whether
they share a row: right on same-row pairs when the answer is yes, wrong when it is no.
Written to docs/RESULTS.md.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402
from stage2_where import two_object_scenes  # noqa: E402

from vlmkit.data.sources.shapes import Obj, render  # noqa: E402

RELATIONS = ("left of", "right of", "above", "below")
LAYOUTS = ("same row", "same column", "diagonal")


def layout_and_truths(a: Obj, b: Obj) -> tuple[str, dict[str, bool]]:
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    layout = "same row" if ra == rb else "same column" if ca == cb else "diagonal"
    return layout, {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}


def main() -> None:
    assistant, model, scenes = two_object_scenes(__doc__)
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
        cells = [f"{layout}, {truth}: {right[rel, layout, truth]}/{asked[rel, layout, truth]}"
                 for layout in LAYOUTS for truth in ("yes", "no") if asked[rel, layout, truth]]
        rows.append((f"'{rel}' (n={n})", f"right {r / n:.3f}; " + "; ".join(cells)))
        print(*rows[-1])
    write_section("stage2-relations", "Stage 2 diagnostics: spatial relations by layout (shapes VLM)", rows,
                  notes=f"Model: `{model}` (trained by `stage2_quality.py --tasks shapes`). {len(scenes)} "
                        "held-out scenes with two objects of different colours and shapes; each relation is asked "
                        "both ways, greedy. Each cell is right answers / questions for one layout and true answer.")


if __name__ == "__main__":
    main()
