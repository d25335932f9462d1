"""Continuous batching: requests join a running batch between decode steps and leave it at once.

`Engine.stream` decodes a batch that is fixed when it starts: a request arriving a moment
later waits for the whole batch to end, and a row that finished early idles in it. Here
each row owns a slot of a `SlotCache` and fills it from position 0, so rows of any length
decode together with no padding. `add` prefills one new prompt into a free slot (between
two decode steps of the others) and returns its first token; `step` decodes one token for
every running row; a row leaves as soon as it is done or its caller removes it.

Each row keeps its own sampling settings, seeded generator, repetition record and token
limit, and its prefill runs alone, so a row's tokens are the ones it would get decoded
alone (`Engine.stream` on that prompt).

`ContinuousBatch` works on token ids, like the engine; `ContinuousChat` on top turns
requests into text deltas (stop strings, incremental detokenization), as
`VisionLanguageAssistant.stream_batch` does for a fixed batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from vlmkit.inference.assistant import Delta, Request, VisionLanguageAssistant, _Answer
from vlmkit.inference.engine import Engine, SamplingParams, penalize_repeats, prompt_tokens
from vlmkit.models.decoder import SlotCache


@dataclass
class _Row:
    key: Hashable
    params: SamplingParams
    generator: torch.Generator | None      # None for greedy rows
    seen: torch.Tensor | None              # [1, vocab], with a repetition penalty only
    limit: int                             # tokens it may generate (max_new_tokens, or the room left)
    produced: int
    token: int                             # its last token: the next step's input


class ContinuousBatch:
    """Token-level continuous batching over an `Engine` with room for `max_rows` rows."""

    def __init__(self, engine: Engine, max_rows: int):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.engine, self.max_rows = engine, max_rows
        self.cache = SlotCache(engine.lm.cfg, max_rows, engine.device, engine.dtype)
        self.rows: list[_Row] = []          # in slot order

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    @torch.inference_mode()
    def add(self, key: Hashable, ids: Sequence[int], pixels: torch.Tensor | None,
            params: SamplingParams) -> tuple[int, bool]:
        """Prefill a new row and pick its first token: (token, finished). A row finished at
        once (a stop id, or max_new_tokens 1) takes no slot."""
        if any(row.key == key for row in self.rows):
            raise ValueError(f"a row with key {key!r} is already running")
        if not ids:
            raise ValueError("every prompt needs at least one token")
        if len(ids) >= self.engine.max_positions:
            raise ValueError(f"the prompt is {len(ids)} tokens; the model's context is {self.engine.max_positions}")
        if not self.free:
            raise ValueError(f"all {self.max_rows} rows are running")
        device = self.engine.device
        prompt = torch.tensor([list(ids)], dtype=torch.long, device=device)
        slot_cache = self.cache.join(len(ids))
        try:
            positions = torch.arange(len(ids), device=device)[None]
            logits = self.engine.prefill(prompt, [pixels], positions, None, slot_cache)   # [1, vocab]
        except BaseException:
            self.cache.leave(self.cache.rows - 1)
            raise
        greedy = params.temperature == 0
        row = _Row(key, params, None if greedy else torch.Generator(device=device).manual_seed(params.seed),
                   None, min(params.max_new_tokens, self.engine.max_positions - len(ids)), 0, -1)
        if params.repetition_penalty != 1.0:
            row.seen = prompt_tokens(prompt, torch.ones_like(prompt, dtype=torch.bool), logits.shape[-1])
        self.rows.append(row)
        token, finished = self._take(row, self._pick(row, logits))
        if finished:
            self._leave(len(self.rows) - 1)
        return token, finished

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, int, bool]]:
        """Decode one token for every running row: (key, token, finished) each; finished rows leave."""
        if not self.rows:
            return []
        cache, device = self.cache, self.engine.device
        cache.reserve(cache.length + 1)
        at = cache.at                                                   # [n], each row's next position
        tokens = torch.tensor([[row.token] for row in self.rows], dtype=torch.long, device=device)
        # Rows of one length need no mask (and then run exactly the kernels a row alone runs).
        key_mask = None
        if min(cache.lengths) != cache.length:
            key_mask = torch.arange(cache.length + 1, device=device)[None] <= at[:, None]   # [n, S]
        logits = self.engine.lm(tokens, positions=at[:, None], cache=cache, key_mask=key_mask)[:, -1].float()
        greedy = logits.argmax(-1).tolist()
        emitted = []
        for i, row in enumerate(self.rows):
            plain = row.params.temperature == 0 and row.seen is None
            emitted.append((row.key, *self._take(row, greedy[i] if plain else self._pick(row, logits[i:i + 1]))))
        for i in reversed(range(len(self.rows))):
            if emitted[i][2]:
                self._leave(i)
        return emitted

    def remove(self, key: Hashable) -> bool:
        """Stop a row (its caller is done with it, or gone); False if no such row is running."""
        for i, row in enumerate(self.rows):
            if row.key == key:
                self._leave(i)
                return True
        return False

    # ------------------------------------------------------------------ per row
    def _pick(self, row: _Row, logits: torch.Tensor) -> int:
        if row.seen is not None:
            logits = penalize_repeats(logits, row.seen, row.params.repetition_penalty)
        return int(Engine.pick(logits, row.params, [row.generator], [True])[0])

    @staticmethod
    def _take(row: _Row, token: int) -> tuple[int, bool]:
        row.token, row.produced = token, row.produced + 1
        if row.seen is not None:
            row.seen[0, token] = True
        return token, token in row.params.stop_ids or row.produced >= row.limit

    def _leave(self, i: int) -> None:
        self.cache.leave(i)        # the last row moves into slot i; its state moves alike
        last = self.rows.pop()
        if i < len(self.rows):
            self.rows[i] = last


class ContinuousChat:
    """`Request`s joining and leaving one running batch, answered as text `Delta`s whose
    `index` is the key the caller gave (what `vlmkit serve` runs)."""

    def __init__(self, assistant: VisionLanguageAssistant, max_rows: int):
        self.assistant = assistant
        self.batch = ContinuousBatch(assistant.engine, max_rows)
        self.stops = set(assistant.tokenizer.stop_ids)
        self.answers: dict[Hashable, tuple[_Answer, int]] = {}   # key -> (its answer, its prompt's length)

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def free(self) -> int:
        return self.batch.free

    def add(self, key: Hashable, request: Request,
            prepared: tuple[list[int], torch.Tensor | None] | None = None) -> list[Delta]:
        """Start answering `request` (`prepared`: its `assistant.prepare` output, when the caller
        has it); the first delta is returned. A bad request raises ValueError and takes no row."""
        ids, pixels = prepared if prepared is not None else self.assistant.prepare(request)
        params = self.assistant.sampling(request)
        self.answers[key] = (_Answer(self.assistant.tokenizer, request.stop), len(ids))
        try:
            token, finished = self.batch.add(key, ids, pixels, params)
        except BaseException:
            del self.answers[key]
            raise
        return self._deltas([(key, token, finished)])

    def step(self) -> list[Delta]:
        """One decode step for every running request."""
        return self._deltas(self.batch.step())

    def cancel(self, key: Hashable) -> None:
        """Forget a request (its client left): its row is free for the next step."""
        self.batch.remove(key)
        self.answers.pop(key, None)

    def _deltas(self, emitted) -> list[Delta]:
        out = []
        for key, token, finished in emitted:
            answer, prompt = self.answers[key]
            stop_token = token in self.stops
            if not stop_token:
                answer.add(token)
            text, reason = answer.emit(stop_token, finished)
            if reason is not None:
                del self.answers[key]
                if not finished:          # a stop string ended it: the row may still be running
                    self.batch.remove(key)
            if text or reason:
                out.append(Delta(key, text, reason, prompt, answer.tokens))
        return out
