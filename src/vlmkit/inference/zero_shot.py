"""Zero-shot classifiers: class names -> one text embedding per class, from prompt templates.

`build_classifier` fills each template ("a photo of a {}.") with each class name, encodes the
prompts and averages them per class (a prompt ensemble, as in CLIP). Image embeddings are
then scored against its rows.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}."]


@torch.no_grad()
def build_classifier(
    encode_text: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> Tensor:
    """One L2-normalised row per class, [C, E]: the re-normalised mean of its normalised prompts."""
    if not classnames or not templates:
        raise ValueError("build_classifier needs at least one class name and one template")
    for t in templates:
        if t.format("\0") == t:  # a template without "{}" would give every class the same text
            raise ValueError(f"template {t!r} has no '{{}}' placeholder for the class name")

    prompts = [t.format(c) for c in classnames for t in templates]  # class-major: reshape below
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        emb = encode_text(batch)
        if emb.dim() != 2 or len(emb) != len(batch):
            raise ValueError(f"encode_text returned shape {tuple(emb.shape)} for {len(batch)} texts; expected [B, E]")
        chunks.append(emb.float())
    emb = torch.cat(chunks).view(len(classnames), len(templates), -1)
    # Normalise before averaging so no single prompt dominates through its norm.
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)
