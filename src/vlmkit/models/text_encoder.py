"""TextEncoder: a BERT-compatible transformer encoder (loads BERT / MiniLM weights).

Word + position + token-type embeddings, LayerNorm, then post-norm blocks. Returns one
token per input id; pooling to one vector is the dual encoder's job.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import TextConfig
from vlmkit.models.layers import Block
from vlmkit.models.vit import _init_weights


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.width)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.norm_embed = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps, pre_norm=False) for _ in range(cfg.depth)
        )
        self.apply(_init_weights)
        for emb in (self.word_embed, self.pos_embed, self.type_embed):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids, mask: [B, T] -> tokens [B, T, D]. mask is 1 for real tokens, 0 for padding."""
        B, T = ids.shape
        if T > self.cfg.max_positions:
            raise ValueError(f"text of {T} tokens exceeds max_positions {self.cfg.max_positions}")
        if int(ids.max()) >= self.cfg.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"token id out of range for a vocabulary of {self.cfg.vocab_size}")
        positions = torch.arange(T, device=ids.device)
        x = self.word_embed(ids) + self.pos_embed(positions)[None] + self.type_embed.weight[0]
        x = self.norm_embed(x)
        key_mask = None if mask is None else mask.bool()
        for block in self.blocks:
            x = block(x, key_mask)
        return x
