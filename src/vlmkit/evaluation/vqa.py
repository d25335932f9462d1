"""Exact-match accuracy for short generated answers (VQA style), overall and per question kind.

Answers are compared after `normalize_answer`, a deliberately small normalisation: case,
outer whitespace, surrounding quotes and a trailing full stop are the differences a chatty
model adds to a correct short answer. Anything more (articles, number words, synonyms)
would change what counts as correct and is left to the caller.
"""
from __future__ import annotations

from typing import Sequence

# Opening quote -> the closing quote that pairs with it.
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}
_FULL_STOPS = ".\u3002"  # ASCII period and the ideographic full stop


def normalize_answer(text: str) -> str:
    """Lowercase, collapse whitespace, drop surrounding quotes and trailing full stops.

    Repeated until nothing changes, so '"Yes."' and '"yes".' both become 'yes'. Only a
    matching pair of quotes is removed ("rock 'n' roll" keeps its apostrophes), and numbers
    stay as written: '3.5' stays '3.5', '3.' becomes '3', 'three' is not '3'.
    """
    if not isinstance(text, str):
        raise ValueError(f"answers must be strings, got {type(text).__name__}")
    text = " ".join(text.lower().split())
    while True:
        before = text
        text = text.rstrip(_FULL_STOPS).strip()
        if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
            text = text[1:-1].strip()
        if text == before:
            return text


def vqa_accuracy(
    predictions: Sequence[str],
    answers: Sequence[str],
    kinds: Sequence[str] | None = None,
) -> dict:
    """Share of predictions equal to their answer after `normalize_answer`.

    Returns {"accuracy", "count"} plus, when `kinds` (one question type per sample, e.g.
    "color", "count") is given, "per_kind": {kind: {"accuracy", "count"}} sorted by kind.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions for {len(answers)} answers")
    if kinds is not None and len(kinds) != len(answers):
        raise ValueError(f"got {len(kinds)} kinds for {len(answers)} answers")
    if not answers:
        raise ValueError("vqa_accuracy needs at least one prediction/answer pair")

    correct = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]
    results: dict = {"accuracy": sum(correct) / len(correct), "count": len(correct)}
    if kinds is not None:
        groups: dict[str, list[bool]] = {}
        for kind, ok in zip(kinds, correct):
            groups.setdefault(str(kind), []).append(ok)
        results["per_kind"] = {
            kind: {"accuracy": sum(oks) / len(oks), "count": len(oks)} for kind, oks in sorted(groups.items())
        }
    return results

