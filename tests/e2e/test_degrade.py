"""Degradation end to end: when the embedder is saturated (admission's limit binds, or its
queue in Triton grows past the configured mean queue time) or its breaker is open, requests
for it are answered by embedder_int8 (and say so)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import Gateway
from tests.helpers import NO_CACHE, echo_server, stack_config, start_stack

pytestmark = pytest.mark.e2e

TEXTS = [f"sentence number {i} about load, queues and lighter models" for i in range(16)]


def test_saturated_embedder_degrades_to_int8(gateway: Gateway) -> None:
    url = gateway.url + "/v1/embeddings"
    body = {"model": "embedder", "input": TEXTS}
    stop = time.monotonic() + 6

    def hammer(_: int) -> list[httpx.Response]:
        out = []
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < stop:
                out.append(c.post(url, headers=NO_CACHE, json=body))
        return out

    with ThreadPoolExecutor(24) as pool:
        responses = [r for rs in pool.map(hammer, range(24)) for r in rs]
    # Admission may shed part of the overload (503 overloaded); nothing else may fail.
    assert all(
        r.status_code == 200 or r.json()["error"]["type"] == "overloaded" for r in responses
    ), {r.status_code for r in responses}
    responses = [r for r in responses if r.status_code == 200]
    degraded = [r for r in responses if r.headers.get("x-floodwall-degraded") == "embedder_int8"]
    assert degraded, f"none of {len(responses)} requests was degraded under saturation"
    assert len(degraded) < len(responses)  # the embedder still served some
    # The lighter model's answers are still the right embeddings: close to the full model's.
    full = next(r for r in responses if "x-floodwall-degraded" not in r.headers)
    a = np.array([d["embedding"] for d in full.json()["data"]])
    b = np.array([d["embedding"] for d in degraded[0].json()["data"]])
    assert float(np.min(np.sum(a * b, axis=1))) > 0.95
    # The queue drains and the signal clears (polled every 250 ms, averaged over the last
    # poll's interval, so it may read "saturated" a second or two after the hammer stops).
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(url, headers=NO_CACHE, json={"model": "embedder", "input": "calm again"})
        if "x-floodwall-degraded" not in r.headers or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200 and "x-floodwall-degraded" not in r.headers


def test_an_open_breaker_sends_standard_calls_to_the_lighter_model(tmp_path: Path) -> None:
    """The breaker trigger alone, against the real Triton: a breaker that counts every call
    to `embedder` as slow opens after `min_calls`; then a standard call is answered by
    `embedder_int8` (marked), and a critical one (the worker key, trusted to name its class)
    keeps its model and gets the breaker's honest 503."""
    with echo_server() as echo_port:
        cfg = stack_config(tmp_path / "run", echo_port)
        for f in cfg["filters"]:
            if f["type"] == "breaker":
                f["params"].update({"models": ["embedder"], "slow_call_ms": 0.001,
                                    "slow_call_rate": 0.5, "min_calls": 4, "window_s": 60,
                                    "open_s": 60})  # fmt: skip
            if f["type"] == "degrade":  # no other trigger
                f["params"].update({"pressure_hold_s": None, "saturation": None})
        s = start_stack(cfg, tmp_path / "fw.yaml")
        try:
            url = f"http://{s.cfg.listener.address}:{s.cfg.listener.port}/v1/embeddings"
            body = {"model": "embedder", "input": "a breaker opens"}
            with httpx.Client(timeout=30) as c:
                first = [c.post(url, headers=NO_CACHE, json=body) for _ in range(4)]
                assert [r.status_code for r in first] == [200] * 4
                assert not [r for r in first if "x-floodwall-degraded" in r.headers]
                r = c.post(url, headers=NO_CACHE, json=body)
                assert r.status_code == 200, r.text
                assert r.headers["x-floodwall-degraded"] == "embedder_int8"
                assert len(r.json()["data"][0]["embedding"]) == 384
                critical = {**NO_CACHE, "authorization": "Bearer fw-demo-worker",
                            "x-priority": "critical"}  # fmt: skip
                r = c.post(url, headers=critical, json=body)
                assert r.status_code == 503 and r.json()["error"]["type"] == "circuit_open"
        finally:
            s.stop()
