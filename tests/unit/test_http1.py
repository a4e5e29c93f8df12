"""proxy/http1.py against a small asyncio server whose answers each test scripts."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.http1 import MAX_BODY_BYTES, Http1Pool, HTTPProtocolError

# A fault in the pool could leave a call waiting on a socket: fail fast, not after 600 s.
pytestmark = pytest.mark.timeout(10)

Answerer = Callable[[bytes], bytes | None]  # the request's head -> raw answer (None: hang up)


@dataclass
class Server:
    answer: Answerer
    port: int = 0
    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)  # (head, body)
    close_after_answer: bool = False  # drop each connection after answering, unannounced
    silent: bool = False  # read requests, never answer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))  # fmt: skip
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                if self.silent:
                    await asyncio.sleep(3600)
                raw = self.answer(head)
                if raw is None:
                    break
                writer.write(raw)
                await writer.drain()
                if self.close_after_answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Serve = Callable[..., Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    started: list[asyncio.Server] = []

    async def start(
        answer: Answerer,
        *,
        close_after_answer: bool = False,
        silent: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> Server:
        s = Server(answer, close_after_answer=close_after_answer, silent=silent)
        srv = await asyncio.start_server(s.handle, "127.0.0.1", 0, ssl=tls)
        started.append(srv)
        s.port = srv.sockets[0].getsockname()[1]
        return s

    yield start
    for srv in started:
        srv.close()


def ok(body: bytes = b'{"ok": true}', extra: str = "") -> Answerer:
    return lambda _head: (
        f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
    )


async def test_a_kept_connection_carries_the_next_call(serve: Serve) -> None:
    s = await serve(ok(extra="Inference-Header-Content-Length: 12\r\n"))
    pool = Http1Pool(f"http://127.0.0.1:{s.port}/base/")
    for _ in range(3):
        a = await pool.post("/v2/models/m/infer", b"{}", "application/json", 1.0)
        assert (a.status, a.body) == (200, b'{"ok": true}')
        assert a.headers["inference-header-content-length"] == "12"
    assert s.connections == 1
    head, body = s.requests[0]
    assert head.startswith(b"POST /base/v2/models/m/infer HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{s.port}".encode() in head
    assert b"Content-Type: application/json" in head and body == b"{}"
    await pool.close()


async def test_a_chunked_answer_is_joined(serve: Serve) -> None:
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n")  # fmt: skip
    s = await serve(lambda _h: raw)
    pool = Http1Pool(f"http://127.0.0.1:{s.port}")
    for _ in range(2):  # the trailer was read whole: the connection is reusable
        assert (await pool.post("/", b"x", "text/plain", 1.0)).body == b"hello, world"
    assert s.connections == 1
    await pool.close()


async def test_connection_close_and_unframed_answers_are_not_reused(
    serve: Serve,
) -> None:
    s = await serve(ok(extra="Connection: close\r\n"))
    pool = Http1Pool(f"http://127.0.0.1:{s.port}")
    for _ in range(2):
        assert (await pool.post("/", b"", "text/plain", 1.0)).status == 200
    assert s.connections == 2
    unframed = await serve(lambda _h: b"HTTP/1.0 503 Busy\r\n\r\nlater", close_after_answer=True)
    pool2 = Http1Pool(f"http://127.0.0.1:{unframed.port}")
    a = await pool2.post("/", b"", "text/plain", 1.0)
    assert (a.status, a.body) == (503, b"later")
    await pool.close()
    await pool2.close()


async def test_an_answer_framed_by_the_close_is_read_to_its_end() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"a": ')
        await writer.drain()
        await asyncio.sleep(0.05)  # the rest arrives later, in a segment of its own
        writer.write(b"[1, 2, 3]}")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(answer, "127.0.0.1", 0)
    pool = Http1Pool(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}")
    a = await pool.post("/", b"{}", "application/json", 2.0)
    assert (a.status, a.body) == (200, b'{"a": [1, 2, 3]}') and pool._idle == []
    await pool.close()
    srv.close()


async def test_a_kept_connection_the_server_dropped_is_replaced(
    serve: Serve,
) -> None:
    """Triton restarted or timed the idle connection out: the call goes out again on a new
    connection instead of failing."""
    s = await serve(ok(), close_after_answer=True)
    pool = Http1Pool(f"http://127.0.0.1:{s.port}")
    for _ in range(3):
        assert (await pool.post("/", b"{}", "application/json", 1.0)).status == 200
    assert s.connections == 3
    await pool.close()


async def test_a_silent_server_times_out_and_its_connection_is_dropped(
    serve: Serve,
) -> None:
    s = await serve(ok(), silent=True)
    pool = Http1Pool(f"http://127.0.0.1:{s.port}")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await pool.post("/", b"{}", "application/json", 0.1)
    assert loop.time() - started < 0.5
    assert pool._idle == []  # mid-answer: never handed to the next call
    await pool.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
        f"HTTP/1.1 200 OK\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
        # int() takes each of these, HTTP none:
        "HTTP/1.1 2\u00b20 OK\r\nContent-Length: 0\r\n\r\n".encode(),
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nab\r\n0\r\n\r\n",
    ],
    ids=[
        "not-http",
        "no-code",
        "bad-header",
        "bad-length",
        "huge-length",
        "bad-chunk",
        "chunk-no-crlf",
        "huge-head",
        "superscript-code",
        "signed-length",
        "0x-chunk",
    ],
)
async def test_an_answer_that_is_not_http_is_a_protocol_error(serve: Serve, raw: bytes) -> None:
    s = await serve(lambda _h: raw)
    pool = Http1Pool(f"http://127.0.0.1:{s.port}")
    with pytest.raises(HTTPProtocolError):
        await pool.post("/", b"{}", "application/json", 1.0)
    assert pool._idle == []
    await pool.close()


async def test_nobody_listening_is_an_oserror(serve: Serve) -> None:
    s = await serve(ok())
    port = s.port
    pool = Http1Pool(f"http://127.0.0.1:{port}")
    await pool.close()
    with pytest.raises(OSError):
        await pool.post("/", b"", "text/plain", 1.0)  # a closed pool opens nothing
    fresh = Http1Pool("http://127.0.0.1:1")
    with pytest.raises(OSError):
        await fresh.post("/", b"", "text/plain", 1.0)


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://host/", "http:///path"])
def test_only_http_urls_with_a_host(url: str) -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        Http1Pool(url)


@pytest.fixture
def localhost_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for localhost."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


async def test_https_verifies_the_server_then_keeps_its_connection(
    serve: Serve, localhost_cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refused until the certificate is trusted through SSL_CERT_FILE (read by the default
    # context, as by every OpenSSL client).
    cert, key = localhost_cert
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    s = await serve(ok(), tls=tls)
    untrusted = Http1Pool(f"https://localhost:{s.port}")
    with pytest.raises(ssl.SSLCertVerificationError):
        await untrusted.post("/x", b"{}", "application/json", 5)
    await untrusted.close()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    pool = Http1Pool(f"https://localhost:{s.port}/base")
    for _ in range(2):
        answer = await pool.post("/x", b"{}", "application/json", 5)
        assert answer.status == 200 and answer.body == b'{"ok": true}'
    await pool.close()
    assert s.connections == 1  # one, kept for both calls (the refused one never got that far)
    assert [head.split(b"\r\n")[0] for head, _ in s.requests] == [b"POST /base/x HTTP/1.1"] * 2
