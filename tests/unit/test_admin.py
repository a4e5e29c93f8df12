"""The processor's admin server: its own endpoints and the POST routes filters add."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest

from proxy.admin import AdminServer
from tests.helpers import free_ports


async def _call(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_filter_routes_get_query_and_headers_and_fail_soft(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="floodwall.audit")
    seen: list[tuple[dict[str, str], dict[str, str]]] = []

    async def ok(query: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
        seen.append((query, headers))
        return 200, {"done": True}

    async def broken(query: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
        raise RuntimeError("secret detail")

    (port,) = free_ports(1)
    server = AdminServer("127.0.0.1", port, lambda: True, {"/x/do": ok, "/x/broken": broken})
    await server.start()
    try:
        status, body = await _call(
            port, b"POST /x/do?tenant=t1&all=1 HTTP/1.1\r\nAuthorization: Bearer k\r\n\r\n"
        )
        assert status == 200 and orjson.loads(body) == {"done": True}
        assert seen == [({"tenant": "t1", "all": "1"}, {"authorization": "Bearer k"})]
        # Audited: what was asked and the answer, never the credentials.
        rec = next(r for r in caplog.records if r.name == "floodwall.audit")
        assert (rec.path, rec.query, rec.status) == ("/x/do", {"tenant": "t1", "all": "1"}, 200)  # type: ignore[attr-defined]
        assert "Bearer k" not in caplog.text
        status, body = await _call(port, b"GET /x/do HTTP/1.1\r\n\r\n")
        assert status == 405 and orjson.loads(body)["error"]["type"] == "method_not_allowed"
        status, body = await _call(port, b"POST /x/broken?token=sk-pasted HTTP/1.1\r\n\r\n")
        assert status == 500 and b"secret detail" not in body
        # A refused request's query is audited by its names: it may hold a pasted secret.
        rec = [r for r in caplog.records if r.name == "floodwall.audit"][-1]
        assert rec.query == ["token"] and "sk-pasted" not in caplog.text  # type: ignore[attr-defined]
        status, _ = await _call(port, b"GET /readyz HTTP/1.1\r\n\r\n")
        assert status == 200
        status, _ = await _call(port, b"GET /nope HTTP/1.1\r\n\r\n")
        assert status == 404
    finally:
        await server.stop()
