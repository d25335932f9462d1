"""A Stage 2 model you can talk to: caption, ask, chat (streaming), classify, embed, explain.

Text in, text out: this class owns the chat template, tokenization, image preprocessing,
stop strings and incremental detokenization; the `Engine` below it sees token ids only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from vlmkit.data.chat import encode_conversation
from vlmkit.data.image_prompt import ImagePrompt
from vlmkit.data.images import ImageTransform, load_image
from vlmkit.data.lm_tokenizer import IMAGE_TOKEN, LMTokenizer
from vlmkit.data.messages import count_images, normalize, prepend_images, text_of
from vlmkit.inference.engine import Engine, SamplingParams

CAPTION_PROMPT = "Describe the image."


@dataclass
class Request:
    """One generation: messages (see `data.messages`) and, unless their image parts carry them, images."""

    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    seed: int = 0


class VisionLanguageAssistant:
    def __init__(self, model, tokenizer: LMTokenizer, transform: ImageTransform, device: torch.device):
        self.model = model.to(device).eval()
        self.tokenizer, self.transform, self.device = tokenizer, transform, device
        self.engine = Engine(self.model, tokenizer.pad_id)
        cfg = self.model.cfg
        self.image_prompt = ImagePrompt(tokenizer, cfg.image_prompt, cfg.image_tokens, cfg.image_token)

    @property
    def context_length(self) -> int:
        return self.model.cfg.decoder.max_positions

    # ------------------------------------------------------------------ preparing input
    def prepare(self, request: Request) -> tuple[list[int], torch.Tensor | None]:
        messages, carried = normalize(request.messages)
        if not messages:
            raise ValueError("no messages given")
        if messages[-1]["role"] != "user" or not (text_of(messages[-1]).strip() or count_images(messages[-1])):
            raise ValueError("the last message must be a non-empty user message")
        images = _images_for(messages, carried, list(request.images))
        if images and all(x is None for x in carried):
            placeholders = sum(count_images(m) for m in messages)
            if placeholders == 0:   # like LLaVA: images without placeholders go before the first user text
                first = next(i for i, m in enumerate(messages) if m["role"] == "user")
                messages[first] = prepend_images(messages[first], len(images))
        pixels, expansions = self.views(images)
        ids = encode_conversation(messages, self.tokenizer, expansions, self.context_length - 1,
                                  add_generation_prompt=True).ids
        return ids, pixels

    def views(self, images: Sequence) -> tuple[torch.Tensor | None, list[tuple[int, ...]]]:
        """Images -> (every view's pixels [n_views, 3, H, W] or None, each image's placeholder ids).

        One view per image, or, when the preprocessing splits images, its tiles and global view.
        """
        pixels, expansions = [], []
        for image in images:
            views, rows, cols = self.transform.tiles(load_image(image))
            pixels.append(views)
            expansions.append(self.image_prompt.ids(rows, cols))
        return (torch.cat(pixels) if pixels else None), expansions

    def sampling(self, r: Request) -> SamplingParams:
        return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
                              top_p=r.top_p, repetition_penalty=r.repetition_penalty, seed=r.seed,
                              stop_ids=self.tokenizer.stop_ids)

    # ------------------------------------------------------------------ generation
    def stream_batch(self, requests: Sequence[Request],
                     prepared: Sequence[tuple[list[int], torch.Tensor | None]] | None = None) -> Iterator[Delta]:
        """Generate for several requests in one batch; yield text deltas as they are decoded.

        Requests share one decode loop when their sampling settings agree (seeds may differ:
        each row has its own sampler); groups with different settings run one after another.
        Each request ends with one `Delta` whose `finish_reason` is set. `prepared`: each
        request's `prepare` output, when the caller has it already.
        """
        if not requests:
            raise ValueError("no requests given")
        if prepared is None:   # validates every request before any work
            prepared = [self.prepare(r) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.temperature, r.top_k, r.top_p, r.repetition_penalty, r.max_new_tokens)
            groups.setdefault(key, []).append(i)
        for rows in groups.values():
            params = self.sampling(requests[rows[0]])
            seeds = [requests[i].seed for i in rows]
            for d in self._run([prepared[i] for i in rows], [requests[i] for i in rows], params, seeds):
                yield Delta(rows[d.index], d.text, d.finish_reason, d.prompt_tokens, d.completion_tokens)

    def _run(self, prepared, requests, params: SamplingParams, seeds: list[int]) -> Iterator[Delta]:
        stops = set(self.tokenizer.stop_ids)
        answers = [_Answer(self.tokenizer, r.stop) for r in requests]

        def should_stop(row: int, ids: list[int]) -> bool:
            # Called once per new token (other than a stop id): the answer takes it in here.
            return answers[row].add(ids[-1])

        for emitted in self.engine.stream([p[0] for p in prepared], [p[1] for p in prepared], params, should_stop,
                                          seeds):
            for row, token in emitted:
                answer = answers[row]
                delta, reason = answer.emit(token in stops, answer.tokens + 1 >= params.max_new_tokens)
                if delta or reason:
                    yield Delta(row, delta, reason, len(prepared[row][0]), answer.tokens)
        for row, answer in enumerate(answers):
            if not answer.done:   # the context filled up
                yield Delta(row, answer.take(final=True), "length", len(prepared[row][0]), answer.tokens)

    def generate_batch(self, requests: Sequence[Request]) -> list[str]:
        out = ["" for _ in requests]
        for d in self.stream_batch(requests):
            out[d.index] += d.text
        return out

    # ------------------------------------------------------------------ the everyday calls
    def ask(self, image, question: str, stream: bool = False, **sampling) -> str | Iterator[str]:
        """Answer a question about one image, several (a list: each where its `<image>` is in
        the question, else all before it) or none (None)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        request = Request([{"role": "user", "content": question}], images, **sampling)
        return self._texts(request) if stream else self.generate_batch([request])[0]

    def caption(self, image, prompt: str = CAPTION_PROMPT, **sampling) -> str:
        """A one-sentence description of the image (usable as alt text)."""
        return self.ask(image, prompt, **sampling)

    def chat(self, messages: Sequence[dict], images: Sequence = (), stream: bool = False,
             **sampling) -> str | Iterator[str]:
        """Reply to a conversation (see `data.messages`): string content with `<image>` where
        each of `images` goes, or typed parts whose image parts carry the images."""
        request = Request(list(messages), list(images), **sampling)
        return self._texts(request) if stream else self.generate_batch([request])[0]

    def _texts(self, request: Request) -> Iterator[str]:
        for d in self.stream_batch([request]):
            if d.text:
                yield d.text

    @torch.no_grad()
    def classify(self, image, labels: Sequence[str], question: str = "What is in the image?") -> list[tuple[str, float]]:
        """Zero-shot by likelihood: probabilities over `labels` as answers to `question`, best first."""
        labels = list(labels)
        if len(labels) < 2:
            raise ValueError("give at least two labels to choose between")
        scores = []
        for label in labels:
            messages = [{"role": "user", "content": IMAGE_TOKEN + "\n" + question},
                        {"role": "assistant", "content": label}]
            scores.append(self._answer_logprob(messages, [image]))
        probs = torch.tensor(scores).softmax(0)
        return sorted(zip(labels, probs.tolist()), key=lambda p: -p[1])

    def _answer_logprob(self, messages, images) -> float:
        pixels, expansions = self.views(images)
        enc = encode_conversation(messages, self.tokenizer, expansions, self.context_length)
        ids = torch.tensor([enc.ids], device=self.device)
        labels = torch.tensor([enc.labels], device=self.device)
        pixels = pixels.to(self.device)
        logits = self.model(ids, pixels=pixels)[0, :-1].float().log_softmax(-1)
        targets = labels[0, 1:]
        keep = targets != -100
        return float(logits[keep].gather(1, targets[keep, None]).sum())

    @torch.no_grad()
    def embed(self, images: Sequence) -> torch.Tensor:
        """Image embeddings [N, D]: the vision tower's patch tokens, mean-pooled and L2-normalised."""
        if isinstance(images, str):
            raise ValueError("pass a list of images; a generative model embeds images only "
                             "(text embeddings need a Stage 1 model)")
        if len(images) == 0:
            raise ValueError("no images given")
        pixels = torch.stack([self.transform(load_image(im)) for im in images]).to(self.device)
        tokens = self.model.vision_tower(pixels, layer=self.model.cfg.vision_layer)
        return torch.nn.functional.normalize(tokens.mean(1).float(), dim=-1).cpu()

    # ------------------------------------------------------------------ seeing what it looked at
    @torch.no_grad()
    def attention(self, image, question: str, answer: str | None = None) -> tuple[list[str], torch.Tensor]:
        """For each answer token, how much it attended to each image patch (mean over layers and heads).

        Returns (answer tokens as text, weights [T, K] over the K image tokens). Without
        `answer`, the model's own greedy answer is used.
        """
        if self.transform.tiled:
            raise ValueError("attention maps need one view per image; this model splits images into tiles")
        answer = self.ask(image, question) if answer is None else answer
        messages = [{"role": "user", "content": IMAGE_TOKEN + "\n" + question},
                    {"role": "assistant", "content": answer}]
        enc = encode_conversation(messages, self.tokenizer, self.model.cfg.image_tokens, self.context_length)
        ids = torch.tensor([enc.ids], device=self.device)
        pixels = self.transform(load_image(image))[None].to(self.device)
        maps: list[torch.Tensor] = []
        self.model(ids, pixels=pixels, attentions=maps)
        weights = torch.stack(maps).mean(0)[0]                        # [T, T]
        answer_rows = [i for i, label in enumerate(enc.labels) if label != -100 and label != self.tokenizer.eos_id]
        image_cols = (ids[0] == self.model.image_token_id).nonzero().flatten()
        # Row i - 1 is the position that predicted answer token i.
        rows = torch.tensor([i - 1 for i in answer_rows], dtype=torch.long, device=self.device)
        attn = weights[rows][:, image_cols].cpu()
        tokens = [self.tokenizer.decode([enc.ids[i]]) for i in answer_rows]
        return tokens, attn

    def explain(self, image, question: str, path: str | Path, answer: str | None = None) -> Path:
        """Write a PNG heatmap of where each answer token looked in the image."""
        from vlmkit.viz.attention import plot_attention_heatmap

        tokens, attn = self.attention(image, question, answer)
        if not tokens:
            raise ValueError("the answer is empty; nothing to explain")
        cfg = self.model.cfg
        if cfg.projector.kind == "resampler" or cfg.vision_select == "all":
            raise ValueError("attention maps need one image token per patch region (mlp or pixel_shuffle projector)")
        grid = cfg.vision.grid // (cfg.projector.shuffle_factor if cfg.projector.kind == "pixel_shuffle" else 1)
        shown = load_image(image).resize((self.transform.size, self.transform.size))
        return plot_attention_heatmap(shown, attn, tokens, path, grid=(grid, grid),
                                      title=f"Q: {question}  A: {''.join(tokens).strip()}")


class _Answer:
    """One request's answer as it streams: text decoded a token at a time, cut at a stop string.

    `take` hands out the text not yet sent, holding back any tail that may still grow into
    a stop string, so a client never sees a stop string or a piece of one.
    """

    def __init__(self, tokenizer: LMTokenizer, stop: Sequence[str]):
        self.tokenizer, self.decode = tokenizer, tokenizer.stream_decoder()
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text, self.sent = "", 0
        self.tokens, self.stopped, self.done = 0, False, False

    def add(self, token: int) -> bool:
        """Take in one generated id (not a stop id); True once a stop string has appeared."""
        self.ids.append(token)
        before = len(self.text)
        self.text += self.decode(token)
        for s in self.stop:   # a new match can only end in the new piece
            at = self.text.find(s, max(0, before - len(s) + 1))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        return self.stopped

    def emit(self, stop_token: bool, out_of_room: bool) -> tuple[str, str | None]:
        """Count one more generated token (already `add`ed unless it is a stop id): the text to
        send now, and the finish reason once the answer ends."""
        self.tokens += 1
        reason = "stop" if stop_token or self.stopped else "length" if out_of_room else None
        self.done = reason is not None
        return self.take(final=self.done), reason

    def take(self, final: bool) -> str:
        if final and not self.stopped:
            # The stream holds back an unfinished UTF-8 character; the answer ends, so decode
            # it whole, once, as `decode` would (an incomplete character becomes U+FFFD).
            self.text = self.tokenizer.decode(self.ids)
        end = len(self.text) if final or self.stopped else len(self.text) - _partial_stop(self.text, self.stop)
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta


@dataclass
class Delta:
    index: int                  # which request
    text: str                   # new text since the last delta of this request
    finish_reason: str | None   # None while running; "stop" (end of turn or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


def _images_for(messages: list[dict], carried: list, given: list) -> list:
    """The images of a request, in placeholder order: carried by image parts or given apart."""
    placeholders = sum(count_images(m) for m in messages)
    if any(x is not None for x in carried):
        if given:
            raise ValueError("images were given both inside the messages and apart from them; use one way")
        if any(x is None for x in carried):
            raise ValueError("some image parts carry an image and some do not; every image part needs one")
        return carried
    if placeholders and placeholders != len(given):
        raise ValueError(f"the messages hold {placeholders} {IMAGE_TOKEN} placeholders but "
                         f"{len(given)} images were given")
    return given


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the start of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
