"""Fetching an image that a request names by URL, without lending a client the server's reach.

A server that fetches URLs for its clients can be pointed at what only it can reach: its own
loopback services, the private network behind it, a cloud's metadata address. So, unless the
operator lists the domains it may fetch from (`--allowed-media-domains`):
- every address a host name resolves to must be a public one, and the connection goes to
  the address that was checked (a second DNS answer cannot swap in another);
- each redirect is a new URL, checked again, at most `max_redirects` of them;
- the whole fetch has one deadline and one size cap, counted as the bytes arrive.
`file://` URLs are read only under an explicit `--media-path`, after symlinks are resolved.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024


class MediaError(ValueError):
    """A URL the server will not or cannot fetch; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MediaPolicy:
    max_bytes: int
    allow_remote: bool = False
    timeout_s: float = 10.0
    max_redirects: int = 3
    allowed_domains: tuple[str, ...] = ()   # when given: only these hosts (and their subdomains), any address
    media_path: Path | None = None          # when given: file:// URLs under it


def fetch(url: str, policy: MediaPolicy) -> bytes:
    """The bytes `url` names, or a MediaError saying why not."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return _read_file(url, policy)
    if scheme not in ("http", "https"):
        raise MediaError(f"unsupported image URL scheme {scheme!r}")
    if not policy.allow_remote:
        raise MediaError("remote image URLs are disabled on this server (start it with --allow-remote-images); "
                         "send the image as a data: URL")
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        status, location, body = _get(url, policy, deadline)
        if status not in REDIRECTS:
            if status != 200:
                raise MediaError(f"the image URL answered HTTP {status}")
            return body
        if not location:
            raise MediaError(f"the image URL redirected (HTTP {status}) without a Location")
        url = urljoin(url, location)
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise MediaError("the image URL redirected to a scheme other than http(s)")
    raise MediaError(f"the image URL redirected more than {policy.max_redirects} times")


def forbidden_address(address: str) -> str | None:
    """Why a client may not make the server connect to `address`, or None if it may."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:   # ::ffff:127.0.0.1 is 127.0.0.1
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")   # link-local covers the cloud metadata address 169.254.169.254
    if not ip.is_global:
        return "not public"
    return None


def _allowed_domain(host: str, policy: MediaPolicy) -> bool:
    return any(host == d or host.endswith("." + d) for d in (d.lower().strip(".") for d in policy.allowed_domains))


def _address(host: str, port: int, policy: MediaPolicy) -> str:
    """The address to connect to: the first the host resolves to, every one of them checked."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise MediaError(f"cannot resolve the image URL's host {host!r} ({e})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if policy.allowed_domains:
        if not _allowed_domain(host, policy):
            raise MediaError(f"image host {host!r} is not in this server's allowed media domains")
        return addresses[0]
    for address in addresses:   # all of them: any one could be the one a client's connection gets
        reason = forbidden_address(address)
        if reason:
            raise MediaError(f"image host {host!r} resolves to a {reason} address; this server only fetches "
                             f"from public addresses")
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to one checked address, whatever DNS says next."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)   # the certificate names the host


def _get(url: str, policy: MediaPolicy, deadline: float) -> tuple[int, str | None, bytes]:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host:
        raise MediaError("the image URL has no host")
    https = parts.scheme.lower() == "https"
    port = parts.port or (443 if https else 80)
    address = _address(host, port, policy)
    left = deadline - time.monotonic()
    if left <= 0:
        raise MediaError(f"fetching the image took longer than {policy.timeout_s:g} s")
    connection = (_PinnedHTTPS if https else _PinnedHTTP)(host, port, address, left)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", path, headers={"User-Agent": "vlmkit", "Accept": "image/*"})
        response = connection.getresponse()
        if response.status in REDIRECTS:
            return response.status, response.getheader("Location"), b""
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > policy.max_bytes:
            raise MediaError(f"image larger than the limit of {policy.max_bytes} bytes", 413)
        body = bytearray()
        while chunk := response.read(CHUNK):
            body += chunk
            if len(body) > policy.max_bytes:
                raise MediaError(f"image larger than the limit of {policy.max_bytes} bytes", 413)
            if time.monotonic() > deadline:
                raise MediaError(f"fetching the image took longer than {policy.timeout_s:g} s")
        return response.status, None, bytes(body)
    except (OSError, http.client.HTTPException) as e:
        if isinstance(e, TimeoutError) or "timed out" in str(e):
            raise MediaError(f"fetching the image took longer than {policy.timeout_s:g} s") from None
        raise MediaError(f"could not fetch the image URL ({type(e).__name__})") from None
    finally:
        connection.close()


def _read_file(url: str, policy: MediaPolicy) -> bytes:
    if policy.media_path is None:
        raise MediaError("file:// image URLs are disabled on this server (start it with --media-path DIR)")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError("file:// image URLs must name a local path (file:///...)")
    root = policy.media_path.resolve()
    path = Path(unquote(parts.path)).resolve()   # symlinks and .. resolved before the check
    if not path.is_relative_to(root):
        raise MediaError("file:// image URLs must point under the server's media path")
    if not path.is_file():
        raise MediaError("no such image file under the media path")
    if path.stat().st_size > policy.max_bytes:
        raise MediaError(f"image larger than the limit of {policy.max_bytes} bytes", 413)
    return path.read_bytes()
