"""VisionTransformer: slices an image into patches and returns the sequence of patch tokens.

The output keeps one token per patch (plus an optional class token first), so spatial
detail survives for Stage 2; pooling to one vector is the dual encoder's job.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.models.layers import Block


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size,
                                     bias=cfg.patch_bias)
        self.prefix = 1 if cfg.class_token else 0
        self.class_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.prefix + cfg.grid**2, cfg.width) * 0.02)
        self.norm_pre = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.norm_pre else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps, pre_norm=True) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.apply(_init_weights)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Learned positions, bicubically resized when the image grid differs from training."""
        n = self.cfg.grid
        if (grid_h, grid_w) == (n, n):
            return self.pos_embed
        prefix, patches = self.pos_embed[:, : self.prefix], self.pos_embed[:, self.prefix :]
        patches = patches.reshape(1, n, n, -1).permute(0, 3, 1, 2)  # [1, D, n, n]
        patches = F.interpolate(patches.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patches = patches.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([prefix, patches], dim=1)

    def forward(self, pixels: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """pixels: [B, C, H, W] -> tokens [B, prefix + N, D].

        `layer=None` returns the final, normalised tokens; `layer=k` returns the raw
        output of block k (negative counts from the end), as LLaVA's feature layer does.
        """
        if pixels.ndim != 4 or pixels.shape[1] != self.cfg.channels:
            raise ValueError(f"expected pixels [B, {self.cfg.channels}, H, W], got {list(pixels.shape)}")
        p = self.cfg.patch_size
        if pixels.shape[2] % p or pixels.shape[3] % p:
            raise ValueError(f"image size {tuple(pixels.shape[2:])} is not a multiple of the patch size {p}")
        x = self.patch_embed(pixels)  # [B, D, H/p, W/p]
        grid_h, grid_w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm_pre(x + self.position_embedding(grid_h, grid_w))
        stop = len(self.blocks) if layer is None else range(len(self.blocks))[layer] + 1
        for block in self.blocks[:stop]:
            x = block(x)
        return self.norm(x) if layer is None else x


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
