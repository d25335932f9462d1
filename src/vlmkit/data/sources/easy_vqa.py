"""Easy-VQA (the `easy-vqa` package): one coloured shape per image, plus its questions.

Captions ("a blue circle.") are derived from the dataset's question/answer pairs, never from
pixels. About one image in ten has questions that do not pin down both colour and shape;
its caption says only what is known ("a circle.", "a teal shape.") and its label is None.
`EasyVQA.conversations()` gives the questions as Stage 2 conversations.
"""
from __future__ import annotations

from collections import defaultdict

from ..conversation import IMAGE_TOKEN, Conversation, Message
from ..images import load_image
from .base import Example, Source

COLOURS = ("red", "green", "blue", "yellow", "gray", "teal", "black", "brown")
SHAPES = ("circle", "rectangle", "triangle")


def describe(qas: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(colour, shape) implied by one image's (question, answer) pairs; None where not implied."""
    facts = {"colour": set(), "shape": set()}
    absent = {"colour": set(), "shape": set()}
    for question, answer in qas:
        words = question.rstrip("?").split()
        colours = {w for w in words if w in COLOURS}
        shapes = {w for w in words if w in SHAPES}
        if answer in COLOURS:    # "what color is the circle?" -> blue
            facts["colour"].add(answer)
            facts["shape"] |= shapes
        elif answer in SHAPES:   # "what is the blue shape?" -> circle
            facts["shape"].add(answer)
            facts["colour"] |= colours
        else:                    # yes/no; "is there not a red shape?" -> no means red is there
            present = (answer == "yes") != ("not" in words or "no" in words)
            target = facts if present else absent
            target["colour"] |= colours
            target["shape"] |= shapes
    result = []
    for kind, universe in (("colour", COLOURS), ("shape", SHAPES)):
        if len(facts[kind]) > 1:
            raise ValueError(f"contradictory {kind} answers: {sorted(facts[kind])}")
        known = facts[kind] or set(universe) - absent[kind]  # fall back to elimination
        result.append(next(iter(known)) if len(known) == 1 else None)
    return result[0], result[1]


def question_kind(answer: str, where: str = "answer") -> str:
    """The type of a question ("yes/no", "colour" or "shape"), read off its answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in COLOURS:
        return "colour"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"{where}: unknown answer {answer!r}")


class EasyVQA(Source):
    """Easy-VQA images as captioned examples; `questions` keeps the VQA triples for later use."""

    name = "easy_vqa"
    classes = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    templates = ["a {}."]  # the captions' own style

    def __init__(self, split: str = "train", instruction: str | None = None):
        # An instruction added after every question ("Answer with one word."), as LLaVA-1.5
        # asks for short answers: a pretrained LM then ties its brevity to the request.
        self.instruction = instruction
        try:
            import easy_vqa
        except ImportError as e:
            raise ImportError("EasyVQA needs the `easy-vqa` package: pip install easy-vqa") from e
        if split == "train":
            texts, answers, ids = easy_vqa.get_train_questions()
            paths = easy_vqa.get_train_image_paths()
        elif split == "test":
            texts, answers, ids = easy_vqa.get_test_questions()
            paths = easy_vqa.get_test_image_paths()
        else:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.answers: list[str] = easy_vqa.get_answers()  # the 13 possible answers, in a fixed order
        self.questions: list[tuple[str, str, int]] = list(zip(texts, answers, ids))
        self._qas: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for question, answer, image_id in self.questions:
            self._qas[image_id].append((question, answer))
        self.image_ids: list[int] = sorted(paths)
        self._paths = paths

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Example:
        image_id = self.image_ids[index]
        qas = list(self._qas.get(image_id, []))
        colour, shape = describe(qas)
        caption = "a " + " ".join(w for w in (colour, shape or "shape") if w) + "."
        label = self.classes.index(f"{colour} {shape}") if colour and shape else None
        meta = {"image_id": image_id, "colour": colour, "shape": shape, "questions": qas}
        return Example(load_image(self._paths[image_id]), caption, label, meta)

    def conversations(self) -> list[Conversation]:
        """One single-turn conversation per question; its image is the row in `__getitem__` order."""
        rows = {image_id: row for row, image_id in enumerate(self.image_ids)}
        convs = []
        for i, (question, answer, image_id) in enumerate(self.questions):
            if image_id not in rows:
                raise ValueError(f"easy_vqa {self.split} question {i}: image id {image_id} has no image")
            asked = f"{question} {self.instruction}" if self.instruction else question
            convs.append(Conversation([Message("user", f"{IMAGE_TOKEN}\n{asked}"),
                                       Message("assistant", answer)], [rows[image_id]],
                                      {"kind": question_kind(answer, f"easy_vqa {self.split} question {i}"),
                                       "answer": answer, "question": question}))
        return convs
