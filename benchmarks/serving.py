"""Serving throughput and latency of `vlmkit serve` under concurrent clients.

    python -m benchmarks.serving [--model DIR] [--quick] [--requests N] [--max-tokens N] [--repeats N]

(from the repository root)

The model is --model, else the trained demo model (runs/demo/stage2/model, written by
`vlmkit demo`); the section says which. The server runs in this
process (uvicorn in a thread on a free 127.0.0.1 port) and async httpx clients send one
fixed set of requests (a `shapes` image each, a question, greedy, streamed with usage) at
concurrency 1, 4 and 16, and at 16 again on a server that decodes one request at a time
(max_batch=1), so batching is measured apart from concurrency. The baseline is the same
requests served one at a time without HTTP (`assistant.stream_batch([request])`, in process).
The settings take turns over --repeats rounds and each figure comes from its median round.
Figures: requests/s, generated tokens/s, latency p50/p95, time to first token p50, and
the speed-up (requests/s) over the baseline. Client and server share this machine's CPUs.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import vlmkit
from benchmarks.results import ROOT, write_section
from vlmkit.data.lm_tokenizer import IMAGE_TOKEN
from vlmkit.data.sources.shapes import Shapes
from vlmkit.inference.assistant import Request
from vlmkit.serving.local import BackgroundServer

DEMO_MODEL = ROOT / "runs" / "demo" / "stage2" / "model"
QUESTIONS = ("Describe the image.", "What colour is the shape?", "What shape is in the image?",
             "Where is the shape?")
CONCURRENCY = (1, 4, 16)


# ----------------------------------------------------------------------------- model
# ----------------------------------------------------------------------------- requests
def make_requests(n: int) -> list[tuple[object, str, str]]:
    """n (PIL image, data: URL, question) triples, the same on every run."""
    source = Shapes(split="test", size=n, seed=0, image_size=64)
    out = []
    for i in range(n):
        image = source[i].image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append((image, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
                    QUESTIONS[i % len(QUESTIONS)]))
    return out


@dataclass
class Result:
    latency: float          # seconds from sending to the last byte
    ttft: float             # seconds to the first content chunk
    tokens: int             # completion tokens
    prompt_tokens: int
    text: str


@dataclass
class Run:
    name: str
    wall: float
    results: list[Result]

    @property
    def rps(self) -> float:
        return len(self.results) / self.wall

    @property
    def tps(self) -> float:
        return sum(r.tokens for r in self.results) / self.wall

    def pct(self, attr: str, q: float) -> float:
        values = sorted(getattr(r, attr) for r in self.results)
        return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def sequential(assistant, requests, max_tokens: int, warmup: int = 1) -> Run:
    """The baseline: each request alone through the model, in process, one after another."""
    def one(image, question) -> Result:
        started, first, text, last = time.perf_counter(), None, "", None
        for d in assistant.stream_batch([Request([{"role": "user", "content": IMAGE_TOKEN + "\n" + question}],
                                                 [image], max_new_tokens=max_tokens, temperature=0.0)]):
            if d.text and first is None:
                first = time.perf_counter() - started
            text += d.text
            last = d
        latency = time.perf_counter() - started
        return Result(latency, first if first is not None else latency, last.completion_tokens, last.prompt_tokens, text)

    for image, _, question in requests[:warmup]:
        one(image, question)
    started = time.perf_counter()
    results = [one(image, question) for image, _, question in requests]
    return Run("sequential, in process (baseline)", time.perf_counter() - started, results)


# ----------------------------------------------------------------------------- HTTP
async def _one(client, url: str, model: str, data_url: str, question: str, max_tokens: int) -> Result:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                      {"type": "text", "text": question}]}]}
    started, first, text, usage = time.perf_counter(), None, "", None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            for choice in event["choices"]:
                piece = choice["delta"].get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - started
                    text += piece
            usage = event.get("usage") or usage
    latency = time.perf_counter() - started
    return Result(latency, first if first is not None else latency, usage["completion_tokens"],
                  usage["prompt_tokens"], text)


async def _load(url: str, model: str, requests, concurrency: int, max_tokens: int) -> tuple[float, list[Result]]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await _one(client, url, model, requests[0][1], requests[0][2], max_tokens)   # warm-up
        results: list[Result | None] = [None] * len(requests)
        todo = iter(range(len(requests)))

        async def worker():
            for i in todo:
                results[i] = await _one(client, url, model, requests[i][1], requests[i][2], max_tokens)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, results


def over_http(assistant, requests, concurrency: int, max_tokens: int, max_batch: int = 16) -> Run:
    from vlmkit.serving.app import ServeSettings, create_app

    settings = ServeSettings(max_batch=max_batch, max_queue=max(64, len(requests)))
    with BackgroundServer(create_app({"bench": assistant}, settings)) as server:
        wall, results = asyncio.run(_load(server.url, "bench", requests, concurrency, max_tokens))
    name = f"HTTP, concurrency {concurrency}" + (", batching off (max_batch=1)" if max_batch == 1 else "")
    return Run(name, wall, results)


# ----------------------------------------------------------------------------- report
def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.rps)[len(runs) // 2]


def describe(run: Run, base: Run) -> list[tuple[str, str]]:
    """(figure, value) pairs for one setting."""
    return [("requests/s", f"{run.rps:.2f}"),
            ("generated tokens/s", f"{run.tps:.1f}"),
            ("latency p50 (s)", f"{run.pct('latency', .5):.3f}"),
            ("latency p95 (s)", f"{run.pct('latency', .95):.3f}"),
            ("first token p50 (s)", f"{run.pct('ttft', .5):.3f}"),
            ("speed-up over the baseline (requests/s)", f"{run.rps / base.rps:.2f}x")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"a Stage 2 checkpoint directory (default: {DEMO_MODEL.relative_to(ROOT)} "
                                        "written by `vlmkit demo`)")
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens: a short run")
    parser.add_argument("--requests", type=int, help="requests per setting (default 48, --quick 16)")
    parser.add_argument("--max-tokens", type=int, help="max_tokens of every request (default 32, --quick 16)")
    parser.add_argument("--repeats", type=int, help="rounds over all settings; each figure is from the "
                                                     "median round by requests/s (default 3, --quick 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    n = args.requests or (16 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 3)
    max_tokens = args.max_tokens or (16 if args.quick else 32)

    if args.model:
        path, which = Path(args.model), f"`{args.model}` (--model)"
    elif (DEMO_MODEL / "config.json").exists():
        path, which = DEMO_MODEL, f"the trained demo model `{DEMO_MODEL.relative_to(ROOT)}`"
    else:
        raise SystemExit(f"no model to serve: {DEMO_MODEL.relative_to(ROOT)} does not exist; run `vlmkit demo` "
                         "first, or pass --model")
    print(f"model: {which}", flush=True)
    assistant = vlmkit.load(path, device=args.device)
    if not hasattr(assistant, "stream_batch"):
        raise SystemExit(f"{path} is not a Stage 2 (chat) model")
    requests = make_requests(n)

    # One untimed pass first: the first time each input shape is seen costs extra.
    sequential(assistant, requests, max_tokens, warmup=0)
    settings = [(c, 16) for c in CONCURRENCY] + [(CONCURRENCY[-1], 1)]
    rounds: list[list[Run]] = [[] for _ in range(len(settings) + 1)]
    for k in range(repeats):   # the settings take turns, so a busy spell hits them all alike
        rounds[0].append(sequential(assistant, requests, max_tokens))
        for i, (c, max_batch) in enumerate(settings, 1):
            rounds[i].append(over_http(assistant, requests, c, max_tokens, max_batch))
        print(f"round {k + 1}/{repeats}: " + ", ".join(f"{r[-1].rps:.1f}" for r in rounds) + " req/s", flush=True)
    base, *runs = [median_run(r) for r in rounds]
    for r in [base, *runs]:
        print(f"{r.name}: " + ", ".join(f"{k} {v}" for k, v in describe(r, base)), flush=True)

    same = {r.name: sum(a.text == b.text for a, b in zip(r.results, base.results)) for r in runs}
    every = "every setting"
    rows = [(every, "model", which),
            (every, "requests (a `shapes` test image each, greedy, streamed)", f"{n}"),
            (every, "questions, asked in turn", f"{len(QUESTIONS)}"),
            (every, "max_tokens", f"{max_tokens}"),
            (every, "rounds (each figure from the median round of its setting, by requests/s)", f"{repeats}"),
            (base.name, "mean prompt tokens per request",
             f"{statistics.mean(r.prompt_tokens for r in base.results):.1f}"),
            (base.name, "mean generated tokens per request", f"{statistics.mean(r.tokens for r in base.results):.1f}")]
    rows += [(base.name, *figure) for figure in describe(base, base)]
    for r in runs:
        rows += [(r.name, *figure) for figure in describe(r, base)]
        rows.append((r.name, f"answers identical to the baseline (of {n})", f"{same[r.name]}"))
    batched, unbatched = runs[len(CONCURRENCY) - 1], runs[-1]
    rows.append((f"concurrency {CONCURRENCY[-1]}, batching on vs off", "batching gain (requests/s, on / off)",
                 f"{batched.rps / unbatched.rps:.2f}x"))
    notes = ("Speed-ups are requests/s over the baseline (the same requests one at a time through the model, "
             "in process, no HTTP). The clients run in the server's process and share its CPUs; on a busy "
             "machine the figures are noisy. Latency is from sending a request to its last byte; the first "
             "token's time includes waiting for the batch to form.")
    write_section("serving", f"Serving: `vlmkit serve` throughput and latency ({'--quick, ' if args.quick else ''}"
                             f"{n} requests, concurrency {', '.join(map(str, CONCURRENCY))})", rows, notes,
                  columns=("setting", "figure", "value"))


if __name__ == "__main__":
    main()
