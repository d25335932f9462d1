"""Continuous batching: rows that join and leave a running batch decode exactly as they would alone."""
from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.config import DecoderConfig, VLMConfig
from vlmkit.data.chat import encode_conversation
from vlmkit.data.lm_tokenizer import LMTokenizer
from vlmkit.inference.assistant import Request
from vlmkit.inference.continuous import ContinuousBatch, ContinuousChat
from vlmkit.inference.engine import Engine, SamplingParams
from vlmkit.models.decoder import DecoderLM, SlotCache
from vlmkit.models.vlm import VisionLanguageModel

CORPUS = ["What colour is the circle?", "red", "blue", "a small red circle at the top left.",
          "Is there a green square in the image?", "yes", "no", "Describe the image.", "How many shapes are there?"] * 5
QUESTIONS = ["What colour is the circle?", "Describe the image.", "Is there a green square in the image?",
             "How many shapes are there?", "red"]


@pytest.fixture(scope="module")
def tokenizer() -> LMTokenizer:
    return LMTokenizer.train(CORPUS, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def engine(tokenizer) -> Engine:
    torch.manual_seed(5)
    cfg = VLMConfig.from_dict({
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 4, "mlp_dim": 64},
        "decoder": {"vocab_size": tokenizer.vocab_size, "width": 48, "depth": 2, "heads": 6, "kv_heads": 2,
                    "mlp_dim": 96, "max_positions": 96, "tie_embeddings": False, "init_std": 0.2},
        "image_token_id": tokenizer.image_id,
    })
    return Engine(VisionLanguageModel(cfg).eval(), tokenizer.pad_id)


def prompts(tokenizer, engine, n: int) -> list[tuple[list[int], torch.Tensor]]:
    K = engine.model.cfg.image_tokens
    gen = torch.Generator().manual_seed(0)
    return [(encode_conversation([{"role": "user", "content": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]}],
                                 tokenizer, K, 90, True).ids, torch.randn(1, 3, 32, 32, generator=gen))
            for i in range(n)]


def test_slot_cache_decoding_equals_full_forward():
    """Rows of different lengths, joining at different steps, each get the logits of a full forward pass."""
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=97, width=40, depth=3, heads=4, kv_heads=2, head_dim=12, mlp_dim=72,
                        max_positions=64)
    model = DecoderLM(cfg).eval()
    cache = SlotCache(cfg, slots=3, initial_length=4)            # small, so it has to grow
    sequences = [torch.randint(0, 97, (1, n)).tolist()[0] for n in (7, 3, 11)]
    fed = [[] for _ in sequences]
    with torch.no_grad():
        for step in range(12):
            if step in (0, 2, 5):                                   # a row joins: its prefill alone
                r = (0, 2, 5).index(step)
                prompt = sequences[r][:5] if r != 1 else sequences[r]
                model(torch.tensor([prompt]), cache=cache.join(len(prompt)))
                fed[r] = list(prompt)
            rows = [r for r in range(3) if fed[r]]
            cache.reserve(cache.length + 1)
            tokens = torch.randint(0, 97, (len(rows), 1))
            at = cache.at
            mask = torch.arange(cache.length + 1)[None] <= at[:, None]
            logits = model(tokens, positions=at[:, None], cache=cache, key_mask=mask)[:, -1]
            for i, r in enumerate(rows):
                fed[r].append(int(tokens[i]))
                full = model(torch.tensor([fed[r]]))[0, -1]
                torch.testing.assert_close(logits[i], full, atol=1e-5, rtol=1e-5)
    assert cache.k.shape[3] >= max(len(f) for f in fed)


def run_schedule(batch: ContinuousBatch, jobs: list[tuple[list[int], torch.Tensor, SamplingParams]],
                 joins: dict[int, list[int]]) -> dict[int, list[int]]:
    """Drive `batch`: before step s, the jobs in joins[s] join (when a row is free, else they wait)."""
    out: dict[int, list[int]] = {}
    waiting: list[int] = []
    step = 0
    while len(out) < len(jobs) or len(batch):
        waiting += joins.get(step, [])
        while waiting and batch.free:
            key = waiting.pop(0)
            ids, pixels, params = jobs[key]
            token, _ = batch.add(key, ids, pixels, params)
            out[key] = [token]
        for key, token, _ in batch.step():
            out[key].append(token)
        step += 1
        assert step < 200
    return out


def test_rows_joining_and_leaving_decode_as_they_would_alone(tokenizer, engine):
    """Each row its own max_tokens and sampling settings; more requests than rows, so rows are reused."""
    settings = [SamplingParams(max_new_tokens=12),
                SamplingParams(max_new_tokens=9, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7),
                SamplingParams(max_new_tokens=16, repetition_penalty=3.0),
                SamplingParams(max_new_tokens=14, temperature=0.7, seed=3),
                SamplingParams(max_new_tokens=3),
                SamplingParams(max_new_tokens=10, temperature=1.2, top_p=0.8, seed=11)]
    jobs = [(ids, pixels, settings[i]) for i, (ids, pixels) in enumerate(prompts(tokenizer, engine, len(settings)))]
    alone = [engine.generate([ids], [pixels], params)[0] for ids, pixels, params in jobs]
    got = run_schedule(ContinuousBatch(engine, max_rows=3), jobs, {0: [0], 2: [1, 2], 3: [3, 4, 5]})
    assert [got[k] for k in range(len(jobs))] == alone
    assert [len(a) for a in alone] == [p.max_new_tokens for p in settings]   # the tiny model never stops early


def test_stop_ids_and_the_context_end_rows(tokenizer, engine):
    (ids, pixels), (ids2, pixels2) = prompts(tokenizer, engine, 2)
    free = engine.generate([ids], [pixels], SamplingParams(max_new_tokens=8))[0]
    stopping = SamplingParams(max_new_tokens=8, stop_ids=(free[2],))
    long = SamplingParams(max_new_tokens=500)                       # more than the context leaves
    jobs = [(ids, pixels, stopping), (ids2, pixels2, long)]
    got = run_schedule(ContinuousBatch(engine, max_rows=2), jobs, {0: [0, 1]})
    assert got[0] == free[: free.index(free[2]) + 1]
    assert len(got[1]) == engine.max_positions - len(ids2)
    assert got[1] == engine.generate([ids2], [pixels2], long)[0]


def test_a_removed_row_frees_its_slot_for_the_next(tokenizer, engine):
    (a, pa), (b, pb) = prompts(tokenizer, engine, 2)
    batch = ContinuousBatch(engine, max_rows=1)
    params = SamplingParams(max_new_tokens=6)
    batch.add("a", a, pa, params)
    batch.step()
    with pytest.raises(ValueError, match="rows are running"):
        batch.add("b", b, pb, params)
    assert batch.remove("a") and not batch.remove("a") and batch.free == 1
    got = [batch.add("b", b, pb, params)[0]]
    while len(batch):
        got += [token for _, token, _ in batch.step()]
    assert got == engine.generate([b], [pb], params)[0]


def test_a_prompt_that_cannot_run_takes_no_row(tokenizer, engine):
    batch = ContinuousBatch(engine, max_rows=2)
    with pytest.raises(ValueError, match="context"):
        batch.add(0, [5] * engine.max_positions, None, SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        batch.add(1, [], None, SamplingParams())
    with pytest.raises(ValueError):   # one image's pixels for a prompt without an image slot
        batch.add(2, [5, 6, 7], torch.randn(1, 3, 32, 32), SamplingParams())
    assert batch.free == 2 and batch.cache.rows == 0


def test_chat_requests_joining_late_get_the_answers_they_get_alone(tiny_vlm_dir):
    """Text deltas: stop strings, mixed max_tokens and seeds, requests joining mid-way."""
    assistant = vlmkit.load(tiny_vlm_dir, device="cpu")

    def request(i: int) -> Request:
        return Request([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], [],
                       max_new_tokens=4 + 3 * i, temperature=0.0 if i % 2 else 0.9, seed=100 + i)

    requests = [request(i) for i in range(6)]
    free = assistant.generate_batch([requests[3]])[0]
    requests[3].stop = (free[len(free) // 2:len(free) // 2 + 2],)   # a stop string met half-way
    alone = [assistant.generate_batch([r])[0] for r in requests]
    chat = ContinuousChat(assistant, max_rows=4)
    texts, reasons = [""] * len(requests), [None] * len(requests)
    queue = list(range(len(requests)))
    while queue or len(chat):
        if queue and chat.free:
            key = queue.pop(0)
            deltas = chat.add(key, requests[key])
        else:
            deltas = chat.step()
        for d in deltas:
            texts[d.index] += d.text
            reasons[d.index] = d.finish_reason or reasons[d.index]
    assert texts == alone
    assert all(reasons) and reasons[3] == "stop" and len(texts[3]) < len(free)
    with pytest.raises(ValueError, match="placeholders"):
        chat.add("bad", Request([{"role": "user", "content": "<image> and <image>"}], []))
    assert len(chat) == 0 and not chat.answers
