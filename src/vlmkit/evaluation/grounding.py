"""Boxes as text for grounding, and how well generated boxes hit the true ones.

One format is shared by training data and evaluation: "[x0, y0, x1, y1]", integers 0..100
giving percent of the image width (x) and height (y), corners like pixel boxes: (x0, y0) top
left, (x1, y1) bottom right, x1 > x0 and y1 > y0. Percent rather than pixels keeps the
numbers independent of image size and few in tokens.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

_NUM = r"[-+]?\d+(?:\.\d+)?"
_SEP = r"\s*(?:,\s*|\s+)"
# Negative numbers are matched too, so "[-5, ...]" is rejected rather than skipped for a later box.
_BOX = re.compile(rf"\[\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*\]")

Box = tuple[float, float, float, float]


def format_box(box: Sequence[int | float], width: int, height: int) -> str:
    """Pixel box (x0, y0, x1, y1) -> "[x0, y0, x1, y1]" in whole percent, clamped to 0..100.

    Rounding half up; if a thin box would round to zero width or height, it is widened by one
    percent so the text still parses as a box.
    """
    x0, y0, x1, y1 = _four(box, "box")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box needs x1 > x0 and y1 > y0, got {tuple(box)}")
    px0, px1 = _span(x0 / width, x1 / width)
    py0, py1 = _span(y0 / height, y1 / height)
    return f"[{px0}, {py0}, {px1}, {py1}]"


def parse_box(text: str) -> Box | None:
    """The first "[a, b, c, d]" in `text` as percent floats, or None if absent or not a valid box.

    Commas or spaces may separate the numbers. A box with x1 <= x0, y1 <= y0 or any value
    outside 0..100 gives None (the first bracketed group is the model's answer; a later one
    is not searched for).
    """
    match = _BOX.search(text)
    if match is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in match.groups())
    if not all(0.0 <= v <= 100.0 for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes in the same units; 0.0 if both are empty."""
    ax0, ay0, ax1, ay1 = _four(a, "a")
    bx0, by0, bx1, by1 = _four(b, "b")
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0) + max(0.0, bx1 - bx0) * max(0.0, by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def grounding_scores(
    predictions: Sequence[str],
    boxes: Sequence[Sequence[float]],
    width: int | Sequence[int],
    height: int | Sequence[int],
    threshold: float = 0.5,
) -> dict:
    """Parse each predicted box and compare it with the true pixel box (converted to percent).

    `width`/`height` are one size for all images or one per sample. A prediction counts as a
    hit when IoU >= threshold; unparsed predictions score IoU 0. True boxes are converted
    without rounding, so even an exact copy of `format_box`'s text can fall a little short
    of IoU 1.
    Returns {f"accuracy@{threshold}", "mean_iou", "count", "unparsed"}.
    """
    n = len(predictions)
    if len(boxes) != n:
        raise ValueError(f"got {n} predictions for {len(boxes)} boxes")
    if n == 0:
        raise ValueError("grounding_scores needs at least one prediction/box pair")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    widths, heights = _per_sample(width, n, "width"), _per_sample(height, n, "height")

    ious, unparsed = [], 0
    for i, (text, box, w, h) in enumerate(zip(predictions, boxes, widths, heights)):
        if w <= 0 or h <= 0:
            raise ValueError(f"image size must be positive, got width={w}, height={h} at index {i}")
        x0, y0, x1, y1 = _four(box, f"boxes[{i}]")
        truth = tuple(min(100.0, max(0.0, 100.0 * v / s)) for v, s in ((x0, w), (y0, h), (x1, w), (y1, h)))
        pred = parse_box(text)
        unparsed += pred is None
        ious.append(0.0 if pred is None else box_iou(pred, truth))
    return {
        f"accuracy@{threshold:g}": sum(iou >= threshold for iou in ious) / n,
        "mean_iou": sum(ious) / n,
        "count": n,
        "unparsed": unparsed,
    }


def _four(box: Sequence[float], name: str) -> Box:
    if isinstance(box, str) or len(box) != 4:
        raise ValueError(f"{name} must be 4 numbers (x0, y0, x1, y1), got {box!r}")
    values = tuple(float(v) for v in box)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} has non-finite values: {box!r}")
    return values  # type: ignore[return-value]


def _span(lo: float, hi: float) -> tuple[int, int]:
    """Fractions lo < hi -> whole percents, clamped, with at least 1 percent between them."""
    a = min(100, max(0, math.floor(100 * lo + 0.5)))  # half up, not Python's round-half-even
    b = min(100, max(0, math.floor(100 * hi + 0.5)))
    if b <= a:
        a, b = (a, a + 1) if a < 100 else (99, 100)
    return a, b


def _per_sample(size: int | Sequence[int], n: int, name: str) -> list[float]:
    if isinstance(size, (int, float)):
        return [float(size)] * n
    if len(size) != n:
        raise ValueError(f"got {len(size)} values of {name} for {n} predictions")
    return [float(s) for s in size]
