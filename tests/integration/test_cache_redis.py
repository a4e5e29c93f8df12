"""The cache filter against a real redis-server: exact and semantic hits, what must never hit
(other tenants, other conversations, traps, no-store), expiry and eviction on a fake clock,
replicas following each other through the feed, invalidation, model versions, Redis and
embedder outages, and concurrent identical misses.

The embedder here is a deterministic bag-of-words stand-in (this file tests the filter and
its Redis store, not the model); tests/e2e/test_cache.py runs the real one through Triton.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from filters.cache.embedder import EmbedderError, JudgeError
from filters.cache.filter import (
    ERRORS,
    SEMANTIC_HITS,
    SPECULATIONS,
    STORES,
    VETOES,
    CacheFilter,
    _scope_id,
)
from filters.cache.guards import GUARDS
from filters.cache.store import zset_key
from filters.cache.verifier import ALIGN_FEATURES, Verifier
from proxy.api import CONTINUE, Decision, Deps, Filter, Mutate, NoParams, RequestContext
from proxy.testing import FakeClock, Harness, UpstreamReply, default_config
from tests.helpers import RedisServer

pytestmark = pytest.mark.integration

ROUTES = [
    {"name": "chat", "match": {"path": "/v1/chat/completions"}, "api": "openai_chat",
     "upstream": "up"},
    {"name": "public_chat", "match": {"path": "/public/chat"}, "api": "openai_chat",
     "upstream": "up"},
    {"name": "embeddings", "match": {"path": "/v1/embeddings"}, "api": "openai_embeddings",
     "upstream": "up"},
]  # fmt: skip
TOKEN = "admin-secret"


class WordsEmbedder:
    """Texts sharing words get close vectors; ``down`` makes it fail like a dead Triton."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = False
        self.delay_s = 0.0

    async def embed(self, text: str) -> np.ndarray[Any, Any]:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.down:
            raise EmbedderError("embedder unreachable (test)")
        v = np.zeros(64, dtype=np.float32)
        for w in _words(text):
            v[int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1.0
        return v

    async def embed_tokens(self, text: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """Each word's token vector: a one-hot of its hash (the same word, the same vector)."""
        rows = np.zeros((len(_words(text)), 64), dtype=np.float16)
        for i, w in enumerate(_words(text)):
            rows[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] = 1.0
        return await self.embed(text), rows

    async def close(self) -> None:
        pass


def _words(text: str) -> list[str]:
    return text.lower().replace("?", " ").replace("'", " ").split()


class _Identify(Filter):
    async def on_request_headers(self, ctx: RequestContext, headers: dict[str, str]) -> Any:
        ctx.tenant = headers.get("x-test-tenant")
        ctx.key_id = headers.get("x-test-key-id")
        return CONTINUE


def cache(rc: Any, clock: Any = None, embedder: Any = None, **params: Any) -> CacheFilter:
    p = CacheFilter.Params.model_validate(
        {
            "routes": {"chat": {"ttl_s": 60, "semantic": True},
                       "public_chat": {"public": True, "semantic": True},
                       "embeddings": {}},
            "semantic": {"threshold": 0.7, "dimensions": 64},
            "versions_upstream": None,
            "admin_token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
            # Budgets far above the defaults (100 / 250 ms): a stall of a busy CI machine
            # made a look-up over its budget a silent miss where a hit was asserted. Tests
            # of the budgets pass their own.
            "redis_timeout_ms": 2000,
            "lookup_budget_ms": 5000,
            **params,
        }
    )  # fmt: skip
    f = CacheFilter(p, Deps(redis=rc, clock=clock or FakeClock()), embedder or WordsEmbedder())
    f.name = "cache"
    return f


def harness(f: CacheFilter) -> Harness:
    ident = _Identify(NoParams(), Deps())
    ident.name = "identify"
    # Envoy waiting as long as the budgets above: each phase's time bounds them.
    return Harness.for_filters([ident, f], default_config(ROUTES, message_timeout_ms=20_000))


def chat(question: str, history: list[dict[str, str]] | None = None, **extra: Any) -> bytes:
    messages = [*(history or []), {"role": "user", "content": question}]
    return orjson.dumps({"model": "sim-llm", "messages": messages, "temperature": 0, **extra})


class Upstream:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, headers: dict[str, str], body: bytes) -> UpstreamReply:
        self.calls += 1
        return UpstreamReply(
            200, {"content-type": "application/json"},
            orjson.dumps({"answer": self.calls, "asked": orjson.loads(body)["messages"][-1]}),
        )  # fmt: skip


async def ask(
    h: Harness, f: CacheFilter, up: Upstream, body: bytes, tenant: str = "a",
    path: str = "/v1/chat/completions", headers: dict[str, str] | None = None,
) -> Any:  # fmt: skip
    r = await h.request("POST", path, headers={"x-test-tenant": tenant, **(headers or {})},
                        body=body, upstream=up)  # fmt: skip
    await f.settle()
    return r


async def test_a_repeat_hits_while_the_first_entry_is_being_embedded(rc: aioredis.Redis) -> None:
    """The first entry of a partition is embedded after its answer went out (a look-up had
    nothing to compare it with); it is written exact-only first, so the same request asked
    again meanwhile is a hit, not a second model call."""
    emb = WordsEmbedder()
    f = cache(rc, embedder=emb)
    h, up = harness(f), Upstream()
    emb.delay_s = 0.5
    q = chat("How do I add a teammate to my workspace?")
    headers = {"x-test-tenant": "a"}
    r = await h.request("POST", "/v1/chat/completions", headers=headers, body=q, upstream=up)
    assert r.headers["x-floodwall-cache"] == "miss"
    deadline = time.monotonic() + 5
    while emb.calls == 0:  # the embedding starts once the exact-only write is in Redis
        assert time.monotonic() < deadline, "the entry was never embedded"
        await asyncio.sleep(0.005)
    r = await h.request("POST", "/v1/chat/completions", headers=headers, body=q, upstream=up)
    assert r.headers["x-floodwall-cache"] == "hit-exact" and up.calls == 1
    assert len(f.index) == 0  # not yet in the semantic index
    await f.settle()
    assert len(f.index) == 1
    emb.delay_s = 0.0
    r = await ask(h, f, up, chat("how can I add a teammate to my workspace"))
    assert r.headers["x-floodwall-cache"] == "hit-semantic" and up.calls == 1


async def test_a_no_cache_restore_keeps_the_entry_a_semantic_hit(rc: aioredis.Redis) -> None:
    """A request with no-cache replaces its entry once it has the answer and its vector; the
    old entry serves paraphrases until then (an exact-only rewrite first would make them
    miss meanwhile, and each miss would store the paraphrase as an entry of its own)."""
    release = asyncio.Event()
    original = "How do I add a teammate to my workspace?"

    class HeldEmbedder(WordsEmbedder):
        async def embed(self, text: str) -> np.ndarray[Any, Any]:
            if text == original and self.calls > 0:
                await release.wait()  # the re-store's embedding, held
            return await super().embed(text)

    emb = HeldEmbedder()
    f = cache(rc, embedder=emb)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat(original))
    assert len(f.index) == 1 and emb.calls == 1
    headers = {"x-test-tenant": "a", "cache-control": "no-cache"}
    r = await h.request("POST", "/v1/chat/completions", headers=headers, body=chat(original),
                        upstream=up)  # fmt: skip
    assert r.headers["x-floodwall-cache"] == "miss" and up.calls == 2
    paraphrase = chat("how can I add a teammate to my workspace")
    for _ in range(3):  # while the new answer is being embedded
        r = await h.request("POST", "/v1/chat/completions", headers={"x-test-tenant": "a"},
                            body=paraphrase, upstream=up)  # fmt: skip
        assert r.headers["x-floodwall-cache"] == "hit-semantic"
        assert orjson.loads(r.body)["answer"] == 1
    release.set()
    await f.settle()
    r = await ask(h, f, up, paraphrase)
    assert r.headers["x-floodwall-cache"] == "hit-semantic" and up.calls == 2
    assert orjson.loads(r.body)["answer"] == 2  # the replacement, with its vector


async def test_a_paraphrase_asked_again_is_answered_by_its_own_key(rc: aioredis.Redis) -> None:
    """After a semantic hit the answer is copied under the asking request's key: the same
    paraphrase again costs an exact look-up (no embedding), is still marked hit-semantic
    with the original's age, ends with the original, and stays in its tenant's scope."""
    clock = FakeClock()
    emb = WordsEmbedder()
    f = cache(rc, clock, emb)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("How do I add a teammate to my workspace?"))
    paraphrase = chat("how can I add a teammate to my workspace")
    clock.advance(5)
    first = await ask(h, f, up, paraphrase)
    assert first.headers["x-floodwall-cache"] == "hit-semantic"
    embedded, aliases = emb.calls, STORES.labels("chat", "alias")._value.get()
    by_alias = SEMANTIC_HITS.labels("alias")._value.get()
    clock.advance(3)
    again = await ask(h, f, up, paraphrase)
    assert again.headers["x-floodwall-cache"] == "hit-semantic" and again.body == first.body
    assert again.headers["age"] == "8"  # the answer's age, not the copy's
    assert emb.calls == embedded and up.calls == 1  # found by its key: no embedding
    assert SEMANTIC_HITS.labels("alias")._value.get() == by_alias + 1
    assert STORES.labels("chat", "alias")._value.get() == aliases  # not copied twice
    other = await ask(h, f, up, paraphrase, tenant="b")  # another tenant: nothing to share
    assert other.headers["x-floodwall-cache"] == "miss" and up.calls == 2
    clock.advance(60 - 8)  # the original's TTL (60 s) is over: so is the copy
    assert (await ask(h, f, up, paraphrase)).headers["x-floodwall-cache"] == "miss"


async def test_no_alias_when_turned_off_or_the_original_changed(rc: aioredis.Redis) -> None:
    f = cache(rc, alias_semantic_hits=False)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("How do I add a teammate to my workspace?"))
    paraphrase = chat("how can I add a teammate to my workspace")
    for _ in range(2):
        assert (await ask(h, f, up, paraphrase)).headers["x-floodwall-cache"] == "hit-semantic"
    keys = await rc.keys("fw:cache:*:e:*")
    assert len(keys) == 1  # the original only
    # A copy of an answer its entry no longer holds is refused, atomically in the store.
    store = f.store
    assert store is not None
    scope = next(iter(await store.scopes()))
    original = keys[0].decode().rsplit(":", 1)[1]
    alias = "b" * 32
    put: dict[str, Any] = dict(scope=scope, scope_meta={}, entry_id=alias, headers={},
                               partition="", text="", vector=b"", now_ms=0, ttl_ms=60_000,
                               max_entries=100, alias_of=(original, 0))  # fmt: skip
    assert await store.put(body=b"an older answer", **put) is None
    assert await store.get(scope, alias, 0) is None
    entry = await store.get(scope, original, 0)
    assert entry is not None
    assert await store.put(body=entry.body, **put) == []
    copy = await store.get(scope, alias, 0)
    assert copy is not None and copy.alias and copy.body == entry.body


async def test_exact_hit_replays_the_answer_with_age(rc: aioredis.Redis) -> None:
    clock = FakeClock()
    f = cache(rc, clock)
    h, up = harness(f), Upstream()
    first = await ask(h, f, up, chat("How do I reset my password?"))
    assert first.status == 200 and first.headers["x-floodwall-cache"] == "miss"
    clock.advance(7)
    again = await ask(h, f, up, chat("How do I reset my password?", user="someone-else"))
    assert again.headers["x-floodwall-cache"] == "hit-exact"
    assert again.headers["age"] == "7"
    assert again.body == first.body and not again.upstream_called and up.calls == 1


async def test_canonical_form_ignores_key_order_but_not_parameters(rc: aioredis.Redis) -> None:
    f = cache(rc)
    h, up = harness(f), Upstream()
    await ask(h, f, up, b'{"model":"sim-llm","temperature":0,"messages":[{"role":"user",'
                        b'"content":"What is GCRA?"}],"max_tokens":5}')  # fmt: skip
    same = b'{"max_tokens":5,"messages":[{"content":"What is GCRA?","role":"user"}],' \
        b'"temperature":0,"model":"sim-llm"}'  # fmt: skip
    assert (await ask(h, f, up, same)).headers["x-floodwall-cache"] == "hit-exact"
    other = chat("What is GCRA?", max_tokens=6)
    assert (await ask(h, f, up, other)).headers["x-floodwall-cache"] == "miss"


async def test_semantic_hit_on_paraphrase_and_guarded_miss_on_trap(rc: aioredis.Redis) -> None:
    f = cache(rc)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("How do I cancel my subscription?"))
    hit = await ask(h, f, up, chat("how can I cancel my subscription"))
    assert hit.headers["x-floodwall-cache"] == "hit-semantic"
    before = VETOES.labels("negation")._value.get()
    trap = await ask(h, f, up, chat("How do I not cancel my subscription?"))
    assert trap.headers["x-floodwall-cache"] == "miss" and trap.upstream_called
    assert VETOES.labels("negation")._value.get() == before + 1


async def test_tenants_never_share_entries_unless_the_route_is_public(rc: aioredis.Redis) -> None:
    f = cache(rc)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("What is the refund policy?"), tenant="a")
    for tenant, q in (("b", "What is the refund policy?"), ("c", "what is the refund policy")):
        r = await ask(h, f, up, chat(q), tenant=tenant)
        assert r.headers["x-floodwall-cache"] == "miss", q
    r = await ask(h, f, up, chat("what is the refund policy"), tenant="a")
    assert r.headers["x-floodwall-cache"] == "hit-semantic"
    await ask(h, f, up, chat("Shared question here"), tenant="a", path="/public/chat")
    r = await ask(h, f, up, chat("Shared question here"), tenant="b", path="/public/chat")
    assert r.headers["x-floodwall-cache"] == "hit-exact"


async def test_jobs_run_by_the_worker_are_cached_in_their_own_tenant(rc: aioredis.Redis) -> None:
    """The jobs worker calls the gateway under its own key for every tenant's jobs: with
    ``on_behalf``, each job is cached in its tenant's scope (so tenants' job answers never
    mix, and a tenant's invalidation reaches them); the header counts from that key only."""
    f = cache(rc, on_behalf={"key_ids": ["worker"]})
    h, up = harness(f), Upstream()

    async def job(q: str, tenant: str) -> str:
        worker = {"x-test-key-id": "worker", "x-job-tenant": tenant}
        r = await ask(h, f, up, chat(q), tenant="floodwall-worker", headers=worker)
        return str(r.headers["x-floodwall-cache"])

    await job("What is the refund policy?", "a")
    assert await job("What is the refund policy?", "b") == "miss"
    assert await job("What is the refund policy?", "a") == "hit-exact"
    # Tenant a's own (interactive) call sees its job's answer; b's does not.
    r = await ask(h, f, up, chat("What is the refund policy?"), tenant="a")
    assert r.headers["x-floodwall-cache"] == "hit-exact"
    # Another key sending the header is cached as itself, not as the tenant it names.
    r = await ask(h, f, up, chat("What is the refund policy?"), tenant="c",
                  headers={"x-test-key-id": "someone", "x-job-tenant": "a"})  # fmt: skip
    assert r.headers["x-floodwall-cache"] == "miss"
    # The worker without a job tenant: not cached at all (no isolation to keep).
    calls = up.calls
    for _ in range(2):
        r = await ask(h, f, up, chat("What is the refund policy?"), tenant="floodwall-worker",
                      headers={"x-test-key-id": "worker"})  # fmt: skip
        assert r.headers["x-floodwall-cache"] == "bypass"
    assert up.calls == calls + 2
    await f.invalidate(tenant="a")
    assert await job("What is the refund policy?", "a") == "miss"


async def test_no_tenant_no_cache(rc: aioredis.Redis) -> None:
    f = cache(rc)
    h, up = harness(f), Upstream()
    for _ in range(2):
        r = await h.request("POST", "/v1/chat/completions", body=chat("hi there"), upstream=up)
        assert r.headers["x-floodwall-cache"] == "bypass"
    assert up.calls == 2


async def test_earlier_turns_are_part_of_the_key(rc: aioredis.Redis) -> None:
    f = cache(rc)
    h, up = harness(f), Upstream()
    one = [{"role": "user", "content": "I use Postgres."}, {"role": "assistant", "content": "OK"}]
    two = [{"role": "user", "content": "I use MySQL."}, {"role": "assistant", "content": "OK"}]
    three = [{"role": "system", "content": "Be brief."}]
    await ask(h, f, up, chat("How do I back up my database?", one))
    r = await ask(h, f, up, chat("How do I back up my database?", two))
    assert r.headers["x-floodwall-cache"] == "miss"
    r = await ask(h, f, up, chat("how can I back up my database", three))
    assert r.headers["x-floodwall-cache"] == "miss"  # the paraphrase, other conversation
    r = await ask(h, f, up, chat("how can I back up my database", one))
    assert r.headers["x-floodwall-cache"] == "hit-semantic"


async def test_entries_expire_on_the_injected_clock(rc: aioredis.Redis) -> None:
    clock = FakeClock()
    f = cache(rc, clock)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("What time zone is Lisbon in?"))
    clock.advance(59)
    assert (await ask(h, f, up, chat("What time zone is Lisbon in?"))).headers[
        "x-floodwall-cache"
    ] == "hit-exact"
    clock.advance(2)  # past the route's 60 s
    assert f.index.expire(int(clock.time() * 1000)) == 1 and len(f.index) == 0
    r = await ask(h, f, up, chat("What time zone is Lisbon in?"))
    assert r.headers["x-floodwall-cache"] == "miss" and r.upstream_called


async def test_entries_per_scope_are_capped_oldest_first(rc: aioredis.Redis) -> None:
    clock = FakeClock()
    f = cache(rc, clock, max_entries_per_scope=3)
    h, up = harness(f), Upstream()
    questions = [f"Question number {w} about billing" for w in "ABCDE"]
    for q in questions:
        await ask(h, f, up, chat(q))
        clock.advance(1)
    assert await rc.zcard(zset_key(next(iter(f.index._scopes)))) == 3
    assert len(f.index) == 3
    calls = up.calls
    for q in questions[2:]:
        assert (await ask(h, f, up, chat(q))).headers["x-floodwall-cache"] == "hit-exact"
    assert up.calls == calls
    assert (await ask(h, f, up, chat(questions[0]))).headers["x-floodwall-cache"] == "miss"


async def test_a_replica_sees_new_entries_within_a_second(rc: aioredis.Redis) -> None:
    a, b = cache(rc), cache(rc)
    await b.start()
    try:
        ha, hb, up = harness(a), harness(b), Upstream()
        await ask(ha, a, up, chat("Where is my invoice for March?"))
        # Wait on b's index rather than asking b in a loop: an early miss on b would store
        # the paraphrase itself and turn every later ask into an exact hit.
        await wait_for(lambda: len(b.index) == 1, within_s=1.0)
        r = await ask(hb, b, up, chat("where is my invoice for march"), headers={})
        assert r.headers["x-floodwall-cache"] == "hit-semantic"
        # A fresh process rebuilds its index from Redis.
        assert await cache(rc).rebuild() == 1
    finally:
        await b.stop()


async def test_invalidation_endpoint_needs_the_token_and_reaches_replicas(
    rc: aioredis.Redis,
) -> None:
    a, b = cache(rc), cache(rc)
    await b.start()
    try:
        h, up = harness(a), Upstream()
        await ask(h, a, up, chat("How do I export my data?"), tenant="a")
        await ask(h, a, up, chat("How do I export my data?"), tenant="b")
        scope_a = _scope_id({"tenant": "a", "route": "chat", "model": "sim-llm", "version": ""})
        await wait_for(lambda: scope_a in b.index._scopes)
        route = a.admin_routes()["/cache/invalidate"]
        assert (await route({"tenant": "a"}, {"authorization": "Bearer nope"}))[0] == 401
        assert (await route({}, {"authorization": f"Bearer {TOKEN}"}))[0] == 400
        status, out = await route({"tenant": "a"}, {"authorization": f"Bearer {TOKEN}"})
        assert status == 200 and out["entries"] == 1
        await wait_for(lambda: scope_a not in b.index._scopes)  # b follows the feed
        assert len(b.index) == 1
        assert (await ask(h, a, up, chat("How do I export my data?"), tenant="a")).headers[
            "x-floodwall-cache"
        ] == "miss"
        assert (await ask(h, a, up, chat("How do I export my data?"), tenant="b")).headers[
            "x-floodwall-cache"
        ] == "hit-exact"
    finally:
        await b.stop()


async def wait_for(cond: Any, within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_a_new_model_version_starts_new_scopes_and_drops_old(rc: aioredis.Redis) -> None:
    f = cache(rc)
    f.versions = {"sim-llm": "1"}
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("Explain GCRA"))
    assert (await ask(h, f, up, chat("Explain GCRA"))).headers["x-floodwall-cache"] == "hit-exact"
    f.versions = {"sim-llm": "2"}
    await f._drop_versions("sim-llm", "2")
    assert (await ask(h, f, up, chat("Explain GCRA"))).headers["x-floodwall-cache"] == "miss"
    assert len(await f.store.scopes()) == 1  # type: ignore[union-attr]


async def test_cache_control_no_store_and_no_cache(rc: aioredis.Redis) -> None:
    f = cache(rc)
    h, up = harness(f), Upstream()
    q = chat("What is the speed of light?")
    await ask(h, f, up, q, headers={"cache-control": "no-store"})
    assert (await ask(h, f, up, q)).headers["x-floodwall-cache"] == "miss"  # nothing stored
    r = await ask(h, f, up, q, headers={"cache-control": "no-cache"})
    assert r.upstream_called and r.headers["x-floodwall-cache"] == "miss"
    r2 = await ask(h, f, up, q)
    assert r2.headers["x-floodwall-cache"] == "hit-exact" and r2.body == r.body  # refreshed


async def test_a_requests_max_age_bounds_the_answers_age(rc: aioredis.Redis) -> None:
    # Only the literal max-age=0 was read; max-age=5 was ignored (an hour-old answer served).
    clock = FakeClock()
    f = cache(rc, clock)
    h, up = harness(f), Upstream()
    q = chat("What is the boiling point of water?")
    await ask(h, f, up, q)
    clock.advance(10)
    r = await ask(h, f, up, q, headers={"cache-control": "max-age=30"})
    assert r.headers["x-floodwall-cache"] == "hit-exact" and r.headers["age"] == "10"
    r = await ask(h, f, up, q, headers={"cache-control": "max-age=5"})
    assert r.upstream_called and r.headers["x-floodwall-cache"] == "miss"
    r = await ask(h, f, up, q)  # the miss refreshed the entry
    assert r.headers["x-floodwall-cache"] == "hit-exact" and r.headers["age"] == "0"
    for zero in ('max-age="0"', "max-age=00", "Max-Age=0"):
        r = await ask(h, f, up, q, headers={"cache-control": zero})
        assert r.upstream_called, zero
    # A paraphrase: the semantic hit obeys it too (without max-age it is one).
    clock.advance(10)
    plain = await ask(h, f, up, chat("what is the boiling point of water"))
    assert plain.headers["x-floodwall-cache"] == "hit-semantic"
    p = chat("what's the boiling point of water")
    assert (await ask(h, f, up, p, headers={"cache-control": "max-age=5"})).upstream_called


async def test_what_is_never_stored(rc: aioredis.Redis) -> None:
    f = cache(rc, max_request_bytes=2000, max_entry_bytes=500)
    h, up = harness(f), Upstream()

    async def twice(body: bytes, reply: Any = None) -> str:
        for _ in range(2):
            r = await h.request("POST", "/v1/chat/completions", headers={"x-test-tenant": "a"},
                                body=body, upstream=reply or up)  # fmt: skip
            await f.settle()
        return str(r.headers["x-floodwall-cache"])

    # Not looked up at all, and the answer says so.
    assert await twice(chat("x " * 1500)) == "bypass"  # request too large
    assert await twice(chat("hot", temperature=0.7)) == "bypass"  # not deterministic
    assert await twice(chat("stream me", stream=True)) == "bypass"
    # Looked up (a miss) but the answer is not stored.
    big = UpstreamReply(200, {"content-type": "application/json"}, b"[" + b"1," * 400 + b"1]")
    assert await twice(chat("big answer"), big) == "miss"
    for reply in (
        UpstreamReply(503, {}, b'{"error":{}}'),
        UpstreamReply(200, {"cache-control": "no-store"}, b"{}"),
        UpstreamReply(200, {"x-floodwall-degraded": "embedder_int8"}, b"{}"),
    ):
        assert await twice(chat(f"q {reply.status} {sorted(reply.headers)}"), reply) == "miss"
    assert await twice(b"{not json", UpstreamReply(400, {}, b"{}")) == "bypass"


async def test_redis_down_is_a_miss_not_an_error(
    rc: aioredis.Redis, redis_server: RedisServer
) -> None:
    f = cache(rc)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("Is Redis up?"))
    before = ERRORS.labels("redis")._value.get()
    redis_server.kill()
    try:
        r = await ask(h, f, up, chat("Is Redis up?"))
        assert r.status == 200 and r.upstream_called
        assert r.headers["x-floodwall-cache"] == "miss"
        assert ERRORS.labels("redis")._value.get() > before
    finally:
        redis_server.start()


async def test_frozen_redis_costs_at_most_the_budget(
    rc: aioredis.Redis, redis_server: RedisServer
) -> None:
    f = cache(rc, redis_timeout_ms=100)
    h, up = harness(f), Upstream()
    redis_server.freeze()
    try:
        t0 = time.monotonic()
        r = await h.request("POST", "/v1/chat/completions", headers={"x-test-tenant": "a"},
                            body=chat("frozen?"), upstream=up)  # fmt: skip
        assert r.status == 200 and r.upstream_called
        assert time.monotonic() - t0 < 0.5
    finally:
        redis_server.freeze(False)
    await f.settle()


async def test_embedder_down_keeps_exact_hits_and_skips_semantic(rc: aioredis.Redis) -> None:
    emb = WordsEmbedder()
    f = cache(rc, embedder=emb)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("How do I change my email address?"))
    emb.down = True
    before = ERRORS.labels("embedder")._value.get()
    assert (await ask(h, f, up, chat("How do I change my email address?"))).headers[
        "x-floodwall-cache"
    ] == "hit-exact"
    r = await ask(h, f, up, chat("how can I change my email address"))
    assert r.headers["x-floodwall-cache"] == "miss" and r.status == 200
    # The look-up failed, then the store's embedding: the answer is kept for exact repeats.
    assert ERRORS.labels("embedder")._value.get() == before + 2
    assert len(f.index) == 1
    assert (await ask(h, f, up, chat("how can I change my email address"))).headers[
        "x-floodwall-cache"
    ] == "hit-exact"


async def test_concurrent_identical_misses_leave_one_whole_entry(rc: aioredis.Redis) -> None:
    f = cache(rc)
    h = harness(f)
    bodies = [orjson.dumps({"answer": i, "pad": "x" * (100 + i)}) for i in range(12)]

    async def slow(i: int) -> UpstreamReply:
        await asyncio.sleep(0.01 * (i % 4))
        return UpstreamReply(200, {"content-type": "application/json"}, bodies[i])

    await asyncio.gather(*(
        h.request("POST", "/v1/chat/completions", headers={"x-test-tenant": "a"},
                  body=chat("Same question at once"), upstream=lambda _h, _b, i=i: slow(i))
        for i in range(12)
    ))  # fmt: skip
    await f.settle()
    (scope,) = f.index._scopes
    assert await rc.zcard(zset_key(scope)) == 1
    assert len(f.index) == 1
    r = await ask(h, f, Upstream(), chat("Same question at once"))
    assert r.headers["x-floodwall-cache"] == "hit-exact" and r.body in bodies


async def test_embeddings_route_is_exact_only(rc: aioredis.Redis) -> None:
    emb = WordsEmbedder()
    f = cache(rc, embedder=emb)
    h = harness(f)
    reply = UpstreamReply(200, {"content-type": "application/json"}, b'{"data":[]}')
    for text in ("hello world", "hello world", "Hello world!"):
        body = orjson.dumps({"model": "e", "input": text})
        r = await h.request("POST", "/v1/embeddings", headers={"x-test-tenant": "a"},
                            body=body, upstream=reply)  # fmt: skip
        await f.settle()
    assert r.headers["x-floodwall-cache"] == "miss"  # not semantic: exact text only
    assert emb.calls == 0


class _Open:
    """A breaker gate that refuses (the model's breaker is open)."""

    def would_refuse(self, now: float) -> bool:
        return True


async def test_stale_if_error_serves_the_last_answer_when_the_model_fails(
    rc: aioredis.Redis,
) -> None:
    clock = FakeClock()
    f = cache(rc, clock, routes={"chat": {"ttl_s": 60, "stale_if_error_s": 600, "semantic": True}})
    h, up = harness(f), Upstream()
    first = await ask(h, f, up, chat("What are your support hours?"))
    clock.advance(120)  # expired, inside the stale window
    failing = UpstreamReply(503, {"content-type": "application/json", "retry-after": "5",
                                  "x-floodwall-error": "upstream_unavailable"},
                            b'{"error":"down"}')  # fmt: skip
    r = await ask(h, f, failing, chat("What are your support hours?"))  # type: ignore[arg-type]
    assert r.status == 200 and r.body == first.body
    assert r.headers["x-floodwall-cache"] == "stale" and r.headers["age"] == "120"
    # Nothing of the error it replaces: no Retry-After, no error type.
    assert "retry-after" not in r.headers and "x-floodwall-error" not in r.headers
    assert "stale" in r.headers["warning"].lower()
    # A working model refreshes the entry; stale answers are never served fresh.
    r = await ask(h, f, up, chat("What are your support hours?"))
    assert r.headers["x-floodwall-cache"] == "miss" and r.upstream_called
    clock.advance(60 + 600 + 1)  # past the window: the error goes through
    r = await ask(h, f, failing, chat("What are your support hours?"))  # type: ignore[arg-type]
    assert r.status == 503


async def test_stale_answer_while_the_breaker_is_open_skips_the_model(rc: aioredis.Redis) -> None:
    clock = FakeClock()
    f = cache(rc, clock, routes={"chat": {"ttl_s": 60, "stale_if_error_s": 600, "semantic": True}})
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("Is the status page up?"))
    clock.advance(61)
    f.deps.signals.gates["sim-llm"] = _Open()
    r = await ask(h, f, up, chat("Is the status page up?"))
    assert r.headers["x-floodwall-cache"] == "stale" and not r.upstream_called
    assert up.calls == 1


async def test_a_slow_redis_does_not_make_the_index_forget(
    rc: aioredis.Redis, redis_server: RedisServer
) -> None:
    f = cache(rc, redis_timeout_ms=100)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("How do I rename my workspace?"))
    await miss_while_frozen_then_hit(h, f, redis_server, chat("how can I rename my workspace"))


async def miss_while_frozen_then_hit(
    h: Harness, f: CacheFilter, redis_server: RedisServer, para: bytes
) -> None:
    """``para`` misses while Redis is frozen, then hits the entry that is still indexed. The
    answers are ones the cache must not store, so only look-ups touch Redis."""
    uncacheable = UpstreamReply(200, {"cache-control": "no-store"}, b"{}")
    redis_server.freeze()
    try:
        r = await ask(h, f, uncacheable, para)  # type: ignore[arg-type]
        assert r.headers["x-floodwall-cache"] == "miss" and r.status == 200
    finally:
        redis_server.freeze(False)
    r = await ask(h, f, uncacheable, para)  # type: ignore[arg-type]
    assert r.headers["x-floodwall-cache"] == "hit-semantic"


@pytest.mark.parametrize("words_first", [True, False], ids=["by_words", "by_vector"])
async def test_a_slow_redis_while_the_judge_decides_does_not_make_the_index_forget(
    rc: aioredis.Redis, redis_server: RedisServer, words_first: bool
) -> None:
    """With the judge, the candidate's entry is fetched while it is judged: a fetch that
    fails (Redis frozen) is a miss, and the entry stays in the index for the next look-up."""
    judge = {"cut": 0.5, **({"words_first": {"min_overlap": 0.2, "margin": 0.3}}
                            if words_first else {})}  # fmt: skip
    p = CacheFilter.Params.model_validate({
        "routes": {"chat": {"ttl_s": 60, "semantic": True}},
        "semantic": {"threshold": 0.5, "dimensions": 64, "judge": judge},
        "versions_upstream": None, "redis_timeout_ms": 100, "lookup_budget_ms": 5000,
    })  # fmt: skip
    f = CacheFilter(p, Deps(redis=rc, clock=FakeClock()), WordsEmbedder(), RuleJudge())
    f.name = "cache"
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("Can I cancel my order today?"))
    errors = ERRORS.labels("redis")._value.get()
    await miss_while_frozen_then_hit(h, f, redis_server, chat("today can I cancel my order"))
    assert ERRORS.labels("redis")._value.get() >= errors + 2  # the exact key, then the fetch
    await f.settle()


class _RewritesTo502(Filter):
    """As the openai filter does with a 200 whose body it cannot read: a 502 for the client."""

    async def on_response_body(self, ctx: RequestContext, body: bytes) -> Decision:
        err = b'{"error":{"type":"upstream_error","message":"unexpected response"}}'
        return Mutate(set_headers={":status": "502", "content-length": str(len(err))}, body=err)


async def test_an_answer_a_filter_rewrote_to_an_error_is_never_stored(rc: aioredis.Redis) -> None:
    f = cache(rc)
    ident = _Identify(NoParams(), Deps())
    ident.name = "identify"
    bad = _RewritesTo502(NoParams(), Deps())
    bad.name = "rewrites"
    # Response phases run in reverse: the rewrite first, then the cache sees the 502.
    h, up = Harness.for_filters([ident, f, bad], default_config(ROUTES)), Upstream()
    not_200 = STORES.labels("chat", "not_200")._value.get()
    r = await ask(h, f, up, chat("What is GCRA?"))
    assert r.status == 502 and r.headers["x-floodwall-cache"] == "miss"
    assert STORES.labels("chat", "not_200")._value.get() == not_200 + 1
    r = await ask(harness(f), f, up, chat("What is GCRA?"))
    assert r.status == 200 and r.headers["x-floodwall-cache"] == "miss" and up.calls == 2


async def test_a_store_during_invalidation_is_dropped_or_stays_listed(rc: aioredis.Redis) -> None:
    """An answer stored while a scope is being dropped is dropped with it or stays in the
    scope's listing, so the next invalidation finds it: never an entry nothing lists."""
    f = cache(rc)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("What is GCRA?"))
    assert f.store is not None
    drop_batch = f.store._drop
    raced: list[bool] = []

    async def batch_then_a_store(**kwargs: Any) -> Any:
        out = await drop_batch(**kwargs)
        if not raced:  # another request's answer lands right after the first batch
            raced.append(True)
            await ask(h, f, up, chat("What is a token bucket?"))
        return out

    f.store._drop = batch_then_a_store  # type: ignore[method-assign]
    await f.invalidate(tenant="a")
    f.store._drop = drop_batch  # type: ignore[method-assign]
    assert raced
    await f.invalidate(tenant="a")
    assert [k async for k in rc.scan_iter("fw:cache:*:e:*")] == []
    r = await ask(h, f, up, chat("What is a token bucket?"))
    assert r.headers["x-floodwall-cache"] == "miss" and up.calls == 3


async def test_a_refresh_while_the_embedder_is_down_keeps_the_entry_semantic(
    rc: aioredis.Redis,
) -> None:
    """A no-cache refresh stores the new answer; with the embedder down it is written without
    a vector, which must not erase the vector already stored for the same prompt."""
    emb = WordsEmbedder()
    f = cache(rc, embedder=emb)
    h, up = harness(f), Upstream()
    q = chat("How do I add a teammate to my workspace?")
    await ask(h, f, up, q)
    emb.down = True
    r = await ask(h, f, up, q, headers={"cache-control": "no-cache"})
    assert r.headers["x-floodwall-cache"] == "miss" and up.calls == 2
    emb.down = False
    assert await f.rebuild() == 1  # Redis still has the vector (any replica restarting)
    r = await ask(h, f, up, chat("how can I add a teammate to my workspace"))
    assert r.headers["x-floodwall-cache"] == "hit-semantic"
    assert orjson.loads(r.body)["answer"] == 2  # the refreshed answer


async def test_the_feed_follower_survives_what_it_cannot_apply(rc: aioredis.Redis) -> None:
    """A stored vector of another length (the embedder or semantic.dimensions changed) is
    left out and counted; a Redis fault in the middle of an event makes a full rebuild, not
    a skipped entry; the follower keeps running through both."""
    writer64 = cache(rc)
    h64, up = harness(writer64), Upstream()
    await ask(h64, writer64, up, chat("How do I cancel my subscription?"))
    bad = ERRORS.labels("bad_entry")._value.get()
    follower = cache(rc, semantic={"threshold": 0.7, "dimensions": 32},
                     embedder=_Fixed(32))  # fmt: skip
    assert follower.store is not None
    load = follower.store.load
    failed: list[str] = []

    async def flaky(scope: str, ids: list[str]) -> Any:
        out = await load(scope, ids)
        if out and len(ids) == 1 and not failed:  # the feed's add of the entry below
            failed.append(ids[0])
            raise RedisConnectionError("connection lost (test)")
        return out

    follower.store.load = flaky  # type: ignore[method-assign]
    await follower.start()
    try:
        await until(lambda: ERRORS.labels("bad_entry")._value.get() > bad)
        assert len(follower.index) == 0
        writer32 = cache(rc, semantic={"threshold": 0.7, "dimensions": 32}, embedder=_Fixed(32))
        await ask(harness(writer32), writer32, up, chat("Where is my invoice?"))
        # The add failed once; the rebuild after it brings the entry.
        await until(lambda: len(follower.index) == 1, timeout_s=5.0)
        assert failed and all(not t.done() for t in follower._tasks)
    finally:
        await follower.stop()


class _Fixed:
    """An embedder of ``dim`` values, the same vector for every text."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    async def embed(self, text: str) -> np.ndarray[Any, Any]:
        return np.ones(self.dim, dtype=np.float32)

    async def close(self) -> None:
        pass


async def until(check: Any, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_a_look_up_never_outlasts_its_budget(rc: aioredis.Redis) -> None:
    emb = WordsEmbedder()
    f = cache(rc, embedder=emb, lookup_budget_ms=100)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("How do I export invoices as CSV?"))
    emb.delay_s = 2.0  # an embedder stuck far beyond the budget
    before = ERRORS.labels("budget")._value.get()
    t0 = time.monotonic()
    r = await h.request("POST", "/v1/chat/completions", headers={"x-test-tenant": "a"},
                        body=chat("how can I export invoices as CSV"), upstream=up)  # fmt: skip
    assert time.monotonic() - t0 < 0.5
    assert r.status == 200 and r.headers["x-floodwall-cache"] == "miss" and r.upstream_called
    assert ERRORS.labels("budget")._value.get() == before + 1
    emb.delay_s = 0.0
    await f.settle()


async def test_a_rebuild_forgets_what_redis_lost(rc: aioredis.Redis) -> None:
    """A Redis restarted without persistence comes back empty: the next rebuild (the feed
    follower runs one after any Redis error) must not keep serving from the old index."""
    f = cache(rc)
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("What is the cancellation policy?"))
    assert len(f.index) == 1
    await rc.flushall()
    assert await f.rebuild() == 0 and len(f.index) == 0
    r = await ask(h, f, up, chat("what is the cancellation policy"))
    assert r.headers["x-floodwall-cache"] == "miss"


async def test_the_align_verifier_stores_and_compares_token_vectors(
    rc: aioredis.Redis, tmp_path: Any
) -> None:
    # Hand-made align verifier: serve only when every token on both sides has its match.
    w = np.zeros(1 + len(GUARDS) + ALIGN_FEATURES)
    w[1 + len(GUARDS)] = w[2 + len(GUARDS)] = 20.0
    Verifier(threshold=0.5, cut=0.5, weights=w, bias=-19.0, align=True).save(tmp_path / "v.json")
    f = cache(rc, semantic={"threshold": 0.7, "dimensions": 64,
                            "verifier": str(tmp_path / "v.json")})  # fmt: skip
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("where is my march invoice"))
    (key,) = [k async for k in rc.scan_iter("fw:cache:*:e:*")]
    assert len(await rc.hget(key, "k")) == 5 * 64 * 2  # five words, float16
    assert f.store is not None
    gets, get = [], f.store.get

    async def counted(*a: Any) -> Any:
        gets.append(a)
        return await get(*a)

    f.store.get = counted  # type: ignore[method-assign]
    hit = await ask(h, f, up, chat("my march invoice is where"))
    assert hit.headers["x-floodwall-cache"] == "hit-semantic"
    # One entry read, the exact look-up: the answer came with the candidates' token vectors.
    assert len(gets) == 1
    before = VETOES.labels("verifier")._value.get()
    other = await ask(h, f, up, chat("where is my april invoice"))
    assert other.headers["x-floodwall-cache"] == "miss"
    assert VETOES.labels("verifier")._value.get() == before + 1

    async def broken(*_: Any) -> Any:
        raise RedisConnectionError("gone (test)")

    f.store.tokens = broken  # type: ignore[method-assign]
    errors = ERRORS.labels("redis")._value.get()
    lost = await ask(h, f, up, chat("invoice march my where is"))
    assert lost.status == 200 and lost.headers["x-floodwall-cache"] == "miss"
    assert ERRORS.labels("redis")._value.get() == errors + 1


class RuleJudge:
    """A judge that calls a pair the same unless its words differ by one from ``refuse``;
    records what it was asked; ``down`` makes it fail like a dead Triton model."""

    def __init__(self, refuse: tuple[str, ...] = ("not",)) -> None:
        self.asked: list[tuple[str, str]] = []
        self.refuse = refuse
        self.down = False

    async def same_answer(self, cached: str, asked: str) -> float:
        self.asked.append((cached, asked))
        if self.down:
            raise JudgeError("judge unreachable (test)")
        differ = set(_words(cached)) ^ set(_words(asked))
        return 0.1 if differ & set(self.refuse) else 0.9

    async def close(self) -> None:
        pass


async def test_the_judge_decides_the_nearest_candidate_and_its_outage_is_a_miss(
    rc: aioredis.Redis,
) -> None:
    judge = RuleJudge()
    p = CacheFilter.Params.model_validate({
        "routes": {"chat": {"ttl_s": 60, "semantic": True}},
        "semantic": {"threshold": 0.5, "dimensions": 64, "judge": {"cut": 0.5}},
        "versions_upstream": None, "redis_timeout_ms": 2000, "lookup_budget_ms": 5000,
    })  # fmt: skip
    f = CacheFilter(p, Deps(redis=rc, clock=FakeClock()), WordsEmbedder(), judge)
    f.name = "cache"
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("Can I cancel my order today?"))
    hit = await ask(h, f, up, chat("today can I cancel my order"))
    assert hit.headers["x-floodwall-cache"] == "hit-semantic"
    # Asked once, cached prompt first: the order the judge was trained in.
    assert judge.asked == [("Can I cancel my order today?", "today can I cancel my order")]
    vetoes = VETOES.labels("judge")._value.get()
    trap = await ask(h, f, up, chat("Can I not cancel my order today?"))
    assert trap.headers["x-floodwall-cache"] == "miss" and trap.status == 200
    assert VETOES.labels("judge")._value.get() == vetoes + 1
    # The same question asked again (case, end punctuation) needs no judge.
    judge.asked.clear()
    again = await ask(h, f, up, chat("can i cancel my order today"))
    assert again.headers["x-floodwall-cache"] == "hit-semantic" and judge.asked == []
    judge.down = True
    errors = ERRORS.labels("judge")._value.get()
    lost = await ask(h, f, up, chat("my order: can I cancel it today?"))
    assert lost.status == 200 and lost.headers["x-floodwall-cache"] == "miss"
    assert ERRORS.labels("judge")._value.get() == errors + 1
    await f.settle()


async def test_words_first_judges_the_word_candidate_before_embedding(rc: aioredis.Redis) -> None:
    """semantic.judge.words_first: a prompt that clearly shares most words with a cached one
    is a hit on the judge's word alone, without embedding it; a refusal goes on to the
    embedding and is not asked about the same pair twice; a judge outage is a miss."""
    judge = RuleJudge()
    p = CacheFilter.Params.model_validate({
        "routes": {"chat": {"ttl_s": 60, "semantic": True}},
        "semantic": {"threshold": 0.5, "dimensions": 64,
                     "judge": {"cut": 0.5, "words_first": {"min_overlap": 0.2, "margin": 0.3}}},
        "versions_upstream": None, "redis_timeout_ms": 2000, "lookup_budget_ms": 5000,
    })  # fmt: skip
    embedder = WordsEmbedder()
    f = CacheFilter(p, Deps(redis=rc, clock=FakeClock()), embedder, judge)
    f.name = "cache"
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat("Can I cancel my order today?"))
    await ask(h, f, up, chat("Where is my invoice for March?"))
    embedded = embedder.calls
    found = SEMANTIC_HITS.labels("words")._value.get()
    hit = await ask(h, f, up, chat("today can I cancel the order"))
    assert hit.headers["x-floodwall-cache"] == "hit-semantic"
    assert orjson.loads(hit.body)["answer"] == 1 and up.calls == 2
    assert judge.asked == [("Can I cancel my order today?", "today can I cancel the order")]
    assert embedder.calls == embedded  # found by its words: never embedded
    assert SEMANTIC_HITS.labels("words")._value.get() == found + 1
    # A trap shares the words too: the judge refuses it, the look-up embeds the prompt, and
    # the nearest by vector (the same entry) is not asked about again.
    judge.asked.clear()
    trap = await ask(h, f, up, chat("Can I not cancel my order today?"))
    assert trap.headers["x-floodwall-cache"] == "miss" and up.calls == 3
    assert judge.asked == [("Can I cancel my order today?", "Can I not cancel my order today?")]
    assert embedder.calls > embedded
    judge.down = True
    errors = ERRORS.labels("judge")._value.get()
    lost = await ask(h, f, up, chat("my invoice for March: where is it?"))
    assert lost.status == 200 and lost.headers["x-floodwall-cache"] == "miss"
    assert ERRORS.labels("judge")._value.get() == errors + 1


ORDER = "Can I cancel my order today?"
PARCEL = "Where is the parcel I ordered last week?"
# Shares 2 of 8 content words with ORDER (0.25) and 3 of 8 with PARCEL: no clear candidate
# (margin 0.3), PARCEL the guess; by vector (below) ORDER is the nearest.
PLACED = "I placed an order last week and want to cancel it, possible?"
# 2 of 6 with ORDER, 1 of 8 with PARCEL: no clear candidate, ORDER the guess and the nearest.
STOP = "I want to stop an order placed today"


class GatedEmbedder:
    """Fixed vectors by text; with ``gate`` set, answers only once it is set (by the judge
    being asked), as if it were slower than the judge: a look-up that asks the judge only
    after embedding fails to embed (a miss)."""

    def __init__(self) -> None:
        self.vectors = {ORDER: (1.0, 0.0, 0.0), PARCEL: (0.6, 0.8, 0.0), PLACED: (0.9, 0.3, 0.3),
                        STOP: (1.0, 0.1, 0.0)}  # fmt: skip
        self.gate: asyncio.Event | None = None

    async def embed(self, text: str) -> np.ndarray[Any, Any]:
        if self.gate is not None:
            try:
                await asyncio.wait_for(self.gate.wait(), 1.0)
            except TimeoutError:
                raise EmbedderError("the judge was not asked during the embedding") from None
        v = np.zeros(64, dtype=np.float32)
        v[:3] = self.vectors.get(text, (0.0, 0.0, 1.0))
        return v / np.linalg.norm(v)

    async def close(self) -> None:
        pass


class GateJudge(RuleJudge):
    """Opens the embedder's gate when asked; fails on the cached prompts in ``fail_on``."""

    def __init__(self, embedder: GatedEmbedder) -> None:
        super().__init__()
        self.embedder = embedder
        self.fail_on: set[str] = set()

    async def same_answer(self, cached: str, asked: str) -> float:
        if self.embedder.gate is not None:
            self.embedder.gate.set()
        if cached in self.fail_on:
            self.asked.append((cached, asked))
            raise JudgeError("judge unreachable (test)")
        return await super().same_answer(cached, asked)


def speculation() -> dict[str, float]:
    return {o: SPECULATIONS.labels(o)._value.get() for o in ("used", "wasted", "skipped")}


async def test_speculation_judges_the_words_guess_while_the_prompt_is_embedded(
    rc: aioredis.Redis,
) -> None:
    """words_first.speculate: with no clear word candidate, the one sharing the most words is
    judged during the embedding; its answer decides only if it is the nearest by vector (the
    verdicts are those without speculation); a wrong or failed guess costs nothing else;
    past max_in_flight the look-up embeds first, as without speculation."""
    embedder = GatedEmbedder()
    judge = GateJudge(embedder)
    p = CacheFilter.Params.model_validate({
        "routes": {"chat": {"ttl_s": 60, "semantic": True}},
        "semantic": {"threshold": 0.5, "dimensions": 64, "judge": {
            "cut": 0.5, "words_first": {"min_overlap": 0.2, "margin": 0.3,
                                        "speculate": {"min_overlap": 0.1, "max_in_flight": 1}}}},
        "versions_upstream": None, "redis_timeout_ms": 2000, "lookup_budget_ms": 5000,
        "alias_semantic_hits": False,
    })  # fmt: skip
    f = CacheFilter(p, Deps(redis=rc, clock=FakeClock()), embedder, judge)
    f.name = "cache"
    h, up = harness(f), Upstream()
    await ask(h, f, up, chat(ORDER))  # answer 1

    # The only entry is the guess and the nearest: judged once, during the embedding.
    before = speculation()
    embedder.gate = asyncio.Event()
    hit = await ask(h, f, up, chat(PLACED))
    assert hit.headers["x-floodwall-cache"] == "hit-semantic" and up.calls == 1
    assert judge.asked == [(ORDER, PLACED)]
    assert speculation() == {**before, "used": before["used"] + 1}

    # PARCEL shares more words, ORDER is nearer: the guess is judged, then the nearest is.
    embedder.gate = None
    fresh = {"cache-control": "no-cache"}  # stored without a look-up (it would hit ORDER)
    await ask(h, f, up, chat(PARCEL), headers=fresh)  # answer 2
    judge.asked.clear()
    before = speculation()
    embedder.gate = asyncio.Event()
    hit = await ask(h, f, up, chat(PLACED))
    assert hit.headers["x-floodwall-cache"] == "hit-semantic"
    assert orjson.loads(hit.body)["answer"] == 1 and up.calls == 2
    assert judge.asked == [(PARCEL, PLACED), (ORDER, PLACED)]
    assert speculation() == {**before, "wasted": before["wasted"] + 1}

    # The wrong guess fails: wasted, no judge error counted, the nearest still decides.
    judge.fail_on = {PARCEL}
    errors = ERRORS.labels("judge")._value.get()
    before = speculation()
    embedder.gate = asyncio.Event()
    hit = await ask(h, f, up, chat(PLACED))
    assert hit.headers["x-floodwall-cache"] == "hit-semantic"
    assert ERRORS.labels("judge")._value.get() == errors
    assert speculation() == {**before, "wasted": before["wasted"] + 1}
    # The right guess fails: used, a judge error and a miss, as without speculation.
    judge.fail_on = {ORDER}
    before = speculation()
    embedder.gate = asyncio.Event()
    lost = await ask(h, f, up, chat(STOP))
    assert lost.status == 200 and lost.headers["x-floodwall-cache"] == "miss"
    assert ERRORS.labels("judge")._value.get() == errors + 1
    assert speculation() == {**before, "used": before["used"] + 1}

    # At the cap, no guess: the embedding first (the gate never opens: a miss).
    judge.fail_on = set()
    judge.asked.clear()
    busy = asyncio.get_running_loop().create_future()
    f._speculating.add(busy)
    before = speculation()
    embedder.gate = asyncio.Event()
    miss = await ask(h, f, up, chat(PLACED))
    assert miss.headers["x-floodwall-cache"] == "miss" and judge.asked == []
    assert speculation() == {**before, "skipped": before["skipped"] + 1}
    f._speculating.discard(busy)
    busy.cancel()
