"""The OpenAI-compatible HTTP API and the web chat page, over `vlmkit.inference.api` models.

Routes only translate: JSON -> `assistant.Request` (images decoded from data: URLs under
size limits), deltas -> OpenAI responses or server-sent events. Generation goes through one
`Batcher` per chat model, so requests that arrive together decode together. Every error,
ours or the framework's, leaves as OpenAI's error JSON with no stack trace or file path.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.data.chat import PromptTooLong
from vlmkit.data.images import ImageDecodeError, load_image
from vlmkit.inference.api import load
from vlmkit.inference.assistant import Request
from vlmkit.runtime import VERSION
from vlmkit.serving.batcher import BATCHERS, BadRequest, QueueFull
from vlmkit.serving.media import MediaError, MediaPolicy, fetch
from vlmkit.serving.metrics import RequestLog, ServerMetrics
from vlmkit.serving.schemas import ChatMessage, ChatRequest, EmbeddingRequest, ExplainRequest

log = logging.getLogger("vlmkit.serving")
WEB = Path(__file__).parent / "web"


@dataclass
class ServeSettings:
    api_key: str | None = None
    allow_remote_images: bool = False      # http(s) image URLs, fetched under serving/media.py's rules
    allowed_media_domains: tuple[str, ...] = ()   # when set: the only hosts fetched, private ones included
    media_path: str | None = None          # when set: file:// image URLs under this folder
    fetch_timeout_s: float = 10.0          # one remote image, redirects included
    max_redirects: int = 3
    max_body_bytes: int = 32 * 2**20       # a whole request
    max_image_bytes: int = 16 * 2**20      # one decoded image file
    max_image_pixels: int = 40_000_000     # width x height, checked on the header before decoding
    max_images: int = 8                    # per request
    max_tokens: int = 1024                 # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_n: int = 8
    max_prompt_tokens: int | None = None   # None: what the model's context holds
    max_stop: int = 4
    batching: str = "continuous"           # or "static": see serving/batcher.py
    max_batch: int = 16                    # rows decoded together
    max_queue: int = 64                    # requests waiting; beyond this, 503
    batch_wait_ms: float = 5.0             # static batching: how long the first request waits for company
    retry_after_s: int = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _error(status: int, message: str, **kw) -> JSONResponse:
    return APIError(status, message, **kw).response()


# ----------------------------------------------------------------------------- body size
class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes (413) before they are read whole.

    A declared Content-Length is checked at once. A chunked body is read here, counted, and
    handed on only when it is complete and within the limit: raised from inside the
    framework's own body parsing, the limit would come out as a 400 "error parsing the body".
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(413, f"request body of {int(declared)} bytes exceeds the limit of {self.limit}",
                                code="body_too_large")(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":   # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await _error(413, f"request body exceeds the limit of {self.limit} bytes",
                                    code="body_too_large")(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, handed = b"".join(chunks), False

        async def replay():
            nonlocal handed
            if handed:   # after the body: what the client does next (a disconnect ends a stream)
                return await receive()
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------- images
def decode_image_url(url: str, settings: ServeSettings):
    """A data: URL (or, when allowed, an http(s) URL) -> an RGB PIL image, within the limits."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, "image data URLs must be base64-encoded (data:image/png;base64,...)",
                           param="image_url")
        if len(payload) * 3 // 4 > settings.max_image_bytes:
            raise APIError(413, f"image larger than the limit of {settings.max_image_bytes} bytes",
                           param="image_url", code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "image data URL is not valid base64", param="image_url") from None
    elif url.startswith(("http://", "https://", "file://")):
        policy = MediaPolicy(settings.max_image_bytes, settings.allow_remote_images, settings.fetch_timeout_s,
                             settings.max_redirects, tuple(settings.allowed_media_domains),
                             Path(settings.media_path) if settings.media_path else None)
        try:
            data = fetch(url, policy)
        except MediaError as e:
            raise APIError(e.status, str(e), param="image_url",
                           code="image_too_large" if e.status == 413 else None) from None
    else:
        raise APIError(400, "image_url must be a data: URL" + (" or an http(s) URL" if settings.allow_remote_images
                                                                else ""), param="image_url")
    try:
        return load_image(data, max_pixels=settings.max_image_pixels)
    except ImageDecodeError as e:
        status = 413 if "too large" in e.problem else 400
        raise APIError(status, f"unusable image: {e.problem}", param="image_url") from None


def to_prompt(messages: list[ChatMessage], settings: ServeSettings) -> tuple[list[dict], list]:
    """OpenAI messages -> (vlmkit messages, typed parts kept and image parts emptied; decoded images).

    String content may hold `<image>` placeholders too; their images then come from nowhere,
    which the assistant reports as a count mismatch.
    """
    out, images = [], []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts = []
        for part in m.content:
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                if len(images) == settings.max_images:
                    raise APIError(400, f"more than {settings.max_images} images in one request", param="messages")
                images.append(decode_image_url(part.image_url.url, settings))
                parts.append({"type": "image"})
        out.append({"role": m.role, "content": parts})
    return out, images


# ----------------------------------------------------------------------------- the app
def create_app(models: dict[str, Any], settings: ServeSettings | None = None) -> FastAPI:
    """An app serving `models` (name -> what `vlmkit.load` returns)."""
    settings = settings or ServeSettings()
    if not models:
        raise ValueError("no models to serve")
    if settings.batching not in BATCHERS:
        raise ValueError(f"batching must be one of {', '.join(BATCHERS)}, got {settings.batching!r}")
    locks = {name: threading.Lock() for name in models}
    batchers = {name: BATCHERS[settings.batching](m, settings.max_batch, settings.max_queue, settings.batch_wait_ms,
                                                  locks[name])
                for name, m in models.items() if hasattr(m, "stream_batch")}
    app = FastAPI(title="vlmkit", version=VERSION, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batchers = batchers   # for monitoring and tests
    metrics = app.state.metrics = ServerMetrics()
    for name, batcher in batchers.items():
        metrics.watch(name, lambda b=batcher: b.waiting, lambda b=batcher: b.running)

    # ---- errors: always OpenAI's shape, never a traceback
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "missing":
            message = "field required"
        return _error(400, f"{where}: {message}" if where else message, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), type="not_found_error" if e.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):
        log.exception("unhandled error")
        return _error(500, "internal server error", type="server_error")

    async def authorize(request: HTTPRequest) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")

    def model(name: str, need: str):
        if name not in models:
            raise APIError(404, f"model {name!r} does not exist; served: {', '.join(models)}",
                           param="model", code="model_not_found")
        m = models[name]
        if need == "chat" and name not in batchers:
            raise APIError(400, f"model {name!r} is a dual encoder: it embeds, it does not chat", param="model")
        return m

    # ---- routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models), "waiting": {n: b.waiting for n, b in batchers.items()}}

    @app.get("/metrics")   # unauthenticated, as Prometheus scrapes it: counts and timings, no content
    async def prometheus():
        content, media_type = metrics.scrape()
        return Response(content, media_type=media_type)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "vlmkit",
             "capabilities": ["chat", "embeddings"] if name in batchers else ["embeddings"]}
            for name in models]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest, request: HTTPRequest):
        started = time.perf_counter()
        model(body.model, "chat")
        max_new = body.max_completion_tokens or body.max_tokens or min(settings.default_max_tokens,
                                                                        settings.max_tokens)
        if max_new > settings.max_tokens:
            raise APIError(400, f"max_tokens {max_new} exceeds this server's limit of {settings.max_tokens}",
                           param="max_tokens")
        if body.n > settings.max_n:
            raise APIError(400, f"n {body.n} exceeds this server's limit of {settings.max_n}", param="n")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > settings.max_stop:
            raise APIError(400, f"at most {settings.max_stop} stop sequences", param="stop")
        messages, images = await run_in_threadpool(to_prompt, body.messages, settings)
        seed = body.seed if body.seed is not None else secrets.randbits(31)  # per row: still one batch
        requests = [Request(messages=messages, images=images, max_new_tokens=max_new, temperature=body.temperature,
                            top_p=body.top_p, stop=tuple(s for s in stops if s), seed=(seed + i) % 2**63)
                    for i in range(body.n)]
        prepared = await run_in_threadpool(_prepare, models[body.model], requests[0], settings.max_prompt_tokens)
        try:
            job = batchers[body.model].submit(requests, prepared)
        except QueueFull as e:
            raise APIError(503, f"server busy: {e}; retry shortly", type="server_error", code="queue_full",
                           headers={"Retry-After": str(settings.retry_after_s)}) from None
        # Until the answer streams (then the stream notices), a client that leaves cancels the job here.
        watcher = asyncio.create_task(_cancel_when_gone(request, job))
        try:
            first = await job.out.get()
            first_at = time.perf_counter()
            if first is None and job.cancelled.is_set():   # the client left before its answer began
                return Response(status_code=499)            # (nginx's "client closed request", for the log)
            _raise_if_error(first)

            def ended(prompt: int, generated: int) -> None:
                metrics.finished(body.model, started, first_at, prompt, generated)
                request.state.log.update(model=body.model, prompt_tokens=prompt, completion_tokens=generated)

            ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(_sse(job, first, ident, created, body.model, body.n, include_usage, ended),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return await _complete(job, first, ident, created, body.model, body.n, ended)
        finally:
            watcher.cancel()

    @app.post("/v1/embeddings", dependencies=[Depends(authorize)])
    async def embeddings(body: EmbeddingRequest):
        m = model(body.model, "embed")
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs or any(not isinstance(x, str) or not x.strip() for x in inputs):
            raise APIError(400, "input must be a non-empty string or a list of non-empty strings", param="input")
        is_image = [x.startswith(("data:", "http://", "https://")) for x in inputs]
        images = [await run_in_threadpool(decode_image_url, x, settings) for x, im in zip(inputs, is_image) if im]
        texts = [x for x, im in zip(inputs, is_image) if not im]
        if texts and not hasattr(m, "embed_texts"):
            raise APIError(400, f"model {body.model!r} embeds images only (its vision tower); send data: URLs",
                           param="input")
        vectors = await run_in_threadpool(_embed, m, locks[body.model], images, texts)
        image_vecs, text_vecs = iter(vectors[0]), iter(vectors[1])
        data = [{"object": "embedding", "index": i,
                 "embedding": _encode(next(image_vecs) if im else next(text_vecs), body.encoding_format)}
                for i, im in enumerate(is_image)]
        tokens = sum(len(t.split()) for t in texts)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/vlmkit/explain", dependencies=[Depends(authorize)])
    async def explain(body: ExplainRequest):
        m = model(body.model, "chat")
        if not body.question.strip():
            raise APIError(400, "question must not be empty", param="question")
        image = await run_in_threadpool(decode_image_url, body.image, settings)
        try:
            answer, png = await run_in_threadpool(_explain, m, locks[body.model], image, body.question, body.answer)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return {"answer": answer, "image": "data:image/png;base64," + base64.b64encode(png).decode()}

    @app.get("/", include_in_schema=False)
    async def page():
        if not (WEB / "index.html").is_file():
            raise APIError(404, "the web page is not installed", type="not_found_error")
        return FileResponse(WEB / "index.html")

    if WEB.is_dir():
        app.mount("/web", StaticFiles(directory=WEB), name="web")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestLog, metrics=metrics)   # outermost: a refused body is logged and counted too
    return app


def _prepare(assistant, request: Request, max_prompt_tokens: int | None):
    """Tokens and pixels for a request, checked here, in a handler's thread, so the model's
    thread only runs the model and a bad request never reaches it."""
    try:
        ids, pixels = assistant.prepare(request)
    except ValueError as e:
        raise APIError(400, str(e), param="messages",
                       code="context_length_exceeded" if isinstance(e, PromptTooLong) else None) from None
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this server's limit is {max_prompt_tokens}",
                       param="messages", code="context_length_exceeded")
    return ids, pixels


async def _cancel_when_gone(request: HTTPRequest, job) -> None:
    """Cancel `job` when the client disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


def _raise_if_error(item) -> None:
    if isinstance(item, BadRequest):
        raise APIError(400, str(item))
    if isinstance(item, Exception):
        raise APIError(500, "internal server error", type="server_error")
    if item is None:
        raise APIError(500, "the generation ended without output", type="server_error")


async def _complete(job, first, ident, created, name, n, ended: Callable[[int, int], None]) -> dict:
    texts, reasons, prompt, completion = [""] * n, [None] * n, 0, [0] * n
    item = first
    while item is not None:
        _raise_if_error(item)
        texts[item.index] += item.text
        prompt, completion[item.index] = item.prompt_tokens, item.completion_tokens
        if item.finish_reason:
            reasons[item.index] = item.finish_reason
        item = await job.out.get()
    ended(prompt, sum(completion))
    return {"id": ident, "object": "chat.completion", "created": created, "model": name,
            "system_fingerprint": f"vlmkit-{VERSION}",
            "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                         "finish_reason": reasons[i] or "length", "logprobs": None} for i in range(n)],
            "usage": {"prompt_tokens": prompt, "completion_tokens": sum(completion),
                      "total_tokens": prompt + sum(completion)}}


async def _sse(job, first, ident, created, name, n, include_usage,
               ended: Callable[[int, int], None]) -> AsyncIterator[str]:
    import json

    def chunk(choices, usage=None) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                "system_fingerprint": f"vlmkit-{VERSION}", "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    prompt, completion = 0, [0] * n
    try:
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        item = first
        while item is not None:
            if isinstance(item, Exception):  # the status line is gone: report in the stream, as OpenAI does
                message = str(item) if isinstance(item, BadRequest) else "internal server error"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                break
            prompt, completion[item.index] = item.prompt_tokens, item.completion_tokens
            if item.text:
                yield chunk([{"index": item.index, "delta": {"content": item.text}, "finish_reason": None}])
            if item.finish_reason:
                yield chunk([{"index": item.index, "delta": {}, "finish_reason": item.finish_reason}])
            item = await job.out.get()
        if include_usage:
            total = sum(completion)
            yield chunk([], {"prompt_tokens": prompt, "completion_tokens": total, "total_tokens": prompt + total})
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that went away stops receiving; nothing else to undo
        ended(prompt, sum(completion))


def _encode(vector, encoding: str):
    if encoding == "base64":  # what the openai client asks for by default: float32, little-endian
        return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


def _embed(m, lock: threading.Lock, images: list, texts: list[str]):
    import torch

    empty = torch.empty(0)
    with lock:
        if hasattr(m, "embed_texts"):
            return (m.embed_images(images) if images else empty, m.embed_texts(texts) if texts else empty)
        return (m.embed(images) if images else empty, empty)


def _explain(m, lock: threading.Lock, image, question: str, answer: str | None) -> tuple[str, bytes]:
    with lock, tempfile.TemporaryDirectory() as tmp:
        if answer is None:
            answer = m.ask(image, question, max_new_tokens=64)
        path = m.explain(image, question, Path(tmp) / "heatmap.png", answer=answer)
        return answer, Path(path).read_bytes()


def model_name(path: str | Path) -> str:
    """`runs/shapes-vlm/model` -> "shapes-vlm"; any other directory -> its own name."""
    path = Path(path).resolve()
    return path.parent.name if path.name == "model" else path.name


def load_models(paths: list[str], device: str | None = None, precision: str = "auto") -> dict[str, Any]:
    models: dict[str, Any] = {}
    for p in paths:
        name = model_name(p)
        if name in models:
            raise ValueError(f"two models would be called {name!r}; rename one of the directories")
        models[name] = load(p, device=device, precision=precision)
    return models
