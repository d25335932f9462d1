"""Contrastive losses: symmetric InfoNCE (CLIP) and the pairwise sigmoid loss (SigLIP).

Under torchrun the embeddings of every rank are gathered (with gradients flowing back to
the local shard), so each image is contrasted with the captions of the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated, and the offset of this rank's rows in them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_fn

    parts = dist_fn.all_gather(x)
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def infonce_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over image->text rows and text->image columns.

    image, text: [B, E], L2-normalised; row i of each is a matching pair.
    """
    all_text, offset = gather_with_grad(text)
    all_image, _ = gather_with_grad(image)
    targets = torch.arange(image.shape[0], device=image.device) + offset
    logits_i2t = scale * image @ all_text.T  # [B, B_global]
    logits_t2i = scale * text @ all_image.T
    return (F.cross_entropy(logits_i2t.float(), targets) + F.cross_entropy(logits_t2i.float(), targets)) / 2


def siglip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Each (image, caption) pair is an independent binary problem: match or not.

    Normalised by the number of images, as in the SigLIP paper.
    """
    all_text, offset = gather_with_grad(text)
    logits = scale * image @ all_text.T + bias  # [B, B_global]
    signs = -torch.ones_like(logits)
    rows = torch.arange(image.shape[0], device=image.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits.float()).sum() / image.shape[0]


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens: logits [n, V] already taken at `answer_positions(labels)`."""
    targets = labels[:, 1:][labels[:, 1:] != -100]
    if targets.numel() == 0:
        raise ValueError("the batch has no answer tokens to learn from (every label is -100)")
    return F.cross_entropy(logits.float(), targets)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: positions whose next token is an answer token (those predict it)."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100
    return predicts
