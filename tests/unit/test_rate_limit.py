"""rate_limit in process: the GCRA arithmetic on a fake clock, params that fail loudly, the
client address, and the in-process limiter (what runs while Redis is away)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from filters.rate_limit import gcra
from filters.rate_limit.filter import RateLimitFilter, client_ip
from filters.rate_limit.lease import Leases
from filters.rate_limit.store import GcraStore
from proxy.api import CONTINUE, Deps, Filter, NoParams, RequestContext, Usage
from proxy.config import ConfigError, FilterConfig
from proxy.registry import build_filters
from proxy.testing import FakeClock, Harness

S = 1_000_000.0  # one second in microseconds
T0 = 1_700_000_000 * S


def test_burst_passes_at_once_then_one_per_interval() -> None:
    rule = gcra.Rule.of(rate=10, period_s=1, burst=5)  # T = 100 ms, 5 at once
    tat: float | None = None
    got = []
    for _ in range(7):
        v = gcra.take([tat], [gcra.Take(rule, 1)], T0)
        got.append(v.allowed)
        if v.allowed:
            tat = v.tats[0]
    assert got == [True] * 5 + [False] * 2
    refused = gcra.take([tat], [gcra.Take(rule, 1)], T0)
    assert refused.waits_us[0] == pytest.approx(0.1 * S)  # the next slot is 100 ms away
    assert gcra.take([tat], [gcra.Take(rule, 1)], T0 + 0.1 * S).allowed


def test_cost_counts_as_that_many_units() -> None:
    rule = gcra.Rule.of(rate=100, period_s=60, burst=100)
    v = gcra.take([None], [gcra.Take(rule, 60)], T0)
    assert v.allowed and gcra.remaining(v.tats[0], rule, T0) == 40
    assert not gcra.take([v.tats[0]], [gcra.Take(rule, 41)], T0).allowed
    assert gcra.take([v.tats[0]], [gcra.Take(rule, 40)], T0).allowed


def test_refund_and_charge_after_the_fact() -> None:
    rule = gcra.Rule.of(rate=1000, period_s=60, burst=1000)
    v = gcra.take([None], [gcra.Take(rule, 800)], T0)  # reserve 800
    tat = gcra.adjust(v.tats[0], rule, -500, T0 + S)  # used 300: refund 500
    assert tat is not None
    assert gcra.remaining(tat, rule, T0 + S) == pytest.approx(716, abs=1)  # 1000-300+16 drained
    # A refund larger than what is held leaves an idle bucket, never credit beyond burst.
    assert gcra.adjust(tat, rule, -5000, T0 + S) is None
    # Charging more than reserved puts the bucket in debt: later requests wait it out.
    debt = gcra.adjust(None, rule, 1500, T0)
    assert debt is not None and not gcra.take([debt], [gcra.Take(rule, 1)], T0).allowed


def test_any_window_admits_at_most_burst_plus_rate() -> None:
    """The rolling-window guarantee: no edges to double up at. Random arrivals for 60 s; in
    every window of length w, admitted <= burst + w / T."""
    rule = gcra.Rule.of(rate=20, period_s=1, burst=5)
    rng = random.Random(3)
    now, tat, admitted = T0, None, []
    while now < T0 + 60 * S:
        now += rng.expovariate(60) * S  # offered 3x the rate
        v = gcra.take([tat], [gcra.Take(rule, 1)], now)
        if v.allowed:
            tat = v.tats[0]
            admitted.append(now)
    assert len(admitted) >= 0.98 * (5 + 20 * 60)  # saturated: close to the allowance
    for w in (0.05, 0.5, 1.0, 1.7, 10.0):
        j = 0
        for i, t in enumerate(admitted):
            while admitted[j] < t - w * S:
                j += 1
            assert i - j + 1 <= 5 + w * 20 + 1e-9, (w, i)


def test_all_or_nothing_across_limits() -> None:
    a, b = gcra.Rule.of(10, 1, 10), gcra.Rule.of(1, 1, 1)
    v = gcra.take([None, None], [gcra.Take(a, 1), gcra.Take(b, 1)], T0)
    assert v.allowed
    refused = gcra.take(list(v.tats), [gcra.Take(a, 1), gcra.Take(b, 1)], T0)
    assert not refused.allowed and refused.tats == v.tats  # a was not charged either


def test_clock_going_back_never_admits_more() -> None:
    """A failover to a Redis whose clock is behind: TATs ahead of 'now' still bind."""
    rule = gcra.Rule.of(rate=10, period_s=1, burst=3)
    tat = None
    for _ in range(3):
        v = gcra.take([tat], [gcra.Take(rule, 1)], T0)
        tat = v.tats[0]
    for skew in (0.0, 0.05 * S, 2 * S):
        assert not gcra.take([tat], [gcra.Take(rule, 1)], T0 - skew).allowed
    # Forward again, the normal rate resumes.
    assert gcra.take([tat], [gcra.Take(rule, 1)], T0 + 0.1 * S).allowed


def test_max_wait_admits_with_a_wait_within_the_bound() -> None:
    rule = gcra.Rule.of(rate=10, period_s=1, burst=1)
    v1 = gcra.take([None], [gcra.Take(rule, 1, max_wait_us=0.25 * S)], T0)
    v2 = gcra.take([v1.tats[0]], [gcra.Take(rule, 1, max_wait_us=0.25 * S)], T0)
    v3 = gcra.take([v2.tats[0]], [gcra.Take(rule, 1, max_wait_us=0.25 * S)], T0)
    v4 = gcra.take([v3.tats[0]], [gcra.Take(rule, 1, max_wait_us=0.25 * S)], T0)
    assert [v.allowed for v in (v1, v2, v3, v4)] == [True, True, True, False]
    assert (v2.wait_us, v3.wait_us) == (pytest.approx(0.1 * S), pytest.approx(0.2 * S))


def test_blocked_until_never_refuses_what_would_pass() -> None:
    rule = gcra.Rule.of(rate=5, period_s=1, burst=2)
    rng = random.Random(5)
    tat: float | None = None
    now = T0
    for _ in range(2000):
        now += rng.uniform(0, 0.3) * S
        if tat is not None and now < gcra.blocked_until(tat, rule, 0.0):
            assert not gcra.take([tat], [gcra.Take(rule, 1)], now).allowed
        v = gcra.take([tat], [gcra.Take(rule, 1)], now)
        if v.allowed:
            tat = v.tats[0]


def test_scaled_rule_is_the_local_share() -> None:
    rule = gcra.Rule.of(rate=100, period_s=1, burst=100).scaled(0.25)
    local = gcra.LocalLimiter()
    admitted = sum(local.take(["k"], [gcra.Take(rule, 1)], T0).allowed for _ in range(100))
    assert admitted == 25
    # 50 x 0.58 is 28.999999999999996 in floats: still 29 whole units, whatever the clock.
    rule = gcra.Rule.of(rate=1, period_s=1, burst=50).scaled(0.58)
    local = gcra.LocalLimiter()
    assert sum(local.take(["k"], [gcra.Take(rule, 1)], 0.0).allowed for _ in range(30)) == 29


# --- params ----------------------------------------------------------------------------------


def _build(params: dict[str, Any]) -> Any:
    return build_filters([FilterConfig(name="rl", type="rate_limit", params=params)], Deps())


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ({"key": ["api_key"]}, "limits[0].key[0]"),
        ({"rate": 0}, "limits[0].rate"),
        ({"period": "fortnight"}, "not a duration"),
        ({"cost": 20}, "exceeds burst"),
        ({"local_share": 0.01}, "fallback would refuse everything"),
        ({"unit": "tokens", "cost": 3}, "token limits charge tokens"),
        ({"key": ["tenant", "tenant"]}, "part twice"),
        ({"max_wait_ms": -1}, "limits[0].max_wait_ms"),
        ({"surprise": 1}, "limits[0].surprise"),
        ({"lease_share": 0.01}, "nothing to lease"),
        ({"lease_share": 0.1, "unit": "tokens"}, "applies to request limits"),
        ({"lease_share": 0.1, "max_wait_ms": 100}, "applies to request limits"),
        ({"lease_share": 0.2}, "limits[0].lease_share"),
    ],
)
def test_bad_limit_configs_fail_at_start_naming_the_field(
    limit: dict[str, Any], message: str
) -> None:
    base = {"name": "l", "key": ["key_id"], "rate": 10}
    with pytest.raises(ConfigError) as e:
        _build({"limits": [{**base, **limit}]})
    assert "filters[0] (rl)" in str(e.value) and message in str(e.value)


def test_duplicate_limit_names_and_empty_limits_are_rejected() -> None:
    lim = {"name": "l", "key": [], "rate": 1}
    with pytest.raises(ConfigError, match="duplicate limit names"):
        _build({"limits": [lim, lim]})
    with pytest.raises(ConfigError, match="limits"):
        _build({"limits": []})


# --- client address --------------------------------------------------------------------------


def test_client_ip_trusts_only_configured_hops() -> None:
    # Envoy (use_remote_address) appends its peer; anything left of it came from the client.
    assert client_ip("10.0.0.7", 0) == "10.0.0.7"
    assert client_ip("6.6.6.6, 10.0.0.7", 0) == "10.0.0.7"  # spoofed entry ignored
    assert client_ip("6.6.6.6, 203.0.113.9, 10.0.0.2", 1) == "203.0.113.9"  # one LB in front
    assert client_ip("10.0.0.2", 3) == "10.0.0.2"  # fewer entries than hops: the leftmost
    assert client_ip("", 0) == "-"


# --- without Redis ---------------------------------------------------------------------------


async def test_without_redis_limits_are_per_process() -> None:
    p = RateLimitFilter.Params.model_validate(
        {"limits": [{"name": "g", "key": [], "rate": 1, "burst": 2, "period": "1h"}]}
    )
    f = RateLimitFilter(p, Deps(clock=FakeClock()))
    f.name = "rate_limit"
    h = Harness.for_filters([f])
    statuses = [(await h.request("GET", "/v2/models/m")).status for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_fail_closed_without_redis_answers_503() -> None:
    p = RateLimitFilter.Params.model_validate(
        {"limits": [{"name": "g", "key": [], "rate": 1, "on_redis_error": "closed"}]}
    )
    f = RateLimitFilter(p, Deps(clock=FakeClock()))
    f.name = "rate_limit"
    r = await Harness.for_filters([f]).request("GET", "/v2/models/m")
    assert r.status == 503 and r.json()["error"]["type"] == "rate_limit_unavailable"


def test_max_wait_extends_envoys_message_timeout() -> None:
    from proxy.bootstrap import render
    from proxy.chain import Chain
    from proxy.testing import default_config

    p = RateLimitFilter.Params.model_validate(
        {"limits": [{"name": "g", "key": [], "rate": 1, "max_wait_ms": 2000}]}
    )
    cfg = default_config()
    chain = Chain(cfg, [RateLimitFilter(p, Deps())])
    from pathlib import Path

    b = render(cfg, chain, Path("/tmp/fw"))
    hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
    assert ext["typed_config"]["message_timeout"] == f"{(500 + 2000) / 1000:.3f}s"

    # Waits in one phase add up: smoothing here, then admission's queue (max_queue_ms 250).
    from filters.admission.filter import AdmissionFilter
    from filters.admission.params import AdmissionParams

    adm = AdmissionFilter(AdmissionParams.model_validate({"max_queue_ms": 250}), Deps())
    b = render(cfg, Chain(cfg, [RateLimitFilter(p, Deps()), adm]), Path("/tmp/fw"))
    hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
    assert ext["typed_config"]["message_timeout"] == f"{(500 + 2000 + 250) / 1000:.3f}s"


# --- leases (the bookkeeping; against Redis: tests/integration/test_rate_limit_redis.py) ------


def test_lease_slow_start_doubles_to_the_cap_while_the_key_is_busy() -> None:
    leases = Leases(cap=40, cost=1, ttl_s=0.1)
    ask = leases.want("k", now=0.0)
    asks = []
    for _ in range(8):
        asks.append(ask)
        leases.granted("k", ask, tat_us=0, now=0.0)
        assert leases.held() <= 40  # never above the cap
        ask = 0.0
        while not ask:  # a busy key: the next top-up is due once half is used
            assert leases.take("k", 1, now=0.0)[0]
            ask = leases.want("k", now=0.0)
    assert asks[:4] == [4, 4, 8, 16]  # then at the cap: topped up to 40 once half is used
    assert all(a >= 20 for a in asks[4:])


def test_lease_units_expire_unused_and_the_next_lease_is_smaller() -> None:
    leases = Leases(cap=64, cost=1, ttl_s=0.1)
    lease = leases.get("k")
    assert lease is None and not leases.take("k", 1, now=0.0)[0]
    leases.granted("k", leases.want("k", 0.0), tat_us=0, now=0.0)
    leases.get("k").size = 32  # type: ignore[union-attr]
    leases.get("k").units = 32  # type: ignore[union-attr]
    assert leases.take("k", 1, now=0.05) == (True, None)
    ok, expired = leases.take("k", 1, now=0.2)  # past its lifetime: void, never given back
    assert not ok and expired is not None and expired.units == 31
    assert leases.get("k").size == 16  # type: ignore[union-attr]
    leases.give_back("k", 1, now=0.2)  # an expired lease takes nothing back
    assert leases.get("k").units == 0  # type: ignore[union-attr]


def test_one_top_up_at_a_time_and_only_once_half_is_used() -> None:
    leases = Leases(cap=100, cost=1, ttl_s=1.0)
    assert leases.want("k", 0.0) == 4
    assert leases.want("k", 0.0) == 0  # in flight
    leases.granted("k", 4, tat_us=0, now=0.0)
    assert leases.want("k", 0.0) == 0  # 4 of 4 left
    leases.take("k", 1, 0.0)
    leases.take("k", 1, 0.0)
    leases.take("k", 1, 0.0)
    assert leases.want("k", 0.0) == 4  # 1 left: due
    leases.granted("k", 4, tat_us=0, now=0.0)  # 5 held: the last went within its lifetime
    leases.take("k", 1, 0.0)
    leases.take("k", 1, 0.0)
    assert leases.want("k", 0.0) == 8  # so the next is twice the size
    leases.refused("k")  # the key is past half its burst in Redis: back to the first size
    assert leases.want("k", 0.0) == 0  # 3 held: more than half of 4
    leases.take("k", 2, 0.0)
    assert leases.want("k", 0.0) == 4


def test_a_lease_cap_below_two_requests_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than two"):
        Leases(cap=3, cost=2, ttl_s=0.1)


# --- whole bursts, requests the fallback cannot judge, Retry-After ---------------------------


@pytest.mark.parametrize(
    ("rate", "period_s", "burst"),
    [(3, 1, 3), (3, 1, 1), (7, 60, 7), (7, 60, 1), (6, 1, 4), (1000, 7, 13)],
)
def test_a_whole_burst_passes_from_idle_whatever_the_interval(
    rate: float, period_s: float, burst: float
) -> None:
    """T = period / rate is rarely whole microseconds: rounding each TAT up must not cost
    the burst its last unit (rate 3 with burst 3 admitted 2; with burst 1, never one)."""
    rule = gcra.Rule.of(rate, period_s, burst)
    tat: float | None = None
    admitted = 0
    for _ in range(int(burst) + 2):
        v = gcra.take([tat], [gcra.Take(rule, 1)], T0)
        if v.allowed:
            admitted, tat = admitted + 1, v.tats[0]
    assert admitted == burst
    # burst == cost: one request of the whole burst passes from idle, then none.
    whole = gcra.take([None], [gcra.Take(rule, burst)], T0)
    assert whole.allowed and not gcra.take([whole.tats[0]], [gcra.Take(rule, 1)], T0).allowed


@pytest.mark.parametrize(
    ("limit", "passes"),
    [
        ({"rate": 6, "burst": 4, "local_share": 0.25}, 1),
        ({"rate": 3, "burst": 1}, 1),
        ({"rate": 7, "period": "1m", "burst": 1}, 1),
        ({"rate": 3, "burst": 3}, 3),
        ({"rate": 10, "burst": 10, "local_share": 0.3}, 3),
        ({"rate": 7, "period": "1m", "burst": 7, "local_share": 0.5}, 3),
    ],
)
async def test_the_fallback_admits_its_whole_local_burst(
    limit: dict[str, Any], passes: int
) -> None:
    # A monotonic clock is not whole microseconds, Redis' is: the fallback must not care.
    p = RateLimitFilter.Params.model_validate({"limits": [{"name": "g", "key": [], **limit}]})
    f = RateLimitFilter(p, Deps(clock=FakeClock(start=1_000.0000003)))
    f.name = "rate_limit"
    h = Harness.for_filters([f])
    statuses = [(await h.request("GET", "/v2/models/m")).status for _ in range(passes + 1)]
    assert statuses == [200] * passes + [429]


class _Estimate(Filter):
    """Stands in for the openai filter: the request's token estimate from a test header."""

    async def on_request_headers(self, ctx: RequestContext, headers: dict[str, str]) -> Any:
        ctx.token_estimate = Usage(int(headers.get("x-test-tokens", "1")))
        return CONTINUE


async def test_a_token_request_above_the_local_burst_is_unavailable_not_rate_limited() -> None:
    """Redis down: 600 tokens fit the shared burst (1000) but never the local one (250). A
    429 would name a Retry-After after which it still could not pass."""
    p = RateLimitFilter.Params.model_validate({"limits": [
        {"name": "t", "key": [], "unit": "tokens", "rate": 1000, "period": "1m",
         "local_share": 0.25},
    ]})  # fmt: skip
    f = RateLimitFilter(p, Deps(clock=FakeClock()))  # no Redis: the fallback throughout
    f.name = "rate_limit"
    est = _Estimate(NoParams(), Deps())
    est.name = "estimate"
    h = Harness.for_filters([est, f])
    big = await h.request("GET", "/v2/models/m", headers={"x-test-tokens": "600"})
    assert big.status == 503 and big.json()["error"]["type"] == "rate_limit_unavailable"
    small = await h.request("GET", "/v2/models/m", headers={"x-test-tokens": "200"})
    assert small.status == 200  # what the local share can judge, it still judges
    assert (await h.request("GET", "/v2/models/m", headers={"x-test-tokens": "100"})).status == 429
    over = await h.request("GET", "/v2/models/m", headers={"x-test-tokens": "1001"})
    assert over.status == 413  # beyond the shared burst: never, with or without Redis


@pytest.mark.parametrize(("after_s", "header"), [(2.0004, "3"), (2.0, "2"), (0.2, "1"), (0, "1")])
def test_retry_after_is_never_before_the_turn(after_s: float, header: str) -> None:
    from proxy import errors

    assert (
        errors.error(429, "rate_limited", "m", retry_after_s=after_s).headers["retry-after"]
        == header
    )


# --- a Redis Cluster, faked per node: what each call's slot answers --------------------------


NOW_US = 1_700_000_000_000_000
HOUR_US = 3_600_000_000


class _Pipeline:
    def __init__(self, cluster: _Cluster) -> None:
        self.cluster = cluster
        self.calls: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        self.calls.append(args)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        # EVALSHA sha numkeys key... "" nreq op nkeys nums...: one request, one key per call
        return [self.cluster.answer(a[3], a[6], a[8:]) for a in self.calls]


class _Cluster:
    """Answers each call as its node would (the script's reply: now, allowed, TAT); records
    what ran where."""

    def __init__(self, answer: Any) -> None:
        self.answer_for = answer
        self.ran: list[tuple[str, str, tuple[Any, ...]]] = []
        self.loaded = False

    def pipeline(self) -> _Pipeline:
        return _Pipeline(self)

    def answer(self, key: str, op: str, nums: tuple[Any, ...]) -> Any:
        reply = self.answer_for(self, key, op)
        if not isinstance(reply, BaseException):
            self.ran.append((key, op, nums))
        return reply

    async def script_load(self, lua: str) -> None:
        self.loaded = True


def _on_cluster(cluster: _Cluster, **params: Any) -> RateLimitFilter:
    """Per key 10 an hour in the tenant's slot, and 10 an hour for everyone in another."""
    p = RateLimitFilter.Params.model_validate({"limits": [
        {"name": "per_key", "key": ["key_id"], "rate": 1, "burst": 10, "period": "1h"},
        {"name": "everyone", "key": [], "rate": 1, "burst": 10, "period": "1h"},
    ], **params})  # fmt: skip
    f = RateLimitFilter(p, Deps(clock=FakeClock()))
    f.name = "rate_limit"
    f.cluster, f.store, f.redis_down_until = True, GcraStore(cluster, cluster=True), 0.0
    return f


async def _settled(f: RateLimitFilter) -> None:
    await asyncio.sleep(0.01)  # the refunds are queued: let their round trip go
    await asyncio.gather(*f._background, return_exceptions=True)


async def test_cluster_noscript_runs_again_only_the_calls_that_found_no_script() -> None:
    """A failed-over node answers NOSCRIPT; the other node ran its call. Running the whole
    batch again would apply that call (a refund here) twice."""

    def answer(c: _Cluster, key: str, op: str) -> Any:
        if key.startswith("B") and not c.loaded:
            return NoScriptError("NOSCRIPT No matching script.")
        return [NOW_US, 1, NOW_US + 1000]

    cluster = _Cluster(answer)
    store = GcraStore(cluster, cluster=True)
    refund = store.call("adjust", ["A"], ["1000.0", "-5.0"])
    take = store.call("take", ["B"], ["1000.0", "10000.0", "1.0", "0.0"])
    assert await refund == [1, NOW_US, NOW_US + 1000]
    assert await take == [1, NOW_US, NOW_US + 1000]
    assert [key for key, _, _ in cluster.ran] == ["A", "B"]
    await store.close()


async def test_cluster_grants_are_given_back_when_another_slot_fails() -> None:
    """The node of "everyone" is down: the request falls back, and the per-key unit Redis
    granted in the other slot is refunded (it was neither used nor orphaned)."""

    def answer(c: _Cluster, key: str, op: str) -> Any:
        if ":everyone:" in key:
            return RedisConnectionError("node down")
        return [NOW_US, 1, NOW_US + HOUR_US]

    cluster = _Cluster(answer)
    f = _on_cluster(cluster)
    assert (await Harness.for_filters([f]).request("GET", "/v2/models/m")).status == 200
    await _settled(f)
    assert [(op, nums) for key, op, nums in cluster.ran if ":per_key:" in key] == [
        ("take", ("3600000000.0", "36000000000.0", "1.0", "0.0")),
        ("adjust", ("3600000000.0", "-1.0")),
    ]
    await f.stop()


async def test_cluster_refusal_remembers_no_block_for_the_refunded_slot() -> None:
    """ "everyone" refuses; the per-key slot granted its last unit and got it back. The deny
    cache must not refuse that key locally from the TAT the refund undid."""

    def answer(c: _Cluster, key: str, op: str) -> Any:
        if ":everyone:" in key:
            return [NOW_US, 0, NOW_US + 20 * HOUR_US]  # full: refused
        if op == "take":
            return [NOW_US, 1, NOW_US + 10 * HOUR_US]  # its last unit: full now
        return [NOW_US, 1, NOW_US + 9 * HOUR_US]

    f = _on_cluster(_Cluster(answer), response_headers=True)
    r = await Harness.for_filters([f]).request("GET", "/v2/models/m")
    assert r.status == 429
    await _settled(f)
    blocked = {key.split(":")[3] for key in f.deny_cache}
    assert blocked == {"everyone"}
    # The refused request's headers show per_key as it stands after the refund: 1 left.
    assert '"per_key";r=1;' in r.headers["ratelimit"]
    await f.stop()


async def test_two_rate_limit_filters_on_one_route_keep_their_own_request_state() -> None:
    # A per-IP limit checked at the headers marked the request checked for the token limit of
    # the other instance too (one ctx.state per class): its body check was skipped.
    from proxy.api import Phase

    class SetModel(Filter):  # plays the openai filter: the model and estimate from the body
        def phases(self, route: Any) -> frozenset[Phase]:
            return frozenset({Phase.REQUEST_HEADERS, Phase.REQUEST_BODY})

        async def on_request_body(self, ctx: Any, body: bytes) -> Any:
            ctx.model, ctx.token_estimate = "m", Usage(prompt_tokens=100, completion_tokens=0)
            return CONTINUE

    deps = Deps(clock=FakeClock())  # no Redis: the in-process limiter
    tokens, per_ip = build_filters([
        FilterConfig(name="tokens", type="rate_limit", params={"limits": [
            {"name": "tok", "key": ["client_ip"], "unit": "tokens", "rate": 150, "period": 60,
             "burst": 150}]}),
        FilterConfig(name="per_ip", type="rate_limit", params={"limits": [
            {"name": "rps", "key": ["client_ip"], "rate": 1000}]}),
    ], deps)  # fmt: skip
    api = SetModel(NoParams(), deps)
    api.name = "openai"
    h = Harness.for_filters([api, tokens, per_ip])
    statuses = [
        (
            await h.request(
                "POST",
                "/v1/embeddings",
                headers={"x-forwarded-for": "1.2.3.4"},
                body=b'{"model": "m", "input": "x"}',
            )
        ).status
        for _ in range(3)
    ]
    assert statuses == [200, 429, 429]


async def test_a_closed_store_fails_calls_instead_of_reconnecting() -> None:
    # A settlement that outlived its filter (a reload, a shutdown) found the store closed:
    # its call reconnected with nobody to close the connection, and had no watchdog.
    cluster = _Cluster(lambda c, key, op: [NOW_US, 1, NOW_US])
    store = GcraStore(cluster, cluster=True)
    await store.close()
    with pytest.raises(RedisConnectionError, match="closed"):
        await store.call("adjust", ["A"], ["1000.0", "-5.0"])
    assert cluster.ran == [] and store._watchdog is None


# --- fast token limits, the advertised policy, the deny cache's answers (session 21) --------


def _admitted_in(rule: gcra.Rule, cost: float, seconds: float) -> float:
    """Units admitted to one key by back-to-back requests of ``cost`` for ``seconds``."""
    tat: float | None = None
    now, step, units = T0, rule.interval_us * cost, 0.0
    while now < T0 + seconds * S:
        v = gcra.take([tat], [gcra.Take(rule, cost)], now)
        if v.allowed:
            tat, units = v.tats[0], units + cost
        else:
            now += max(step / 4, 1.0)
    return units


@pytest.mark.parametrize(
    ("rate", "period_s", "cost"),
    [(100e6, 60, 1000), (2e6, 1, 500), (7e6, 60, 333), (150_000, 1, 64)],
)
def test_a_fast_token_limit_admits_its_rate(rate: float, period_s: float, cost: float) -> None:
    # T rounded up to whole microseconds admitted 60M of 100M tokens a minute, 1M of 2M a
    # second (T = 0.5 us): token limits keep T exact; each take still rounds up (<1 us).
    burst = cost * 4
    rule = gcra.Rule.of(rate, period_s, burst, exact=True)
    seconds = 1.0
    allowance = burst + rate / period_s * seconds
    admitted = _admitted_in(rule, cost, seconds)
    assert admitted <= allowance
    assert admitted >= 0.99 * allowance, (admitted, allowance)
    whole = gcra.take([None], [gcra.Take(rule, burst)], T0)  # the whole burst, from idle
    assert whole.allowed
    # Request limits keep whole microseconds (their bursts stay exact).
    assert gcra.Rule.of(rate, period_s, burst).interval_us == float(int(rule.interval_us) + 1)


@pytest.mark.parametrize(
    ("limit", "policy"),
    [
        ({"rate": 10}, "q=10;w=1"),
        ({"rate": 0.1, "burst": 1}, "q=1;w=10"),  # was q=1;w=1: ten times the real rate
        ({"rate": 1, "period": "2m"}, "q=1;w=120"),  # was q=1;w=60
        ({"rate": 2.5}, "q=5;w=2"),  # was q=2;w=1
        ({"rate": 3}, "q=3;w=1"),  # T rounded up to whole microseconds still counts as 3
        ({"rate": 7, "period": "1m"}, "q=7;w=60"),
        ({"rate": 100_000_000, "period": "1m", "unit": "tokens"}, 'q=100000000;w=60;qu="tokens"'),
    ],
)
def test_ratelimit_policy_never_promises_more_than_the_limit(
    limit: dict[str, Any], policy: str
) -> None:
    p = RateLimitFilter.Params.model_validate({"limits": [{"name": "l", "key": [], **limit}]})
    (lim,) = RateLimitFilter(p, Deps(clock=FakeClock())).limits
    assert lim.policy == f'"l";{policy}'


@pytest.mark.parametrize(
    ("limit", "cost"),
    [
        ({"unit": "tokens", "rate": 100, "burst": 1000}, 500.0),
        ({"rate": 10}, 1.0),
        ({"rate": 10, "cost": 3}, 3.0),
    ],
)
def test_the_deny_cache_answers_as_redis_would(limit: dict[str, Any], cost: float) -> None:
    # A cached refusal of a 500-token request said Retry-After 1 (when one token fits)
    # against Redis' 5, and its RateLimit t meant another thing than Redis'.
    clock = FakeClock()
    p = RateLimitFilter.Params.model_validate({"limits": [{"name": "l", "key": [], **limit}]})
    f = RateLimitFilter(p, Deps(clock=clock))
    (lim,) = f.limits
    now_us = 5_000 * S
    full = gcra.take([None], [gcra.Take(lim.rule, lim.spec.burst_units)], now_us).tats[0]
    v = gcra.take([full], [gcra.Take(lim.rule, cost)], now_us)
    assert not v.allowed
    redis = f._refusal([lim], [lim.rule], v, [cost], False)
    f._remember_blocks([lim], ["k"], [lim.rule], v, clock.monotonic())
    cached = f._cached_refusal([lim], ["k"], clock.monotonic(), [cost])
    assert cached is not None
    assert cached.headers["retry-after"] == redis.headers["retry-after"]
    assert cached.headers["ratelimit"] == redis.headers["ratelimit"]


def test_a_stream_that_failed_after_its_200_keeps_its_reservation() -> None:
    # The openai filter judges such a stream a 502 (session 21); it may have sent text, so
    # it is not refunded as a request that failed before producing anything is.
    from filters.rate_limit.filter import _settle
    from proxy.api import Outcome
    from proxy.testing import default_config

    ctx = RequestContext(default_config().routes[0], started=0.0)
    failed = Outcome(status=502, aborted=False, responded_by=None, duration_s=1.0,
                     upstream_status=502)  # fmt: skip
    assert _settle(100.0, ctx, failed) == 0.0  # buffered: nothing produced
    ctx.response_streamed = True
    assert _settle(100.0, ctx, failed) == 100.0


async def test_a_check_redis_could_not_answer_in_time_is_503_overloaded() -> None:
    # Redis is up, but this process got no answer within max_check_ms (a busy event loop):
    # refused at once as overloaded, counted, and any leased units given back.
    from prometheus_client import REGISTRY

    from filters.rate_limit.store import Overloaded

    p = RateLimitFilter.Params.model_validate({"limits": [{"name": "o", "key": [], "rate": 5}]})
    f = RateLimitFilter(p, Deps(clock=FakeClock(), redis=object()))
    f.name = "rate_limit"

    async def late(*args: Any) -> Any:
        raise Overloaded()

    f._shared = late  # type: ignore[method-assign]
    labels = {"limit": "o", "decision": "overloaded"}
    before = REGISTRY.get_sample_value("floodwall_ratelimit_decisions_total", labels) or 0.0
    r = await Harness.for_filters([f]).request("GET", "/v2/models/m")
    assert r.status == 503 and r.json()["error"]["type"] == "overloaded"
    assert r.headers["retry-after"] == "1" and not r.upstream_called
    assert REGISTRY.get_sample_value("floodwall_ratelimit_decisions_total", labels) == before + 1
