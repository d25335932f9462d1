"""What every data source yields: an image with its caption (and, when known, its class)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
