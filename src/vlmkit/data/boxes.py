"""Boxes as text: the one format of grounding answers, in training data and in evaluation.

"[x0, y0, x1, y1]": integers 0..100 giving percent of the image width (x) and height (y),
corners like pixel boxes: (x0, y0) top left, (x1, y1) bottom right, x1 > x0 and y1 > y0.
Percent rather than pixels keeps the numbers independent of image size and few in tokens.
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
    x0, y0, x1, y1 = as_four(box, "box")
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


def as_four(box: Sequence[float], name: str) -> Box:
    """`box` as four finite floats, or a ValueError naming it."""
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
