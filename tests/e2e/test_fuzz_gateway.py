"""Property-based fuzzing through the real stack: Envoy, the processor, Triton, Redis and the
worker of the shipped local config, with the requests of tests/fuzzing.py (bodies one or two
edits from valid, random and spoofed headers) sent over HTTP/1.1 to Envoy. There the model's
answers are real, and what Envoy does to the bytes on the way (framing, header handling,
buffering, content-length) is part of what is tested.

For every example: an answer (the client waits 70 s, past every route's timeout), never a
500 or 502; every
answer marked ``x-floodwall-error`` is the documented JSON error, and so is every other JSON
error with an ``error`` object (Envoy's local replies); no filter fault and no internal error; a
spoofed internal header never reaches an upstream (the /echo route shows what arrives). At
the end every child process (Envoy, the processor, Triton, Redis, the worker) still runs.

Its own stack (not the session's): the examples open breakers, spend the limited key's
budget and queue jobs, which would change what later tests see. Derandomized;
``FLOODWALL_FUZZ_E2E_EXAMPLES`` (default 150) and ``FLOODWALL_FUZZ_SEED`` search further.
"""

from __future__ import annotations

import http.client
import os
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from proxy.runtime import Stack
from tests.fuzzing import FAMILIES, SPOOF, requests
from tests.helpers import metric_total, stack_config, start_stack

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("FLOODWALL_FUZZ_E2E_EXAMPLES", "150"))
SEED = int(os.environ.get("FLOODWALL_FUZZ_SEED", "0"))
PATHS = sorted({p for paths in FAMILIES.values() for p in paths})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, echo_port: int) -> Iterator[Stack]:
    from proxy import models

    models.build()
    d = tmp_path_factory.mktemp("fuzz")
    s = start_stack(stack_config(d / "run", echo_port), d / "floodwall.yaml")
    try:
        yield s
    finally:
        s.stop()


def _urls(stack: Stack) -> tuple[str, str]:
    c, p = stack.cfg.listener, stack.cfg.processor
    return f"http://{c.address}:{c.port}", f"http://{p.admin_address}:{p.admin_port}"


def _faults(admin: str) -> float:
    return metric_total(f"{admin}/metrics", "floodwall_filter_faults_total")


@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED == 0, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(req=requests(PATHS), echo=st.booleans())
def test_requests_through_the_real_stack(
    stack: Stack, req: tuple[str, str, str, dict[str, str], bytes], echo: bool
) -> None:
    route, method, path, headers, body = req
    if echo:  # the same request to the echo upstream: what reaches an upstream is seen
        route, path = "/echo/x", "/echo/x"
    _, admin = _urls(stack)
    before = _faults(admin)
    status, got, content = _send(stack, method, path, headers, body)
    event(f"{route} -> {status}")
    assert _faults(admin) == before, (method, path, headers, body[:300], content[:300])
    assert got.get("x-floodwall-error") != "internal_error", content[:300]
    # Nothing here is a server fault: a 500 or 502 (Triton's own 500 for a request it could
    # not parse was one) would be counted against the model and its host.
    assert status not in (500, 502), (status, content[:300])
    if "x-floodwall-error" in got:
        # A gRPC caller (content-type application/grpc, on any route) reads it in grpc-message.
        doc = got["grpc-message"] if "grpc-status" in got else content
        err = orjson.loads(doc)["error"]
        assert isinstance(err["type"], str) and isinstance(err["message"], str), err
    if status >= 400 and got.get("content-type", "").startswith("application/json"):
        doc = orjson.loads(content)
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):  # ours or Envoy's
            assert isinstance(doc["error"].get("type"), str), doc
            assert isinstance(doc["error"].get("message"), str), doc
    if route == "/echo/x" and status == 200:
        assert SPOOF.encode() not in content, content[:500]  # the echo shows what it got


def _send(
    stack: Stack, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request as written (httpx refuses values such as a lone space, which a
    client can still send): the status, the headers (lower-case) and the body."""
    c = stack.cfg.listener
    conn = http.client.HTTPConnection(c.address, c.port, timeout=70)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("host", "fuzz")
        for k, v in headers.items():
            # UTF-8 on the wire, as a client may send; CR and LF would end the header (a
            # request of another shape, which Envoy refuses before anything of ours runs).
            conn.putheader(k, v.replace("\r", " ").replace("\n", " ").encode())
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_every_child_survived_the_fuzzing(stack: Stack) -> None:
    _, admin = _urls(stack)
    # Faults after the last example too: the worker runs the queued jobs through the gateway.
    time.sleep(2)
    assert _faults(admin) == 0
    dead = [(c.name, c.proc.returncode) for c in stack.children if c.proc.poll() is not None]
    assert not dead  # the test's stack restarts nothing: a crash would show here
    assert httpx.get(f"{admin}/readyz", timeout=5).status_code == 200
