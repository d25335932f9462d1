"""Decode a source once into compact tensors, skipping (and counting) unreadable images.

Small and medium datasets (the built-in ones, a few tens of thousands of your own
pairs) fit in memory as uint8 pixels, so training batches are an index into a tensor:
no per-step decoding, no worker processes fighting the model for the CPU.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlmkit.data.images import ImageDecodeError, ImageTransform
from vlmkit.data.sources.base import Source
from vlmkit.runtime import main_process


class DataError(ValueError):
    """The data cannot be used as asked (too many unreadable images, empty source...)."""


@dataclass
class PreparedPairs:
    images: torch.Tensor           # uint8 [N, 3, S, S]
    captions: list[str]
    labels: torch.Tensor           # long [N], -1 where the source has no class
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    skipped: int = 0
    rows: torch.Tensor | None = None  # long [N]: each image's index in the source (unreadable ones are gone)
    # Split images (a tiled transform): `images` holds each image's global view, `views` every
    # view (tiles row by row, then the global view) and `grids` each image's (first view, rows, cols).
    views: torch.Tensor | None = None     # uint8 [V, 3, S, S]
    grids: list[tuple[int, int, int]] | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def take(self, rows: torch.Tensor) -> "PreparedPairs":
        """The given rows, in the given order."""
        captions = [self.captions[i] for i in rows.tolist()]
        source_rows = None if self.rows is None else self.rows[rows]
        grids = None if self.grids is None else [self.grids[i] for i in rows.tolist()]
        return PreparedPairs(self.images[rows], captions, self.labels[rows], self.mean, self.std, self.skipped,
                             source_rows, self.views, grids)

    def grid(self, row: int) -> tuple[int, int]:
        """(rows, cols) of tiles image `row` was split into; (0, 0) when it was not."""
        return (0, 0) if self.grids is None else self.grids[row][1:]

    def view_rows(self, rows: Sequence[int]) -> list[int]:
        """The rows of `view_pixels` holding these images' views, in order."""
        if self.grids is None:
            return list(rows)
        return [v for r in rows for first, n_rows, n_cols in [self.grids[r]]
                for v in range(first, first + n_rows * n_cols + 1)]

    @property
    def num_views(self) -> int:
        return len(self.images) if self.views is None else len(self.views)

    def view_pixels(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Normalised float pixels of the given views (rows of `view_rows`)."""
        return self._normalise(self.images[index] if self.views is None else self.views[index])

    def subset(self, mask: torch.Tensor) -> "PreparedPairs":
        """The rows where the boolean `mask` is true."""
        return self.take(mask.nonzero().flatten())

    def distinct_captions(self, limit: int | None = None) -> "PreparedPairs":
        """The first row of each distinct caption (up to `limit` rows).

        Retrieval is measured on these: two images with the same caption are the same
        text query, so keeping both would make R@1 unreachable by design.
        """
        seen: set[str] = set()
        rows = []
        for i, caption in enumerate(self.captions):
            if caption not in seen:
                seen.add(caption)
                rows.append(i)
        return self.take(torch.tensor(rows[:limit], dtype=torch.long))

    def pixels(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Normalised float pixels [B, 3, S, S] for the given rows (the global view of a split image)."""
        return self._normalise(self.images[index])

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, self.mean, self.std)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels [B, 3, S, S] -> the float input a tower takes."""
    x = images.float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class _Decoded(Dataset):
    def __init__(self, source: Source, transform: ImageTransform, count: int):
        self.source, self.transform, self.count = source, transform, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        try:
            ex = self.source[i]
        except (ImageDecodeError, FileNotFoundError) as e:
            return None, str(e)
        views, rows, cols = self.transform.views(ex.image)
        views = torch.stack([torch.from_numpy(np.asarray(v).copy()).permute(2, 0, 1) for v in views])  # uint8
        return (views[-1], ex.caption, -1 if ex.label is None else int(ex.label), i, views, rows, cols), None


def _collate(items):
    return items


def prepare(
    source: Source,
    transform: ImageTransform,
    limit: int | None = None,
    max_bad_fraction: float = 0.01,
    num_workers: int = 0,
    desc: str = "decode",
) -> PreparedPairs:
    """Decode up to `limit` examples of `source` at the transform's size.

    Unreadable images are skipped and counted; past `max_bad_fraction` of them the
    run stops with a message naming the first bad file.
    """
    count = len(source) if limit is None else min(limit, len(source))
    if count == 0:
        raise DataError(f"data source {source.name!r} is empty")
    # Its own generator: a DataLoader otherwise draws its workers' seed from torch's global RNG,
    # so preparing one more set would change the weights a model is then initialised with.
    loader = DataLoader(_Decoded(source, transform, count), batch_size=256, num_workers=num_workers,
                        collate_fn=_collate, generator=torch.Generator().manual_seed(0))
    images, captions, labels, kept, errors, views, grids = [], [], [], [], [], [], []
    n_views = 0
    with tqdm(total=count, desc=desc, unit="img", leave=False, disable=not main_process(),
              mininterval=0.1 if sys.stderr.isatty() else 30) as bar:
        for batch in loader:
            for item, error in batch:
                if item is None:
                    errors.append(error)
                else:
                    images.append(item[0])
                    captions.append(item[1])
                    labels.append(item[2])
                    kept.append(item[3])
                    if transform.tiled:
                        grids.append((n_views, item[5], item[6]))
                        views.append(item[4])
                        n_views += len(item[4])
            bar.update(len(batch))
    if errors and len(errors) / count > max_bad_fraction:
        raise DataError(
            f"{len(errors)} of {count} images in {source.name!r} could not be read "
            f"({len(errors) / count:.1%} > data.max_bad_fraction {max_bad_fraction:.1%}); first: {errors[0]}"
        )
    if not images:
        raise DataError(f"no readable images in {source.name!r}")
    return PreparedPairs(torch.stack(images), captions, torch.tensor(labels, dtype=torch.long),
                         tuple(transform.mean), tuple(transform.std), skipped=len(errors),
                         rows=torch.tensor(kept, dtype=torch.long),
                         views=torch.cat(views) if transform.tiled else None, grids=grids if transform.tiled else None)
