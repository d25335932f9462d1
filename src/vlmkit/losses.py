"""Contrastive losses: symmetric InfoNCE (CLIP) and the pairwise sigmoid loss (SigLIP).

Under torchrun the embeddings of every rank are gathered (with gradients flowing back to
the local shard), so each image is contrasted with the captions of the global batch.

Both losses take optional `negatives`: one extra caption per pair that is wrong for every
image (a hard negative, NegCLIP-style), added to the image->text side only.

Both losses take optional `caption_ids` (one integer per pair, equal for identical
captions). Data with few distinct captions (Easy-VQA has 24) puts many copies of a caption
in one batch; without the ids those copies are pushed apart as if they were mismatches.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated, and the offset of this rank's rows in them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _AllGather.apply(x), dist.get_rank() * x.shape[0]


class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own rows, summed over ranks:
    every rank's loss reads every rank's rows, and the gradient is the sum of those losses'.
    (DDP then averages over ranks, which the mean in each rank's loss expects.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows: (dist.get_rank() + 1) * rows]


def same_caption(caption_ids: torch.Tensor | None, offset: int) -> torch.Tensor | None:
    """Bool [B, B_global]: local pair i and global pair j have the same caption, i != j."""
    if caption_ids is None:
        return None
    all_ids, _ = gather_with_grad(caption_ids)
    same = caption_ids[:, None] == all_ids[None, :]
    rows = torch.arange(len(caption_ids), device=same.device)
    same[rows, rows + offset] = False
    return same


def infonce_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                 caption_ids: torch.Tensor | None = None, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric cross-entropy over image->text rows and text->image columns.

    image, text: [B, E], L2-normalised; row i of each is a matching pair. With
    `caption_ids`, other pairs that share the caption are left out of the negatives.
    `negatives` [B, E] are extra captions each image's row is contrasted with.
    """
    all_text, offset = gather_with_grad(text)
    all_image, _ = gather_with_grad(image)
    targets = torch.arange(image.shape[0], device=image.device) + offset
    logits_i2t = (scale * image @ all_text.T).float()  # [B, B_global]
    logits_t2i = (scale * text @ all_image.T).float()
    same = same_caption(caption_ids, offset)
    if same is not None:
        logits_i2t = logits_i2t.masked_fill(same, float("-inf"))
        logits_t2i = logits_t2i.masked_fill(same, float("-inf"))
    if negatives is not None:
        logits_i2t = torch.cat([logits_i2t, (scale * image @ gather_with_grad(negatives)[0].T).float()], dim=1)
    return (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets)) / 2


def siglip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                caption_ids: torch.Tensor | None = None, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Each (image, caption) pair is an independent binary problem: match or not.

    Normalised by the number of images, as in the SigLIP paper. With `caption_ids`, an
    image and another pair's identical caption count as a match.
    """
    all_text, offset = gather_with_grad(text)
    logits = scale * image @ all_text.T + bias  # [B, B_global]
    signs = -torch.ones_like(logits)
    rows = torch.arange(image.shape[0], device=image.device)
    signs[rows, rows + offset] = 1.0
    same = same_caption(caption_ids, offset)
    if same is not None:
        signs = signs.masked_fill(same, 1.0)
    loss = -F.logsigmoid(signs * logits.float()).sum()
    if negatives is not None:
        loss = loss - F.logsigmoid(-(scale * image @ gather_with_grad(negatives)[0].T + bias).float()).sum()
    return loss / image.shape[0]


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """Cross-entropy over answer tokens: logits [n, V] already taken at `answer_positions(labels)`.

    The mean over this batch's answer tokens, or with `denominator` their sum divided by it:
    a batch that is one share of a larger one (a micro-batch, one rank's part) then counts
    each token as the whole batch's mean would, however the tokens fall between the shares.
    """
    targets = labels[:, 1:][labels[:, 1:] != -100]
    if denominator is not None:
        return F.cross_entropy(logits.float(), targets, reduction="sum") / denominator
    if targets.numel() == 0:
        raise ValueError("the batch has no answer tokens to learn from (every label is -100)")
    return F.cross_entropy(logits.float(), targets)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: positions whose next token is an answer token (those predict it)."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100
    return predicts
