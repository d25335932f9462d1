"""Data sources by name: `build_source("shapes", split="test")`, or a path to your own pairs."""
from __future__ import annotations

import inspect
import os
from typing import Any

from vlmkit.config import DataConfig

from .base import Example, Source
from .digits import Digits
from .easy_vqa import EasyVQA
from .fashion_mnist import FashionMNIST
from .pairs import ImageTextPairs
from .shapes import Shapes
from .shapes_vqa import ShapesVQA

SOURCES: dict[str, type[Source]] = {
    "shapes": Shapes,
    "fashion_mnist": FashionMNIST,
    "digits": Digits,
    "easy_vqa": EasyVQA,
    "shapes_vqa": ShapesVQA,
}


def _check_kwargs(cls: type, kwargs: dict[str, Any]) -> None:
    # Checked here so a typo ("image_sise") names itself instead of surfacing as a generic
    # TypeError from deep inside a constructor.
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{cls.__name__} got unknown argument(s) {unknown}; it accepts {allowed}")


def build_source(name: str, split: str = "train", **kwargs: Any) -> Source:
    """A registered source by name, or `ImageTextPairs` for an existing file or folder."""
    if name in SOURCES:
        cls = SOURCES[name]
        _check_kwargs(cls, {"split": split, **kwargs})
        return cls(split=split, **kwargs)
    if os.path.exists(name):
        # A captions file is already one split, so `split` does not apply to it.
        _check_kwargs(ImageTextPairs, kwargs)
        return ImageTextPairs(name, **kwargs)
    raise ValueError(f"unknown source {name!r}; available: {sorted(SOURCES)}, "
                     "or a path to a .jsonl/.csv captions file or a folder holding one")


def source_for(data: DataConfig, split: str, size: int | None = None) -> Source:
    """The source a Stage 1 data config names, for one split; `size` sets how many scenes a
    generated world (`shapes`) makes."""
    kwargs = dict(data.source_options)
    if size is not None and data.source == "shapes":
        kwargs["size"] = size
    return build_source(data.source, split, **kwargs)


__all__ = ["SOURCES", "build_source", "source_for", "Example", "Source", "Shapes", "FashionMNIST",
           "Digits", "EasyVQA", "ImageTextPairs", "ShapesVQA"]
