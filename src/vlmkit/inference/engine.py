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


def prompt_tokens(ids: torch.Tensor, real: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] booleans: which vocabulary ids each row's prompt holds (what a repetition
    penalty counts as seen). Padding and image placeholders (ids past the vocabulary) aside."""
    keep = real & (ids < vocab)
    counts = torch.zeros((ids.shape[0], vocab), dtype=torch.long, device=ids.device)
    counts.scatter_add_(1, ids.masked_fill(~keep, 0), keep.long())
    return counts > 0


class Engine:
    """Batched generation for a `VisionLanguageModel` or a text-only `DecoderLM`.

    The KV cache, the key mask and the positions are allocated once for the whole answer; a
    decode step writes one column of each, and a finished row stays in the batch (its
    output ignored) instead of being copied out of the cache. Nothing is concatenated or
    reallocated per token.
    """

    def __init__(self, model: torch.nn.Module, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        # A VLM holds its decoder as `language_model`; a DecoderLM is its own.
        self.lm = getattr(model, "language_model", model)
        self.max_positions = self.lm.cfg.max_positions

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations run in: the embedding table's (an int8 model keeps it in float)."""
        return self.lm.embed.weight.dtype

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
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        longest = max(len(p) for p in prompts)
        if longest >= self.max_positions:
            raise ValueError(f"the prompt is {longest} tokens; the model's context is {self.max_positions}")
        new_tokens = min(params.max_new_tokens, self.max_positions - longest)
        device, B, total = self.device, len(prompts), longest + new_tokens

        ids = torch.full((B, longest), self.pad_id, dtype=torch.long)
        key_mask = torch.ones((B, total), dtype=torch.bool)   # generated positions are all real
        for row, p in enumerate(prompts):
            ids[row, longest - len(p):] = torch.tensor(list(p))
            key_mask[row, :longest - len(p)] = False
        ids, key_mask = ids.to(device), key_mask.to(device)
        padded = not bool(key_mask.all())
        positions = (key_mask[:, :longest].cumsum(1) - 1).clamp(min=0)
        cache = KVCache(self.lm.cfg, B, total, device, self.dtype)
        logits = self.prefill(ids, pixels, positions, key_mask[:, :longest] if padded else None, cache)

        seen = None
        if params.repetition_penalty != 1.0:
            seen = prompt_tokens(ids, key_mask[:, :longest], logits.shape[-1])
        generators = [torch.Generator(device=device).manual_seed(params.seed if seeds is None else seeds[row])
                      for row in range(B)]
        stop_ids = set(params.stop_ids)
        running = [True] * B
        outputs: list[list[int]] = [[] for _ in range(B)]
        position = positions[:, -1:] + 1                      # [B, 1], each row's next position

        for step in range(new_tokens):
            if seen is not None:
                logits = penalize_repeats(logits, seen, params.repetition_penalty)
            tokens = self.pick(logits, params, generators, running)       # [B]
            emitted = []
            for row, token in enumerate(tokens.tolist()):
                if not running[row]:
                    continue
                outputs[row].append(token)
                emitted.append((row, token))
                if token in stop_ids or (should_stop is not None and should_stop(row, outputs[row])):
                    running[row] = False
            yield emitted
            if not any(running) or step == new_tokens - 1:
                return
            if seen is not None:
                seen[torch.arange(B, device=device), tokens] = True
            mask = key_mask[:, :cache.length + 1] if padded else None
            logits = self.lm(tokens[:, None], positions=position, cache=cache, key_mask=mask)[:, -1].float()
            position += 1

    def prefill(self, ids: torch.Tensor, pixels: Sequence[torch.Tensor | None], positions: torch.Tensor,
                 key_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Run the prompts through the model into `cache`; the last position's logits [B, vocab] in fp32."""
        images = [p for p in pixels if p is not None and len(p)]
        if self.lm is self.model:
            if images:
                raise ValueError("this is a text-only language model; it takes no images")
            out = self.model(ids, positions=positions, cache=cache, key_mask=key_mask, last_only=True)
        else:
            image_pixels = torch.cat(images).to(self.device) if images else None
            out = self.model(ids, pixels=image_pixels, positions=positions, cache=cache, key_mask=key_mask,
                             last_only=True)
        return out[:, -1].float()

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
    def pick(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator],
              running: list[bool]) -> torch.Tensor:
        if params.temperature == 0:
            return logits.argmax(-1)
        logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
        probs = logits.softmax(-1)
        # A finished row draws nothing: its generator stays where a row run alone would leave it.
        return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] if running[i] else probs[i].argmax()
                            for i, g in enumerate(generators)])
