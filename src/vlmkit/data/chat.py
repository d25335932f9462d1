"""Conversations -> token ids and labels: chat template, image-slot expansion, label masking.

The template is rendered turn by turn, so every token is known to belong to a prompt part
(label -100) or to an assistant answer (label = the token). An answer's span is what the
template adds between "prompt for the assistant" and "after the assistant message": the
answer text and its end-of-turn token, which is what the model must learn to produce.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from vlmkit.data.lm_tokenizer import IMAGE_TOKEN, LMTokenizer

IGNORE = -100


class PromptTooLong(ValueError):
    """The conversation needs more tokens than allowed."""


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    images: int          # image placeholders expanded


def _messages(conversation) -> list:
    return list(conversation.messages) if hasattr(conversation, "messages") else list(conversation)


def encode_conversation(conversation, tokenizer: LMTokenizer, image_tokens: int | Sequence[Sequence[int]],
                        max_length: int, add_generation_prompt: bool = False) -> Encoded:
    """Token ids and labels for a conversation (a `Conversation` or a list of messages).

    For training, the last message is the assistant's and is labelled with the others; for
    generation pass `add_generation_prompt=True` and a conversation ending with the user.
    Each image placeholder becomes `image_tokens` image-token slots, or, given a list, the
    ids listed for that image (`data.image_prompt`: tiles and their markers).
    """
    messages = _messages(conversation)
    if not messages:
        raise ValueError("the conversation has no messages")
    pieces: list[tuple[str, bool]] = []       # (text, is_answer)
    done = ""
    # A prompt for generation needs no labels: render it whole, as transformers does (some
    # published templates, llava-onevision's, do not render turns as prefixes of each other).
    for i, message in enumerate([] if add_generation_prompt else messages):
        role = message["role"] if isinstance(message, dict) else message.role
        if role == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            after = tokenizer.apply_chat_template(messages[: i + 1])
            if not (prompt.startswith(done) and after.startswith(prompt)):
                raise ValueError("the chat template does not render turns as prefixes of each other; "
                                 "cannot find the answer tokens")
            pieces.append((prompt[len(done):], False))
            answer = after[len(prompt):]
            # The template's whitespace after the end-of-turn token is not part of the answer.
            eos = tokenizer.special_tokens["eos_token"]
            cut = answer.find(eos)
            cut = len(answer) if cut < 0 else cut + len(eos)
            pieces.append((answer[:cut], True))
            done = prompt + answer[:cut]
    final = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    if not final.startswith(done):
        raise ValueError("the chat template renders the whole conversation differently from its turns")
    if final[len(done):]:
        pieces.append((final[len(done):], False))

    ids: list[int] = []
    labels: list[int] = []
    image_id, n_images = tokenizer.image_id, 0
    for text, is_answer in pieces:
        for token in tokenizer.encode(text):
            if token == image_id:
                if is_answer:
                    raise ValueError(f"an assistant message contains the image placeholder {IMAGE_TOKEN}")
                if isinstance(image_tokens, int):
                    expansion = [image_id] * image_tokens
                elif n_images < len(image_tokens):
                    expansion = list(image_tokens[n_images])
                else:
                    raise ValueError(f"the conversation holds more image placeholders than the "
                                     f"{len(image_tokens)} images given")
                n_images += 1
                ids += expansion
                labels += [IGNORE] * len(expansion)
            else:
                ids.append(token)
                labels.append(token if is_answer else IGNORE)
    if len(ids) > max_length:
        slots = sum(i == image_id for i in ids)
        raise PromptTooLong(f"the conversation is {len(ids)} tokens ({n_images} images, {slots} image tokens "
                            f"included), more than the limit of {max_length}")
    return Encoded(ids, labels, n_images)


def collate(batch: Sequence[Encoded], pad_id: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence: ids, labels (-100 on padding), mask, positions."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    T = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for row, e in enumerate(batch):
        span = slice(T - len(e.ids), T) if left_pad else slice(0, len(e.ids))
        ids[row, span] = torch.tensor(e.ids)
        labels[row, span] = torch.tensor(e.labels)
        mask[row, span] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"ids": ids, "labels": labels, "mask": mask, "positions": positions}
