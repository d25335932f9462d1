"""Questions and answers about `shapes` scenes, exact by construction, for Stage 2.

`scene_questions` asks up to one question per kind (caption, colour, shape, count, position,
relation, exists, grounding, order) about a `Scene`; answers are computed from the scene,
never from pixels. Yes/no kinds draw the target answer first, so yes and no are balanced 50/50.
`ShapesVQA` turns scene i of a `Shapes` source into single-turn `Conversation`s whose image
is row i (render it with `.source[i]`, or `ShapesVQA[i]` which is the same).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from .. import boxes
from ..conversation import IMAGE_TOKEN, Conversation, Message
from .base import Example, Source
from .shapes import COLOURS, SHAPES, Obj, Scene, Shapes, caption

KINDS = ("caption", "colour", "shape", "count", "position", "relation", "exists", "grounding", "order")
CAPTION_QUESTIONS = ("Describe the image.", "Write a short caption for this image.", "What is in the picture?")
ORDER_QUESTION = "Name the shapes from left to right."
RELATIONS = ("left of", "right of", "above", "below")
_ZERO_COUNT_P = 0.2  # share of count questions about a colour or shape that is absent


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str                                         # one of KINDS
    box: tuple[int, int, int, int] | None = None      # grounding: the object's pixel box


def format_box(box: Sequence[float], image_size: int | tuple[int, int]) -> str:
    """Pixel box (x0, y0, x1, y1) -> "[x0, y0, x1, y1]" in integer percent (0..100) of the image.

    The one box format of training data and evaluation lives in `data/boxes.py`.
    """
    w, h = (image_size, image_size) if isinstance(image_size, int) else image_size
    if w <= 0 or h <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return boxes.format_box(box, w, h)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")  # crosses


def _relation_holds(a: Obj, b: Obj, rel: str) -> bool:
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


def _ask(kind: str, scene: Scene, rng: random.Random) -> QA | None:
    objs = scene.objects
    combos = Counter((o.colour, o.shape) for o in objs)
    colours, shapes = Counter(o.colour for o in objs), Counter(o.shape for o in objs)
    # Objects a "the {colour} {shape}" phrase names unambiguously.
    unique = [o for o in objs if combos[o.colour, o.shape] == 1]
    if kind == "caption":
        return QA(rng.choice(CAPTION_QUESTIONS), caption(scene), kind)
    if kind == "colour":
        o = rng.choice(objs)
        # The position form is always unambiguous; the short form only when the shape is unique.
        if shapes[o.shape] == 1 and rng.random() < 0.5:
            return QA(f"What colour is the {o.shape}?", o.colour, kind)
        return QA(f"What colour is the {o.shape} at the {o.position}?", o.colour, kind)
    if kind == "shape":
        o = rng.choice(objs)
        if colours[o.colour] == 1 and rng.random() < 0.5:
            return QA(f"What is the {o.colour} shape?", o.shape, kind)
        return QA(f"What shape is at the {o.position}?", o.shape, kind)
    if kind == "count":
        absent_colours = [c for c in COLOURS if c not in colours]
        absent_shapes = [s for s in SHAPES if s not in shapes]
        if rng.random() < _ZERO_COUNT_P and (absent_colours or absent_shapes):
            options = [("colour", c) for c in absent_colours] + [("shape", s) for s in absent_shapes]
        else:
            options = [("all", "")] + [("colour", c) for c in colours] + [("shape", s) for s in shapes]
        what, value = rng.choice(options)
        if what == "all":
            return QA("How many shapes are there?", str(len(objs)), kind)
        if what == "colour":
            return QA(f"How many {value} shapes are there?", str(colours[value]), kind)
        return QA(f"How many {_plural(value)} are there?", str(shapes[value]), kind)
    if kind == "position":
        if not unique:
            return None
        o = rng.choice(unique)
        return QA(f"Where is the {o.colour} {o.shape}?", o.position, kind)
    if kind == "relation":
        if len(unique) < 2:
            return None
        target = rng.random() < 0.5
        pairs = [(a, b) for a in unique for b in unique if a is not b]
        rng.shuffle(pairs)
        for a, b in pairs:
            rels = [r for r in RELATIONS if _relation_holds(a, b, r) == target]
            if rels:
                rel = rng.choice(rels)
                return QA(f"Is the {a.colour} {a.shape} {rel} the {b.colour} {b.shape}?",
                          "yes" if target else "no", kind)
        return None  # unreachable for objects in distinct cells, kept for safety
    if kind == "exists":
        if rng.random() < 0.5:
            o = rng.choice(objs)
            return QA(f"Is there {_article(o.colour)} {o.colour} {o.shape} in the image?", "yes", kind)
        # Every colour-shape pair is a candidate, held-out ones included: absent means "no".
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in combos]
        hard = [(c, s) for c, s in absent if c in colours or s in shapes]
        easy = [cs for cs in absent if cs not in hard]
        # Hard negatives (sharing a colour or a shape with an object present) stop the model
        # answering from one attribute alone.
        pool = (hard or easy) if rng.random() < 0.5 else (easy or hard)
        c, s = rng.choice(pool)
        return QA(f"Is there {_article(c)} {c} {s} in the image?", "no", kind)
    if kind == "grounding":
        if not unique:
            return None
        o = rng.choice(unique)
        return QA(f"Where is the {o.colour} {o.shape}? Give its box.", format_box(o.box, scene.image_size),
                  kind, o.box)
    if kind == "order":
        # Captions list objects in reading order, row by row; this lists them column by column
        # (top first within a column), so columns get the same dense lesson as rows (README).
        ordered = sorted(objs, key=lambda o: (o.cell % 3, o.cell // 3))
        return QA(ORDER_QUESTION, ", ".join(f"{o.colour} {o.shape}" for o in ordered), kind)
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


def _check_kinds(kinds: Sequence[str]) -> None:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown question kind(s) {unknown}; expected some of {KINDS}")


def scene_questions(scene: Scene, rng: random.Random, kinds: Sequence[str] = KINDS) -> list[QA]:
    """One QA per kind in `kinds` (in that order) that this scene allows; deterministic in `rng`."""
    _check_kinds(kinds)
    # Each kind draws from its own stream, so a kind's question does not depend on which
    # other kinds were asked for (ShapesVQA(kinds=("exists",)) asks the same exists questions).
    base = rng.getrandbits(64)
    qas = [_ask(k, scene, random.Random(f"{base}/{k}")) for k in kinds]
    return [qa for qa in qas if qa is not None]


class ShapesVQA(Source):
    """`Shapes` scenes with single-turn VQA conversations; a pure function of (seed, split, index).

    As a `Source` it yields the underlying `Shapes` examples, so row i of a prepared image
    tensor is the image that `conversations(i)` refers to (`images=[i]`).
    """

    name = "shapes_vqa"
    classes = Shapes.classes
    templates = Shapes.templates

    def __init__(self, split: str = "train", size: int = 10_000, seed: int = 0, image_size: int = 64,
                 min_objects: int = 1, max_objects: int = 3, kinds: Sequence[str] = KINDS,
                 questions_per_image: int | None = None):
        kinds = tuple(kinds)
        if not kinds:
            raise ValueError("kinds must name at least one question kind")
        _check_kinds(kinds)
        if questions_per_image is not None and questions_per_image < 1:
            raise ValueError(f"questions_per_image must be >= 1 or None, got {questions_per_image}")
        self.source = Shapes(split, size, seed, image_size, min_objects, max_objects)
        self.split, self.size, self.seed = split, size, seed
        self.kinds, self.questions_per_image = kinds, questions_per_image

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Example:
        return self.source[index]

    def conversations(self, index: int) -> list[Conversation]:
        scene = self.source.scene(index)  # raises IndexError out of range
        index %= self.size
        rng = random.Random(f"shapes-vqa/{self.seed}/{self.split}/{index}")
        qas = scene_questions(scene, rng, self.kinds)
        n = self.questions_per_image
        if n is not None and len(qas) > n:
            qas = [qas[i] for i in sorted(rng.sample(range(len(qas)), n))]  # keep kind order
        convs = []
        for qa in qas:
            meta = {"kind": qa.kind, "answer": qa.answer, "question": qa.question}
            if qa.box is not None:
                meta.update(box=list(qa.box), image_size=scene.image_size)
            convs.append(Conversation([Message("user", f"{IMAGE_TOKEN}\n{qa.question}"),
                                       Message("assistant", qa.answer)], [index], meta))
        return convs

    def all_conversations(self, limit: int | None = None) -> list[Conversation]:
        """Conversations of scenes 0..limit-1 (all scenes by default), scene by scene."""
        n = len(self) if limit is None else min(limit, len(self))
        return [c for i in range(n) for c in self.conversations(i)]
