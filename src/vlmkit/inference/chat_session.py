"""A multi-turn conversation with a `VisionLanguageAssistant`: history, attached images, streaming."""
from __future__ import annotations

from typing import Iterator

from vlmkit.data.images import load_image
from vlmkit.data.lm_tokenizer import IMAGE_TOKEN


class ChatSession:
    def __init__(self, assistant, system: str | None = None, **sampling):
        self.assistant, self.system, self.sampling = assistant, system, sampling
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list = []
        self._pending: list = []

    def attach(self, image) -> None:
        """Attach an image to the next message (decoded now, so a bad file is reported at once)."""
        self._pending.append(load_image(image))

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to `text`; the turn joins the history once the reply is complete."""
        if not text.strip():
            raise ValueError("the message is empty")
        content = "".join(IMAGE_TOKEN + "\n" for _ in self._pending) + text
        messages = self.messages + [{"role": "user", "content": content}]
        images = self.images + self._pending
        reply = ""
        for piece in self.assistant.chat(messages, images, stream=True, **self.sampling):
            reply += piece
            yield piece
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self.images, self._pending = images, []
