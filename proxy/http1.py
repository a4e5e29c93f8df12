"""A lean keep-alive HTTP/1.1 client for calls on the request path (the semantic cache's
embedder and judge calls to Triton).

Why not aiohttp: measured on the 2-core dev VM against one Triton on its own core (session
23; the cache's embedder call, 400 calls each way alternating, 30 ms apart, two runs), a
call took 5.9 ms at p50 and 7.6-8.2 ms at p99 through aiohttp's ClientSession, 5.2 ms and
6.6-7.5 ms here; a semantic hit found by its vector makes two such calls one after the other.
As ``proxy/resp.py`` for Redis, this does only what those calls need: POST with a body,
an answer framed by Content-Length or chunked, connections kept and reused.

Idempotent calls only: a kept connection the server has closed meanwhile (Triton restarted,
its idle timeout) fails on first use, and the call is then sent once more on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

# An answer's head and body must fit in these; more is a fault, never a buffer that grows.
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024


class HTTPProtocolError(ValueError):
    """The server's answer is not HTTP/1.1 this client can read."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Http1Pool:
    """POSTs to one ``http://`` or ``https://`` origin over at most ``limit`` connections,
    keeping up to ``max_idle`` of them open between calls. ``https`` verifies the server
    against the system's CAs (a private CA: ``SSL_CERT_FILE``, read by OpenSSL)."""

    def __init__(self, base_url: str, *, limit: int = 64, max_idle: int = 16) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r}: an http:// or https:// URL with a host is needed")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._host_header = parts.netloc.rpartition("@")[2]  # no userinfo on the wire
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(limit)
        self._max_idle = max_idle
        self._closed = False

    async def post(self, path: str, body: bytes, content_type: str, timeout_s: float) -> Answer:
        """The answer to one POST of ``body`` to ``path``; ``TimeoutError`` past
        ``timeout_s`` (the whole call, waiting for a connection included), ``OSError`` when
        the server cannot be reached or hangs up, ``HTTPProtocolError`` for an answer that
        is not HTTP/1.1."""
        head = (
            f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        async with asyncio.timeout(timeout_s), self._slots:
            while self._idle:
                conn = self._idle.pop()
                try:
                    return await self._exchange(conn, head, body)
                except (OSError, asyncio.IncompleteReadError):
                    continue  # closed while kept (a restart, an idle timeout): next one
            return await self._exchange(await self._open(), head, body)

    async def _open(self) -> _Conn:
        if self._closed:
            raise OSError("pool closed")
        return await asyncio.open_connection(
            self.host, self.port, ssl=self._ssl, limit=MAX_HEAD_BYTES
        )

    async def _exchange(self, conn: _Conn, head: bytes, body: bytes) -> Answer:
        reader, writer = conn
        keep = False
        try:
            writer.write(head + body)
            answer, keep = await _read_answer(reader)
        except asyncio.LimitOverrunError:
            raise HTTPProtocolError(f"answer head over {MAX_HEAD_BYTES} bytes") from None
        finally:
            if keep and not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
            else:
                writer.close()  # mid-answer (a timeout, a fault) or not reusable
        return answer

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[Answer, bool]:
    """One answer, and whether its connection may carry another request."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw[:-4].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not _digits(code, 3):
        raise HTTPProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise HTTPProtocolError(f"malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        if not _digits(headers["content-length"]):
            raise HTTPProtocolError("unreadable Content-Length")
        length = int(headers["content-length"])
        if length > MAX_BODY_BYTES:
            raise HTTPProtocolError(f"Content-Length {length} out of bounds")
        body = await reader.readexactly(length)
    else:  # framed by the end of the connection: read until then
        out = bytearray()
        while chunk := await reader.read(65536):
            out += chunk
            if len(out) > MAX_BODY_BYTES:
                raise HTTPProtocolError(f"answer body over {MAX_BODY_BYTES} bytes")
        body = bytes(out)
        keep = False
    return Answer(int(code), headers, body), keep


def _digits(text: str, n: int | None = None) -> bool:
    """ASCII digits only (``int`` also takes "+5", " 5", "1_0" and other scripts' digits),
    ``n`` of them if given."""
    return bool(text) and text.isascii() and text.isdigit() and (n is None or len(text) == n)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        digits = line.split(b";", 1)[0].strip()
        if not digits or digits.strip(b"0123456789abcdefABCDEF"):  # int() takes "0x1f", "1_f"
            raise HTTPProtocolError(f"unreadable chunk size {line[:40]!r}")
        size = int(digits, 16)
        if len(out) + size > MAX_BODY_BYTES:
            raise HTTPProtocolError(f"answer body over {MAX_BODY_BYTES} bytes")
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, unused
                pass
            return bytes(out)
        out += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise HTTPProtocolError("chunk not followed by CRLF")
