"""Does the shapes VLM find the object a question names? Ask about each object in turn.

    python benchmarks/stage2_where.py        # after stage2_quality.py --tasks shapes

Held-out scenes with two objects (distinct colours and shapes); the trained benchmark model
(`runs/bench/vlm-shapes/model`) is asked the same question about each object, greedily:

  where   "Where is the C S?"    find the object by content, answer with its cell
  colour  "What colour is the S?" find the object by content, answer with an attribute
  shape   "What shape is at the P?" find the object by its place, answer with an attribute

If a model answers a kind alike for both objects, it does not use the object the question
names, whatever its accuracy. Written to docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

import vlmkit  # noqa: E402
from vlmkit.data.sources.shapes import Shapes, render  # noqa: E402

QUESTIONS = {
    "where": (lambda o: f"Where is the {o.colour} {o.shape}?", lambda o: o.position),
    "colour": (lambda o: f"What colour is the {o.shape}?", lambda o: o.colour),
    "shape": (lambda o: f"What shape is at the {o.position}?", lambda o: o.shape),
}


def two_object_scenes(description: str):
    """Parse --model/--scenes; return the loaded model, its path and the first held-out scenes
    with two objects of different colours and shapes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/bench/vlm-shapes/model")
    parser.add_argument("--scenes", type=int, default=300)
    args = parser.parse_args()
    assistant = vlmkit.load(args.model, device="cpu")
    source = Shapes("test", 4 * args.scenes, image_size=assistant.transform.size, min_objects=2, max_objects=2)
    scenes = [s for s in map(source.scene, range(len(source)))
              if s.objects[0].colour != s.objects[1].colour and s.objects[0].shape != s.objects[1].shape]
    return assistant, args.model, scenes[: args.scenes]


def main() -> None:
    assistant, model, scenes = two_object_scenes(__doc__)
    rows = []
    for kind, (ask, truth) in QUESTIONS.items():
        right = both = alike = first = 0
        for scene in scenes:
            image = render(scene)
            answers = [assistant.ask(image, ask(o), max_new_tokens=8) for o in scene.objects]
            hits = [a == truth(o) for a, o in zip(answers, scene.objects)]
            right, both = right + sum(hits), both + all(hits)
            alike += answers[0] == answers[1]
            first += sum(a == truth(scene.objects[0]) for a in answers)
        n = len(scenes)
        rows.append((f"{kind}: {QUESTIONS[kind][0](scenes[0].objects[0])!r}-style, asked about both objects "
                     f"of {n} scenes",
                     f"right {right / (2 * n):.3f}; both right {both / n:.3f}; same answer for both "
                     f"{alike / n:.3f}; answers naming the first object {first / (2 * n):.3f}"))
        print(rows[-1])
    write_section("stage2-where", "Stage 2 diagnostics: does the shapes VLM find the object a question names?", rows,
                  notes=f"Model: `{model}` (trained by `stage2_quality.py --tasks shapes`). Held-out scenes with "
                        "two objects of different colours and shapes; each question is asked about each object, "
                        "greedy. A model that reads the named object answers the two questions differently; "
                        "'same answer for both' near 1 with 'right' near 0.5 means it answers about one of the "
                        "objects whichever is named.")


if __name__ == "__main__":
    main()
