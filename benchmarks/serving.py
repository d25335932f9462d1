"""Serving throughput and latency of `vlmkit serve`: closed-loop clients, and requests arriving over time.

    python -m benchmarks.serving [--model DIR|llava-smol] [--part closed|arrivals|all] [--precision P] [--quick]
                                 [--requests N] [--max-tokens N] [--repeats N]

(from the repository root)

The model is --model, else the trained demo model (runs/demo/stage2/model, written by
`vlmkit demo`); `--model llava-smol` builds the llava-smol shape of `benchmarks/speed.py`
(SigLIP-B/16 with random weights, SmolLM2-135M with its real ones). The section says which.
The server runs in this process (uvicorn in a thread on a free 127.0.0.1 port) and async
httpx clients send `shapes` images with questions, greedy, streamed with usage.

Part `closed` (section `serving`): one fixed set of requests at concurrency 1, 4 and 16,
and at 16 again on a server that decodes one request at a time (max_batch=1), so batching
is measured apart from concurrency. The baseline is the same requests served one at a time
without HTTP (`assistant.stream_batch([request])`, in process). The settings take turns
over --repeats rounds and each figure comes from its median round. Figures: requests/s,
generated tokens/s, latency p50/p95, time to first token p50, and the speed-up
(requests/s) over the baseline.

Part `arrivals` (section `serving-arrivals`): requests with mixed max_tokens (and
questions) arrive as a Poisson stream at rates of 0.5, 1 and 2 times what the baseline
serves per second, on a server with continuous batching and on one with static batching
(the settings take turns at each rate, same arrival times). Figures per rate and batching:
throughput (completed requests/s and generated tokens/s, from the first arrival to the
last answer), time to first token p50/p95, latency p95, and how many answers equal the
baseline's. Client and server share this machine's CPUs.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import tempfile
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
RATES = (0.5, 1.0, 2.0)                   # arrivals per second, as multiples of the baseline's requests/s
MAX_TOKENS_MIX = (4, 8, 16, 32, 64)


# ----------------------------------------------------------------------------- requests
@dataclass
class Req:
    image: object            # PIL image
    url: str                 # the same image as a data: URL
    question: str
    max_tokens: int


def make_requests(n: int, max_tokens: int | tuple[int, ...]) -> list[Req]:
    """n requests, the same on every run; max_tokens fixed, or drawn from a tuple."""
    source = Shapes(split="test", size=n, seed=0, image_size=64)
    draw = random.Random(0)
    out = []
    for i in range(n):
        image = source[i].image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(Req(image, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
                       QUESTIONS[i % len(QUESTIONS)],
                       max_tokens if isinstance(max_tokens, int) else draw.choice(max_tokens)))
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


def sequential(assistant, requests: list[Req], warmup: int = 1) -> Run:
    """The baseline: each request alone through the model, in process, one after another."""
    def one(r: Req) -> Result:
        started, first, text, last = time.perf_counter(), None, "", None
        for d in assistant.stream_batch([Request([{"role": "user", "content": IMAGE_TOKEN + "\n" + r.question}],
                                                 [r.image], max_new_tokens=r.max_tokens, temperature=0.0)]):
            if d.text and first is None:
                first = time.perf_counter() - started
            text += d.text
            last = d
        latency = time.perf_counter() - started
        return Result(latency, first if first is not None else latency, last.completion_tokens, last.prompt_tokens, text)

    for r in requests[:warmup]:
        one(r)
    started = time.perf_counter()
    results = [one(r) for r in requests]
    return Run("sequential, in process (baseline)", time.perf_counter() - started, results)


# ----------------------------------------------------------------------------- HTTP
async def _one(client, url: str, model: str, r: Req) -> Result:
    body = {"model": model, "max_tokens": r.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": r.url}},
                                                      {"type": "text", "text": r.question}]}]}
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


async def _load(url: str, model: str, requests: list[Req], concurrency: int) -> tuple[float, list[Result]]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await _one(client, url, model, requests[0])   # warm-up
        results: list[Result | None] = [None] * len(requests)
        todo = iter(range(len(requests)))

        async def worker():
            for i in todo:
                results[i] = await _one(client, url, model, requests[i])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, results


def over_http(assistant, requests: list[Req], concurrency: int, max_batch: int = 16) -> Run:
    from vlmkit.serving.app import ServeSettings, create_app

    settings = ServeSettings(max_batch=max_batch, max_queue=max(64, len(requests)))
    with BackgroundServer(create_app({"bench": assistant}, settings)) as server:
        wall, results = asyncio.run(_load(server.url, "bench", requests, concurrency))
    name = f"HTTP, concurrency {concurrency}" + (", batching off (max_batch=1)" if max_batch == 1 else "")
    return Run(name, wall, results)


async def _arrivals(url: str, model: str, requests: list[Req], times: list[float]) -> tuple[float, list[Result]]:
    """Send request i at times[i] seconds after the start, each on its own connection."""
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 1, max_keepalive_connections=len(requests) + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await _one(client, url, model, requests[0])   # warm-up
        results: list[Result | None] = [None] * len(requests)
        started = time.perf_counter()

        async def send(i: int) -> None:
            await asyncio.sleep(max(0.0, started + times[i] - time.perf_counter()))
            results[i] = await _one(client, url, model, requests[i])

        await asyncio.gather(*(send(i) for i in range(len(requests))))
        return time.perf_counter() - started, results


def poisson_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival times of a Poisson stream: exponential gaps with mean 1 / rate, the first at 0."""
    draw, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += draw.expovariate(rate)
    return out


def arriving(assistant, requests: list[Req], rate: float, batching: str, max_batch: int = 16) -> Run:
    from vlmkit.serving.app import ServeSettings, create_app

    settings = ServeSettings(batching=batching, max_batch=max_batch, max_queue=max(64, len(requests)))
    with BackgroundServer(create_app({"bench": assistant}, settings)) as server:
        wall, results = asyncio.run(_arrivals(server.url, "bench", requests, poisson_times(len(requests), rate)))
    return Run(f"{rate:.2f} requests/s arriving, {batching} batching", wall, results)


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


def closed(assistant, which: str, n: int, max_tokens: int, repeats: int, quick: bool) -> None:
    requests = make_requests(n, max_tokens)
    # One untimed pass first: the first time each input shape is seen costs extra.
    sequential(assistant, requests, warmup=0)
    settings = [(c, 16) for c in CONCURRENCY] + [(CONCURRENCY[-1], 1)]
    rounds: list[list[Run]] = [[] for _ in range(len(settings) + 1)]
    for k in range(repeats):   # the settings take turns, so a busy spell hits them all alike
        rounds[0].append(sequential(assistant, requests))
        for i, (c, max_batch) in enumerate(settings, 1):
            rounds[i].append(over_http(assistant, requests, c, max_batch))
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
             "in process, no HTTP). The server batches continuously (its default). The clients run in the "
             "server's process and share its CPUs; on a busy machine the figures are noisy. Latency is from "
             "sending a request to its last byte.")
    write_section("serving", f"Serving: `vlmkit serve` throughput and latency ({'--quick, ' if quick else ''}"
                             f"{n} requests, concurrency {', '.join(map(str, CONCURRENCY))})", rows, notes,
                  columns=("setting", "figure", "value"))


def arrivals(assistant, which: str, section: str, n: int, repeats: int, quick: bool) -> None:
    requests = make_requests(n, MAX_TOKENS_MIX)
    sequential(assistant, requests, warmup=0)   # untimed: first shapes
    base = median_run([sequential(assistant, requests) for _ in range(repeats)])
    print(f"baseline: {base.rps:.2f} requests/s", flush=True)
    runs: dict[tuple[float, str], list[Run]] = {}
    for k in range(repeats):
        for factor in RATES:
            for batching in ("continuous", "static"):   # in turn, on the same arrival times
                run = arriving(assistant, requests, factor * base.rps, batching)
                runs.setdefault((factor, batching), []).append(run)
                print(f"round {k + 1}/{repeats}, {run.name}: {run.rps:.2f} requests/s, first token p95 "
                      f"{run.pct('ttft', .95):.3f} s", flush=True)
    best = {key: median_run(r) for key, r in runs.items()}
    lengths = sorted(r.tokens for r in base.results)
    rows = [("every setting", "model", which),
            ("every setting", "requests per run (a `shapes` test image each, greedy, streamed)", f"{n}"),
            ("every setting", "max_tokens, drawn per request from", ", ".join(map(str, MAX_TOKENS_MIX))),
            ("every setting", "generated tokens per request: min / median / max",
             f"{lengths[0]} / {lengths[len(lengths) // 2]} / {lengths[-1]}"),
            ("every setting", "runs per setting (each figure from the median run, by requests/s)", f"{repeats}"),
            ("baseline: one at a time, in process", "requests/s", f"{base.rps:.2f}"),
            ("baseline: one at a time, in process", "generated tokens/s", f"{base.tps:.1f}")]
    for factor in RATES:
        for batching in ("continuous", "static"):
            r = best[factor, batching]
            rows += [(r.name, "throughput (requests/s)", f"{r.rps:.2f}"),
                     (r.name, "throughput (generated tokens/s)", f"{r.tps:.1f}"),
                     (r.name, "first token p50 (s)", f"{r.pct('ttft', .5):.3f}"),
                     (r.name, "first token p95 (s)", f"{r.pct('ttft', .95):.3f}"),
                     (r.name, "latency p95 (s)", f"{r.pct('latency', .95):.3f}"),
                     (r.name, f"answers identical to the baseline (of {n})",
                      f"{sum(a.text == b.text for a, b in zip(r.results, base.results))}")]
    top = RATES[-1]
    cont, stat = best[top, "continuous"], best[top, "static"]
    rows += [(f"highest rate ({top:g}x the baseline), continuous / static", "throughput (requests/s)",
              f"{cont.rps / stat.rps:.2f}x"),
             (f"highest rate ({top:g}x the baseline), continuous / static", "first token p95",
              f"{cont.pct('ttft', .95) / stat.pct('ttft', .95):.2f}x")]
    notes = ("Arrival times are a seeded Poisson stream (the same for both batchings at a rate); each request "
             "has its own connection. Throughput counts from the first arrival to the last answer, so below "
             "capacity it follows the arrival rate. Static batching waits up to 5 ms for a batch to form, then "
             "decodes it to its end before taking the next; continuous batching lets requests join and leave "
             "between decode steps. Below 1x on a ratio row means continuous batching is lower (better, for "
             "the first-token row). Clients and server share this machine's CPUs.")
    write_section(section, f"Serving: requests arriving over time, continuous vs static batching "
                           f"({'--quick, ' if quick else ''}{n} requests per run)", rows, notes,
                  columns=("setting", "figure", "value"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"a Stage 2 checkpoint directory, or llava-smol (default: "
                                        f"{DEMO_MODEL.relative_to(ROOT)} written by `vlmkit demo`)")
    parser.add_argument("--part", choices=("closed", "arrivals", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens: a short run")
    parser.add_argument("--requests", type=int, help="requests per setting (default 48, --quick 16)")
    parser.add_argument("--max-tokens", type=int, help="closed part: max_tokens of every request "
                                                       "(default 32, --quick 16)")
    parser.add_argument("--repeats", type=int, help="rounds over all settings; each figure is from the "
                                                     "median round by requests/s (default 3, --quick 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "int8"),
                        help="as `vlmkit serve --precision` (default auto, what it serves with)")
    args = parser.parse_args()
    n = args.requests or (16 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 3)
    max_tokens = args.max_tokens or (16 if args.quick else 32)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "llava-smol":
            from benchmarks.speed import build_llava_smol

            path, which, suffix = build_llava_smol(Path(tmp))[1], "llava-smol (see benchmarks/speed.py)", "-llava-smol"
        elif args.model:
            path, which, suffix = Path(args.model), f"`{args.model}` (--model)", ""
        elif (DEMO_MODEL / "config.json").exists():
            path, which, suffix = DEMO_MODEL, f"the trained demo model `{DEMO_MODEL.relative_to(ROOT)}`", ""
        else:
            raise SystemExit(f"no model to serve: {DEMO_MODEL.relative_to(ROOT)} does not exist; run `vlmkit demo` "
                             "first, or pass --model")
        if args.precision != "auto":
            which, suffix = f"{which}, --precision {args.precision}", f"{suffix}-{args.precision}"
        print(f"model: {which}", flush=True)
        assistant = vlmkit.load(path, device=args.device, precision=args.precision)
    if not hasattr(assistant, "stream_batch"):
        raise SystemExit(f"{path} is not a Stage 2 (chat) model")
    if args.part in ("closed", "all"):
        closed(assistant, which, n, max_tokens, repeats, args.quick)
    if args.part in ("arrivals", "all"):
        arrivals(assistant, which, "serving-arrivals" + suffix, n, repeats, args.quick)


if __name__ == "__main__":
    main()
