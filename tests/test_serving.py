"""The OpenAI-compatible server: the official client against a live server, bad input, limits,
authentication, and concurrent requests batched without changing any answer."""
from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

import vlmkit  # noqa: E402
from vlmkit.serving.app import ServeSettings, create_app  # noqa: E402
from vlmkit.serving.local import BackgroundServer  # noqa: E402

QUESTION = "What colour is the circle?"


def png(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def scene(colour=(220, 30, 30), size=(40, 30)) -> Image.Image:
    im = Image.new("RGB", size, (250, 250, 250))
    im.paste(colour, (5, 5, 20, 20))
    return im


def chat_body(image: Image.Image | None = None, question: str = QUESTION, **extra) -> dict:
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(png(image))}})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **extra}


@pytest.fixture(scope="module")
def models(tiny_vlm_dir, tiny_run):
    return {"tiny": vlmkit.load(tiny_vlm_dir, device="cpu"), "clip": vlmkit.load(tiny_run.model_dir, device="cpu")}


@pytest.fixture(scope="module")
def client(models):
    app = create_app(models, ServeSettings(max_body_bytes=2_000_000, max_image_bytes=1_000_000,
                                           max_image_pixels=4_000_000, max_tokens=64))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def live(models):
    app = create_app(models, ServeSettings(api_key="sekret", max_tokens=64))
    with BackgroundServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def oai(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="sekret")


# ----------------------------------------------------------------------------- the official client
def test_chat_with_an_image_matches_the_library(oai, models):
    image = scene()
    reply = oai.chat.completions.create(**chat_body(image))
    answer = reply.choices[0].message.content
    assert answer and answer == models["tiny"].ask(image, QUESTION, max_new_tokens=8)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 16  # 16 image slots + text


def test_several_images_interleaved_with_text(oai, models):
    """Two image parts in one message, text between: the same answer as the library's typed-part call."""
    red, blue = scene(), scene((30, 30, 220), (30, 44))
    content = [{"type": "text", "text": "First"}, {"type": "image_url", "image_url": {"url": data_url(png(red))}},
               {"type": "text", "text": "then"}, {"type": "image_url", "image_url": {"url": data_url(png(blue))}},
               {"type": "text", "text": QUESTION}]
    reply = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                        max_tokens=8, temperature=0)
    parts = [{"type": "text", "text": "First"}, {"type": "image", "image": red}, {"type": "text", "text": "then"},
             {"type": "image", "image": blue}, {"type": "text", "text": QUESTION}]
    answer = models["tiny"].chat([{"role": "user", "content": parts}], max_new_tokens=8)
    assert reply.choices[0].message.content == answer
    assert reply.usage.prompt_tokens > 32  # two images of 16 slots each, and the text


def test_streaming_sends_the_same_text_in_pieces(oai):
    body = chat_body(scene(), stream=True, stream_options={"include_usage": True})
    chunks = list(oai.chat.completions.create(**body))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    whole = oai.chat.completions.create(**chat_body(scene())).choices[0].message.content
    assert "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_stop_strings_and_seeds(oai):
    full = oai.chat.completions.create(**chat_body(scene(), max_tokens=16)).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = oai.chat.completions.create(**chat_body(scene(), max_tokens=16, stop=[stop]))
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    sampled = lambda seed: oai.chat.completions.create(**chat_body(scene(), temperature=1.0, seed=seed)  # noqa: E731
                                                       ).choices[0].message.content
    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in range(4)}) > 1
    two = oai.chat.completions.create(**chat_body(scene(), n=2, temperature=1.0, seed=3))
    assert [c.index for c in two.choices] == [0, 1]


def test_embeddings_for_texts_and_images(oai, models):
    image = scene()
    out = oai.embeddings.create(model="clip", input=["a red circle", data_url(png(image))])
    text_vec, image_vec = (d.embedding for d in out.data)
    for got, expected in ((text_vec, models["clip"].embed_texts(["a red circle"])[0]),
                          (image_vec, models["clip"].embed_images([image])[0])):
        assert len(got) == len(expected) and max(abs(a - b) for a, b in zip(got, expected.tolist())) < 1e-5
    vlm = oai.embeddings.create(model="tiny", input=data_url(png(image)))
    assert len(vlm.data[0].embedding) == 32
    with pytest.raises(openai.BadRequestError, match="images only"):
        oai.embeddings.create(model="tiny", input="a red circle")


def test_api_key_is_required(live):
    import httpx

    assert httpx.get(live.url + "/health").status_code == 200  # liveness needs no key
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(live.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    ok = httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer sekret"}).json()
    assert {m["id"] for m in ok["data"]} == {"tiny", "clip"}


# ----------------------------------------------------------------------------- bad input
def _bomb() -> bytes:
    """A tiny PNG whose header claims 30000 x 30000 pixels."""
    raw = png(Image.new("L", (1, 1)))
    ihdr = raw.index(b"IHDR")
    import struct
    import zlib

    header = struct.pack(">II", 30000, 30000) + raw[ihdr + 12:ihdr + 17]
    chunk = b"IHDR" + header
    return raw[:ihdr - 4] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[ihdr + 21:]


def _odd_images() -> dict[str, bytes]:
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 128))
    frames = [Image.new("P", (20, 20), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return {
        "1x1": png(Image.new("RGB", (1, 1), (0, 0, 255))),
        "very wide": png(Image.new("RGB", (3000, 2), (0, 255, 0))),
        "cmyk": png(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"),
        "rgba": png(rgba),
        "16-bit": png(Image.new("I;16", (20, 20), 40000)),
        "animated": gif.getvalue(),
    }


@pytest.mark.parametrize("name", ["1x1", "very wide", "cmyk", "rgba", "16-bit", "animated"])
def test_odd_but_valid_images_are_answered(client, name):
    raw = _odd_images()[name]
    body = chat_body()
    body["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": data_url(raw)}})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def _image_body(url: str) -> dict:
    body = chat_body()
    body["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": url}})
    return body


BAD_REQUESTS = {
    "truncated png": (lambda: _image_body(data_url(png(scene())[:60])), 400, "truncated"),
    "not an image": (lambda: _image_body(data_url(b"hello, this is text")), 400, "not an image"),
    "decompression bomb": (lambda: _image_body(data_url(_bomb())), 413, "too large"),
    "image bytes over the limit": (lambda: _image_body(data_url(b"\0" * 1_200_000)), 413, "larger than"),
    "not base64": (lambda: _image_body("data:image/png;base64,@@@@"), 400, "base64"),
    "remote url": (lambda: _image_body("http://169.254.169.254/latest/meta-data"), 400, "remote image URLs"),
    "file url": (lambda: _image_body("file:///etc/passwd"), 400, "--media-path"),
    "wrong type": (lambda: chat_body(max_tokens="many"), 400, "max_tokens"),
    "missing messages": (lambda: {"model": "tiny"}, 400, "messages"),
    "empty messages": (lambda: {"model": "tiny", "messages": []}, 400, "messages"),
    "empty content": (lambda: {"model": "tiny", "messages": [{"role": "user", "content": ""}]}, 400, "non-empty"),
    "bad role": (lambda: {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    "overlong prompt": (lambda: chat_body(question="red " * 400), 400, "tokens"),
    "unknown model": (lambda: {**chat_body(), "model": "gpt-9"}, 404, "does not exist"),
    "max_tokens over the limit": (lambda: chat_body(max_tokens=100_000), 400, "limit"),
    "a dual encoder cannot chat": (lambda: {**chat_body(), "model": "clip"}, 400, "does not chat"),
    "placeholder without image": (lambda: chat_body(question="<image> what?"), 400, "placeholder"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_going(client, name):
    make, status, words = BAD_REQUESTS[name]
    r = client.post("/v1/chat/completions", json=make())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words.lower() in error["message"].lower()
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and "/site-packages/" not in r.text and "/work/" not in r.text
    assert client.post("/v1/chat/completions", json=chat_body(scene())).status_code == 200


def test_malformed_json_and_oversized_bodies(client):
    r = client.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"x" * 2_100_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert client.get("/no/such/route").json()["error"]["type"] == "not_found_error"
    assert client.post("/v1/chat/completions", json=chat_body(scene())).status_code == 200


def test_a_chunked_body_over_the_limit_gets_413_like_a_declared_one(models):
    """Without Content-Length the limit is found while reading; the framework's body parsing
    used to swallow it as a 400 "error parsing the body"."""
    import httpx

    app = create_app(models, ServeSettings(max_body_bytes=100_000))
    with BackgroundServer(app) as server:
        chunks = (b"x" * 30_000 for _ in range(5))   # a generator: sent with Transfer-Encoding: chunked
        r = httpx.post(server.url + "/v1/chat/completions", content=chunks, timeout=60,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        small = (piece for piece in [json.dumps(chat_body(max_tokens=2)).encode()])
        assert httpx.post(server.url + "/v1/chat/completions", content=small, timeout=60,
                          headers={"Content-Type": "application/json"}).status_code == 200


# ----------------------------------------------------------------------------- concurrency
def test_one_clients_bad_request_never_fails_the_others(models):
    """Valid requests batched with invalid ones get the answers they get alone; only the
    invalid ones fail, each with its own 400."""
    import httpx

    good = [chat_body(scene((40 * i, 60, 200)), question=q, max_tokens=6)
            for i, q in enumerate([QUESTION, "Describe the image.", "Is there a red square?"] * 2)]
    bad = [chat_body(scene(), seed=2**70, temperature=0.8, max_tokens=6),
           chat_body(scene(), seed=-(2**70), max_tokens=6),
           chat_body(scene(), frequency_penalty=1e300, max_tokens=6)]
    app = create_app(models, ServeSettings(max_batch=16, batch_wait_ms=100))
    with BackgroundServer(app) as server:
        def send(body):
            return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)

        alone = [send(b).json()["choices"][0]["message"]["content"] for b in good]
        with ThreadPoolExecutor(len(good) + len(bad)) as pool:
            replies = list(pool.map(send, [x for pair in zip(good, bad + bad) for x in pair]))
    assert [r.json()["choices"][0]["message"]["content"] for r in replies[0::2]] == alone
    for r in replies[1::2]:
        assert r.status_code == 400 and r.json()["error"]["param"] in ("seed", "frequency_penalty"), r.text


def test_a_static_batch_that_fails_fails_only_the_request_at_fault(models):
    """Whatever slips past validation and breaks a batch part-way (here: after the other
    requests finished, as a sampled group after a greedy one): the others keep their answers."""
    import httpx

    tiny = models["tiny"]
    original = tiny.stream_batch

    def fragile(requests, prepared=None):
        fine = [i for i, r in enumerate(requests) if r.max_new_tokens != 3]
        for d in original([requests[i] for i in fine], [prepared[i] for i in fine]) if fine else ():
            yield type(d)(fine[d.index], d.text, d.finish_reason, d.prompt_tokens, d.completion_tokens)
        if len(fine) < len(requests):
            raise ValueError("max_new_tokens 3 is cursed")

    bodies = [chat_body(scene((30 * i, 0, 90)), max_tokens=3 if i == 2 else 5) for i in range(5)]
    app = create_app({"tiny": tiny}, ServeSettings(batching="static", max_batch=8, batch_wait_ms=200))
    tiny.stream_batch = fragile
    try:
        with BackgroundServer(app) as server, ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(lambda b: httpx.post(server.url + "/v1/chat/completions", json=b, timeout=60),
                                    bodies))
    finally:
        del tiny.stream_batch
    assert [r.status_code for r in replies] == [200, 200, 400, 200, 200]
    assert "cursed" in replies[2].json()["error"]["message"]


def test_32_simultaneous_requests_equal_one_at_a_time(models):
    import httpx

    app = create_app(models, ServeSettings(max_batch=16, batch_wait_ms=20))
    colours = [(30 * i % 256, 90 * i % 256, 170 * i % 256) for i in range(32)]
    # Greedy and seeded sampling, each with its own max_tokens.
    bodies = [chat_body(scene(c), question=q, max_tokens=3 + i % 7, temperature=0.9 if i % 2 else 0, seed=i)
              for i, (c, q) in enumerate(zip(colours, [QUESTION, "Describe the image.", "Is there a green square?",
                                                       "red"] * 8))]
    with BackgroundServer(app) as server:
        def send(body):
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        alone = [send(b) for b in bodies]
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(send, bodies))
    assert together == alone
    assert len(set(alone)) > 1   # the images and questions really differ


def test_with_static_batching_requests_that_arrive_together_decode_together(models):
    import httpx

    tiny = models["tiny"]
    sizes = []
    original = tiny.stream_batch

    def recording(requests, prepared=None):
        sizes.append(len(requests))
        return original(requests, prepared)

    app = create_app({"tiny": tiny}, ServeSettings(batching="static", max_batch=8, batch_wait_ms=50))
    tiny.stream_batch = recording
    try:
        with BackgroundServer(app) as server, ThreadPoolExecutor(8) as pool:
            bodies = [chat_body(scene((20 * i, 0, 0)), max_tokens=4) for i in range(8)]   # no seed: random seeds
            codes = list(pool.map(lambda b: httpx.post(server.url + "/v1/chat/completions", json=b,
                                                       timeout=60).status_code, bodies))
    finally:
        del tiny.stream_batch
    assert codes == [200] * 8
    assert sum(sizes) == 8 and max(sizes) > 1


def test_a_request_that_fails_in_the_running_batch_fails_alone(models, monkeypatch):
    """Continuous batching: a request whose prefill fails gets its own 400; one decode step that
    fails costs the rows running then a 500 each, and the server goes on serving."""
    import httpx

    from vlmkit.inference.continuous import ContinuousChat

    add, step, broken = ContinuousChat.add, ContinuousChat.step, []

    def fragile_add(self, key, request, prepared=None):
        if request.max_new_tokens == 3:
            raise ValueError("max_new_tokens 3 is cursed")
        return add(self, key, request, prepared)

    def fragile_step(self):
        if broken == ["armed"] and len(self):
            broken[0] = "fired"
            raise RuntimeError("the step broke")
        return step(self)

    monkeypatch.setattr(ContinuousChat, "add", fragile_add)
    monkeypatch.setattr(ContinuousChat, "step", fragile_step)
    bodies = [chat_body(scene((30 * i, 0, 90)), max_tokens=3 if i == 2 else 5) for i in range(5)]
    app = create_app(models, ServeSettings(max_batch=8))
    with BackgroundServer(app) as server, ThreadPoolExecutor(5) as pool:
        def send(body):
            return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)

        alone = [send(b) for b in bodies]
        together = list(pool.map(send, bodies))
        broken.append("armed")
        cut = send(bodies[0])
        after = send(bodies[1])
    assert [r.status_code for r in together] == [r.status_code for r in alone] == [200, 200, 400, 200, 200]
    assert "cursed" in together[2].json()["error"]["message"]
    assert [r.json() for r in together if r.status_code == 200] != []
    assert ([r.json()["choices"][0]["message"]["content"] for r in together if r.status_code == 200] ==
            [r.json()["choices"][0]["message"]["content"] for r in alone if r.status_code == 200])
    assert broken == ["fired"] and cut.status_code == 500 and "the step broke" not in cut.text
    assert after.status_code == 200 and app.state.batchers["tiny"].running == 0


def test_a_request_joins_the_running_batch_and_leaves_it_when_done(models, monkeypatch):
    """A short request sent while a long one decodes starts at once, and is answered before the
    long one ends, with the answer it gets alone."""
    import httpx

    from vlmkit.inference.continuous import ContinuousChat

    step, rows = ContinuousChat.step, []

    def counting(self):   # 10 ms a step, so the long answer is still going when the short one arrives
        rows.append(len(self))
        time.sleep(0.01)
        return step(self)

    monkeypatch.setattr(ContinuousChat, "step", counting)
    long = {**chat_body(scene(), max_tokens=60), "stream": True}
    short = chat_body(scene((0, 200, 0)), question="Describe the image.", max_tokens=4)
    app = create_app(models, ServeSettings(max_batch=4))
    with BackgroundServer(app) as server:
        url = server.url + "/v1/chat/completions"
        alone = httpx.post(url, json=short, timeout=60).json()["choices"][0]["message"]["content"]
        rows.clear()
        with httpx.stream("POST", url, json=long, timeout=60) as stream:
            lines = stream.iter_lines()
            while "content" not in next(lines):    # the long answer is under way
                pass
            joined = httpx.post(url, json=short, timeout=60)
            pieces = sum('"content"' in line for line in lines)   # what remained of the long answer
    assert joined.json()["choices"][0]["message"]["content"] == alone
    assert max(rows) == 2 and rows[-1] == 1      # decoded side by side, then the short one left
    assert pieces > 10                           # the long one was far from done when the short one ended


def test_a_client_that_disconnects_frees_its_row_at_the_next_step(models, monkeypatch):
    import httpx

    from vlmkit.inference.continuous import ContinuousChat

    step, steps = ContinuousChat.step, []

    def slow(self):   # 20 ms a step: 120 tokens would take 2.4 s
        steps.append(len(self))
        time.sleep(0.02)
        return step(self)

    monkeypatch.setattr(ContinuousChat, "step", slow)
    app = create_app(models, ServeSettings(max_batch=4, max_tokens=150))
    batcher = app.state.batchers["tiny"]
    with BackgroundServer(app) as server:
        url = server.url + "/v1/chat/completions"
        for stream in (True, False):
            steps.clear()
            body = {**chat_body(scene(), max_tokens=120), "stream": stream}
            with httpx.Client(timeout=60) as client:
                if stream:
                    with client.stream("POST", url, json=body) as r:
                        next(line for line in r.iter_lines() if '"content"' in line)
                else:
                    with pytest.raises(httpx.ReadTimeout):
                        client.post(url, json=body, timeout=0.3)
                    assert batcher.running == 1
            # The connection is closed: the row leaves within a step or two, long before 120 tokens.
            deadline = time.monotonic() + 10
            while batcher.running and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.running == 0 and len(steps) < 40, (stream, len(steps))
        ok = httpx.post(url, json=chat_body(scene(), max_tokens=4), timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_the_prompt_token_limit_is_enforced_with_openai_error_json(models):
    import httpx

    app = create_app(models, ServeSettings(max_prompt_tokens=20))
    with BackgroundServer(app) as server:
        long = httpx.post(server.url + "/v1/chat/completions", json=chat_body(scene()), timeout=60)
        short = httpx.post(server.url + "/v1/chat/completions",
                           json={**chat_body(), "messages": [{"role": "user", "content": "red"}]}, timeout=60)
    assert long.status_code == 400, long.text
    error = long.json()["error"]
    assert error["code"] == "context_length_exceeded" and "limit is 20" in error["message"]
    assert short.status_code == 200, short.text


def test_a_full_queue_answers_503_with_retry_after(models):
    import httpx

    app = create_app(models, ServeSettings(max_queue=1, max_batch=1, batch_wait_ms=0))
    batcher = app.state.batchers["tiny"]
    with BackgroundServer(app) as server:
        batcher.lock.acquire()   # the model is busy: the first request is taken and blocks, the next waits
        try:
            with ThreadPoolExecutor(3) as pool:
                futures = [pool.submit(httpx.post, server.url + "/v1/chat/completions", json=chat_body(), timeout=60)]
                time.sleep(0.3)
                futures.append(pool.submit(httpx.post, server.url + "/v1/chat/completions", json=chat_body(),
                                           timeout=60))
                time.sleep(0.3)
                refused = httpx.post(server.url + "/v1/chat/completions", json=chat_body(), timeout=60)
                assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
                assert refused.json()["error"]["code"] == "queue_full"
                batcher.lock.release()
                assert [f.result().status_code for f in futures] == [200, 200]
        finally:
            if batcher.lock.locked():
                batcher.lock.release()


def test_explain_returns_a_heatmap_png(client):
    image = scene()
    r = client.post("/v1/vlmkit/explain", json={"model": "tiny", "image": data_url(png(image)),
                                                "question": QUESTION})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"]
    raw = base64.b64decode(body["image"].split(",", 1)[1])
    assert Image.open(io.BytesIO(raw)).format == "PNG"
    assert client.get("/health").json()["status"] == "ok"
    assert json.loads(client.get("/v1/models").text)["object"] == "list"


# ----------------------------------------------------------------------------- observability
def test_metrics_scrape_as_prometheus_and_each_request_is_logged_with_its_id(models):
    import logging

    from prometheus_client.parser import text_string_to_metric_families

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("vlmkit.serving.requests")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    app = create_app(models, ServeSettings(max_tokens=64))
    try:
        with TestClient(app) as c:
            answered = c.post("/v1/chat/completions", json=chat_body(scene(), max_tokens=4),
                              headers={"X-Request-Id": "client-7"})
            missing = c.post("/v1/chat/completions", json={**chat_body(), "model": "nope"})
            text = c.get("/metrics").text
    finally:
        logger.removeHandler(handler)
    assert answered.status_code == 200 and answered.headers["x-request-id"] == "client-7"
    assert missing.status_code == 404 and missing.headers["x-request-id"].startswith("req-")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    chat = "/v1/chat/completions"
    assert samples[("vlmkit_requests_total", (("route", chat), ("status", "200")))] == 1
    assert samples[("vlmkit_requests_total", (("route", chat), ("status", "404")))] == 1
    usage = answered.json()["usage"]
    assert samples[("vlmkit_generation_tokens_total", (("model", "tiny"),))] == usage["completion_tokens"]
    assert samples[("vlmkit_prompt_tokens_total", (("model", "tiny"),))] == usage["prompt_tokens"]
    assert samples[("vlmkit_time_to_first_token_seconds_count", (("model", "tiny"),))] == 1
    assert samples[("vlmkit_queue_length", (("model", "tiny"),))] == 0
    assert samples[("vlmkit_running_rows", (("model", "tiny"),))] == 0
    logged = [json.loads(line) for line in lines]
    first = next(entry for entry in logged if entry["id"] == "client-7")
    assert first["status"] == 200 and first["model"] == "tiny"
    assert first["completion_tokens"] == usage["completion_tokens"] and first["latency_ms"] > 0
    assert any(entry["status"] == 404 and entry["id"] == missing.headers["x-request-id"] for entry in logged)
