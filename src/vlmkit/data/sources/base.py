"""What every data source yields: an image with its caption (and, when known, its class)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from PIL import Image


@dataclass
class Example:
    image: Image.Image          # RGB, any size; transforms resize later
    caption: str
    label: int | None = None    # class index, for sources with named classes
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the scene of a `shapes` image


class Source:
    """A map-style dataset of `Example`s.

    `classes` and `templates` are set by sources with named classes, so zero-shot
    classification can build prompts ("a photo of a {}.") without a classifier head.
    `__getitem__` may raise `ImageDecodeError` for a corrupt or missing image; the
    loader skips and counts those (see data/loader.py).
    """

    name: str = "source"
    classes: list[str] | None = None
    templates: list[str] = ["a photo of a {}."]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Example:
        raise NotImplementedError

    def hard_negative_caption(self, index: int) -> str:
        """Example `index`'s caption with one detail wrong, for `train.hard_negatives`."""
        raise NotImplementedError(f"the {self.name!r} source cannot make hard-negative captions "
                                  "(train.hard_negatives needs one that can, such as 'shapes')")


class LabelledArrays(Source):
    """A source held as uint8 arrays with class labels and one caption template per example.

    Subclasses set `images` [N, H, W], `labels` [N], `indices` (position in the original
    split) and `template_ids` [N] (which of `templates` captions each example).
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    template_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Example:
        label = int(self.labels[index])
        caption = self.templates[self.template_ids[index]].format(self.classes[label])
        image = Image.fromarray(self.images[index]).convert("RGB")
        return Example(image, caption, label, {"index": int(self.indices[index])})
