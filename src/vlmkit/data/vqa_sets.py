"""Stage 2 data: a table of decoded images plus conversations that point into it.

Each conversation's `images` are rows of `images` (a `PreparedPairs`), so the pixels of a
batch are one index into a uint8 tensor. Built-in sets: `shapes` (captions, VQA,
existence probes, grounding), `easy_vqa`; anything else is a LLaVA JSON/JSONL file whose
image paths are decoded once (unreadable images drop their conversations, counted).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vlmkit.config import VlmDataConfig
from vlmkit.data.conversation import Conversation, load_llava_json
from vlmkit.data.images import ImageTransform, load_image
from vlmkit.data.prepared import DataError, PreparedPairs, prepare
from vlmkit.data.sources.base import Example, Source

BUILTIN = ("shapes", "easy_vqa")


@dataclass
class ConversationSet:
    images: PreparedPairs
    conversations: list[Conversation]
    dropped: int = 0          # conversations whose image could not be read

    def __len__(self) -> int:
        return len(self.conversations)

    def kinds(self) -> Counter:
        return Counter(c.meta.get("kind", "chat") for c in self.conversations)

    def only(self, kinds: list[str] | None) -> "ConversationSet":
        """The conversations of the given kinds (all when `kinds` is None)."""
        if kinds is None:
            return self
        kept = [c for c in self.conversations if c.meta.get("kind", "chat") in kinds]
        if not kept:
            raise DataError(f"no conversations of kinds {kinds}; this set has {dict(self.kinds())}")
        return ConversationSet(self.images, kept, self.dropped)


class ImageFiles(Source):
    """Images named by path (the images of a LLaVA JSON file), for `prepare`."""

    name = "images"

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Example:
        return Example(load_image(self.paths[index]), "")


def _remap(conversations: list[Conversation], prepared: PreparedPairs, key) -> tuple[list[Conversation], int]:
    """Point each conversation's images at rows of `prepared`; drop those with an unreadable image."""
    row_of = {int(source_row): row for row, source_row in enumerate(prepared.rows.tolist())}
    kept, dropped = [], 0
    for c in conversations:
        rows = [row_of.get(key(image)) for image in c.images]
        if any(r is None for r in rows):
            dropped += 1
            continue
        kept.append(Conversation(c.messages, rows, c.meta))
    return kept, dropped


def build_set(cfg: VlmDataConfig, split: str, size: int | None, transform: ImageTransform,
              source: str | None = None) -> ConversationSet:
    """The conversations of `split` ("train"/"test"/"heldout" for shapes) from `source` (default cfg.source)."""
    name = source or cfg.source
    options = dict(cfg.source_options)
    if name == "shapes":
        from vlmkit.data.sources.shapes_vqa import ShapesVQA

        vqa = ShapesVQA(split=split, size=size or 2000, **options)
        images = prepare(vqa, transform, max_bad_fraction=cfg.max_bad_fraction, desc=f"{split} images")
        conversations = [c for i in range(len(vqa)) for c in vqa.conversations(i)]
        kept, dropped = _remap(conversations, images, int)
        return ConversationSet(images, kept, dropped)
    if name == "easy_vqa":
        from vlmkit.data.sources.easy_vqa import EasyVQA

        if options:
            raise ValueError(f"easy_vqa takes no source_options, got {sorted(options)}")
        ev = EasyVQA(split="train" if split == "train" else "test")
        images = prepare(ev, transform, limit=size, max_bad_fraction=cfg.max_bad_fraction, desc=f"{split} images")
        # Conversations about images past `size` are left out by design, not counted as dropped.
        conversations = [c for c in ev.conversations() if size is None or c.images[0] < size]
        kept, dropped = _remap(conversations, images, int)
        return ConversationSet(images, kept, dropped)
    path = Path(name)
    if not path.exists():
        raise ValueError(f"unknown conversation source {name!r}; use one of {list(BUILTIN)} "
                         "or a path to a LLaVA .json/.jsonl file")
    conversations = load_llava_json(path, cfg.image_folder)
    paths = sorted({str(image) for c in conversations for image in c.images})
    if not paths:
        raise DataError(f"{path}: no conversation has an image")
    images = prepare(ImageFiles(paths), transform, max_bad_fraction=cfg.max_bad_fraction, desc="images")
    index = {p: i for i, p in enumerate(paths)}
    kept, dropped = _remap(conversations, images, lambda image: index[str(image)])
    if size is not None:
        kept = kept[:size]
    return ConversationSet(images, kept, dropped)
