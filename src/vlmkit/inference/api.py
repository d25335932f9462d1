"""The high-level API: `vlmkit.load(dir)` and what a loaded model can do.

A Stage 1 checkpoint loads as a `DualEncoderModel` (embed, classify, search); a Stage 2
checkpoint as a `VisionLanguageAssistant` (caption, ask, chat, classify, embed). The CLI
and the server call only this module, never model internals.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from vlmkit.checkpoint import CheckpointError, load_model, read_config
from vlmkit.data.images import ImageTransform, load_image
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.inference.precision import for_inference
from vlmkit.inference.zero_shot import DEFAULT_TEMPLATES, build_classifier
from vlmkit.runtime import default_device

class DualEncoderModel:
    """A trained dual encoder with its tokenizer and image preprocessing."""

    def __init__(self, model, tokenizer: Tokenizer, transform: ImageTransform, device: torch.device):
        self.model, self.tokenizer, self.transform, self.device = model.to(device).eval(), tokenizer, transform, device

    @property
    def embed_dim(self) -> int:
        return self.model.cfg.embed_dim

    @torch.no_grad()
    def embed_images(self, images: Sequence, batch_size: int = 64) -> torch.Tensor:
        """Paths, bytes or PIL images -> L2-normalised embeddings [N, E]."""
        if len(images) == 0:
            raise ValueError("no images given")
        out = []
        for i in range(0, len(images), batch_size):
            pixels = torch.stack([self.transform(load_image(img)) for img in images[i: i + batch_size]])
            out.append(self.model.encode_image(pixels.to(self.device)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> L2-normalised embeddings [N, E]; overlong texts are truncated to the model's limit."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts given")
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError("texts must be non-empty strings")
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenizer.encode(texts[i: i + batch_size], max_length=self.model.cfg.text.max_length)
            out.append(self.model.encode_text(ids.to(self.device), mask.to(self.device)).float().cpu())
        return torch.cat(out)

    def classify(self, image, labels: Sequence[str], templates: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """Zero-shot: probabilities over `labels`, best first, from a prompt-template ensemble."""
        labels = list(labels)
        if len(labels) < 2:
            raise ValueError("give at least two labels to choose between")
        templates = list(templates or DEFAULT_TEMPLATES)
        bad = [t for t in templates if "{}" not in t]
        if bad:
            raise ValueError(f"template {bad[0]!r} has no '{{}}' where the label goes")
        classifier = build_classifier(self.embed_texts, labels, templates)
        scale = self.model.scale_and_bias()[0].item()
        probs = (scale * self.embed_images([image]) @ classifier.T).softmax(-1)[0]
        return sorted(zip(labels, probs.tolist()), key=lambda p: -p[1])

    def rank(self, query: torch.Tensor, candidates: torch.Tensor, top_k: int) -> list[tuple[int, float]]:
        scores = (candidates @ query.T).squeeze(-1)
        top = scores.topk(min(top_k, len(scores)))
        return list(zip(top.indices.tolist(), top.values.tolist()))

    def search_images(self, text: str, images: Sequence, top_k: int = 5) -> list[tuple[int, float]]:
        """Text -> the best-matching images: (index into `images`, cosine similarity)."""
        return self.rank(self.embed_texts([text]), self.embed_images(images), top_k)

    def search_texts(self, image, texts: Sequence[str], top_k: int = 5) -> list[tuple[int, float]]:
        """Image -> the best-matching texts: (index into `texts`, cosine similarity)."""
        return self.rank(self.embed_images([image]), self.embed_texts(texts), top_k)


    def embed(self, images: Sequence | None = None, texts: Sequence[str] | None = None) -> torch.Tensor:
        """Embeddings of `images` or of `texts` (one of the two), in the shared space."""
        if (images is None) == (texts is None):
            raise ValueError("pass images or texts (one of the two)")
        return self.embed_images(images) if images is not None else self.embed_texts(texts)


def load(path: str | Path, device: str | torch.device | None = None, precision: str = "auto"):
    """Load a vlmkit checkpoint directory for inference (a Stage 1 or a Stage 2 model).

    `precision`: "auto" (bf16 where the device computes it natively, else fp32), "fp32",
    "bf16" or "int8" (int8 language-model weights; see `inference.precision`).
    """
    path = Path(path)
    config = read_config(path)
    if config["kind"] not in ("dual_encoder", "vlm"):
        raise CheckpointError(f"{path}: model kind {config['kind']!r} is not supported; known: dual_encoder, vlm")
    if not (path / "preprocessor.json").is_file():
        raise CheckpointError(f"{path}: missing preprocessor.json")
    transform = ImageTransform.from_dict(json.loads((path / "preprocessor.json").read_text()))
    device = torch.device(device) if device else default_device()
    model = for_inference(load_model(path), precision, device)
    if config["kind"] == "vlm":
        from vlmkit.data.lm_tokenizer import LMTokenizer
        from vlmkit.inference.assistant import VisionLanguageAssistant

        return VisionLanguageAssistant(model, LMTokenizer.from_pretrained(path), transform, device)
    return DualEncoderModel(model, Tokenizer.from_pretrained(path), transform, device)
