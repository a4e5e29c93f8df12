"""The cache through the real stack: Envoy, the processor, Redis and Triton's embedder and
judge.

An exact repeat and a paraphrase are answered by the gateway (the model is not called); a
look-alike with the opposite meaning is not; the operator can invalidate a tenant's answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import httpx
import pytest

from filters.cache.filter import _triton_versions
from tests.e2e.conftest import Gateway
from tests.helpers import AUTH, metric_total

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": "Bearer fw-demo-admin"}


def chat(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": "sim-llm", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": question}], **extra}  # fmt: skip


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    return metric_total(gateway.metrics_url, name, **labels)


def test_exact_repeat_and_paraphrase_are_served_by_the_gateway(gateway: Gateway) -> None:
    stored = metric(gateway, "floodwall_cache_stores_total", route="chat", result="stored")
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as c:
        first = c.post("/v1/chat/completions", json=chat("How do I rotate my API keys safely?"))
        assert first.status_code == 200, first.text
        assert first.headers["x-floodwall-cache"] == "miss"
        # The store happens after the answer went out: give it a moment.
        for _ in range(50):
            again = c.post("/v1/chat/completions",
                           json=chat("How do I rotate my API keys safely?"))  # fmt: skip
            if again.headers["x-floodwall-cache"] != "miss":
                break
        assert again.headers["x-floodwall-cache"] == "hit-exact" and "age" in again.headers
        # Repeats that came before the first store landed were misses too, and their stores
        # replace the entry: same answer text, another completion id. So compare the text:
        # the stand-in model words its answer after the prompt, so the paraphrase's own
        # answer would differ.
        answer = first.json()["choices"]
        assert again.json()["choices"] == answer
        # The first entry of a partition is written exact-only, then again once embedded
        # (counted as stored then): only then can a paraphrase find it.
        deadline = time.monotonic() + 10
        while metric(gateway, "floodwall_cache_stores_total", route="chat",
                     result="stored") <= stored:  # fmt: skip
            assert time.monotonic() < deadline, "the entry never reached the semantic index"
            time.sleep(0.05)
        para = c.post("/v1/chat/completions", json=chat("how can I safely rotate my API keys"))
        assert para.headers["x-floodwall-cache"] == "hit-semantic"
        assert para.json()["choices"] == answer
        trap = c.post("/v1/chat/completions",
                      json=chat("How do I not rotate my API keys safely?"))  # fmt: skip
        assert trap.headers["x-floodwall-cache"] == "miss"
        assert trap.json()["choices"][0]["message"] != first.json()["choices"][0]["message"]
    assert metric(gateway, "floodwall_cache_lookups_total", route="chat",
                  result="hit_semantic") >= 1  # fmt: skip
    # The local config lets the judge (Triton's pair_judge) decide.
    assert metric(gateway, "floodwall_cache_vetoes_total", guard="judge") >= 1


def test_embeddings_are_cached_exactly_and_no_store_is_honoured(gateway: Gateway) -> None:
    body = {"model": "embedder", "input": "Floodwall caches embeddings of exact texts."}
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as c:
        # Misses the full model answered: one of them is what gets stored. A miss degraded to
        # the lighter model (Triton still busy from an earlier test) is never stored.
        stored, degraded, r = [], 0, None
        for _ in range(50):
            r = c.post("/v1/embeddings", json=body)
            assert r.status_code == 200
            if r.headers["x-floodwall-cache"] == "hit-exact":
                break
            if "x-floodwall-degraded" in r.headers:
                degraded += 1
            else:
                stored.append(r.json())
        assert r is not None and r.headers["x-floodwall-cache"] == "hit-exact", degraded
        assert "x-floodwall-degraded" not in r.headers and r.json() in stored
        fresh = c.post("/v1/embeddings", json=body, headers={"cache-control": "no-store"})
        assert fresh.headers["x-floodwall-cache"] == "bypass"  # neither looked up nor stored


def test_invalidation_by_tenant_through_the_admin_endpoint(gateway: Gateway) -> None:
    q = chat("What is the warranty period for refurbished laptops?")
    admin = gateway.metrics_url.replace("/metrics", "/cache/invalidate")
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as c:
        c.post("/v1/chat/completions", json=q)
        for _ in range(50):
            if c.post("/v1/chat/completions", json=q).headers["x-floodwall-cache"] == "hit-exact":
                break
        else:
            pytest.fail("never cached")
        assert httpx.post(admin, params={"tenant": "demo"}).status_code == 401
        wrong = {"authorization": "Bearer " + hashlib.sha256(b"x").hexdigest()}
        assert httpx.post(admin, params={"tenant": "demo"}, headers=wrong).status_code == 401
        r = httpx.post(admin, params={"tenant": "demo"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["entries"] >= 1
        assert c.post("/v1/chat/completions", json=q).headers["x-floodwall-cache"] == "miss"


def test_model_versions_come_from_triton(gateway: Gateway) -> None:
    versions = asyncio.run(_triton_versions(gateway.triton_url))
    assert versions is not None
    assert versions.get("embedder") == "1" and versions.get("sim_llm") == "1"
