"""Stage 2 data: a table of decoded images plus conversations that point into it.

Each conversation's `images` are rows of `images` (a `PreparedPairs`), so the pixels of a
batch are one index into a uint8 tensor. Built-in sets: `shapes` (captions, VQA,
existence probes, grounding), `easy_vqa`; anything else is a LLaVA JSON/JSONL file whose
image paths are decoded once (unreadable images drop their conversations, counted).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vlmkit.config import VlmDataConfig
from vlmkit.data.conversation import IMAGE_TOKEN, Conversation, Message, load_llava_json
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
        kept = [c for c in self.conversations if of_kinds(c, kinds)]
        if not kept:
            raise DataError(f"no conversations of kinds {kinds}; this set has {dict(self.kinds())}")
        return ConversationSet(self.images, kept, self.dropped)


def question_kinds(conversation: Conversation) -> list[str]:
    """The kind of each question a conversation asks ("chat" where the data does not say)."""
    return conversation.meta.get("kinds", [conversation.meta.get("kind", "chat")])


def of_kinds(conversation: Conversation, kinds: list[str] | None) -> bool:
    """Whether every question of `conversation` is of one of `kinds` (None: any)."""
    if kinds is None:
        return True
    return all(k in kinds for k in question_kinds(conversation))


def repeats(conversation: Conversation, task_repeats: dict[str, int]) -> int:
    """How many times a conversation appears per training epoch: its kinds' largest repeat (default 1)."""
    return max(task_repeats.get(k, 1) for k in question_kinds(conversation))


def merge_turns(conversations: list[Conversation], turns: int, seed: int = 0,
                single: tuple[str, ...] = ("caption",)) -> list[Conversation]:
    """Questions about the same image, up to `turns` at a time, as one multi-turn conversation.

    LLaVA trains on conversations like these: the image is read once and every answer in
    the sequence is a training target, so a step learns from several questions for little
    more compute than one. The questions of an image are shuffled before they are grouped.
    Kinds in `single` stay single-turn (the align phase trains on captions alone, and a
    caption earlier in the conversation would give the later answers away as text); so do
    conversations that are not one user question about one image.
    """
    if turns < 2:
        return conversations
    rng = random.Random(seed)
    by_image: dict = {}
    merged: list[Conversation] = []
    for c in conversations:
        one_question = (len(c.images) == 1 and len(c.messages) == 2 and c.messages[0].role == "user"
                        and c.messages[0].content.count(IMAGE_TOKEN) == 1)
        if one_question and c.meta.get("kind", "chat") not in single:
            by_image.setdefault(c.images[0], []).append(c)
        else:
            merged.append(c)
    for image, group in by_image.items():
        rng.shuffle(group)
        for start in range(0, len(group), turns):
            chunk = group[start: start + turns]
            if len(chunk) == 1:
                merged.append(chunk[0])
                continue
            messages = list(chunk[0].messages)
            for c in chunk[1:]:
                question = c.messages[0].content.replace(IMAGE_TOKEN, "").strip()
                messages += [Message("user", question), c.messages[1]]
            merged.append(Conversation(messages, [image], {"kind": "multi_turn",
                                                           "kinds": [c.meta.get("kind", "chat") for c in chunk]}))
    return merged


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
    """The conversations of `split` ("train"/"test"/"heldout" for shapes) from `source` (default cfg.source).

    Training conversations ask up to `cfg.train_turns` questions each; evaluation ones one.
    """
    data = _build_set(cfg, split, size, transform, source)
    if split == "train" and cfg.train_turns > 1:
        data = ConversationSet(data.images, merge_turns(data.conversations, cfg.train_turns), data.dropped)
    return data


def _build_set(cfg: VlmDataConfig, split: str, size: int | None, transform: ImageTransform,
               source: str | None) -> ConversationSet:
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

        unknown = sorted(set(options) - {"instruction"})
        if unknown:
            raise ValueError(f"easy_vqa source_options: unknown {unknown}; known: instruction")
        ev = EasyVQA(split="train" if split == "train" else "test", **options)
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
