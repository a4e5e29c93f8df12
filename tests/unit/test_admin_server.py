"""The processor's admin server against hostile or broken clients (it shares the processor's
process and file descriptors), and the cache's admin token as that endpoint checks it."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator

import orjson
import pytest

from filters.cache.filter import CacheFilter
from proxy import admin
from proxy.admin import AdminServer
from proxy.api import Deps
from tests.helpers import free_ports


@pytest.fixture
async def port() -> AsyncIterator[int]:
    (p,) = free_ports(1)
    server = AdminServer("127.0.0.1", p, lambda: True)
    await server.start()
    try:
        yield p
    finally:
        await server.stop()


async def _call(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return raw


def _json_error(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head
    return int(head.split()[1]), orjson.loads(body)["error"]["type"]


async def test_malformed_or_oversized_heads_get_a_json_error_and_no_traceback(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    long_line = b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"
    assert _json_error(await _call(port, long_line)) == (400, "invalid_request_error")
    long_header = b"GET /healthz HTTP/1.1\r\nx: " + b"a" * 70_000 + b"\r\n\r\n"
    assert _json_error(await _call(port, long_header)) == (431, "headers_too_large")
    # Each line under the per-line cap, together over the head's.
    many_headers = b"GET /healthz HTTP/1.1\r\n" + (b"x: " + b"a" * 8000 + b"\r\n") * 9 + b"\r\n"
    assert _json_error(await _call(port, many_headers)) == (431, "headers_too_large")
    assert _json_error(await _call(port, b"GET //[ HTTP/1.1\r\n\r\n")) == (
        400,
        "invalid_request_error",
    )
    assert _json_error(await _call(port, b"GET\r\n\r\n")) == (400, "invalid_request_error")
    assert (await _call(port, b"GET /healthz HTTP/1.1\r\n\r\n")).endswith(b"\r\n\r\nok\n")
    # One short line per refusal, nothing of the request in it, no traceback.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(len(r.getMessage()) < 200 for r in caplog.records)


async def test_a_client_trickling_its_head_is_cut_off_at_the_deadline(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "_HEAD_DEADLINE_S", 1.0, raising=False)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    # One line every 0.3 s, well inside any per-line timeout, for 3 s.
    for _ in range(10):
        await asyncio.sleep(0.3)
        if reader.at_eof():
            break
        writer.write(b"x-slow: 1\r\n")
    with_answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert with_answer == b"" and time.monotonic() - t0 < 2.5


async def test_connections_past_the_cap_are_refused_at_once(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "_MAX_CONNECTIONS", 3, raising=False)
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    try:
        for _, w in idle:
            w.write(b"GET /healthz HTTP/1.1\r\n")  # a head that never ends
            await w.drain()
        await asyncio.sleep(0.2)  # the server takes them in
        t0 = time.monotonic()
        # Refused before a byte is read (a request sent already may meet a reset instead).
        assert _json_error(await _call(port, b"")) == (503, "busy")
        assert time.monotonic() - t0 < 1
    finally:
        for _, w in idle:
            w.close()
    await asyncio.sleep(0.2)  # the server sees them go
    assert (await _call(port, b"GET /healthz HTTP/1.1\r\n\r\n")).endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize(
    ("authorization", "accepted"),
    [
        ("Bearer s3cret", True),
        ("bearer s3cret", True),
        ("BEARER   s3cret ", True),
        ("s3cret", False),  # no scheme
        ("Basic s3cret", False),
        ("Bearer ", False),
        ("Bearer", False),
        ("", False),
        ("Bearer wrong", False),
    ],
)
async def test_the_cache_admin_token_is_a_bearer_token(authorization: str, accepted: bool) -> None:
    digest = hashlib.sha256(b"s3cret").hexdigest()
    cache = CacheFilter(
        CacheFilter.Params.model_validate({"routes": {}, "admin_token_sha256": digest}), Deps()
    )
    invalidate = cache.admin_routes()["/cache/invalidate"]
    # No scope named: past the token check the answer is 400, before it 401.
    status, body = await invalidate({}, {"authorization": authorization})
    kind = "invalid_request_error" if accepted else "unauthorized"
    assert (status, body["error"]["type"]) == (400 if accepted else 401, kind)


async def test_invalidating_a_cache_without_redis_is_503() -> None:
    # It raised RuntimeError: a 500 from the admin endpoint.
    digest = hashlib.sha256(b"s3cret").hexdigest()
    cache = CacheFilter(
        CacheFilter.Params.model_validate({"routes": {}, "admin_token_sha256": digest}), Deps()
    )
    invalidate = cache.admin_routes()["/cache/invalidate"]
    status, body = await invalidate({"all": "1"}, {"authorization": "Bearer s3cret"})
    assert (status, body["error"]["type"]) == (503, "unavailable")


async def test_invalidate_refuses_unknown_parameters() -> None:
    # ?tenant=a&modle=x dropped all of tenant a's entries: the misspelt field was ignored.
    digest = hashlib.sha256(b"s3cret").hexdigest()
    cache = CacheFilter(
        CacheFilter.Params.model_validate({"routes": {}, "admin_token_sha256": digest}), Deps()
    )
    invalidate = cache.admin_routes()["/cache/invalidate"]
    status, body = await invalidate(
        {"tenant": "a", "modle": "x"}, {"authorization": "Bearer s3cret"}
    )
    assert status == 400 and "modle" in body["error"]["message"]
