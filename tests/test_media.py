"""Remote and local image URLs: what the server fetches, and what it never asks for.

Every test that forbids a fetch checks, on a real server at 127.0.0.1, that the request
never arrived: refusing after connecting would already have reached the target.
"""
from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from vlmkit.serving.media import MediaError, MediaPolicy, fetch, forbidden_address


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


PNG = _png()


class Recorder(BaseHTTPRequestHandler):
    def do_GET(self):   # noqa: N802 (http.server's name)
        self.server.seen.append(self.path)
        route, query = urlsplit(self.path).path, parse_qs(urlsplit(self.path).query)
        if route == "/img.png":
            self._send(200, PNG)
        elif route == "/big":
            self._send(200, b"\0" * 300_000)
        elif route == "/big-undeclared":   # no Content-Length: the cap must hold while reading
            self.send_response(200)
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"\0" * 10_000)
        elif route == "/slow":
            time.sleep(3)
            self._send(200, PNG)
        elif route == "/redirect":
            self.send_response(302)
            self.send_header("Location", query["to"][0])
            self.end_headers()
        elif route == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self._send(404, b"")

    def _send(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def servers():
    """Two servers on 127.0.0.1 that record every request they get."""
    running = []
    for _ in range(2):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        server.seen = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        running.append(server)
    yield running
    for server in running:
        server.shutdown()


def url(server, path: str, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{server.server_address[1]}{path}"


OPEN = MediaPolicy(max_bytes=100_000, allow_remote=True, timeout_s=1.5)
LOCAL = MediaPolicy(max_bytes=100_000, allow_remote=True, timeout_s=1.5, allowed_domains=("localhost",))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_loopback_is_never_asked(servers, host):
    with pytest.raises(MediaError, match="loopback"):
        fetch(url(servers[0], "/img.png", host), OPEN)
    assert servers[0].seen == []


@pytest.mark.parametrize("address, reason", [
    ("169.254.169.254", "link-local"), ("10.1.2.3", "private"), ("192.168.0.7", "private"),
    ("172.16.5.4", "private"), ("127.0.0.53", "loopback"), ("::1", "loopback"), ("fd00:ec2::254", "private"),
    ("0.0.0.0", "unspecified"), ("::ffff:10.0.0.1", "private"), ("100.64.0.1", "not public"),
    ("224.0.0.251", "multicast")])
def test_private_link_local_and_metadata_addresses_are_forbidden(address, reason):
    assert forbidden_address(address) == reason


def test_public_addresses_are_allowed():
    assert forbidden_address("93.184.216.34") is None and forbidden_address("2606:4700::1111") is None


def test_an_allowed_domain_is_fetched_and_others_are_not(servers):
    assert fetch(url(servers[0], "/img.png", "localhost"), LOCAL) == PNG
    with pytest.raises(MediaError, match="not in this server's allowed media domains"):
        fetch(url(servers[1], "/img.png"), LOCAL)
    assert servers[0].seen == ["/img.png"] and servers[1].seen == []


def test_every_redirect_hop_is_checked_again(servers):
    hop = url(servers[1], "/img.png")   # 127.0.0.1: not an allowed domain
    with pytest.raises(MediaError, match="not in this server's allowed media domains"):
        fetch(url(servers[0], f"/redirect?to={hop}", "localhost"), LOCAL)
    assert len(servers[0].seen) == 1 and servers[1].seen == []
    hop = url(servers[1], "/img.png", "localhost")
    assert fetch(url(servers[0], f"/redirect?to={hop}", "localhost"), LOCAL) == PNG


def test_redirects_size_and_time_are_capped(servers):
    with pytest.raises(MediaError, match="redirected more than 3 times"):
        fetch(url(servers[0], "/loop", "localhost"), LOCAL)
    assert len(servers[0].seen) == 4
    for path in ("/big", "/big-undeclared"):
        with pytest.raises(MediaError, match="larger than the limit") as caught:
            fetch(url(servers[0], path, "localhost"), LOCAL)
        assert caught.value.status == 413
    started = time.monotonic()
    with pytest.raises(MediaError, match="longer than 1.5 s"):
        fetch(url(servers[0], "/slow", "localhost"), LOCAL)
    assert time.monotonic() - started < 2.5


def test_remote_urls_are_off_unless_enabled(servers):
    with pytest.raises(MediaError, match="--allow-remote-images"):
        fetch(url(servers[0], "/img.png", "localhost"), MediaPolicy(max_bytes=100_000))
    with pytest.raises(MediaError, match="unsupported image URL scheme 'ftp'"):
        fetch("ftp://localhost/img.png", LOCAL)
    assert servers[0].seen == []


def test_file_urls_only_under_the_media_path(tmp_path):
    media, outside = tmp_path / "media", tmp_path / "secret.png"
    media.mkdir()
    (media / "ok.png").write_bytes(PNG)
    outside.write_bytes(PNG)
    (media / "link.png").symlink_to(outside)
    policy = MediaPolicy(max_bytes=100_000, media_path=media)
    assert fetch(f"file://{media / 'ok.png'}", policy) == PNG
    for escape in (f"file://{outside}", f"file://{media}/../secret.png", f"file://{media / 'link.png'}"):
        with pytest.raises(MediaError, match="under the server's media path"):
            fetch(escape, policy)
    with pytest.raises(MediaError, match="--media-path"):
        fetch(f"file://{media / 'ok.png'}", MediaPolicy(max_bytes=100_000))


def test_the_api_answers_about_a_fetched_image_and_refuses_a_forbidden_one(servers, models_for_media):
    from fastapi.testclient import TestClient

    from vlmkit.serving.app import ServeSettings, create_app

    app = create_app(models_for_media, ServeSettings(allow_remote_images=True, allowed_media_domains=("localhost",)))
    body = lambda image_url: {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": [  # noqa: E731
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "What is it?"}]}]}
    with TestClient(app) as client:
        assert client.post("/v1/chat/completions", json=body(url(servers[0], "/img.png", "localhost"))).status_code == 200
        refused = client.post("/v1/chat/completions", json=body(url(servers[1], "/img.png")))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "image_url"
    assert servers[1].seen == []


@pytest.fixture(scope="module")
def models_for_media(tiny_vlm_dir):
    import vlmkit

    return {"tiny": vlmkit.load(tiny_vlm_dir, device="cpu")}
