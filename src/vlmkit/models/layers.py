"""Transformer building blocks shared by the towers: attention, MLP, blocks.

Attention uses one fused QKV projection and `scaled_dot_product_attention`, so the
fastest kernel for the device is picked (flash / memory-efficient on CUDA, fused on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":  # OpenAI CLIP's x * sigmoid(1.702 x)
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; choose gelu, gelu_tanh or quick_gelu")


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, dim: int, heads: int, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """x: [B, T, D]; mask: [B, T] with True for tokens that may be attended to.

        `causal` lets position t see positions <= t only; it combines with `mask`.
        """
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, T, hd] each
        attn_mask = None if mask is None else attention_mask(mask, causal)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and mask is None)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


def attention_mask(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, T] key mask -> boolean SDPA mask, [B, 1, 1, T] or (causal) [B, 1, T, T].

    With `causal`, every position may also see itself: a padding position that precedes
    all real tokens (left padding) would otherwise have no key at all, and its NaN output
    would leak into the next layer through the (masked, yet multiplied) values. Real
    positions already see themselves, so their outputs are unchanged.
    """
    keys = mask.to(torch.bool)[:, None, None, :]  # broadcast over heads and queries
    if not causal:
        return keys
    T = mask.shape[1]
    lower = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    return (keys & lower) | torch.eye(T, dtype=torch.bool, device=mask.device)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One transformer layer.

    `pre_norm=True` is the ViT/CLIP layout (x + f(norm(x))); `pre_norm=False` is BERT's
    (norm(x + f(x))). Both keep the same parameter names so converters stay simple.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, eps: float, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), mask, causal)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, mask, causal))
        return self.norm2(x + self.mlp(x))


class AttentionPool(nn.Module):
    """Multi-head attention pooling (SigLIP's "MAP" head): one learned probe reads the tokens.

    The probe attends over all tokens (fused q/k/v in-projection, then an out-projection);
    a pre-norm MLP with a residual follows, and the probe's output is the pooled vector.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.qkv = nn.Linear(dim, 3 * dim)   # rows: query, key, value projections
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act)
        nn.init.normal_(self.probe, std=0.02)
        for linear in (self.qkv, self.out, self.mlp.fc1, self.mlp.fc2):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, D] -> pooled [B, D]."""
        B, T, D = tokens.shape
        hd = D // self.heads
        w_q, w_kv = self.qkv.weight.split([D, 2 * D])
        b_q, b_kv = self.qkv.bias.split([D, 2 * D])
        # Only the probe is a query, so project it alone rather than every token three ways.
        q = F.linear(self.probe, w_q, b_q).view(1, 1, self.heads, hd).transpose(1, 2).expand(B, -1, -1, -1)
        k, v = F.linear(tokens, w_kv, b_kv).view(B, T, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, hd]
        y = self.out(y.transpose(1, 2).reshape(B, 1, D))
        y = y + self.mlp(self.norm(y))
        return y[:, 0]
