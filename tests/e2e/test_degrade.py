"""Degradation under load, end to end: when the embedder's queue in Triton grows past the
configured mean queue time, requests for it are answered by embedder_int8 (and say so)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import Gateway
from tests.helpers import NO_CACHE

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
