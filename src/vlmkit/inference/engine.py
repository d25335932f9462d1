"""Generation on token ids: prefill into a preallocated KV cache, then a sampling decode loop.

The engine knows nothing of text or tokenizers. Prompts of different lengths are left
padded into one batch (positions count from each row's first real token, so a row decodes
exactly as it would alone); a row leaves the batch when it emits a stop id or when the
caller's `should_stop` says so (that is how the API implements stop strings). Each row
samples from its own seeded generator, so batched sampling equals unbatched sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from vlmkit.models.decoder import KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0            # 0: greedy
    top_k: int = 0                      # 0: off
    top_p: float = 1.0                  # 1: off
    repetition_penalty: float = 1.0     # 1: off; >1 discourages tokens already in the sequence
    seed: int = 0
    stop_ids: Sequence[int] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf; logits [B, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best one always stays).
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in transformers): seen tokens' logits /penalty if > 0, *penalty if < 0."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


class Engine:
    """Batched generation for a `VisionLanguageModel` (or anything with the same forward)."""

    def __init__(self, model: torch.nn.Module, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.max_positions = model.cfg.decoder.max_positions

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def stream(self, prompts: Sequence[Sequence[int]], pixels: Sequence[torch.Tensor | None],
               params: SamplingParams,
               should_stop: Callable[[int, list[int]], bool] | None = None,
               seeds: Sequence[int] | None = None) -> Iterator[list[tuple[int, int]]]:
        """Yield, per decode step, the (row, token) pairs emitted by the rows still running.

        `pixels[i]` holds prompt i's images [n_i, 3, H, W] in placeholder order (or None).
        `seeds[i]` seeds row i's sampler (default `params.seed` for every row), so requests
        with different seeds still share one batch.
        """
        if len(prompts) != len(pixels):
            raise ValueError(f"got {len(prompts)} prompts but {len(pixels)} image lists")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest >= self.max_positions:
            raise ValueError(f"the prompt is {longest} tokens; the model's context is {self.max_positions}")
        new_tokens = min(params.max_new_tokens, self.max_positions - longest)
        device, B = self.device, len(prompts)

        ids = torch.full((B, longest), self.pad_id, dtype=torch.long)
        key_mask = torch.zeros((B, longest), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, longest - len(p):] = torch.tensor(list(p))
            key_mask[row, longest - len(p):] = 1
        ids, key_mask = ids.to(device), key_mask.to(device)
        positions = (key_mask.cumsum(1) - 1).clamp(min=0)
        images = [p for p in pixels if p is not None and len(p)]
        image_pixels = torch.cat(images).to(device) if images else None

        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.cfg.decoder, B, longest + new_tokens, device, dtype)
        padded = bool((key_mask == 0).any())
        logits = self.model(ids, pixels=image_pixels, positions=positions, cache=cache,
                            key_mask=key_mask if padded else None, last_only=True)[:, -1].float()

        vocab = logits.shape[-1]
        seen = torch.zeros((B, vocab), dtype=torch.bool, device=device)
        if params.repetition_penalty != 1.0:
            seen.scatter_(1, ids.masked_fill((ids >= vocab) | (key_mask == 0), 0), True)
        if seeds is not None and len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for {B} prompts")
        generators = [torch.Generator(device=device).manual_seed(params.seed if seeds is None else seeds[row])
                      for row in range(B)]
        stop_ids = set(params.stop_ids)
        rows = list(range(B))                 # original index of each row still running
        outputs: list[list[int]] = [[] for _ in range(B)]
        last_pos = positions[:, -1]

        for step in range(new_tokens):
            if params.repetition_penalty != 1.0:
                logits = penalize_repeats(logits, seen, params.repetition_penalty)
            tokens = self._pick(logits, params, [generators[r] for r in rows])       # [b]
            emitted, keep = [], []
            for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
                outputs[row].append(token)
                emitted.append((row, token))
                stopped = token in stop_ids or (should_stop is not None and should_stop(row, outputs[row]))
                if not stopped:
                    keep.append(i)
            yield emitted
            if not keep or step == new_tokens - 1:
                return
            if len(keep) < len(rows):        # finished rows leave the batch
                index = torch.tensor(keep, device=device)
                cache.select(index)
                tokens, key_mask, last_pos, seen = tokens[index], key_mask[index], last_pos[index], seen[index]
                rows = [rows[i] for i in keep]
            if params.repetition_penalty != 1.0:
                seen[torch.arange(len(rows), device=device), tokens] = True
            last_pos = last_pos + 1
            key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)
            logits = self.model.language_model(tokens[:, None], positions=last_pos[:, None], cache=cache,
                                               key_mask=key_mask if padded else None)[:, -1].float()

    def generate(self, prompts: Sequence[Sequence[int]], pixels: Sequence[torch.Tensor | None],
                 params: SamplingParams, should_stop: Callable[[int, list[int]], bool] | None = None,
                 seeds: Sequence[int] | None = None) -> list[list[int]]:
        """All generated ids per prompt (a stop id, when hit, is the last one)."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for emitted in self.stream(prompts, pixels, params, should_stop, seeds):
            for row, token in emitted:
                outputs[row].append(token)
        return outputs

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
        if params.temperature == 0:
            return logits.argmax(-1)
        logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
        probs = logits.softmax(-1)
        return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])
