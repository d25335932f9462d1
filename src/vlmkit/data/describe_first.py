""""Describe, then answer" (`VLMConfig.describe_first`): a question about an image is asked
as the second turn of a conversation whose first turn is the model's own description.

A small language model trained from scratch learns to read a text description far sooner
than to search image tokens for one object; the description is generated from the image by
the same model, greedily, so the image is still the only input. Training conversations
carry the true description; evaluation and the assistant put the generated one in its
place with `described`.
"""
from __future__ import annotations

from typing import Any

from vlmkit.data.chat import IGNORE, Encoded
from vlmkit.data.conversation import IMAGE_PLACEHOLDER

DESCRIBE_PROMPT = "Describe the image."


def describe_request() -> list[dict[str, str]]:
    """The first turn: what the model answers with its description."""
    return [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{DESCRIBE_PROMPT}"}]


def needs_description(messages: list[Any]) -> bool:
    """A single-turn question about one image that is not itself a request to describe."""
    if len(messages) != 1:
        return False
    content = _content(messages[0])
    question = content.replace(IMAGE_PLACEHOLDER, "").strip()
    return content.count(IMAGE_PLACEHOLDER) <= 1 and question != DESCRIBE_PROMPT


def described(messages: list[Any], description: str) -> list[dict[str, str]]:
    """[question] -> [describe, description, question] (the placeholder moves to the first turn)."""
    question = _content(messages[0]).replace(IMAGE_PLACEHOLDER, "").strip()
    description = description.replace(IMAGE_PLACEHOLDER, "")  # an answer never holds an image slot
    return [*describe_request(), {"role": "assistant", "content": description},
            {"role": "user", "content": question}]


def _content(message: Any) -> str:
    return message["content"] if isinstance(message, dict) else message.content


def answer_only(encoded: Encoded) -> Encoded:
    """Labels of the answer turn only: the description (the first labelled run) is not trained.

    Descriptions are learned from the caption conversations; here they would outweigh the
    short answer several times over in the per-token loss, and the answer is what is hard.
    """
    labels = list(encoded.labels)
    i = next((k for k, t in enumerate(labels) if t != IGNORE), len(labels))
    while i < len(labels) and labels[i] != IGNORE:
        labels[i] = IGNORE
        i += 1
    return Encoded(encoded.ids, labels, encoded.images)
