"""The shipped chain against a Redis that stops answering (SIGSTOP: connections stay open,
no reply ever comes), each request met by filters that have not yet noticed (fresh ones, so
every filter pays its own full budget): each phase must end before Envoy's message timeout,
with the answer the filters decide (a fallback or their documented 503), never Envoy's 504.

Filters run one after another within a phase, so their budgets add up: on the async chat
submission the cache's look-up (250 ms), rate_limit's check (up to 400 ms) and the jobs
filter's submission and settlement (200 + 200 ms) came to about a second against the local
config's 750 ms. Each filter's budget is now cut to what the phase has left
(``RequestContext.budget_s``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from filters.admission.filter import AdmissionFilter
from filters.admission.limiter import Limiter
from proxy.api import Deps, Phase, RequestContext
from proxy.config import parse_config
from proxy.process import make_redis
from proxy.registry import build_filters
from proxy.testing import Harness, UpstreamReply
from tests.helpers import DEMO_KEY, RedisServer, free_ports, local_config_dict, sim_llm_answer

pytestmark = pytest.mark.integration

CHAT = {
    "model": "sim-llm",
    "messages": [{"role": "user", "content": "How do I reset it?"}],
    "temperature": 0,  # deterministic: the cache looks it up
}
EMBED = {"model": "embedder", "input": "a text to embed"}
# (method, path, extra headers, body, statuses the filters may answer with)
LIMITED = {"authorization": "Bearer fw-demo-limited"}  # a token budget on chat: at the body
CASES: list[tuple[str, str, dict[str, str], Any, set[int]]] = [
    ("POST", "/v1/chat/completions", {"prefer": "respond-async"}, CHAT, {202, 503}),
    ("POST", "/v1/chat/completions", {"prefer": "respond-async", **LIMITED}, CHAT, {202, 503}),
    ("POST", "/v1/chat/completions", LIMITED, CHAT, {200, 503}),
    ("POST", "/v1/chat/completions", {}, CHAT, {200, 503}),
    ("POST", "/v1/embeddings", {"prefer": "respond-async"}, EMBED, {202, 503}),
    ("POST", "/v1/jobs", {}, {"url": "/v1/embeddings", "body": EMBED}, {202, 503}),
    ("GET", "/v1/jobs/" + "a" * 32, {}, None, {503}),
]


@pytest.fixture
async def frozen(tmp_path: Path) -> AsyncIterator[tuple[str, RedisServer]]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        server.freeze()
        yield server.url, server
    finally:
        server.freeze(False)
        server.stop()


def _config(redis_url: str, message_timeout_ms: int | None, busy: bool) -> Any:
    (dead,) = free_ports(1)  # Triton: nothing listens (its calls fail at once)
    text = orjson.dumps(local_config_dict()).decode()
    for port in ("8000", "8001", "8002"):
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{dead}")
    data = orjson.loads(text)
    data["redis"] = {"url": redis_url}
    if message_timeout_ms is not None:
        data["processor"]["message_timeout_ms"] = message_timeout_ms
    if busy:  # and the cache's budgets as long as its params allow a user to set them
        (cache,) = [f for f in data["filters"] if f["type"] == "cache"]
        cache["params"].update(lookup_budget_ms=500, redis_timeout_ms=500)
    return parse_config(data)


async def _upstream(headers: dict[str, str], body: bytes) -> UpstreamReply:
    """sim_llm's answer (the only model call a case lets through)."""
    return sim_llm_answer()


# The shipped 500 ms, and a tight 150 ms (Envoy's timeout is that plus the filters' holds:
# admission's 250 ms queue), under which the filters' own budgets add up past it. With the
# models busy too (admission's limit taken: a call waits its 250 ms in admission's queue
# after the filters before it spent theirs) and the cache's budgets at 500 ms, or not.
@pytest.mark.parametrize("busy", [False, True])
@pytest.mark.parametrize("message_timeout_ms", [None, 150])
@pytest.mark.parametrize(("method", "path", "extra", "body", "allowed"), CASES)
async def test_each_phase_ends_before_envoys_message_timeout(
    frozen: tuple[str, RedisServer],
    busy: bool,
    message_timeout_ms: int | None,
    method: str,
    path: str,
    extra: dict[str, str],
    body: Any,
    allowed: set[int],
) -> None:
    url, _ = frozen
    cfg = _config(url, message_timeout_ms, busy)
    # The processor's own client (redis.timeout_ms: 1 s of silence before it drops a
    # connection), as `floodwall up` makes it.
    redis = make_redis(url, 1000)
    upstreams = {n: u.base_url for n, u in cfg.upstreams.items()}
    filters = build_filters(cfg.filters, Deps(redis=redis, upstreams=upstreams))
    if busy:
        (adm,) = [f for f in filters if isinstance(f, AdmissionFilter)]
        for model in adm.p.models:
            lim = adm.limiters[model] = Limiter(adm.p)
            lim.inflight = int(lim.limit)  # every permit held by calls that never end
        allowed = allowed | {503}  # overloaded, after the queue's wait
    h = Harness(cfg, filters)
    envoy_s = (cfg.processor.message_timeout_ms + h.chain.max_hold_ms()) / 1000
    took: list[tuple[Phase, float]] = []
    run = h.chain.run

    async def timed(plan: Any, phase: Phase, ctx: RequestContext, data: Any) -> Any:
        t0 = time.monotonic()
        try:
            return await run(plan, phase, ctx, data)
        finally:
            took.append((phase, time.monotonic() - t0))

    h.chain.run = timed  # type: ignore[method-assign]
    headers = {"authorization": f"Bearer {DEMO_KEY}", **extra}
    try:
        r = await h.request(
            method, path, headers=headers, body=orjson.dumps(body) if body else None,
            upstream=_upstream,
        )  # fmt: skip
    finally:
        for f in filters:
            await f.stop()
        await redis.aclose()
    assert took
    for phase, seconds in took:
        assert seconds < envoy_s, (phase, seconds, envoy_s, r.status, r.body)
    assert r.status in allowed, (r.status, r.body)
    if r.status >= 400:
        assert orjson.loads(r.body)["error"]["type"]
