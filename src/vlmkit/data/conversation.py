"""Conversations: the in-memory format of Stage 2 (generative VLM) training and evaluation.

A `Conversation` is a list of `Message`s (optional system, then user/assistant turns) plus
one image per `IMAGE_TOKEN` in its text, in order. `load_llava_json` reads the LLaVA
format (a JSON list or JSONL of records with "image" and "conversations"); `to_llava_json`
writes it back. Files are validated eagerly (errors name file, record index and id); image
files are not: a missing one surfaces at decode time, or ahead of it via `missing_images`.
"""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from vlmkit.config import IMAGE_TOKEN

ROLES = ("system", "user", "assistant")
_FROM_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}
_ROLE_FROM = {v: k for k, v in _FROM_ROLE.items()}


@dataclass(frozen=True)
class Message:
    role: str      # "system" | "user" | "assistant"
    content: str   # may contain IMAGE_TOKEN, one per image, in order


@dataclass
class Conversation:
    messages: list[Message]
    # Per placeholder, in order: a path (str), a PIL image, or an int row index into a
    # prepared image tensor (so synthetic sources need not write image files).
    images: list[Any] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"kind": "colour", "answer": "red"}

    def num_placeholders(self) -> int:
        return sum(m.content.count(IMAGE_TOKEN) for m in self.messages if isinstance(m.content, str))

    def validate(self, where: str = "conversation", require_answer: bool = True) -> None:
        """Raise ValueError (prefixed with `where`) if this cannot be trained or evaluated on.

        `require_answer` (training) demands an assistant message last; prompts for
        generation end with the user instead.
        """
        if not self.messages:
            raise ValueError(f"{where}: no messages")
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise ValueError(f"{where}: message {i} has unknown role {m.role!r}; expected one of {ROLES}")
            if not isinstance(m.content, str):
                raise ValueError(f"{where}: message {i} ({m.role}) content must be a string, "
                                 f"got {type(m.content).__name__}")
            if m.role == "system" and i != 0:
                raise ValueError(f"{where}: message {i} is a system message; only the first message may be")
        offset = 1 if self.messages[0].role == "system" else 0
        if len(self.messages) == offset:
            raise ValueError(f"{where}: no user message after the system message")
        for i in range(offset, len(self.messages)):
            m, expected = self.messages[i], ("user", "assistant")[(i - offset) % 2]
            if m.role != expected:
                raise ValueError(f"{where}: message {i} is from {m.role!r} but {expected!r} was expected "
                                 "(user and assistant must alternate, starting with user)")
            if m.role == "user" and not m.content.strip():
                raise ValueError(f"{where}: message {i} (user) has empty content")
        if require_answer and self.messages[-1].role != "assistant":
            raise ValueError(f"{where}: last message is from {self.messages[-1].role!r}; "
                             "training needs an assistant answer last")
        n = self.num_placeholders()
        if n != len(self.images):
            raise ValueError(f"{where}: {n} {IMAGE_TOKEN} placeholder(s) in the messages "
                             f"but {len(self.images)} image(s)")
        for k, image in enumerate(self.images):
            ok = (isinstance(image, (str, os.PathLike, Image.Image))
                  or (isinstance(image, numbers.Integral) and not isinstance(image, bool)))
            if not ok:
                raise ValueError(f"{where}: image {k} must be a path, a PIL image or an int row index, "
                                 f"got {type(image).__name__}")


# --- LLaVA JSON --------------------------------------------------------------------------------


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs; JSONL if the suffix is .jsonl, else one JSON list."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are harmless
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: invalid JSON at column {e.colno} ({e.msg})") from None
            records.append((f"line {lineno}, record {len(records)}", obj))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__} "
                         "(use a .jsonl file for one record per line)")
    return [(f"record {i}", obj) for i, obj in enumerate(data)]


def _parse_record(rec: Any, where: str, folder: Path, require_answer: bool) -> Conversation:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with 'conversations', got {type(rec).__name__}")
    where = f"{where} (id={rec.get('id')!r})"
    image = rec.get("image")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(x, str) for x in image):
        images = list(image)
    else:
        raise ValueError(f"{where}: 'image' must be a string or a list of strings, got {image!r}")
    if any(not x.strip() for x in images):
        raise ValueError(f"{where}: 'image' has an empty path")
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of turns")
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: turn {t} must be an object with 'from' and 'value'")
        role = _FROM_ROLE.get(turn.get("from"))
        if role is None:
            raise ValueError(f"{where}: turn {t} has unknown 'from' {turn.get('from')!r}; "
                             f"expected one of {sorted(_FROM_ROLE)}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"{where}: turn {t} 'value' must be a string, got {type(value).__name__}")
        messages.append(Message(role, value))
    # LLaVA convention: an image with no placeholder belongs before the first human message.
    if images and not any(IMAGE_TOKEN in m.content for m in messages):
        first = next((i for i, m in enumerate(messages) if m.role == "user"), None)
        if first is not None:
            messages[first] = Message("user", (IMAGE_TOKEN + "\n") * len(images) + messages[first].content)
    meta = {"id": rec["id"]} if "id" in rec else {}
    # `/` keeps an absolute path as it is.
    conv = Conversation(messages, [str(folder / x) for x in images], meta)
    conv.validate(where, require_answer=require_answer)
    return conv


def load_llava_json(path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                    require_answer: bool = True) -> list[Conversation]:
    """Conversations from a LLaVA-format .json (a list of records) or .jsonl file.

    Image paths resolve relative to `image_folder` (default: the file's folder); the files
    themselves are not checked here (see `missing_images`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file not found: {path}")
    folder = Path(image_folder) if image_folder is not None else path.parent
    return [_parse_record(rec, f"{path}, {loc}", folder, require_answer) for loc, rec in _read_records(path)]


def to_llava_json(conversations: Iterable[Conversation], path: str | os.PathLike,
                  image_folder: str | os.PathLike | None = None) -> None:
    """Write `conversations` as LLaVA JSON (JSONL if `path` ends in .jsonl).

    Relative image paths are rewritten relative to `image_folder` (default: the output
    file's folder), the inverse of `load_llava_json`; absolute ones are kept.
    """
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    records = []
    for i, conv in enumerate(conversations):
        where = f"conversation {i}"
        conv.validate(where, require_answer=False)
        images = []
        for k, image in enumerate(conv.images):
            if not isinstance(image, (str, os.PathLike)):
                raise ValueError(f"{where}: image {k} is a {type(image).__name__}; "
                                 "LLaVA JSON can only hold image paths")
            p = os.fspath(image)
            images.append(p if os.path.isabs(p) else os.path.relpath(p, folder))
        rec: dict[str, Any] = {"id": conv.meta.get("id", str(i))}
        if images:
            rec["image"] = images[0] if len(images) == 1 else images
        rec["conversations"] = [{"from": _ROLE_FROM[m.role], "value": m.content} for m in conv.messages]
        records.append(rec)
    with open(path, "w", encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
            f.write("\n")


def missing_images(conversations: Iterable[Conversation]) -> list[str]:
    """Image paths (each once, in first-seen order) that are not existing files."""
    missing: dict[str, None] = {}  # a dict keeps order and drops repeats
    for conv in conversations:
        for image in conv.images:
            if isinstance(image, (str, os.PathLike)):
                p = os.fspath(image)
                if p not in missing and not os.path.isfile(p):
                    missing[p] = None
    return list(missing)
