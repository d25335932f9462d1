"""TextEncoder: a transformer text encoder in BERT's or CLIP's layout.

`layout="bert"` (default) loads BERT / MiniLM weights: word + position + token-type
embeddings, LayerNorm, then post-norm blocks. `layout="pre_norm"` is CLIP's and SigLIP's
text tower: word + position embeddings, pre-norm blocks, a final LayerNorm (`norm`), with
optional causal attention (CLIP). Returns one token per input id; pooling to one vector is
the dual encoder's job.
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
        bert = cfg.layout == "bert"
        self.word_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.width)
        if bert:
            self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.width)
            self.norm_embed = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps, pre_norm=not bert)
            for _ in range(cfg.depth)
        )
        # Pre-norm blocks leave the residual stream unnormalised; the final norm fixes that.
        self.norm = None if bert else nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.apply(_init_weights)
        for emb in (self.word_embed, self.pos_embed, getattr(self, "type_embed", None)):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids, mask: [B, T] -> tokens [B, T, D]. mask is 1 for real tokens, 0 for padding."""
        B, T = ids.shape
        if T > self.cfg.max_positions:
            raise ValueError(f"text of {T} tokens exceeds max_positions {self.cfg.max_positions}")
        if int(ids.max()) >= self.cfg.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"token id out of range for a vocabulary of {self.cfg.vocab_size}")
        positions = torch.arange(T, device=ids.device)
        x = self.word_embed(ids) + self.pos_embed(positions)[None]
        if self.cfg.layout == "bert":
            x = self.norm_embed(x + self.type_embed.weight[0])
        key_mask = None if mask is None or not self.cfg.mask_padding else mask.bool()
        for block in self.blocks:
            x = block(x, key_mask, self.cfg.causal)
        return x if self.norm is None else self.norm(x)
