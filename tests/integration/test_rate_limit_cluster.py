"""The rate_limit filter unchanged against a local 3-master Redis Cluster of Debian's
redis-server: a request's per-key and per-tenant keys share the tenant's hash slot (one atomic
script), a global limit lives in its own slot, and a refusal in one slot gives back what the
other slot granted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from tests.integration.test_rate_limit_redis import call, harness, limiter, per_key

pytestmark = pytest.mark.integration


async def test_limits_on_a_cluster_are_exact_and_all_or_nothing(crc: Any) -> None:
    f = limiter(
        crc,
        per_key(rate=1, burst=3, period="1h"),
        {"name": "per_tenant", "key": ["tenant"], "rate": 1, "burst": 100, "period": "1h"},
        {"name": "everyone", "key": [], "rate": 1, "burst": 7, "period": "1h"},
        local_deny_cache=False,
        response_headers=True,
    )
    assert f.cluster
    h = harness(f)
    # Three keys: each has 3, all together 7 (the global limit).
    results = await asyncio.gather(*(call(h, key=k) for k in ["a", "b", "c"] * 4))
    assert sum(r.status == 200 for r in results) == 7
    # Keys spread over the masters: the nodes really hold them in different slots.
    keys = [k for node in crc.get_primaries() for k in await crc.keys("fw:rl:*", target_nodes=node)]
    slots = {key_slot(k) for k in keys}
    assert len(slots) >= 2
    # Refusals by "everyone" gave back the per-key and per-tenant units they had taken:
    # per_tenant shows exactly what was admitted for that tenant, not what was attempted.
    sent = ["a", "b", "c"] * 4
    admitted = {k: sum(r.status == 200 for r, kk in zip(results, sent, strict=True) if kk == k)
                for k in "abc"}  # fmt: skip
    g = limiter(crc, {"name": "per_tenant", "key": ["tenant"], "rate": 1, "burst": 100,
                     "period": "1h"}, response_headers=True)  # fmt: skip
    r = await call(harness(g), key="a")
    assert f'"per_tenant";r={100 - admitted["a"] - 1};' in r.headers["ratelimit"]


async def test_cluster_script_cache_is_loaded_on_every_master(crc: Any) -> None:
    await crc.execute_command("SCRIPT FLUSH", target_nodes=aioredis.RedisCluster.PRIMARIES)
    h = harness(limiter(crc, per_key(rate=5, burst=5)))
    results = [await call(h, key=f"key{i}") for i in range(30)]  # tenants on all masters
    assert all(r.status == 200 for r in results)
    stats = await crc.info("commandstats", target_nodes=aioredis.RedisCluster.PRIMARIES)
    loads = [s.get("cmdstat_script|load", {}).get("calls", 0) for s in stats.values()]
    assert all(n >= 1 for n in loads), f"SCRIPT LOAD per master: {loads}"


async def test_noscript_on_one_master_runs_no_other_call_twice(crc: Any) -> None:
    """A failover empties one master's script cache. The calls of the same pipeline that ran
    on the other masters must not run again: the per-key unit would be taken twice."""
    from filters.rate_limit.filter import _short

    f = limiter(
        crc,
        per_key(rate=1, burst=10, period="1h"),
        {"name": "everyone", "key": [], "rate": 1, "burst": 100, "period": "1h"},
        local_deny_cache=False,
        response_headers=True,
    )
    h = harness(f)
    flushed = crc.get_node_from_key("{everyone}")
    key = next(
        k for k in (f"key{i}" for i in range(100))
        if crc.get_node_from_key(f"{{{_short('t-' + k)}}}") != flushed
    )  # fmt: skip
    assert (await call(h, key=key)).status == 200  # the script is on both masters now
    await crc.execute_command("SCRIPT FLUSH", target_nodes=flushed)
    r = await call(h, key=key)
    assert r.status == 200
    assert '"per_key";r=8;' in r.headers["ratelimit"]  # two requests, two units
    assert '"everyone";r=98;' in r.headers["ratelimit"]
