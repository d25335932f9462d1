"""scikit-learn's bundled 8x8 handwritten digits (offline), with a fixed 80/20 train/test split."""
from __future__ import annotations

import functools

import numpy as np

from .base import LabelledArrays

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {}.", "a photo of the number {}.", "a blurry picture of the digit {}.",
             "a low resolution image of a handwritten {}."]
_SPLIT_SEED = 0        # fixed, so the split never depends on a user's seed
_TRAIN_FRACTION = 0.8


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # optional dependency, only needed here

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    return images, d.target.astype(np.int64)


class Digits(LabelledArrays):
    """1797 8x8 greyscale digits (as RGB; the transform resizes), captioned by template."""

    name = "digits"
    classes = CLASSES
    templates = TEMPLATES

    def __init__(self, split: str = "train", seed: int = 0):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        images, labels = _load()
        order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
        cut = int(round(_TRAIN_FRACTION * len(labels)))
        self.indices = np.sort(order[:cut] if split == "train" else order[cut:])
        self.images, self.labels = images[self.indices], labels[self.indices]
        self.split, self.seed = split, seed
        # Caption template per original index, like FashionMNIST.
        template_ids = np.random.default_rng(seed).integers(len(TEMPLATES), size=len(labels))
        self.template_ids = template_ids[self.indices]

