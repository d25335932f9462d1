"""DualEncoder: a vision tower and a text tower, pooled and projected into one space.

Returns L2-normalised embeddings and the (clamped) logit scale and bias; the loss lives
in `vlmkit.losses`.

Pooling: images by class token, mean of patch tokens, or SigLIP's attention-pooling head
("map", which is then also the image projection); texts by first token, mean, last real
token ("eos": CLIP, whose tokenizer ends every text with EOS) or final position ("last":
SigLIP, padded to a fixed length).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import DualEncoderConfig
from vlmkit.models.layers import AttentionPool
from vlmkit.models.text_encoder import TextEncoder
from vlmkit.models.vit import VisionTransformer


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, D], [B, T] -> [B, D]: the mean over real (unpadded) tokens."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def last_real_token(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, D], [B, T] -> [B, D]: each row's last position whose mask is set.

    Finds the last set position, not "sum of the mask - 1", so left padding works too.
    """
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).amax(dim=1).clamp(min=0)  # an all-padding row: position 0
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]


class DualEncoder(nn.Module):
    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.text = TextEncoder(cfg.text)
        v = cfg.vision
        # Modules are created, then initialised, in this order so that a seed gives the same
        # weights as before the "map" head and the text bias existed.
        if cfg.vision_pool == "map":
            # The pooling head's output is already in the shared space: no separate projection.
            self.vision_head = AttentionPool(v.width, v.heads, v.mlp_dim, v.act, v.norm_eps)
        else:
            self.vision_proj = nn.Linear(v.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=cfg.text_proj_bias)
        if cfg.vision_pool != "map":
            nn.init.normal_(self.vision_proj.weight, std=v.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=cfg.text.width**-0.5)
        if cfg.text_proj_bias:
            nn.init.zeros_(self.text_proj.bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.loss == "siglip" else None

    def pool_image(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.vision_pool == "cls":
            return tokens[:, 0]
        if self.cfg.vision_pool == "map":
            return self.vision_head(tokens)
        return tokens[:, self.vision.prefix :].mean(dim=1)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.pool_image(self.vision(pixels))
        if self.cfg.vision_pool != "map":
            z = self.vision_proj(z)
        return F.normalize(z, dim=-1) if normalize else z

    def pool_text(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, T, D] -> [B, D]; "eos" without a mask takes the final position, like "last"."""
        pool = self.cfg.text_pool
        if pool == "cls":
            return tokens[:, 0]
        if pool == "last" or (pool == "eos" and mask is None):
            return tokens[:, -1]
        if pool == "eos":
            return last_real_token(tokens, mask)
        return masked_mean(tokens, mask)

    def project_text(self, pooled: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Split from `encode_text` so a locked tower's pooled outputs can be cached (LiT)."""
        z = self.text_proj(pooled)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        return self.project_text(self.pool_text(self.text(ids, mask), mask), normalize)

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """exp(logit_scale), clamped as in CLIP so the temperature cannot collapse."""
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp(), self.logit_bias

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                text_pooled: torch.Tensor | None = None):
        """Both embeddings, scale and bias. `text_pooled` replaces ids for a locked, cached text tower."""
        scale, bias = self.scale_and_bias()
        text = self.project_text(text_pooled) if text_pooled is not None else self.encode_text(ids, mask)
        return self.encode_image(pixels), text, scale, bias
