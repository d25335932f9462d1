"""Batch augmentation for Stage 1 training, applied to normalised pixel tensors.

`dihedral` draws one of the 8 symmetries of a square for each image: a horizontal flip, a
vertical flip and a transpose, each with probability 1/2. A shape stays the same shape
under all of them, so a tower trained this way must read shape from the pixels, not from
where or which way round it happens to sit. Captions that name a side ("left of") would
be wrong afterwards, so it is for data without them.
"""
from __future__ import annotations

import torch


def dihedral(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """pixels [B, C, H, W] with H == W -> each image under a random symmetry of the square."""
    if pixels.shape[-1] != pixels.shape[-2]:
        raise ValueError(f"dihedral augmentation needs square images, got {tuple(pixels.shape[-2:])}")
    flips = torch.rand(3, len(pixels), generator=generator) < 0.5
    chosen = [m.to(pixels.device)[:, None, None, None] for m in flips]
    pixels = torch.where(chosen[0], pixels.flip(-1), pixels)
    pixels = torch.where(chosen[1], pixels.flip(-2), pixels)
    return torch.where(chosen[2], pixels.transpose(-1, -2), pixels)


AUGMENTATIONS = {"dihedral": dihedral}
