"""The benchmarks' open-loop generator (bench/openloop.c): every scheduled request is sent and
counted once, statuses are read from the answers, and a refused connection is a failure, not
a hang."""

from __future__ import annotations

import shutil

import pytest

from bench.loadgen import HttpRequest, open_loop, open_loop_mix
from tests.helpers import echo_server, free_ports

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


def test_every_slot_is_sent_and_answered() -> None:
    with echo_server() as port:
        r = open_loop("127.0.0.1", port, HttpRequest("GET", "/x", {}), rate=200, seconds=1)
        assert r["requests"] == 200
        assert r["statuses"] == {"200": 200} and r["failures"] == 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] < 1000

        body = b'{"input": "x"}'
        queue_full = HttpRequest("POST", "/triton-queue-full", {"a": "b"}, body)
        r = open_loop("127.0.0.1", port, queue_full, rate=100, seconds=0.5)
        assert r["statuses"] == {"503": 50} and r["failures"] == 0


def test_a_server_that_is_not_there_counts_failures() -> None:
    (port,) = free_ports(1)
    r = open_loop("127.0.0.1", port, HttpRequest("GET", "/", {}), rate=100, seconds=0.3)
    assert r["requests"] == 30 and r["failures"] == 30 and r["statuses"] == {}


def test_a_mix_keeps_its_shares_and_marks_per_kind() -> None:
    get = HttpRequest("GET", "/a", {})
    full = HttpRequest("POST", "/triton-queue-full", {}, b"{}")
    with echo_server() as port:
        per = open_loop_mix(
            "127.0.0.1", port, [("ok", get, 3.0), ("refused", full, 1.0)], rate=200, seconds=1,
            mark={"ok": b"Content-Type: application/json", "refused": b"x-not-sent"},
        )  # fmt: skip
    assert per["ok"]["requests"] == 150 and per["refused"]["requests"] == 50
    assert per["ok"]["statuses"] == {"200": 150} and per["ok"]["ok"] == 150
    assert per["ok"]["marked"] == 150  # a header name and value prefix, any case
    assert per["refused"]["statuses"] == {"503": 50} and per["refused"]["ok"] == 0
    assert per["refused"]["marked"] == 0
