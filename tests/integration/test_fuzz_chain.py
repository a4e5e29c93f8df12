"""Property-based fuzzing of the shipped local config's whole chain against a real Redis.

Every filter of ``examples/local.yaml`` (auth, cache, openai, admission, rate_limit, jobs,
degrade, breaker) sees generated requests on every route: bodies that are nearly valid
(a field missing, of the wrong type, out of range, nested, huge, not UTF-8), random headers
(Cache-Control, Prefer, Idempotency-Key, spoofed ``x-floodwall-*``, webhooks, grpc-timeout),
and generated upstream answers (any status, any body, broken JSON, SSE that stops early).

The properties, for every example:
- no filter faults: bad input is a decision (an error answer), never an exception;
- every answer the chain makes itself is the documented JSON error (or a job/cache answer)
  with a status the README lists, and never a 500;
- no client-sent internal header reaches the model or the client;
- the chain completes every request (the harness waits for on_complete).

Hypothesis runs derandomized (the same examples every CI run); set
``FLOODWALL_FUZZ_EXAMPLES`` (default 1000) and ``FLOODWALL_FUZZ_SEED`` to search further.
Triton is not started: the embedder, the judge and Triton's metrics are stand-ins or a dead
port, so the model-facing code takes its failure paths too.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from filters.cache.filter import CacheFilter
from proxy import metrics
from proxy.api import Deps, Headers
from proxy.config import parse_config
from proxy.process import make_redis
from proxy.registry import build_filters
from proxy.testing import Harness, UpstreamReply
from tests.fuzzing import (
    ANSWERED,
    FAMILIES,
    SPOOF,
    encoded,
    header_values,
    json_values,
    loose_json,
    maybe,
    requests,
    token,
)
from tests.helpers import RedisServer, free_ports, local_config_dict

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FLOODWALL_FUZZ_EXAMPLES", "1000"))
SEED = int(os.environ.get("FLOODWALL_FUZZ_SEED", "0"))


class _WordsEmbedder:
    """Texts sharing words get close vectors (the model is not under test here)."""

    async def embed(self, text: str) -> np.ndarray[Any, Any]:
        v = np.zeros(64, dtype=np.float32)
        for w in re.findall(r"\w+", text.lower()):
            v[int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1.0
        return v

    async def close(self) -> None:
        pass


class _OverlapJudge:
    async def same_answer(self, cached: str, asked: str) -> float:
        a, b = set(cached.lower().split()), set(asked.lower().split())
        return len(a & b) / max(1, len(a | b))

    async def close(self) -> None:
        pass


# --- the chain under test -----------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # One loop for every example: the filters' Redis connections and background tasks live
    # on it (hypothesis calls the test synchronously, once per example).
    lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture(scope="module")
def harness(
    tmp_path_factory: pytest.TempPathFactory, loop: asyncio.AbstractEventLoop
) -> Iterator[Harness]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    (dead,) = free_ports(1)  # Triton: nothing listens here
    data = local_config_dict()
    text = orjson.dumps(data).decode()
    for port in ("8000", "8001", "8002"):
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{dead}")
    data = orjson.loads(text)
    for up in data["upstreams"].values():
        up["endpoints"] = [{"address": "127.0.0.1", "port": dead}]
    cfg = parse_config(data)

    async def build() -> tuple[Harness, Any]:
        redis = make_redis(server.url, 2000)
        deps = Deps(redis=redis, upstreams={n: u.base_url for n, u in cfg.upstreams.items()})
        filters = build_filters(cfg.filters, deps)
        for i, f in enumerate(filters):
            if isinstance(f, CacheFilter):  # the semantic path with stand-in models
                c = CacheFilter(f.p, deps, _WordsEmbedder(), _OverlapJudge())
                c.name = f.name
                filters[i] = c
        h = Harness(cfg, filters)
        await h.chain.start()
        return h, redis

    h, redis = loop.run_until_complete(build())
    h.redis = redis  # type: ignore[attr-defined]  # for the per-example FLUSHDB
    try:
        yield h
    finally:
        loop.run_until_complete(h.chain.stop())
        loop.run_until_complete(redis.aclose())
        server.stop()


# --- strategies ---------------------------------------------------------------------------


def _kserve(outputs: dict[str, Any]) -> UpstreamReply:
    """Triton's KServe v2 answer: one output per name, each value its data."""
    body = {
        "model_name": "m",
        "outputs": [
            {"name": k, "datatype": "BYTES", "shape": [1], "data": v} for k, v in outputs.items()
        ],
    }
    return UpstreamReply(200, {"content-type": "application/json"}, loose_json(body))


def _stream(events: list[Any], cut: int | None) -> UpstreamReply:
    """Triton's generate_stream: SSE events, maybe cut short mid-event."""
    raw = b"".join(b"data: " + loose_json(e) + b"\n\n" for e in events)
    return UpstreamReply(200, {"content-type": "text/event-stream"}, raw[:cut])


count = maybe(st.integers(0, 10**6))
chat_answer = st.builds(lambda text, p, c, fin: _kserve(
    {"TEXT": [text], "PROMPT_TOKENS": [p], "COMPLETION_TOKENS": [c], "FINISH_REASON": [fin]}),
    maybe(st.text(max_size=20)), count, count, maybe(st.sampled_from(["stop", "length"])),
)  # fmt: skip
stream_answer = st.builds(
    lambda texts, last, cut: _stream([*({"TEXT": t} for t in texts), last], cut),
    st.lists(st.text(max_size=8), max_size=3),
    maybe(st.fixed_dictionaries({"TEXT": st.text(max_size=8), "FINISH_REASON": st.just("stop"),
                                  "PROMPT_TOKENS": count, "COMPLETION_TOKENS": count})
           | st.just({"error": "model failed"})),
    st.none() | st.none() | st.integers(0, 200),
)  # fmt: skip


def _embedding_answer(request: bytes, dim: int, tokens: Any) -> UpstreamReply:
    """The embedder's answer, one vector per text the request carried."""
    try:
        n = len(orjson.loads(request)["inputs"][0]["data"])
    except (orjson.JSONDecodeError, LookupError, TypeError):
        n = 1
    body = {"model_name": "embedder", "outputs": [
        {"name": "EMBEDDING", "datatype": "FP32", "shape": [n, dim], "data": [0.5] * n * dim},
        {"name": "TOKENS", "datatype": "INT64", "shape": [n], "data": tokens}]}  # fmt: skip
    return UpstreamReply(200, {"content-type": "application/json"}, loose_json(body))


embedding_answer = st.builds(
    lambda dim, tokens: lambda request: _embedding_answer(request, dim, tokens),
    st.integers(1, 4), maybe(st.lists(st.integers(0, 300), min_size=1, max_size=1)),
)  # fmt: skip
any_reply = st.one_of(
    st.builds(UpstreamReply,
              st.sampled_from([200, 200, 400, 404, 429, 500, 502, 503, 504]),
              st.fixed_dictionaries({"content-type": st.sampled_from(
                  ["application/json", "text/event-stream", "text/plain"])},
                  optional={"cache-control": header_values["cache-control"],
                            "retry-after": token, "content-length": token}),
              encoded(json_values)),
    st.just(UpstreamReply(200, {"content-type": "text/event-stream"}, b"data: {\"choi")),
)  # fmt: skip
# Mostly what the route's model would answer, so that the response side's parsing runs.
REPLIES = {
    "/v1/chat/completions": st.one_of(chat_answer, stream_answer, any_reply),
    "/v1/embeddings": st.one_of(embedding_answer, embedding_answer, any_reply),
}


# --- the property -------------------------------------------------------------------------


def _faults() -> float:
    return sum(s.value for m in metrics.FILTER_FAULTS.collect() for s in m.samples
               if s.name.endswith("_total"))  # fmt: skip


@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED == 0, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_input_makes_a_filter_fault(
    harness: Harness, loop: asyncio.AbstractEventLoop, family: str, data: st.DataObject
) -> None:
    route, method, path, headers, body = data.draw(requests(FAMILIES[family]), label="request")
    # Examples share the processor (its breakers, limiters) but not Redis: without this,
    # the jobs queued by earlier examples fill the tenant's quota and later ones see 429s.
    loop.run_until_complete(harness.redis.flushdb())  # type: ignore[attr-defined]
    reply = data.draw(REPLIES.get(route, any_reply), label="upstream reply")
    before = _faults()
    seen: list[Headers] = []

    def upstream(h: Headers, b: bytes) -> UpstreamReply:
        seen.append(h)
        return reply if isinstance(reply, UpstreamReply) else reply(b)

    result = loop.run_until_complete(
        asyncio.wait_for(
            harness.request(method, path, headers=headers, body=body, upstream=upstream), 30
        )
    )
    # `pytest --hypothesis-show-statistics` shows how the examples spread over the answers.
    event(f"{route} -> {result.status} by {result.responded_by}")
    assert _faults() == before, f"a filter faulted on {method} {path} {headers} {body[:200]!r}"
    if result.responded_by is not None:
        assert result.status in ANSWERED, (result.status, result.body[:300])
        if result.status >= 400:
            err = orjson.loads(result.body)["error"]
            assert isinstance(err["type"], str) and isinstance(err["message"], str)
    for h in seen:  # what reached the model carries no client-made internal header
        assert SPOOF not in h.values(), h
    if result.responded_by is None:
        assert SPOOF not in result.headers.values(), result.headers
