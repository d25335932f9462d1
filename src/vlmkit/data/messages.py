"""One message format for every entry point: OpenAI/HF-style chat messages.

A message is `{"role": "system" | "user" | "assistant", "content": ...}` whose content is

* a string, with `<image>` wherever an image goes (the LLaVA convention), or
* a list of typed parts: `{"type": "text", "text": ...}`, `{"type": "image"}` (which may
  carry the image itself under "image", "url" or "path", as transformers' processors
  accept) or OpenAI's `{"type": "image_url", "image_url": {"url": ...}}`.

Chat templates come in two kinds. Text-model templates (ChatML, SmolLM2's, vlmkit's own)
print `message['content']` and need a string; VLM templates (llava-hf's, SmolVLM's) loop
over typed parts and print nothing for a string. `for_template` turns any message into
the form its template reads, so every template renders from the same messages. Between
the forms, an image part is `<image>` and neighbouring parts are joined by a newline.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from vlmkit.config import IMAGE_TOKEN

ROLES = ("system", "user", "assistant")
_IMAGE_KEYS = ("image", "url", "path")
# A template that reads a part's "type" is a VLM template: content['type'], content.type,
# selectattr('type', ...).
_READS_PARTS = re.compile(r"""\[\s*['"]type['"]\s*\]|\.type\b|selectattr\(\s*['"]type['"]""")


def reads_parts(template: str) -> bool:
    """Whether a chat template loops over typed content parts (else it prints content strings)."""
    return bool(_READS_PARTS.search(template))


def _image_source(part: dict) -> Any:
    if part["type"] == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    return next((part[k] for k in _IMAGE_KEYS if part.get(k) is not None), None)


def _parts_of(text: str) -> list[dict]:
    """A content string -> typed parts; the newline joining a placeholder to its text belongs to it."""
    parts: list[dict] = []
    pieces = text.split(IMAGE_TOKEN)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if i < len(pieces) - 1:
            piece = piece.removesuffix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _string_of(parts: Sequence[dict]) -> str:
    return "\n".join(IMAGE_TOKEN if p["type"] == "image" else p["text"] for p in parts)


def normalize(messages: Sequence[Any]) -> tuple[list[dict], list[Any]]:
    """Check messages and split off their images.

    Returns (messages whose content is a string or a list of `text` / bare `image` parts,
    the image each image part carried, in order, None where it carried none). Objects with
    `.role` / `.content` (a `Conversation`'s messages) are read like dicts.
    """
    if isinstance(messages, (str, dict)):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out, images = [], []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (m.role, m.content)
        if role not in ROLES:
            raise ValueError(f"message {i}: role must be system, user or assistant, got {role!r}")
        if isinstance(content, str):
            images += [None] * content.count(IMAGE_TOKEN)
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"message {i}: content must be a string or a list of typed parts, "
                             f"got {type(content).__name__}")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"message {i} part {j}: a text part needs a string 'text'")
                if IMAGE_TOKEN in text:
                    raise ValueError(f"message {i} part {j}: a text part contains the image placeholder {IMAGE_TOKEN}; "
                                     "send the image as an image part")
                parts.append({"type": "text", "text": text})
            elif kind in ("image", "image_url"):
                parts.append({"type": "image"})
                images.append(_image_source(part))
            else:
                raise ValueError(f"message {i} part {j}: type must be text, image or image_url, got {kind!r}")
        out.append({"role": role, "content": parts})
    return out, images


def count_images(message: dict) -> int:
    content = message["content"]
    return content.count(IMAGE_TOKEN) if isinstance(content, str) else sum(p["type"] == "image" for p in content)


def text_of(message: dict) -> str:
    """The message's text without its images."""
    content = message["content"]
    if isinstance(content, str):
        return content.replace(IMAGE_TOKEN, "")
    return "".join(p["text"] for p in content if p["type"] == "text")


def prepend_images(message: dict, n: int) -> dict:
    """`message` with `n` images before its text (where LLaVA puts images given without placeholders)."""
    content = message["content"]
    if isinstance(content, str):
        return {**message, "content": (IMAGE_TOKEN + "\n") * n + content}
    return {**message, "content": [{"type": "image"} for _ in range(n)] + list(content)}


def for_template(messages: Sequence[dict], parts: bool) -> list[dict]:
    """Normalized messages in the form a template reads: typed parts (`parts`) or strings."""
    out = []
    for m in messages:
        content = m["content"]
        if parts and isinstance(content, str):
            content = _parts_of(content)
        elif not parts and not isinstance(content, str):
            content = _string_of(content)
        out.append({**m, "content": content})
    return out
