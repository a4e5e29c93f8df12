"""The cache unchanged against a local 3-master Redis Cluster: an entry's keys share its
scope's hash slot (one atomic store script), while the scope registry and the change feed
live in slots of their own; exact and semantic hits, a replica following the feed,
invalidation and a rebuild all work across the nodes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.crc import key_slot

from filters.cache.store import FEED, SCOPES, entry_key, zset_key
from tests.integration.test_cache_redis import Upstream, ask, cache, chat, harness

# Marked slow, so outside the default run, for a reason not yet found: this test passes on
# its own (`pytest -m slow tests/integration/test_cache_cluster.py`, ~4 s) and after the other
# integration tests, but a run of tests/e2e followed by it in one process hung (once in three
# tries on 2026-11-22; output buffering hid whether in this test or the last e2e test). The
# cluster fixture now waits for every node to be up, which a CI failure elsewhere needed.
# Session 25 ran `pytest -m "e2e or slow" tests/e2e tests/integration/test_cache_cluster.py`
# six times in a row: all passed (109 tests, ~4.3 min each); the hang did not come back.
# pytest-timeout (600 s) would now print every thread's stack if it did.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_cache_on_a_cluster(crc: Any) -> None:
    a, b = cache(crc), cache(crc)
    await b.start()
    try:
        h, up = harness(a), Upstream()
        await ask(h, a, up, chat("How do I add a teammate to my workspace?"))
        (scope,) = a.index._scopes
        assert key_slot(entry_key(scope, "x").encode()) == key_slot(zset_key(scope).encode())
        slots = {key_slot(k.encode()) for k in (zset_key(scope), SCOPES, FEED)}
        assert len(slots) > 1  # the test spans slots, as a real deployment does

        r = await ask(h, a, up, chat("How do I add a teammate to my workspace?"))
        assert r.headers["x-floodwall-cache"] == "hit-exact"
        r = await ask(h, a, up, chat("how can I add a teammate to my workspace"))
        assert r.headers["x-floodwall-cache"] == "hit-semantic"

        hb = harness(b)
        deadline = time.monotonic() + 1.0
        while scope not in b.index._scopes:
            assert time.monotonic() < deadline, "the replica did not follow the feed"
            await asyncio.sleep(0.05)
        r = await ask(hb, b, up, chat("how can I add a teammate to my workspace"))
        assert r.headers["x-floodwall-cache"] == "hit-semantic"

        assert await cache(crc).rebuild() == 1
        dropped = await a.invalidate(tenant="a")
        # The question and the paraphrase's own key (alias_semantic_hits, session 19).
        assert dropped == {"scopes": 1, "entries": 2}
        r = await ask(h, a, up, chat("How do I add a teammate to my workspace?"))
        assert r.headers["x-floodwall-cache"] == "miss"
    finally:
        await b.stop()
