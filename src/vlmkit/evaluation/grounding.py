"""How well generated boxes hit the true ones (grounding).

The answers are boxes in the text format of `vlmkit.data.boxes` ("[x0, y0, x1, y1]" in
percent of the image), parsed back with `parse_box` and compared by IoU.
"""
from __future__ import annotations

from typing import Sequence

from vlmkit.data.boxes import as_four, parse_box


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes in the same units; 0.0 if both are empty."""
    ax0, ay0, ax1, ay1 = as_four(a, "a")
    bx0, by0, bx1, by1 = as_four(b, "b")
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
        x0, y0, x1, y1 = as_four(box, f"boxes[{i}]")
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


def _per_sample(size: int | Sequence[int], n: int, name: str) -> list[float]:
    if isinstance(size, (int, float)):
        return [float(size)] * n
    if len(size) != n:
        raise ValueError(f"got {len(size)} values of {name} for {n} predictions")
    return [float(s) for s in size]
