"""What an image placeholder becomes in the token ids: the slots the image's tokens fill.

"slots" (LLaVA, vlmkit's own models): every view of the image takes `slots` image-token
slots, one view after another. "idefics3" (Idefics3, SmolVLM): an image split into rows x
cols tiles is written, row by row,

    <fake_token_around_image><row_1_col_1><image>*slots ... \\n   (one line per row)
    \\n<fake_token_around_image><global-img><image>*slots<fake_token_around_image>

and an unsplit image as the last line alone. The text is tokenized whole, as transformers'
processor does: a tokenizer may merge the two newlines before the global view into one token.
"""
from __future__ import annotations

import functools

from vlmkit.data.lm_tokenizer import LMTokenizer

LAYOUTS = ("slots", "idefics3")
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
MAX_GRID = 6   # Idefics3's tokenizers have row/column markers up to <row_6_col_6>


def tile_markers() -> list[str]:
    """The special tokens the idefics3 layout writes, as Idefics3 / SmolVLM tokenizers hold them."""
    return [FAKE_TOKEN, GLOBAL_TOKEN] + [f"<row_{r}_col_{c}>" for r in range(1, MAX_GRID + 1)
                                         for c in range(1, MAX_GRID + 1)]


def idefics3_text(rows: int, cols: int, slots: int, image_token: str) -> str:
    image = image_token * slots
    last = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{image}{FAKE_TOKEN}"
    if rows == 0 and cols == 0:
        return last
    lines = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
                    for r in range(rows))
    return lines + "\n" + last


class ImagePrompt:
    """Token ids for one image placeholder, given how the image was split."""

    def __init__(self, tokenizer: LMTokenizer, layout: str, slots: int, image_token: str):
        if layout not in LAYOUTS:
            raise ValueError(f"image_prompt {layout!r} is unknown; known: {', '.join(LAYOUTS)}")
        self.tokenizer, self.layout, self.slots, self.image_token = tokenizer, layout, slots, image_token
        self.image_id = tokenizer.token_id(image_token)
        if layout == "idefics3":
            missing = [t for t in (FAKE_TOKEN, GLOBAL_TOKEN) if tokenizer.backend.token_to_id(t) is None]
            if missing:
                raise ValueError(f"the tokenizer lacks {missing}, which the idefics3 image prompt needs")

    @functools.lru_cache(maxsize=64)
    def ids(self, rows: int = 0, cols: int = 0) -> tuple[int, ...]:
        if self.layout == "slots":
            return (self.image_id,) * (self.slots * (rows * cols + 1))
        ids = tuple(self.tokenizer.encode(idefics3_text(rows, cols, self.slots, self.image_token)))
        if ids.count(self.image_id) != self.slots * (rows * cols + 1):
            raise ValueError(f"the tokenizer splits {self.image_token!r} or a tile marker; "
                             "the image prompt does not hold one slot per image token")
        return ids
