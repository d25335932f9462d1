"""DecoderLM: a Llama-compatible decoder-only language model with a preallocated KV cache.

RMSNorm, rotary position embeddings (the "rotate half" layout of Hugging Face Llama),
SwiGLU MLP and grouped-query attention through `scaled_dot_product_attention`. The Q, K and
V projections are fused into one matrix (`attn.qkv`), as are the gate and up projections
(`mlp.gate_up`); `convert/` splits them back into Hugging Face's names.

The model takes token ids or ready-made input embeddings (the VLM fills image slots
itself), explicit positions (so left-padded batches rotate each row from its own start),
and an optional `KVCache` that it appends to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import DecoderConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Llama does; under bf16 autocast the variance would lose digits.
        # (By hand: F.rms_norm's CPU kernel is several times slower on a single row.)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [max_positions, head_dim], in the rotate-half layout."""
    # Always on the CPU, even inside `checkpoint.empty_model()`: no checkpoint holds these.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device="cpu"), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, hd]; cos/sin: [B, T, 1, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention for one new token: q [B, H, 1, hd] over k, v [B, kvH, S, hd] -> [B, H, 1, hd].

    Two matrix products and a softmax, with each key/value head's query heads stacked as
    rows, so grouped-query attention needs no repeated keys. For a single query this beats
    `scaled_dot_product_attention`'s CPU kernel, several times over in bf16. Scores and
    softmax run in fp32. mask: boolean, broadcastable to [B, 1, 1, S].
    """
    B, H, _, hd = q.shape
    kvH = k.shape[1]
    q = q.reshape(B, kvH, H // kvH, hd)                            # query head h reads key head h // group
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * hd ** -0.5   # [B, kvH, group, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.matmul(scores.softmax(-1).to(v.dtype), v)           # [B, kvH, group, hd]
    return y.reshape(B, H, 1, hd)


class KVCache:
    """Keys and values for every layer, allocated once for `max_length` positions.

    Decoding writes each new step in place, so no tensor is concatenated or reallocated
    per token. `length` is the number of positions filled, shared by all rows of the batch
    (left padding keeps rows aligned).
    """

    def __init__(self, cfg: DecoderConfig, batch: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if max_length > cfg.max_positions:
            raise ValueError(f"cache length {max_length} exceeds the model's context of {cfg.max_positions} tokens")
        shape = (cfg.depth, batch, cfg.kv_heads, max_length, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, kvH, T, hd] after the filled part; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_length} allocated")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """An empty cache whose storage is `k`, `v` [depth, B, kvH, max_length, hd] (views of a larger one)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_length, cache.length = k, v, k.shape[3], 0
        return cache


class SlotCache:
    """Keys and values for rows that join and leave a running batch (continuous batching).

    Each running row owns one slot and fills it from position 0, so rows hold different
    lengths and need no padding. Running rows sit in slots 0..n-1: a row that leaves is
    replaced by the last one, so a decode step reads the first n slots as a view and
    nothing is gathered. Storage grows (doubling its length) as the longest row needs it.

    As the `cache` of a one-token decode step over all n rows, `update` writes each row's new
    key at that row's own length and `advance` moves every row on; `length` is the longest
    row's, so the step's key mask is [n, length + 1].
    """

    def __init__(self, cfg: DecoderConfig, slots: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, initial_length: int = 256):
        self.cfg, self.slots = cfg, slots
        self.lengths: list[int] = []          # per running row, in slot order
        shape = (cfg.depth, slots, cfg.kv_heads, min(initial_length, cfg.max_positions), cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._at: torch.Tensor | None = None   # lengths as a tensor, rebuilt after a change

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        return max(self.lengths, default=0)

    @property
    def at(self) -> torch.Tensor:
        """Each running row's length (its next position), [n] on the cache's device."""
        if self._at is None:
            self._at = torch.tensor(self.lengths, dtype=torch.long, device=self.k.device)
        return self._at

    def reserve(self, length: int) -> None:
        """Make every slot hold at least `length` positions, keeping what is stored."""
        have = self.k.shape[3]
        if length <= have:
            return
        if length > self.cfg.max_positions:
            raise ValueError(f"{length} positions exceed the model's context of {self.cfg.max_positions} tokens")
        grown = min(max(length, 2 * have), self.cfg.max_positions)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], grown, old.shape[4])
            new[:, :, :, :have] = old
            setattr(self, name, new)

    def join(self, prompt_length: int) -> KVCache:
        """Take the next free slot for a row of `prompt_length` tokens; its prefill goes into the
        returned cache (a view of the slot)."""
        if self.rows == self.slots:
            raise ValueError(f"all {self.slots} slots are taken")
        self.reserve(prompt_length)
        slot = self.rows
        self.lengths.append(prompt_length)
        self._at = None
        return KVCache.over(self.k[:, slot:slot + 1], self.v[:, slot:slot + 1])

    def leave(self, row: int) -> None:
        """Free row `row`'s slot: the last row moves into it (the caller moves its own state alike)."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            self.k[:, row, :, :n] = self.k[:, last, :, :n]
            self.v[:, row, :, :n] = self.v[:, last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()
        self._at = None

    # ---- the cache protocol of a one-token decode step over the running rows
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.rows
        if k.shape[0] != n or k.shape[2] != 1:
            raise ValueError(f"a slot cache takes one new token for each of its {n} rows, got {tuple(k.shape)}")
        rows = torch.arange(n, device=k.device)
        self.k[layer, :n][rows, :, self.at] = k[:, :, 0]
        self.v[layer, :n][rows, :, self.at] = v[:, :, 0]
        end = self.length + 1
        return self.k[layer, :n, :, :end], self.v[layer, :n, :, :end]

    def advance(self, steps: int) -> None:
        self.lengths = [n + steps for n in self.lengths]
        self._at = None


class DecoderAttention(nn.Module):
    """Grouped-query self-attention with RoPE; `kv_heads` key/value heads serve `heads` query heads."""

    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.attention_bias)
        self.out = nn.Linear(cfg.heads * cfg.head_dim, cfg.width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, record: list | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, kvH, hd = self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * kvH, hd)
        qk = apply_rope(qkv[:, :, :H + kvH], cos, sin)                   # q and k heads rotated in one go
        q = qk[:, :, :H].transpose(1, 2)                                  # [B, H, T, hd]
        k = qk[:, :, H:].transpose(1, 2)                                  # [B, kvH, T, hd]
        v = qkv[:, :, H + kvH:].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                        # [B, kvH, S, hd]
        if record is not None:
            record.append(self._weights(q, k, mask))
        if T == 1:
            y = decode_attention(q, k, v, mask)
        else:
            if mask is None and T > 1 and cache is not None and cache.length > 0:
                raise ValueError("a multi-token step after a filled cache needs an explicit mask")
            # Without a mask, plain causal attention over a fresh sequence takes the fast kernel.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=kvH != H)
        return self.out(y.transpose(1, 2).reshape(B, T, H * hd))

    def _weights(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention probabilities averaged over heads, [B, T, S]; only computed when asked for."""
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / self.head_dim ** 0.5    # [B, H, T, S]
        T, S = scores.shape[-2:]
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1).mean(1).detach().float()


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = DecoderAttention(cfg, layer)
        self.norm2 = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.width, cfg.mlp_dim)

    def forward(self, x, cos, sin, mask, cache, record):
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache, record)
        return x + self.mlp(self.norm2(x))


class DecoderLM(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_positions, cfg.rope_theta)
        # Not persistent: derived from the config, so checkpoints hold weights only.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None, last_only: bool = False,
                return_hidden: bool = False, attentions: list | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with `last_only`).

        `return_hidden` gives the final normed hidden states instead, so a training loss can
        apply `lm_head` to the few answer positions only (the vocabulary projection is the
        largest matrix product of a small LM).

        input_ids [B, T] or embeds [B, T, D]; positions [B, T] (default: continue from the
        cache); key_mask [B, S] marks real tokens among all S cached + new positions, needed
        only when rows are padded. Pass a list as `attentions` to receive each layer's
        head-averaged attention probabilities [B, T, S].
        """
        if (input_ids is None) == (embeds is None):
            raise ValueError("pass exactly one of input_ids or embeds")
        x = self.embed(input_ids) if embeds is None else embeds
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        # With a cache, positions stay below its length, which the cache keeps within the
        # context; checking costs a device sync, so only uncached calls check.
        if cache is None and int(positions.max()) >= self.cfg.max_positions:
            raise ValueError(f"position {int(positions.max())} is past the model's context of "
                             f"{self.cfg.max_positions} tokens")
        cos = self.rope_cos[positions].unsqueeze(2).to(x.dtype)          # [B, T, 1, hd]
        sin = self.rope_sin[positions].unsqueeze(2).to(x.dtype)
        mask = None
        if T == 1 and key_mask is not None:      # one new token sees every real key: no causal part
            if key_mask.shape != (B, start + 1):
                raise ValueError(f"key_mask must be [batch, {start + 1}] (cached + new positions), "
                                 f"got {tuple(key_mask.shape)}")
            mask = key_mask.bool()[:, None, None, :]
        elif key_mask is not None or (cache is not None and start > 0 and T > 1):
            mask = self._mask(key_mask, B, T, start, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache, attentions)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    @staticmethod
    def _mask(key_mask: torch.Tensor | None, B: int, T: int, start: int, device) -> torch.Tensor:
        """Boolean [B, 1, T, S]: causal over S = start + T positions, minus padded keys."""
        S = start + T
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(start)   # query i sees keys <= start + i
        if key_mask is None:
            return causal.expand(B, 1, T, S)
        if key_mask.shape != (B, S):
            raise ValueError(f"key_mask must be [batch, {S}] (cached + new positions), got {tuple(key_mask.shape)}")
        mask = causal[None, None] & key_mask.bool()[:, None, None, :]
        # A padding query would see no key at all and SDPA would return NaN; let it see itself.
        return mask | _diagonal(T, S, device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _diagonal(T: int, S: int, device) -> torch.Tensor:
    """[T, S] with True where query i meets its own key (column S - T + i)."""
    eye = torch.zeros(T, S, dtype=torch.bool, device=device)
    eye[torch.arange(T), torch.arange(S - T, S)] = True
    return eye
