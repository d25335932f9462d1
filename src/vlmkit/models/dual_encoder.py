"""DualEncoder: a vision tower and a text tower, pooled and projected into one space.

Returns L2-normalised embeddings and the (clamped) logit scale and bias; the loss lives
in `vlmkit.losses`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import DualEncoderConfig
from vlmkit.models.text_encoder import TextEncoder
from vlmkit.models.vit import VisionTransformer


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, D], [B, T] -> [B, D]: the mean over real (unpadded) tokens."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class DualEncoder(nn.Module):
    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.text = TextEncoder(cfg.text)
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.vision_proj.weight, std=cfg.vision.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=cfg.text.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.loss == "siglip" else None

    def pool_image(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.vision_pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.vision.prefix :].mean(dim=1)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.vision_proj(self.pool_image(self.vision(pixels)))
        return F.normalize(z, dim=-1) if normalize else z

    def pool_text(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return tokens[:, 0] if self.cfg.text_pool == "cls" else masked_mean(tokens, mask)

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
