"""The pictures of a finished Stage 1 run: similarity matrix, embedding map, loss curve."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from vlmkit.data.prepared import PreparedPairs
from vlmkit.evaluation.clip_eval import encode_images, encode_texts
from vlmkit.viz.plots import plot_curves, plot_embedding_map, plot_similarity_matrix


def _pil(data: PreparedPairs, i: int) -> Image.Image:
    return Image.fromarray(data.images[i].permute(1, 2, 0).numpy())


def draw_dual_encoder_run(model, tokenizer, data: PreparedPairs, out_dir: str | Path, classes: list[str] | None = None,
                          n_matrix: int = 8, n_map: int = 300, device="cpu") -> dict[str, Path]:
    """Write similarity.png (a batch of held-out pairs), embedding_map.png (PCA) and loss_curve.png."""
    out_dir = Path(out_dir)
    rows = torch.arange(min(n_map, len(data)))
    if classes:  # one example per class first, so the matrix shows every class once where it can
        firsts = [int((data.labels == c).nonzero()[0]) for c in range(len(classes)) if (data.labels == c).any()]
        rows = torch.tensor(firsts[:n_matrix] + [i for i in rows.tolist() if i not in firsts[:n_matrix]])
    sample = data.take(rows)
    image = encode_images(model, sample, device=device)
    text = encode_texts(model, tokenizer, sample.captions, device=device)
    k = min(n_matrix, len(rows))
    labels = None
    if classes and bool((sample.labels >= 0).all()):
        labels = [classes[int(c)] for c in sample.labels]
    paths = {
        "similarity": plot_similarity_matrix(image[:k] @ text[:k].T, out_dir / "similarity.png",
                                             images=[_pil(sample, i) for i in range(k)], captions=sample.captions[:k],
                                             title="cosine similarity: held-out images x their captions"),
        "embedding_map": plot_embedding_map(image, text, out_dir / "embedding_map.png", image_labels=labels,
                                            text_labels=labels,
                                            title="PCA of image (dots) and caption (crosses) embeddings"),
    }
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        paths["loss_curve"] = plot_curves(records, out_dir / "loss_curve.png", keys=("loss",),
                                          eval_keys=[k for k in records[-1] if k.endswith("R@1") or "top1" in k])
    return paths
