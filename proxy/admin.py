"""The processor's admin endpoint: /metrics (Prometheus), /healthz (alive), /readyz (taking
traffic; 503 while starting or draining), plus the ``POST`` routes filters declare
(``Filter.admin_routes``, e.g. the cache's /cache/invalidate). Tiny on purpose: it must
answer when all else is busy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from urllib.parse import SplitResult, parse_qsl, urlsplit

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
           431: "431 Request Header Fields Too Large", 500: "500 Internal Server Error",
           503: "503 Service Unavailable"}  # fmt: skip


def _json_response(status: int, body: object) -> bytes:
    return _response(_STATUS.get(status, f"{status} Status"), orjson.dumps(body),
                     "application/json")  # fmt: skip


def _error(kind: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"type": kind, "message": message}}


# The server shares the processor's process and file descriptors, so a client may hold a
# connection only briefly: the whole request head must arrive within _HEAD_DEADLINE_S (a
# per-line timeout lets a client trickle one line at a time for ever), the answer must be
# taken within _WRITE_DEADLINE_S, and past _MAX_CONNECTIONS open ones a new one is refused.
_HEAD_DEADLINE_S = 5.0
_WRITE_DEADLINE_S = 5.0
_MAX_CONNECTIONS = 64
_MAX_LINE = 8 * 1024  # the stream's limit: a longer line is refused, not buffered
_MAX_HEAD = 64 * 1024
_MAX_HEADERS = 100


class _BadHead(Exception):
    """A request head that is not served: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


async def _read_head(
    reader: asyncio.StreamReader,
) -> tuple[str, SplitResult, dict[str, str]] | None:
    """(method, target, headers); None when the client closed without sending a request."""
    try:
        line = await reader.readline()
    except ValueError:  # over the stream's limit
        raise _BadHead(
            400, "invalid_request_error", f"request line over {_MAX_LINE} bytes"
        ) from None
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) < 2:
        raise _BadHead(400, "invalid_request_error", "request line is not METHOD TARGET VERSION")
    try:
        target = urlsplit(parts[1])
    except ValueError:  # e.g. "//[": an unclosed IPv6 bracket
        raise _BadHead(400, "invalid_request_error", "malformed request target") from None
    headers: dict[str, str] = {}
    size = len(line)
    try:
        while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
            size += len(h)
            if size > _MAX_HEAD or len(headers) >= _MAX_HEADERS:
                too_big = f"over {_MAX_HEAD} bytes or {_MAX_HEADERS} header fields"
                raise _BadHead(431, "headers_too_large", too_big)
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
    except ValueError:  # over the stream's limit
        raise _BadHead(431, "headers_too_large", f"a header line over {_MAX_LINE} bytes") from None
    return parts[0], target, headers


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
        self._open = 0  # connections being served

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=_MAX_LINE
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= _MAX_CONNECTIONS:
            writer.write(_json_response(503, _error("busy", "too many admin connections")))
            writer.close()
            return
        self._open += 1
        try:
            try:
                async with asyncio.timeout(_HEAD_DEADLINE_S):
                    head = await _read_head(reader)
                if head is None:
                    return
            except _BadHead as bad:
                # One short line, never the request itself (it may carry credentials).
                log.info("admin: refused a request (%s): %s", bad.status, bad.message)
                out = _json_response(bad.status, _error(bad.kind, bad.message))
            else:
                method, target, headers = head
                out = await self._answer(method, target.path, target.query, headers)
            writer.write(out)
            async with asyncio.timeout(_WRITE_DEADLINE_S):
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._open -= 1
            writer.close()

    async def _answer(self, method: str, path: str, query: str, headers: dict[str, str]) -> bytes:
        if path in self.routes:
            return await self._route(method, path, dict(parse_qsl(query)), headers)
        if path == "/metrics":
            return _response("200 OK", generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return _response("200 OK", b"ok\n")
        if path == "/readyz":
            if self.ready():
                return _response("200 OK", b"ready\n")
            return _response("503 Service Unavailable", b"not ready\n")
        return _response("404 Not Found", b"not found\n")

    async def _route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str]
    ) -> bytes:
        if method != "POST":
            status, body = 405, _error("method_not_allowed", "use POST")
        else:
            try:
                status, body = await self.routes[path](query, headers)
            except Exception as exc:  # the admin plane answers, whatever a handler does
                log.exception("admin route %s failed", path)
                status, body = 500, _error("internal", type(exc).__name__)
            # Who did what is the handler's business (it authenticates); the audit log keeps
            # what was asked and the answer, never the credentials in the headers. A refused
            # request's query may hold anything (a token pasted into the URL): its names only.
            asked: object = query if status < 400 else sorted(query)
            audit.info("admin_action", extra={"path": path, "query": asked, "status": status})
        return _json_response(status, body)
