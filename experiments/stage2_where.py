"""Does the shapes VLM find the object a question names? Ask about each object in turn.

    python -m experiments.stage2_where --model DIR [--out runs/experiments]   # from the repository root

Question: when asked about each of two objects in a scene, does the `shapes` VLM answer about
the object the question names, or about one of them whichever is named?
Answer: at first it did not: at 8de11da it gave the same place for both objects in 0.933 of
scenes (right 0.507, chance); with one rotary position per image (`model.image_positions=shared`)
at e48bcb9, in 0.100 (right 0.937). The recorded run, at commit f10c14b on the preset with the
`order` kind, has "where" right 1.000, "what colour" 0.992 and "what shape is at P?" 0.947, the
weakest. Figures in docs/experiments.md.

Input: --model (required), a trained `shapes` Stage 2 model directory, e.g. from
`vlmkit train vlm --preset shapes --vision-init runs/shapes/model --out runs/vlm` (then
`--model runs/vlm/model`). The recorded runs read `runs/bench/vlm-shapes/model`, the model
`python -m benchmarks.stage2_quality --tasks shapes` had trained.

Held-out scenes with two objects (distinct colours and shapes); the model is asked the same
question about each object, greedily:

  where   "Where is the C S?"    find the object by content, answer with its cell
  colour  "What colour is the S?" find the object by content, answer with an attribute
  shape   "What shape is at the P?" find the object by its place, answer with an attribute

If a model answers a kind alike for both objects, it does not use the object the question
names, whatever its accuracy. Written to OUT/stage2_where.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import vlmkit
from benchmarks.results import write_section
from vlmkit.data.sources.shapes import Shapes, render

QUESTIONS = {
    "where": (lambda o: f"Where is the {o.colour} {o.shape}?", lambda o: o.position),
    "colour": (lambda o: f"What colour is the {o.shape}?", lambda o: o.colour),
    "shape": (lambda o: f"What shape is at the {o.position}?", lambda o: o.shape),
}


def two_object_scenes(description: str, name: str):
    """Parse --model/--scenes/--out; return the loaded model, the parsed arguments, the first held-out
    scenes with two objects of different colours and shapes, and the file to write (OUT/NAME.md)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a trained `shapes` Stage 2 model directory (vlmkit train vlm --preset shapes)")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--out", default="runs/experiments", help=f"folder for {name}.md")
    args = parser.parse_args()
    assistant = vlmkit.load(args.model, device="cpu")
    source = Shapes("test", 4 * args.scenes, image_size=assistant.transform.size, min_objects=2, max_objects=2)
    scenes = [s for s in map(source.scene, range(len(source)))
              if s.objects[0].colour != s.objects[1].colour and s.objects[0].shape != s.objects[1].shape]
    return assistant, args, scenes[: args.scenes], Path(args.out) / f"{name}.md"


def main() -> None:
    assistant, args, scenes, target = two_object_scenes(__doc__, "stage2_where")
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
        question = f"{kind}: {QUESTIONS[kind][0](scenes[0].objects[0])!r}-style, asked about both objects of {n} scenes"
        new = [(question, "right", f"{right / (2 * n):.3f}"),
               (question, "both right", f"{both / n:.3f}"),
               (question, "same answer for both", f"{alike / n:.3f}"),
               (question, "answers naming the first object", f"{first / (2 * n):.3f}")]
        print(*new, sep="\n", flush=True)
        rows += new
    write_section("stage2-where", "Stage 2 diagnostics: does the shapes VLM find the object a question names?", rows,
                  columns=("question", "figure", "value"), target=target,
                  notes=f"Model: `{args.model}`. Held-out scenes with "
                        "two objects of different colours and shapes; each question is asked about each object, "
                        "greedy. A model that reads the named object answers the two questions differently; "
                        "'same answer for both' near 1 with 'right' near 0.5 means it answers about one of the "
                        "objects whichever is named.")


if __name__ == "__main__":
    main()
