"""VisionTransformer: slices an image into patches and returns the sequence of patch tokens.

The output keeps one token per patch (plus an optional class token first), so spatial
detail survives for Stage 2; pooling to one vector is the dual encoder's job.
"""
from __future__ import annotations


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
        # Learned, but started from 2-D sin-cos values (as MAE does): the position signal is
        # then as strong as the content from step 0, and small models learn "where" much faster.
        self.pos_embed = nn.Parameter(sincos_2d(cfg.grid, cfg.width, self.prefix))
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
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # [B, D, H/p, W/p]; a bf16 tower takes bf16
        grid_h, grid_w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm_pre(x + self.position_embedding(grid_h, grid_w))
        stop = len(self.blocks) if layer is None else range(len(self.blocks))[layer] + 1
        for block in self.blocks[:stop]:
            x = block(x)
        return self.norm(x) if layer is None else x


    def unused_after(self, layer: int | None) -> list[nn.Module]:
        """The parts a forward to block `layer` never runs: later blocks and the final norm."""
        if layer is None:
            return []
        return [*self.blocks[range(len(self.blocks))[layer] + 1:], self.norm]


def sincos_2d(grid: int, width: int, prefix: int = 0) -> torch.Tensor:
    """[1, prefix + grid*grid, width]: half the channels encode the row, half the column."""
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for c in (rows.flatten(), cols.flatten()):
        angles = c[:, None] * freqs[None, :]  # [grid*grid, quarter]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    table = torch.cat([table, torch.zeros(grid * grid, width - table.shape[1])], dim=1)  # width % 4 leftovers
    return torch.cat([torch.zeros(prefix, width), table])[None]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
