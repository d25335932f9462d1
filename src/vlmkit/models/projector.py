"""Projectors: ViT patch tokens [B, N, Dv] -> LM input embeddings [B, K, Dlm].

- `mlp`: two linear layers with a GELU between, one output token per patch (LLaVA-1.5).
- `pixel_shuffle`: merge each f x f block of neighbouring patches into one token by
  concatenating their features, then the MLP (nanoVLM), or one bias-free Linear with
  `linear` (Idefics3 / SmolVLM): f^2 fewer image tokens.
- `resampler`: a fixed number of learned queries cross-attend to the patches, then the
  MLP (Q-Former / Perceiver-resampler style): the token count no longer depends on the image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import ProjectorConfig


class MLPProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, N, D] on a square grid -> [B, N / f^2, D * f^2], each token a f x f block of patches."""
    B, N, D = x.shape
    side = int(round(N ** 0.5))
    if side * side != N or side % factor:
        raise ValueError(f"pixel_shuffle needs a square grid divisible by {factor}, got {N} tokens")
    g = side // factor
    x = x.view(B, g, factor, g, factor, D)          # [B, row block, row in block, col block, col in block, D]
    x = x.permute(0, 1, 3, 2, 4, 5)                 # [B, g, g, f, f, D]
    return x.reshape(B, g * g, factor * factor * D)


class Resampler(nn.Module):
    """Learned queries attend to the patch tokens (one cross-attention layer), then an MLP."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, queries: int, heads: int):
        super().__init__()
        if in_dim % heads:
            raise ValueError(f"resampler heads {heads} must divide the vision width {in_dim}")
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(queries, in_dim) * 0.02)
        self.norm_q = nn.LayerNorm(in_dim)
        self.norm_kv = nn.LayerNorm(in_dim)
        self.q = nn.Linear(in_dim, in_dim)
        self.kv = nn.Linear(in_dim, 2 * in_dim)
        self.out = nn.Linear(in_dim, in_dim)
        self.mlp = MLPProjector(in_dim, out_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        hd = D // self.heads
        q = self.q(self.norm_q(self.queries)).expand(B, -1, -1)
        q = q.view(B, -1, self.heads, hd).transpose(1, 2)                        # [B, H, K, hd]
        k, v = self.kv(self.norm_kv(x)).view(B, N, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # [B, H, N, hd]
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D)
        return self.mlp(self.queries + self.out(y))


class Projector(nn.Module):
    """The projector named by `cfg.kind` (see the module docstring), optionally with a learned
    position embedding per output token (`cfg.position_embedding`; `tokens` of them)."""

    def __init__(self, cfg: ProjectorConfig, vision_width: int, lm_width: int, tokens: int | None = None):
        super().__init__()
        self.kind, self.factor = cfg.kind, cfg.shuffle_factor
        hidden = cfg.hidden or lm_width
        if cfg.linear and cfg.kind == "resampler":
            raise ValueError("projector.linear replaces the MLP of the mlp and pixel_shuffle projectors, "
                             "not the resampler")
        if cfg.kind in ("mlp", "pixel_shuffle"):
            width = vision_width * (cfg.shuffle_factor ** 2 if cfg.kind == "pixel_shuffle" else 1)
            self.net = nn.Linear(width, lm_width, bias=False) if cfg.linear else MLPProjector(width, lm_width, hidden)
        elif cfg.kind == "resampler":
            self.net = Resampler(vision_width, lm_width, hidden, cfg.queries, cfg.heads)
        else:
            raise ValueError(f"unknown projector kind {cfg.kind!r}; choose mlp, pixel_shuffle or resampler")
        self.position = None
        if cfg.position_embedding:
            if tokens is None:
                raise ValueError("projector.position_embedding needs the number of image tokens")
            self.position = nn.Parameter(torch.randn(tokens, lm_width) * 0.02)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.kind == "pixel_shuffle":
            patches = pixel_shuffle(patches, self.factor)
        out = self.net(patches)
        return out if self.position is None else out + self.position.to(out.dtype)

    @torch.no_grad()
    def calibrate(self, patches: torch.Tensor) -> None:
        """Data-dependent init: make the first layer see standardised features.

        Raw ViT outputs are dominated by a part that is the same for every image (position
        embeddings, mostly); what differs between images can be 1% of a token's norm. Folding
        per-channel mean and std, measured on `patches` [n, N, Dv], into the first linear layer
        lets the LM see image content from step one, and keeps the projector a plain
        Linear-GELU-Linear (the layout LLaVA checkpoints use).
        """
        if self.kind == "pixel_shuffle":
            patches = pixel_shuffle(patches, self.factor)
        # The resampler normalises its inputs with LayerNorm already; a bias-free Linear has no
        # bias to take the mean into, and is a published model's part, not one to start.
        first = self.net.fc1 if isinstance(self.net, MLPProjector) else None
        if first is not None:
            x = patches.reshape(-1, patches.shape[-1]).float()
            mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
            # fc1(x) = W x + b  ->  W ((x - mean) / std) + b  =  (W / std) x + (b - W (mean / std))
            w = first.weight / std
            first.bias.copy_(first.bias - w @ mean)
            first.weight.copy_(w)
        if self.position is not None:
            # Slot vectors start as large as what the image puts in a token, so they are not drowned.
            spread = self.net(patches).float().std()
            self.position.copy_(torch.randn_like(self.position) * spread)
