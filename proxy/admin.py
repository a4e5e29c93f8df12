"""The processor's admin endpoint: /metrics (Prometheus), /healthz (alive), /readyz (taking
traffic; 503 while starting or draining). Tiny on purpose: it must answer when all else is busy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger("floodwall.admin")


def _response(status: str, body: bytes, ctype: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class AdminServer:
    def __init__(self, host: str, port: int, ready: Callable[[], bool]) -> None:
        self.host, self.port, self.ready = host, port, ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            # Drain the request headers; we need none of them.
            while (h := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                if len(h) > 8192:
                    break
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                out = _response("200 OK", generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                out = _response("200 OK", b"ok\n")
            elif path == "/readyz":
                out = (
                    _response("200 OK", b"ready\n")
                    if self.ready()
                    else _response("503 Service Unavailable", b"not ready\n")
                )
            else:
                out = _response("404 Not Found", b"not found\n")
            writer.write(out)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
