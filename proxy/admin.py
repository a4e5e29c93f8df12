"""The processor's admin endpoint: /metrics (Prometheus), /healthz (alive), /readyz (taking
traffic; 503 while starting or draining), plus the ``POST`` routes filters declare
(``Filter.admin_routes``, e.g. the cache's /cache/invalidate). Tiny on purpose: it must
answer when all else is busy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from urllib.parse import parse_qsl, urlsplit

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from proxy.api import AdminHandler

log = logging.getLogger("floodwall.admin")
audit = logging.getLogger("floodwall.audit")


def _response(status: str, body: bytes, ctype: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


_STATUS = {200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized",
           403: "403 Forbidden", 404: "404 Not Found", 405: "405 Method Not Allowed",
           500: "500 Internal Server Error", 503: "503 Service Unavailable"}  # fmt: skip


class AdminServer:
    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        routes: Mapping[str, AdminHandler] | None = None,
    ) -> None:
        self.host, self.port, self.ready = host, port, ready
        self.routes = dict(routes or {})
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
            headers: dict[str, str] = {}
            while (h := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                if len(h) > 8192 or len(headers) > 100:
                    break
                name, _, value = h.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            parts = line.decode("latin-1").split()
            method = parts[0] if parts else ""
            target = urlsplit(parts[1]) if len(parts) >= 2 else urlsplit("")
            path = target.path
            if path in self.routes:
                out = await self._route(method, path, dict(parse_qsl(target.query)), headers)
            elif path == "/metrics":
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

    async def _route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str]
    ) -> bytes:
        if method != "POST":
            status, body = 405, {"error": {"type": "method_not_allowed", "message": "use POST"}}
        else:
            try:
                status, body = await self.routes[path](query, headers)
            except Exception as exc:  # the admin plane answers, whatever a handler does
                log.exception("admin route %s failed", path)
                status, body = 500, {"error": {"type": "internal", "message": type(exc).__name__}}
            # Who did what is the handler's business (it authenticates); the audit log keeps
            # what was asked and the answer, never the credentials in the headers.
            audit.info("admin_action", extra={"path": path, "query": query, "status": status})
        return _response(_STATUS.get(status, f"{status} Status"), orjson.dumps(body),
                         "application/json")  # fmt: skip
