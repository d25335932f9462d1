"""POPE-style hallucination scores: yes/no object-existence probes ("Is there a dog in the image?").

"yes" is the positive class, as in the POPE paper. A model that hallucinates objects says
"yes" too often, which shows as low precision and a yes_ratio above the share of "yes"
answers (0.5 on the balanced POPE splits).
"""
from __future__ import annotations

import re
from typing import Sequence

from vlmkit.evaluation.vqa import normalize_answer

_WORD = re.compile(r"\w+")


def parse_yes_no(text: str) -> str | None:
    """Read a yes/no answer: "yes" or "no" when the normalised text starts with it, else None.

    "Yes." -> "yes", "no, there is not" -> "no", "**Yes**" -> "yes"; "There is no dog" -> None,
    because only the first word is read (a sentence may mention "no" in passing).
    """
    match = _WORD.search(normalize_answer(text))
    word = match.group(0) if match else None
    return word if word in ("yes", "no") else None


def pope_scores(predictions: Sequence[str], answers: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes_ratio of yes/no predictions against yes/no answers.

    Predictions that `parse_yes_no` cannot read are counted in "unparsed" and are always wrong
    for accuracy. For the confusion matrix (and so precision/recall/F1) they are treated as
    "no": a model that dodges the question never claims the object, so it cannot add a false
    positive but does miss true objects. "confusion" holds tp/fp/fn/tn on that basis, so an
    unparsed prediction on a "no" answer is a tn there while still wrong in accuracy.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("pope_scores needs at least one prediction/answer pair")
    truth = []
    for i, answer in enumerate(answers):
        label = normalize_answer(answer)
        if label not in ("yes", "no"):
            raise ValueError(f"answers must be 'yes' or 'no', got {answer!r} at index {i}")
        truth.append(label)

    parsed = [parse_yes_no(p) for p in predictions]
    tp = sum(p == "yes" and t == "yes" for p, t in zip(parsed, truth))
    fp = sum(p == "yes" and t == "no" for p, t in zip(parsed, truth))
    fn = sum(p != "yes" and t == "yes" for p, t in zip(parsed, truth))
    tn = sum(p != "yes" and t == "no" for p, t in zip(parsed, truth))
    correct = sum(p == t for p, t in zip(parsed, truth))  # None never equals a label
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    n = len(truth)
    return {
        "accuracy": correct / n,
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": (tp + fp) / n,
        "count": n,
        "unparsed": sum(p is None for p in parsed),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


def _ratio(num: float, den: float) -> float:
    # A model that never says "yes" has no precision to speak of: report 0 rather than fail.
    return num / den if den else 0.0
