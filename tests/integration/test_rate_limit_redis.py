"""The rate_limit filter against a real redis-server: the Lua script agrees with the Python
arithmetic, limits are exact across filter instances (replicas), tokens are reserved and
settled, smoothing waits, and Redis dying, freezing and coming back under both failure modes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from filters.openai.filter import OpenAIFilter
from filters.rate_limit import gcra
from filters.rate_limit.filter import REDIS_ERRORS, REDIS_UP, RateLimitFilter
from proxy.api import CONTINUE, Deps, Filter, RequestContext
from proxy.testing import FakeClock, Harness, UpstreamReply, default_config
from tests.helpers import RedisServer, sim_llm_answer

pytestmark = pytest.mark.integration

_made: list[RateLimitFilter] = []


@pytest.fixture(autouse=True)
async def _stop_limiters() -> AsyncIterator[None]:
    """Stops the filters a test made: each holds its own connection to Redis."""
    yield
    while _made:
        await _made.pop().stop()


def limiter(rc: Any, *limits: dict[str, Any], clock: Any = None, **params: Any) -> RateLimitFilter:
    p = RateLimitFilter.Params.model_validate({"limits": list(limits), **params})
    f = RateLimitFilter(p, Deps(redis=rc, clock=clock or FakeClock()))
    f.name = "rate_limit"
    _made.append(f)
    return f


def per_key(rate: float = 5, burst: float | None = None, **kw: Any) -> dict[str, Any]:
    return {"name": "per_key", "key": ["key_id"], "rate": rate, "burst": burst, **kw}


async def call(h: Harness, key: str = "k1", path: str = "/v2/models/m/infer", **kw: Any) -> Any:
    return await h.request("POST", path, headers={"x-test-key": key}, body=b"{}", **kw)


class _Identify(Filter):
    """Stands in for auth: the key id comes from a test header."""

    async def on_request_headers(self, ctx: RequestContext, headers: dict[str, str]) -> Any:
        ctx.key_id = headers.get("x-test-key")
        ctx.tenant = "t-" + (ctx.key_id or "")
        return CONTINUE


def harness(*filters: Filter, openai: OpenAIFilter | None = None) -> Harness:
    from proxy.api import NoParams

    ident = _Identify(NoParams(), Deps())
    ident.name = "identify"
    chain = [ident, *([openai] if openai else []), *filters]
    return Harness.for_filters(chain, default_config(ROUTES))


ROUTES = [
    {"name": "chat", "match": {"path": "/v1/chat/completions"}, "api": "openai_chat",
     "upstream": "up"},
    {"name": "kserve_http", "match": {"prefix": "/v2"}, "upstream": "up"},
]  # fmt: skip


# --- the script is the Python arithmetic -----------------------------------------------------


async def test_lua_script_matches_python_arithmetic(rc: aioredis.Redis) -> None:
    """Random takes and adjusts at pinned instants give identical verdicts and TATs."""
    from filters.rate_limit.store import LUA

    await rc.script_load(LUA)
    rng = random.Random(7)
    rules = [gcra.Rule.of(10, 1, 5), gcra.Rule.of(100, 60, 20), gcra.Rule.of(3, 1, 1),
             gcra.Rule.of(7e6, 60, 20, exact=True)]  # fractional T (8.57 us)  # fmt: skip
    keys = ["fw:t:a", "fw:t:b", "fw:t:c", "fw:t:d"]
    model: dict[str, float | None] = dict.fromkeys(keys)
    now = 1_700_000_000_000_000
    for step in range(400):
        now += rng.choice([0, 0, 1_000, 37_000, 150_000, 2_000_000])
        if rng.random() < 0.8:
            takes = [gcra.Take(r, rng.choice([1, 1, 2, 3]), rng.choice([0, 0, 300_000]))
                     for r in rules]  # fmt: skip
            nums = []
            for t in takes:
                nums += [repr(t.rule.interval_us), repr(t.rule.tolerance_us), repr(t.cost),
                         repr(t.max_wait_us)]  # fmt: skip
            raw = await _pinned(rc, keys, str(now), 1, "take", 4, *nums)
            reply = [int(x) for x in raw[1:]]
            expect = gcra.take([_live(model[k], now) for k in keys], takes, now)
            assert bool(reply[0]) == expect.allowed, step
            got = gcra.from_reply(reply[0] == 1, now, reply[1:], takes)
            assert got.tats == expect.tats and got.waits_us == expect.waits_us, step
            if expect.allowed:
                model.update(zip(keys, expect.tats, strict=True))
        else:
            deltas = [rng.choice([-3, -1, 1, 2]) for _ in keys]
            nums = []
            for r, d in zip(rules, deltas, strict=True):
                nums += [repr(r.interval_us), repr(float(d))]
            await _pinned(rc, keys, str(now), 1, "adjust", 4, *nums)
            for k, r, d in zip(keys, rules, deltas, strict=True):
                model[k] = gcra.adjust(_live(model[k], now), r, d, now)


async def test_one_script_call_serves_a_batch_of_requests(rc: aioredis.Redis) -> None:
    """Requests in one call are each all-or-nothing, in order: the second is refused (its
    second key is full) and writes nothing; the third, on fresh keys, passes."""
    from filters.rate_limit.store import LUA, SHA

    await rc.script_load(LUA)
    r = gcra.Rule.of(1, 3600, 1)
    n = [repr(r.interval_us), repr(r.tolerance_us), "1.0", "0.0"]
    raw = await rc.evalsha(
        SHA, 5, "k:a", "k:b", "k:a", "k:c", "k:d", "", 3,
        "take", 1, *n,  "take", 2, *n, *n,  "take", 2, *n, *n,
    )  # fmt: skip
    assert [int(x) for x in raw[1:2]] == [1]  # first request granted
    assert int(raw[3]) == 0  # second refused (k:a is taken) ...
    assert await rc.get("k:b") is None  # ... and wrote nothing
    assert int(raw[6]) == 1  # third granted


@pytest.mark.parametrize(
    ("rate", "period_s", "burst"), [(3, 1, 3), (3, 1, 1), (7, 60, 7), (7, 60, 1), (6, 1, 4)]
)
async def test_the_script_admits_a_whole_burst_from_idle(
    rc: aioredis.Redis, rate: float, period_s: float, burst: float
) -> None:
    """At one pinned instant: exactly ``burst`` units, whatever fraction of a microsecond
    T = period / rate has (rate 3 with burst 3 admitted 2, with burst 1 none)."""
    from filters.rate_limit.store import LUA, SHA

    await rc.script_load(LUA)
    r = gcra.Rule.of(rate, period_s, burst)
    n = [repr(r.interval_us), repr(r.tolerance_us), "1.0", "0.0"]
    now = str(1_700_000_000_000_000)
    granted = [int((await rc.evalsha(SHA, 1, "k:one", now, 1, "take", 1, *n))[1])
               for _ in range(int(burst) + 2)]  # fmt: skip
    assert granted == [1] * int(burst) + [0, 0]
    whole = [repr(r.interval_us), repr(r.tolerance_us), repr(float(burst)), "0.0"]
    assert int((await rc.evalsha(SHA, 1, "k:whole", now, 1, "take", 1, *whole))[1]) == 1


@pytest.mark.parametrize(
    "limit",
    [
        {"rate": 3, "burst": 1},
        {"rate": 7, "period": "1m", "burst": 1},
        {"rate": 6, "burst": 4, "cost": 4},
    ],
)
async def test_a_limit_whose_burst_is_one_request_admits_it(
    rc: aioredis.Redis, limit: dict[str, Any]
) -> None:
    """burst == cost on Redis' own clock: one request from idle, then a refusal."""
    h = harness(limiter(rc, per_key(**limit), local_deny_cache=False))
    assert [(await call(h)).status for _ in range(2)] == [200, 429]


async def _pinned(rc: aioredis.Redis, keys: list[str], *args: Any) -> Any:
    """Runs the script at a pinned instant and drops the keys' expiry in the same transaction.
    The script sets a TTL of the TAT's distance from the pinned now, as little as 2 ms of
    Redis' real clock: on a slow host the keys expired between steps (seen in CI) while the
    model, which only knows pinned time, still held them."""
    from filters.rate_limit.store import SHA

    async with rc.pipeline(transaction=True) as pipe:
        pipe.evalsha(SHA, len(keys), *keys, *args)
        for k in keys:
            pipe.persist(k)
        return (await pipe.execute())[0]


def _live(tat: float | None, now: float) -> float | None:
    # The model forgets a TAT once it has passed, as Redis' expiry would (the arithmetic,
    # script and Python alike, treats an old TAT and no TAT alike: no verdict changes).
    return tat if tat is not None and tat > now else None


# --- limits, headers, all-or-nothing ---------------------------------------------------------


async def test_burst_then_refusal_with_headers(rc: aioredis.Redis) -> None:
    h = harness(limiter(rc, per_key(rate=1, burst=3, period="1m"), response_headers=True))
    ok = [await call(h) for _ in range(3)]
    assert [r.status for r in ok] == [200, 200, 200]
    assert ok[0].headers["ratelimit-policy"] == '"per_key";q=1;w=60'
    assert ok[0].headers["ratelimit"].startswith('"per_key";r=2;')
    assert ok[2].headers["ratelimit"].startswith('"per_key";r=0;')
    denied = await call(h)
    assert denied.status == 429
    assert denied.json()["error"]["type"] == "rate_limited"
    assert 1 <= int(denied.headers["retry-after"]) <= 60
    assert denied.headers["ratelimit"].startswith('"per_key";r=0;t=')
    # Another key has its own budget.
    assert (await call(h, key="k2")).status == 200


async def test_denied_request_consumes_nothing_from_any_limit(rc: aioredis.Redis) -> None:
    """per_key allows 2 a minute; per_tenant 100. Refusals by per_key must not eat into
    per_tenant: after 10 refused calls the tenant's budget is still 98."""
    f = limiter(
        rc,
        per_key(rate=2, burst=2, period="1m"),
        {"name": "per_tenant", "key": ["tenant"], "rate": 100, "period": "1m"},
        local_deny_cache=False,
        response_headers=True,
    )
    h = harness(f)
    assert [(await call(h)).status for _ in range(12)] == [200, 200] + [429] * 10
    tenant_state = (await call(h)).headers["ratelimit"]
    assert '"per_tenant";r=98;' in tenant_state


async def test_two_replicas_share_one_exact_limit(rc: aioredis.Redis) -> None:
    """Two filter instances (two processors) and one Redis: 20 admitted in total, not 40."""
    a, b = (
        harness(limiter(rc, per_key(rate=1, burst=20, period="1h"))),
        harness(limiter(rc, per_key(rate=1, burst=20, period="1h"))),
    )
    results = await asyncio.gather(*(call(h) for h in [a, b] * 30))
    assert sum(r.status == 200 for r in results) == 20
    assert sum(r.status == 429 for r in results) == 40


async def test_local_deny_cache_spares_redis_and_never_admits_more(rc: aioredis.Redis) -> None:
    f = limiter(rc, per_key(rate=1, burst=2, period="1h"))
    h = harness(f)
    statuses = [(await call(h)).status for _ in range(50)]
    assert statuses == [200, 200] + [429] * 48
    info = await rc.info("commandstats")
    # 2 grants and the first refusal went to Redis; the other 47 refusals stayed local.
    assert info["cmdstat_evalsha"]["calls"] <= 3


async def test_concurrent_checks_share_round_trips(rc: aioredis.Redis) -> None:
    f = limiter(rc, per_key(rate=1000, burst=1000))
    assert f.store is not None
    h = harness(f)
    results = await asyncio.gather(*(call(h, key=f"k{i}") for i in range(200)))
    assert all(r.status == 200 for r in results)
    # One script call serves a whole batch of requests.
    calls = (await rc.info("commandstats"))["cmdstat_evalsha"]["calls"]
    assert f.store.round_trips == calls <= 10, f"200 checks took {calls} round trips"


# --- leases ----------------------------------------------------------------------------------


def everyone(burst: float = 400, share: float = 0.05, **kw: Any) -> dict[str, Any]:
    """One limit across all callers, leased: each replica may hold ``share`` of the burst."""
    return {"name": "everyone", "key": [], "rate": 1, "period": "1h", "burst": burst,
            "lease_share": share, **kw}  # fmt: skip


async def _units_in_redis(rc: aioredis.Redis, f: RateLimitFilter, name: str) -> float:
    """Units a limit's (only) key holds in Redis: (TAT - now) / T."""
    keys = await rc.keys(f"fw:rl:*:{name}:*")
    assert len(keys) == 1
    tat = int(await rc.get(keys[0]))
    sec, usec = await rc.time()
    lim = next(lim for lim in f.limits if lim.spec.name == name)
    return (tat - (sec * 1_000_000 + usec)) / lim.rule.interval_us


def _lease(f: RateLimitFilter, name: str = "everyone") -> Any:
    lim = next(lim for lim in f.limits if lim.spec.name == name)
    assert lim.leases is not None
    return lim.leases


async def test_leases_spare_redis_and_every_admission_is_counted_there(
    rc: aioredis.Redis,
) -> None:
    f = limiter(rc, everyone(burst=100_000, share=0.01))
    assert f.store is not None
    h = harness(f)
    statuses = [(await call(h, key=f"k{i % 7}")).status for i in range(1000)]
    assert statuses == [200] * 1000
    assert f.store.round_trips <= 40, f"1000 checks took {f.store.round_trips} round trips"
    # Redis counted every admitted request (most as part of a lease), and besides them at
    # most what this replica holds, never above its cap (1% of 100,000).
    in_redis = await _units_in_redis(rc, f, "everyone")
    held = _lease(f).held()
    assert in_redis - held == _Between(999.9, 1000.01)
    assert held <= 1000


async def test_leased_limit_stays_exact_across_three_replicas(rc: aioredis.Redis) -> None:
    """A limit of 400 (per hour) leased by three replicas, 30 clients, 900 calls: never more
    than 400 admitted, and the shortfall at most the three replicas' lease caps (20 each).
    Past half the burst no lease is granted: the rest is checked per request."""
    from filters.rate_limit.filter import DECISIONS

    used = DECISIONS.labels("everyone", "leased")
    used_before = used._value.get()
    filters = [limiter(rc, everyone(burst=400, share=0.05)) for _ in range(3)]
    hs = [harness(f) for f in filters]

    async def client(h: Harness) -> list[Any]:  # 10 per replica, 30 calls each
        return [await call(h, key=f"k{i}") for i in range(30)]

    per_client = await asyncio.gather(*(client(h) for h in hs for _ in range(10)))
    results = [r for rs in per_client for r in rs]
    admitted = sum(r.status == 200 for r in results)
    assert 400 - 3 * 20 <= admitted <= 400
    assert used._value.get() - used_before >= 20  # leases did serve some of them
    assert all(r.status in (200, 429) for r in results)
    assert sum(_lease(f).held() for f in filters) <= 3 * 20
    assert await _units_in_redis(rc, filters[0], "everyone") <= 400.01


async def test_expired_lease_units_are_lost_never_given_back(rc: aioredis.Redis) -> None:
    clock = FakeClock()
    f = limiter(rc, everyone(), clock=clock)
    h = harness(f)
    assert (await call(h)).status == 200  # checked in Redis; a first lease of 4 rides along
    await asyncio.sleep(0.01)
    assert _lease(f).held() == 4
    in_redis = await _units_in_redis(rc, f, "everyone")
    assert in_redis == _Between(4.99, 5.01)
    clock.advance(0.2)  # past lease_ms (100 ms)
    assert (await call(h)).status == 200
    await asyncio.sleep(0.01)
    # The 4 unused units expired here; Redis still counts them (a later refund could re-grant
    # capacity that already drained): 5 + this request + its new lease of 4.
    assert await _units_in_redis(rc, f, "everyone") == _Between(9.99, 10.01)


async def test_a_refused_request_gives_its_leased_units_back(rc: aioredis.Redis) -> None:
    f = limiter(rc, everyone(), per_key(rate=1, burst=2, period="1h"), local_deny_cache=False,
                response_headers=True)  # fmt: skip
    h = harness(f)
    first = await call(h)
    await asyncio.sleep(0.01)
    second = await call(h)  # "everyone" from the lease, per_key in Redis
    assert (first.status, second.status) == (200, 200)
    assert _lease(f).held() == 3
    # Served from the lease, the response still carries both limits' state.
    assert '"everyone";r=' in second.headers["ratelimit"]
    assert '"per_key";r=0;' in second.headers["ratelimit"]
    refused = await call(h)
    assert refused.status == 429
    assert _lease(f).held() == 3  # per_key refused: the leased unit came back


# --- smoothing -------------------------------------------------------------------------------


async def test_max_wait_holds_requests_instead_of_refusing(rc: aioredis.Redis) -> None:
    clock = FakeClock()
    h = harness(limiter(rc, per_key(rate=10, burst=1, max_wait_ms=500), clock=clock))
    results = [await call(h) for _ in range(5)]
    assert all(r.status == 200 for r in results)
    # Each of the 4 after the first waits for its slot, 0.1 s apart in Redis time.
    assert len(clock.slept) == 4 and all(0 < s <= 0.5 for s in clock.slept)
    assert clock.slept == sorted(clock.slept)


async def test_client_gone_while_waiting_gives_the_slot_back(rc: aioredis.Redis) -> None:
    from proxy.api import SystemClock

    f = limiter(rc, per_key(rate=1, burst=1, period="1s", max_wait_ms=5000), clock=SystemClock())
    h = harness(f)
    assert (await call(h)).status == 200
    waiting = asyncio.ensure_future(call(h))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # held for its turn (about 1 s)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.05)  # on_complete's refund
    t0 = time.monotonic()
    assert (await call(h)).status == 200
    # Had the cancelled request kept its slot, this one would wait about 2 s.
    assert time.monotonic() - t0 < 1.5


# --- tokens ----------------------------------------------------------------------------------


def _openai() -> OpenAIFilter:
    p = OpenAIFilter.Params.model_validate(
        {"chat_models": {"sim-llm": {"triton_model": "sim_llm", "default_max_tokens": 50}}}
    )
    f = OpenAIFilter(p, Deps())
    f.name = "openai"
    return f


def _sim_llm_reply(prompt_tokens: int, completion_tokens: int) -> UpstreamReply:
    return sim_llm_answer(prompt_tokens, completion_tokens, "ok")


TOKENS_LIMIT = {"name": "tokens", "key": ["tenant", "model"], "unit": "tokens", "rate": 1000,
                "period": "1h"}  # fmt: skip
CHAT = b'{"model": "sim-llm", "messages": [{"role": "user", "content": "hello there"}]}'


async def _used(rc: aioredis.Redis, f: RateLimitFilter) -> float:
    """Units held by the (only) token key: (TAT - now) / T, from Redis itself."""
    keys = await rc.keys("fw:rl:*:tokens:*")
    assert len(keys) == 1
    tat = int(await rc.get(keys[0]))
    sec, usec = await rc.time()
    return (tat - (sec * 1_000_000 + usec)) / f.limits[0].rule.interval_us


def _held_about(expected: float, f: RateLimitFilter, since: float) -> Any:
    """``expected`` units, less what the limit has refilled since ``since`` (monotonic): the
    bucket drains while a slow CI host runs the test, so a fixed tolerance is not enough."""
    refilled = (time.monotonic() - since) * 1e6 / f.limits[0].rule.interval_us
    return _Between(expected - refilled - 0.01, expected + 0.01)


class _Between:
    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and self.low <= other <= self.high

    def __repr__(self) -> str:
        return f"between {self.low:.3f} and {self.high:.3f}"


async def test_tokens_reserved_up_front_then_settled_to_usage(rc: aioredis.Redis) -> None:
    f = limiter(rc, TOKENS_LIMIT)
    h = harness(f, openai=_openai())
    seen: list[float] = []
    t0 = time.monotonic()

    async def upstream(headers: dict[str, str], body: bytes) -> UpstreamReply:
        seen.append(await _used(rc, f))  # while the model works: the reservation
        return _sim_llm_reply(prompt_tokens=9, completion_tokens=12)

    r = await h.request("POST", "/v1/chat/completions", headers={"x-test-key": "k"},
                        body=CHAT, upstream=upstream)  # fmt: skip
    assert r.status == 200, r.body
    # Prompt "user: hello there\nassistant:" is 28 chars -> 7 estimated, + max_tokens 50.
    assert seen[0] == _held_about(57, f, t0)
    assert await _used(rc, f) == _held_about(21, f, t0)  # settled: 9 + 12


async def test_token_reservation_refused_before_the_model_is_called(rc: aioredis.Redis) -> None:
    f = limiter(rc, {**TOKENS_LIMIT, "rate": 100, "burst": 100})
    h = harness(f, openai=_openai())
    called = 0

    def upstream(headers: dict[str, str], body: bytes) -> UpstreamReply:
        nonlocal called
        called += 1
        return _sim_llm_reply(7, 50)  # uses its whole reservation

    statuses = [
        (
            await h.request(
                "POST",
                "/v1/chat/completions",
                headers={"x-test-key": "k"},
                body=CHAT,
                upstream=upstream,
            )
        ).status
        for _ in range(3)
    ]
    assert statuses == [200, 429, 429] and called == 1
    big = CHAT.replace(b'"messages"', b'"max_tokens": 500, "messages"')
    r = await h.request("POST", "/v1/chat/completions", headers={"x-test-key": "k"}, body=big)
    assert r.status == 413 and r.json()["error"]["type"] == "request_exceeds_limit"


class _BodyProbe(Filter):
    """Counts the request bodies it sees: the work a filter before the limiter's body phase
    (the cache's embedding and judge) would do."""

    seen = 0

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Any:
        _BodyProbe.seen += 1
        return CONTINUE


async def test_callers_are_checked_as_early_as_their_own_limits_allow(rc: aioredis.Redis) -> None:
    """On a route where one key has a token limit (checked after the body), a key with request
    limits only is checked at its headers, once; and a key known to be over a limit the body
    cannot change is refused at its headers, before the filters in between see its body."""
    from proxy.api import NoParams

    f = limiter(
        rc, per_key(rate=1, burst=2),
        {**TOKENS_LIMIT, "when": {"key_ids": ["tokened"]}},
        local_deny_cache=True,
    )  # fmt: skip
    ident, probe = _Identify(NoParams(), Deps()), _BodyProbe(NoParams(), Deps())
    ident.name, probe.name = "identify", "probe"
    h = Harness.for_filters([ident, probe, _openai(), f], default_config(ROUTES))
    _BodyProbe.seen = 0

    async def chat(key: str) -> int:
        r = await h.request("POST", "/v1/chat/completions", headers={"x-test-key": key},
                            body=CHAT, upstream=_sim_llm_reply(7, 50))  # fmt: skip
        return r.status

    # Request limits only: the whole burst of 2 (checked once each, not at headers and body).
    assert [await chat("plain") for _ in range(4)] == [200, 200, 429, 429]
    # The token-limited key waits for the body; once Redis said its bucket is empty (the
    # answer that admitted the second request says so), the next are refused at their
    # headers (the local deny cache): no body of theirs reaches the probe.
    _BodyProbe.seen = 0
    assert [await chat("tokened") for _ in range(5)] == [200, 200, 429, 429, 429]
    assert _BodyProbe.seen == 2


async def test_aborted_and_failed_requests_are_settled(rc: aioredis.Redis) -> None:
    f = limiter(rc, TOKENS_LIMIT)
    h = harness(f, openai=_openai())
    t0 = time.monotonic()
    # The client leaves while the model works: the reservation stands (57).
    await h.request("POST", "/v1/chat/completions", headers={"x-test-key": "k"}, body=CHAT,
                    upstream=_sim_llm_reply(9, 12), client_aborts=True)  # fmt: skip
    assert await _used(rc, f) == _held_about(57, f, t0)
    # The model fails without usage: the whole reservation comes back.
    failed = UpstreamReply(status=503, body=b'{"error":"unavailable"}')
    r = await h.request("POST", "/v1/chat/completions", headers={"x-test-key": "k"}, body=CHAT,
                        upstream=failed)  # fmt: skip
    assert r.status == 503
    assert await _used(rc, f) == _held_about(57, f, t0)


# --- Redis failures --------------------------------------------------------------------------


async def test_redis_killed_fail_open_then_recovers(
    redis_server: RedisServer, rc: aioredis.Redis
) -> None:
    clock = FakeClock()
    f = limiter(
        rc, per_key(rate=1, burst=10, period="1h", local_share=0.5), clock=clock,
        retry_redis_ms=1000, timeout_ms=200,
    )  # fmt: skip
    h = harness(f)
    assert [(await call(h)).status for _ in range(2)] == [200, 200]
    redis_server.kill()
    try:
        statuses = [(await call(h)).status for _ in range(8)]
        # In process at half the limit: 5 pass, then refusals; never a 5xx.
        assert statuses == [200] * 5 + [429] * 3
        assert REDIS_UP._value.get() == 0
    finally:
        redis_server.start()
    clock.advance(1.1)  # past retry_redis_ms: the next check tries Redis again
    # Redis restarted empty (no persistence): its own budget again, shared by replicas.
    assert [(await call(h, key="k2")).status for _ in range(11)] == [200] * 10 + [429]
    assert REDIS_UP._value.get() == 1


async def test_redis_killed_fail_closed_answers_503(
    redis_server: RedisServer, rc: aioredis.Redis
) -> None:
    f = limiter(rc, per_key(on_redis_error="closed"), timeout_ms=200)
    h = harness(f)
    assert (await call(h)).status == 200
    redis_server.kill()
    try:
        r = await call(h)
        assert r.status == 503
        assert r.json()["error"]["type"] == "rate_limit_unavailable"
        assert int(r.headers["retry-after"]) >= 1
    finally:
        redis_server.start()


async def test_frozen_redis_costs_the_timeout_not_a_hang(
    redis_server: RedisServer, rc: aioredis.Redis
) -> None:
    from proxy.api import SystemClock

    f = limiter(rc, per_key(), timeout_ms=100, clock=SystemClock())
    h = harness(f)
    assert (await call(h)).status == 200
    redis_server.freeze()
    try:
        t0 = time.monotonic()
        r = await call(h)
        elapsed = time.monotonic() - t0
        assert r.status == 200  # fail open: the in-process share admits it
        assert elapsed < 1.0, f"check took {elapsed:.2f} s with a 100 ms budget"
        sent = f.store.round_trips
        assert (await call(h)).status == 200
        assert f.store.round_trips == sent  # within retry_redis_ms: no new attempt
    finally:
        redis_server.freeze(False)


class _Slow(Filter):
    """A filter before the limiter that spends all but ``leave_s`` of the phase (as one
    waiting on a frozen Redis of its own would)."""

    leave_s = 0.05

    async def on_request_headers(self, ctx: RequestContext, headers: dict[str, str]) -> Any:
        assert ctx.phase_deadline is not None
        await asyncio.sleep(max(0.0, ctx.phase_deadline - time.monotonic() - self.leave_s))
        return CONTINUE


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_a_check_late_in_its_phase_waits_only_for_what_is_left(
    redis_server: RedisServer, rc: aioredis.Redis, on_error: str
) -> None:
    # Envoy gives up on the phase at message_timeout_ms (500): after the ~400 ms spent before
    # it, the check has ~50 ms, not its own 400 (timeout_ms) to wait for a silent Redis.
    from proxy.api import NoParams, SystemClock

    f = limiter(rc, per_key(on_redis_error=on_error), timeout_ms=400, clock=SystemClock())
    slow = _Slow(NoParams(), Deps())
    slow.name = "slow"
    h = harness(slow, f)
    envoy_s = h.chain.config.processor.message_timeout_ms / 1000
    assert (await call(h)).status == 200
    cut = REDIS_ERRORS.labels("budget")._value.get()
    redis_server.freeze()
    try:
        t0 = time.monotonic()
        r = await call(h)
        elapsed = time.monotonic() - t0
    finally:
        redis_server.freeze(False)
    assert elapsed < envoy_s, elapsed
    assert r.status == (200 if on_error == "open" else 503), r.body
    assert REDIS_ERRORS.labels("budget")._value.get() == cut + 1
    # This request was late, Redis not known down: the next check goes to Redis.
    assert REDIS_UP._value.get() == 1
    sent = f.store.round_trips
    assert (await call(h)).status == 200
    assert f.store.round_trips > sent


async def test_a_check_with_no_time_left_and_redis_fine_is_shed_not_let_through(
    rc: aioredis.Redis,
) -> None:
    # Redis answers; the phase is spent before the check could get its reply: shed as an
    # overloaded gateway (503), not admitted from the fallback's share.
    from proxy.api import NoParams, SystemClock

    f = limiter(rc, per_key(), timeout_ms=400, clock=SystemClock())
    slow = _Slow(NoParams(), Deps())
    slow.name, slow.leave_s = "slow", 0.0
    h = harness(slow, f)
    cut = REDIS_ERRORS.labels("budget")._value.get()
    r = await call(h)
    assert r.status == 503 and r.json()["error"]["type"] == "overloaded", r.body
    assert REDIS_ERRORS.labels("budget")._value.get() == cut and REDIS_UP._value.get() == 1


async def test_restarted_redis_reloads_the_script(
    redis_server: RedisServer, rc: aioredis.Redis
) -> None:
    h = harness(limiter(rc, per_key()))
    assert (await call(h)).status == 200
    await rc.script_flush()  # what a restart or failover does to the script cache
    assert (await call(h, key="other")).status == 200
