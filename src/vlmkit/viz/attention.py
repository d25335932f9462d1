"""Where a VLM looked: per-token attention over image patches, drawn over the image.

Like the figures in `plots`, this builds a `matplotlib.figure.Figure` on the Agg canvas (no
pyplot), writes the file and returns its path.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vlmkit.viz.plots import _as_array, _figure, _save

_DISPLAY_SIDE = 384  # pixels on the longer side: enough detail, small files for large photos
_COLUMNS = 4


def plot_attention_heatmap(
    image: Image.Image,
    attention: torch.Tensor | np.ndarray,
    tokens: Sequence[str],
    path: str | Path,
    grid: tuple[int, int] | None = None,
    title: str | None = None,
    max_panels: int = 12,
) -> Path:
    """Image panels with attention overlaid: the mean over tokens, then one per generated token.

    `attention` is [T, N]: for each of T generated tokens, its weight on each of N image
    patches, row-major over a (grid_h, grid_w) patch grid (`grid`; square if None). Each
    panel's map is rescaled to [0, 1] on its own, so panels show where a token looked, not how
    strongly compared with other tokens. Only the first `max_panels` tokens get a panel.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
    weights = _as_array(attention, "attention")
    if weights.ndim != 2 or weights.shape[0] < 1 or weights.shape[1] < 1:
        raise ValueError(f"attention must be a [T, N] matrix with T, N >= 1, got shape {weights.shape}")
    t, n = weights.shape
    if len(tokens) != t:
        raise ValueError(f"got {len(tokens)} tokens for {t} attention rows")
    if not np.isfinite(weights).all():
        raise ValueError("attention has NaN or infinite values")
    if max_panels < 0:
        raise ValueError(f"max_panels must be >= 0, got {max_panels}")
    grid_h, grid_w = _grid(n, grid)

    shown = min(t, max_panels)
    maps = [weights.mean(axis=0)] + [weights[i] for i in range(shown)]
    labels = [f"mean over {t} token{'s' * (t != 1)}"] + [_label(i, tokens[i]) for i in range(shown)]

    picture = image.convert("RGB")
    scale = _DISPLAY_SIDE / max(picture.size)
    if scale < 1:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
    pixels = np.asarray(picture)

    columns = min(_COLUMNS, len(maps))
    rows = math.ceil(len(maps) / columns)
    aspect = picture.height / picture.width
    fig = _figure(3.0 * columns, (3.0 * aspect + 0.5) * rows)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, values, label in zip(axes, maps, labels):
        ax.imshow(pixels)
        ax.imshow(_upsample(values.reshape(grid_h, grid_w), picture.size), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(label, fontsize=9)
    for ax in axes:
        ax.axis("off")  # also blanks the unused cells of the last row
    if title or shown < t:
        note = f" (first {shown} of {t} tokens)" if shown < t else ""
        fig.suptitle(f"{title or 'Attention over image patches'}{note}")
    return _save(fig, path)


def _grid(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"cannot infer a square patch grid from N={n} patches; pass grid=(h, w) "
                "(and drop any CLS or other non-patch positions)"
            )
        return side, side
    if len(grid) != 2 or grid[0] < 1 or grid[1] < 1 or grid[0] * grid[1] != n:
        raise ValueError(f"grid {tuple(grid)} does not match N={n} patches")
    return int(grid[0]), int(grid[1])


def _upsample(patch_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Rescale to [0, 1] and resize bilinearly to `size` (width, height), for a smooth overlay."""
    lo, hi = float(patch_map.min()), float(patch_map.max())
    # A constant map carries no "where": show it as all-low rather than divide by zero.
    norm = (patch_map - lo) / (hi - lo) if hi > lo else np.zeros_like(patch_map)
    return np.asarray(Image.fromarray(norm.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))


def _label(index: int, token: str) -> str:
    # repr() shows the leading spaces and newlines that sub-word tokens often carry.
    text = repr(str(token))
    return f"{index}: {text if len(text) <= 24 else text[:21] + '...'}"
