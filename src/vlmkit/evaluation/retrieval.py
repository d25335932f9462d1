"""Image-text retrieval metrics (Recall@K, median rank) for paired embeddings.

Row i of `image_emb` and row i of `text_emb` are a pair: for image i the right caption is text i
and vice versa. Similarities are computed a block of queries at a time, so N = 10k pairs needs
a few tens of MB rather than the full N x N matrix.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """[N, E] x [M, E] -> [N, M] dot products (cosine similarity when rows are L2-normalised)."""
    _check_2d(image_emb, text_emb)
    return image_emb.float() @ text_emb.float().T


@torch.no_grad()
def retrieval_ranks(queries: Tensor, candidates: Tensor, chunk_size: int = 1024) -> Tensor:
    """0-based rank of each query's paired candidate (query i <-> candidate i), LongTensor [N].

    The rank counts every *other* candidate scoring at least as high as the right one, so a
    tie costs a place: constant embeddings score R@1 = 0, not 1.
    """
    queries, candidates = queries.float(), candidates.float()
    ranks = []
    for start in range(0, len(queries), chunk_size):
        sim = queries[start : start + chunk_size] @ candidates.T  # [chunk, N]
        rows = torch.arange(sim.shape[0], device=sim.device)
        # Read the right score from the same matmul, so rounding can't split a true tie.
        correct = sim[rows, rows + start].unsqueeze(1)
        at_least = sim >= correct
        at_least[rows, rows + start] = False  # the pair itself is not a competitor
        ranks.append(at_least.sum(dim=1))
    return torch.cat(ranks).cpu()


def retrieval_metrics(
    image_emb: Tensor, text_emb: Tensor, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024
) -> dict[str, float]:
    """Recall@K in both directions for paired, L2-normalised embeddings.

    Keys: "image_to_text_R@K" (an image queries all texts), "text_to_image_R@K", their average
    "mean_R@K", and "image_to_text_median_rank" / "text_to_image_median_rank" (1 = best).
    """
    _check_2d(image_emb, text_emb)
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"paired embeddings must have the same shape, "
                         f"got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if len(image_emb) == 0:
        raise ValueError("need at least one image-text pair")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")

    results: dict[str, float] = {}
    ranks = {
        "image_to_text": retrieval_ranks(image_emb, text_emb, chunk_size),
        "text_to_image": retrieval_ranks(text_emb, image_emb, chunk_size),
    }
    for direction, r in ranks.items():
        for k in ks:
            results[f"{direction}_R@{k}"] = (r < k).double().mean().item()
    for k in ks:
        results[f"mean_R@{k}"] = (results[f"image_to_text_R@{k}"] + results[f"text_to_image_R@{k}"]) / 2
    for direction, r in ranks.items():
        # torch.median takes the lower middle value; the float median is the textbook one.
        results[f"{direction}_median_rank"] = float(r.double().add(1).quantile(0.5))
    return results


def _check_2d(image_emb: Tensor, text_emb: Tensor) -> None:
    if image_emb.dim() != 2 or text_emb.dim() != 2:
        raise ValueError(f"embeddings must be 2-D [N, E], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding widths differ: {image_emb.shape[1]} vs {text_emb.shape[1]}")
