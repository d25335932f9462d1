"""Figures for vision-language models: similarity heatmaps, embedding maps and training curves.

Every function writes a PNG (or any format matplotlib infers from the suffix) and returns its
path. Figures are built with `matplotlib.figure.Figure` on the Agg canvas rather than through
pyplot: nothing opens a window, nothing is left in pyplot's registry to leak, and the
process-wide backend (a notebook's, say) is left alone.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image, ImageOps

_EVAL_PREFIXES = ("eval_", "eval/", "val_", "val/")
_EVAL_SPLITS = {"eval", "val", "valid", "validation", "test"}


def plot_similarity_matrix(
    sim: torch.Tensor | np.ndarray,
    path: str | Path,
    images: Sequence[Image.Image] | None = None,
    captions: Sequence[str] | None = None,
    title: str = "Image-text similarity",
) -> Path:
    """Heatmap of `sim` [n images, m texts] with values, image thumbnails on top, captions on the left."""
    values = _as_array(sim, "sim")
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"sim must be a non-empty [n, m] matrix, got shape {values.shape}")
    n, m = values.shape
    if images is not None and len(images) != n:
        raise ValueError(f"got {len(images)} images for {n} similarity rows")
    if captions is not None and len(captions) != m:
        raise ValueError(f"got {len(captions)} captions for {m} similarity columns")

    grid = values.T  # texts as rows: long captions read best as y labels, as in the CLIP paper
    top = -1.7 if images else -0.5  # room above row 0 for the thumbnails
    fig = _figure(max(6.0, 1.0 * n + 4.5), max(4.0, 0.65 * m + (2.5 if images else 1.5)))
    ax = fig.add_subplot()
    lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
    heat = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
    for (j, i), v in np.ndenumerate(grid):
        # Light text on the dark (low) end of viridis, dark text on the bright end.
        dark = hi <= lo or (v - lo) / (hi - lo) < 0.6
        ax.text(i, j, f"{v:.2f}", ha="center", va="center", fontsize=9, color="white" if dark else "black")

    if images:
        for i, image in enumerate(images):
            # pad() keeps the aspect ratio inside the square cell instead of stretching.
            thumb = ImageOps.pad(image.convert("RGB"), (96, 96), color=(255, 255, 255))
            ax.imshow(np.asarray(thumb), extent=(i - 0.5, i + 0.5, -1.6, -0.6), origin="lower")
        ax.set_xticks([])
    else:
        ax.set_xticks(range(n), labels=[f"image {i}" for i in range(n)], rotation=45, ha="right")
    labels = [_wrap(c) for c in captions] if captions is not None else [f"text {j}" for j in range(m)]
    ax.set_yticks(range(m), labels=labels, fontsize=9)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(m - 0.5, top)  # inverted: row 0 at the top, thumbnails above it
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.colorbar(heat, ax=ax, fraction=0.03, pad=0.02)
    ax.set_title(title)
    return _save(fig, path)


def plot_embedding_map(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    path: str | Path,
    image_labels: Sequence[str] | None = None,
    text_labels: Sequence[str] | None = None,
    title: str = "Image and text embeddings (PCA)",
) -> Path:
    """2-D PCA of both embedding sets together: images as dots, texts as crosses, pairs joined."""
    img, txt = _as_array(image_emb, "image_emb"), _as_array(text_emb, "text_emb")
    if img.ndim != 2 or txt.ndim != 2 or len(img) == 0 or len(txt) == 0:
        raise ValueError(f"need non-empty [N, E] embeddings, got shapes {img.shape} and {txt.shape}")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"embedding widths differ: {img.shape[1]} vs {txt.shape[1]}")
    for labels, emb, name in ((image_labels, img, "image_labels"), (text_labels, txt, "text_labels")):
        if labels is not None and len(labels) != len(emb):
            raise ValueError(f"{name} has {len(labels)} entries for {len(emb)} embeddings")
    image_labels = None if image_labels is None else [str(l) for l in image_labels]
    text_labels = None if text_labels is None else [str(l) for l in text_labels]

    # One PCA for both sets, so the modality gap shows as a shift between them.
    joint = np.concatenate([img, txt]).astype(np.float64)
    centred = joint - joint.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    coords = np.zeros((len(joint), 2))
    k = min(2, len(vt))
    coords[:, :k] = centred @ vt[:k].T
    share = s**2 / max(float((s**2).sum()), 1e-12)
    xy_img, xy_txt = coords[: len(img)], coords[len(img) :]

    names = list(dict.fromkeys((image_labels or []) + (text_labels or [])))  # first-seen order
    palette = _colours(len(names))
    colour_of = dict(zip(names, palette))

    fig = _figure(7.5, 6.0)
    ax = fig.add_subplot()
    if len(img) == len(txt) <= 50:
        for a, b in zip(xy_img, xy_txt):
            ax.plot([a[0], b[0]], [a[1], b[1]], color="0.75", lw=0.7, zorder=1)
    img_colours = [colour_of[l] for l in image_labels] if image_labels is not None else "C0"
    txt_colours = [colour_of[l] for l in text_labels] if text_labels is not None else "C1"
    ax.scatter(xy_img[:, 0], xy_img[:, 1], c=img_colours, marker="o", s=36, zorder=2)
    ax.scatter(xy_txt[:, 0], xy_txt[:, 1], c=txt_colours, marker="x", s=44, zorder=3)

    handles = [
        Line2D([], [], marker="o", ls="", color="0.3", label="image"),
        Line2D([], [], marker="x", ls="", color="0.3", label="text"),
    ]
    handles += [Line2D([], [], marker="s", ls="", color=colour_of[nm], label=nm) for nm in names[:20]]
    # Outside the axes: with many labels an inside legend would hide points.
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    pc = [f"PC{i + 1} ({share[i]:.0%} var.)" if i < len(share) else f"PC{i + 1}" for i in range(2)]
    ax.set_xlabel(pc[0])
    ax.set_ylabel(pc[1])
    ax.set_title(title)
    return _save(fig, path)


def plot_curves(
    records: Sequence[dict[str, Any]],
    path: str | Path,
    keys: Sequence[str] = ("loss",),
    x: str = "step",
    title: str = "Training curves",
    eval_keys: Sequence[str] | None = None,
) -> Path:
    """Lines for `keys` against `x` from metrics.jsonl records; eval metrics as markers.

    Eval values are keys prefixed "eval/", "eval_", "val/" or "val_" (or any key of a record
    whose "split" is eval/val/test). Those matching `keys` ("eval/loss" for "loss") share the
    top panel; the others get a second panel, all of them or only those named in `eval_keys`.
    """
    if not records:
        raise ValueError("plot_curves needs at least one record")
    if not keys:
        raise ValueError("plot_curves needs at least one key")
    series = _collect(records, x)
    train = {k: series[k] for k in keys if k in series}
    if not train:
        raise ValueError(f"no record has both {x!r} and any of {list(keys)}")
    paired = {name: series[name] for k in keys for name in (p + k for p in _EVAL_PREFIXES) if name in series}
    others = {n: s for n, s in series.items() if n.startswith(_EVAL_PREFIXES) and n not in paired
              and (eval_keys is None or n in eval_keys)}

    fig = _figure(8.0, 7.0 if others else 4.5)
    axes = fig.subplots(2 if others else 1, 1, sharex=True, squeeze=False)[:, 0]
    for name, pts in train.items():
        axes[0].plot(*zip(*pts), lw=1.2, label=name)
    for name, pts in paired.items():
        axes[0].plot(*zip(*pts), "o", ms=6, label=name)
    axes[0].set_ylabel(", ".join(train))
    axes[0].set_title(title)
    if others:
        for name, pts in others.items():
            axes[1].plot(*zip(*pts), "o-", ms=5, lw=0.8, label=name)
        axes[1].set_ylabel("eval metrics")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel(x)
    return _save(fig, path)


# --------------------------------------------------------------------- helpers
def _collect(records: Sequence[dict[str, Any]], x: str) -> dict[str, list[tuple[float, float]]]:
    """Numeric (x, value) points per metric, sorted by x; eval-split records get an "eval_" prefix."""
    series: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        if not isinstance(record, dict) or not _is_number(record.get(x)):
            continue  # records without the x key can't be placed
        is_eval = str(record.get("split", record.get("phase", "train"))).lower() in _EVAL_SPLITS
        for key, value in record.items():
            if key == x or not _is_number(value):
                continue
            name = f"eval_{key}" if is_eval and not key.startswith(_EVAL_PREFIXES) else key
            series.setdefault(name, []).append((float(record[x]), float(value)))
    return {k: sorted(v) for k, v in series.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} is not numeric: {e}") from e


def _wrap(caption: str) -> str:
    # Shorten first so a paragraph-long caption can't blow up the row height.
    return textwrap.fill(textwrap.shorten(str(caption), width=80, placeholder=" …"), width=32) or " "


def _colours(count: int) -> list[tuple[float, float, float, float]]:
    # Qualitative maps while they have enough distinct colours, then a continuous one.
    if count <= 20:
        cmap = colormaps["tab10" if count <= 10 else "tab20"]
        return [cmap(i) for i in range(count)]
    return [colormaps["turbo"](i / (count - 1)) for i in range(count)]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # attach the raster canvas explicitly: no GUI backend is ever consulted
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clear()  # drop artists (and image copies) now rather than at garbage collection
    return path
