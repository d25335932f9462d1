"""What an operator watches: Prometheus metrics at GET /metrics and one log line per request.

Each app has its own registry, so two servers in one process (tests, several apps behind
one ASGI router) never add to each other's counts. Names follow Prometheus' conventions
(`_total` counters, `_seconds` histograms) under a `vlmkit_` prefix.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("vlmkit.serving.requests")
REQUEST_ID = "x-request-id"
# Latency buckets from a GPU's milliseconds to a 2-core CPU's tens of seconds.
FIRST_TOKEN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vlmkit_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.queue = Gauge("vlmkit_queue_length", "Chat requests waiting for the model", ["model"], registry=r)
        self.running = Gauge("vlmkit_running_rows", "Rows (choices) the model is decoding now", ["model"],
                             registry=r)
        self.first_token = Histogram("vlmkit_time_to_first_token_seconds",
                                     "From a chat request's arrival to its first generated token", ["model"],
                                     buckets=FIRST_TOKEN_BUCKETS, registry=r)
        self.per_token = Histogram("vlmkit_time_per_output_token_seconds",
                                   "Mean time between a request's generated tokens, after the first", ["model"],
                                   buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vlmkit_prompt_tokens", "Prompt tokens read (image tokens included)",
                                     ["model"], registry=r)
        self.generated_tokens = Counter("vlmkit_generation_tokens", "Tokens generated", ["model"], registry=r)

    def watch(self, model: str, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        """Queue length and running rows are read from the batcher at scrape time."""
        self.queue.labels(model).set_function(waiting)
        self.running.labels(model).set_function(running)

    def finished(self, model: str, started: float, first_token: float | None, prompt: int, generated: int) -> None:
        """A chat request's timings and token counts, when it ends."""
        self.prompt_tokens.labels(model).inc(prompt)
        self.generated_tokens.labels(model).inc(generated)
        if first_token is not None:
            self.first_token.labels(model).observe(first_token - started)
            if generated > 1:
                self.per_token.labels(model).observe((time.perf_counter() - first_token) / (generated - 1))

    def scrape(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestLog:
    """ASGI middleware: a request id (the client's X-Request-Id, or a new one) echoed in the
    response's headers, and one JSON log line per request when its response has ended (a
    stream included): id, method, route, status, latency, and what the handler added to
    `request.state.log` (model, tokens)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(REQUEST_ID.encode(), b"").decode("latin-1")
        ident = given if given and len(given) <= 128 and given.isprintable() else f"req-{secrets.token_hex(8)}"
        scope.setdefault("state", {})["log"] = {}
        started, status = time.perf_counter(), 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID.encode(), ident.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"   # unknown paths: one label, not many
            self.metrics.requests.labels(route, str(status)).inc()
            log.info(json.dumps({"id": ident, "method": scope["method"], "path": scope["path"], "status": status,
                                 "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                                 **scope["state"]["log"]}))


ROUTES = ("/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/vlmkit/explain", "/health", "/metrics", "/")
