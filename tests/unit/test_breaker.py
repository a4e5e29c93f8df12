"""The breaker filter on a fake clock and a fake upstream: it opens on failures and on slow
calls, refuses while open, lets a bounded number of trials through half-open, and closes or
reopens on their verdict."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from filters.breaker.filter import BreakerFilter, State
from proxy.api import (
    CONTINUE,
    Decision,
    Deps,
    Filter,
    Headers,
    Mutate,
    NoParams,
    RequestContext,
)
from proxy.config import ConfigError, FilterConfig
from proxy.registry import build_filters
from proxy.testing import FakeClock, Harness, UpstreamReply

OK = UpstreamReply(200)
FAIL = UpstreamReply(503, body=b'{"error":"down"}')


def _setup(**params: Any) -> tuple[Harness, BreakerFilter, FakeClock]:
    clock = FakeClock()
    p = BreakerFilter.Params.model_validate(
        {"min_calls": 4, "failure_rate": 0.5, "open_s": 5, "half_open_calls": 2, **params}
    )
    f = BreakerFilter(p, Deps(clock=clock))
    f.name = "breaker"
    return Harness.for_filters([f]), f, clock


async def call(h: Harness, up: Any = OK, model: str = "m") -> Any:
    return await h.request("POST", f"/v2/models/{model}/infer", body=b"{}", upstream=up)


async def test_opens_on_failure_rate_and_refuses_with_retry_after() -> None:
    h, f, _ = _setup(models=["m"])
    for up in (OK, FAIL, OK):
        assert (await call(h, up)).status == up.status
    assert f.breakers["m"].state is State.CLOSED  # 3 calls < min_calls
    await call(h, FAIL)  # 2 of 4 failed: 50%
    assert f.breakers["m"].state is State.OPEN
    r = await call(h)
    assert r.status == 503 and r.json()["error"]["type"] == "circuit_open"
    assert not r.upstream_called
    assert int(r.headers["retry-after"]) == 5
    # Other models have their own breaker; unlisted ones are not watched at all.
    assert (await call(h, model="other")).status == 200
    assert "other" not in f.breakers


async def test_half_open_admits_bounded_trials_then_closes() -> None:
    h, f, clock = _setup(models=["m"])
    for _ in range(4):
        await call(h, FAIL)
    clock.advance(5.1)
    gate = asyncio.Event()

    async def slow_ok(headers: Any, body: bytes) -> UpstreamReply:
        await gate.wait()
        return OK

    trials = [asyncio.ensure_future(call(h, slow_ok)) for _ in range(2)]
    await asyncio.sleep(0)
    extra = await call(h)  # a third call while two trials are in flight
    assert extra.status == 503
    assert f.breakers["m"].state is State.HALF_OPEN
    gate.set()
    assert [(await t).status for t in trials] == [200, 200]
    assert f.breakers["m"].state is State.CLOSED
    assert (await call(h)).status == 200


async def test_a_failed_trial_reopens() -> None:
    h, f, clock = _setup(models=["m"])
    for _ in range(4):
        await call(h, FAIL)
    clock.advance(5.1)
    assert (await call(h, FAIL)).status == 503
    assert f.breakers["m"].state is State.OPEN
    assert f.breakers["m"].open_until == pytest.approx(clock.monotonic() + 5)


async def test_slow_calls_open_it_too() -> None:
    h, f, clock = _setup(models=["m"], slow_call_ms=100, slow_call_rate=0.75)

    async def slow(headers: Any, body: bytes) -> UpstreamReply:
        clock.advance(0.2)
        return OK

    for _ in range(3):
        await call(h, slow)
    await call(h)
    assert f.breakers["m"].state is State.OPEN


async def test_window_forgets_old_failures() -> None:
    h, f, clock = _setup(models=["m"], window_s=10)
    for _ in range(3):
        await call(h, FAIL)
    clock.advance(11)  # those failures left the window
    for _ in range(4):
        await call(h, OK)
    await call(h, FAIL)
    assert f.breakers["m"].state is State.CLOSED  # 1 of 5 in the window


async def test_client_gone_during_a_trial_gives_the_permit_back() -> None:
    h, f, clock = _setup(models=["m"], half_open_calls=1)
    for _ in range(4):
        await call(h, FAIL)
    clock.advance(5.1)
    await h.request("POST", "/v2/models/m/infer", body=b"{}", upstream=OK, client_aborts=True)
    assert f.breakers["m"].trials_in_flight == 0
    assert (await call(h)).status == 200
    assert f.breakers["m"].state is State.CLOSED


def test_bad_breaker_config_fails_at_start() -> None:
    with pytest.raises(ConfigError, match="failure_rate"):
        build_filters([FilterConfig(name="b", type="breaker",
                                    params={"failure_rate": 2})], Deps())  # fmt: skip


class _LongBody(Filter):
    """First in the chain, so last at the response: the answer's body takes 20 s to come
    after its headers (a long completion, streamed)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(NoParams(), Deps())
        self.name = "long_body"
        self.clock = clock

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        self.clock.advance(20)
        return CONTINUE


async def test_slow_is_time_to_first_byte_and_slow_trials_weigh_by_their_share() -> None:
    h, f, clock = _setup(models=["m"], half_open_calls=2, slow_call_ms=1000, window_s=600)
    h = Harness.for_filters([_LongBody(clock), f])
    for _ in range(4):
        await call(h)  # healthy, fast to their first byte, 20 s to their end
    assert f.breakers["m"].state is State.CLOSED
    for _ in range(4):
        await call(h, FAIL)
    assert f.breakers["m"].state is State.OPEN
    clock.advance(5.1)

    async def slow_headers(headers: Any, body: bytes) -> UpstreamReply:
        clock.advance(2)
        return OK

    # One of two trials slow to its headers: half the trials, short of slow_call_rate (all).
    assert (await call(h, slow_headers)).status == 200
    assert f.breakers["m"].state is State.HALF_OPEN
    assert (await call(h)).status == 200  # fast to its headers, long to its end
    assert f.breakers["m"].state is State.CLOSED


async def test_two_breakers_on_one_route_judge_each_call_once() -> None:
    clock = FakeClock()
    deps = Deps(clock=clock)
    per_route = BreakerFilter(BreakerFilter.Params(min_calls=2), deps)
    per_route.name = "per_route"
    per_model = BreakerFilter(BreakerFilter.Params(models=["m"], min_calls=2), deps)
    per_model.name = "per_model"
    h = Harness.for_filters([per_route, per_model])
    await call(h, FAIL)
    for b in (per_route.breakers["kserve_http"], per_model.breakers["m"]):
        assert b._totals(clock.monotonic()) == (1, 1, 0)
        assert b.state is State.CLOSED  # one failure, min_calls 2


class _StaleIfError(Filter):
    """As the cache's stale-if-error does: a 5xx from the model becomes a 200 stale answer."""

    async def on_response_body(self, ctx: RequestContext, body: bytes) -> Decision:
        if (ctx.response_status or 0) >= 500:
            return Mutate(set_headers={":status": "200", "content-length": "2"}, body=b"{}")
        return CONTINUE


async def test_failures_served_stale_still_open_it() -> None:
    """The client gets a 200 (an old answer), the model answered 503: the breaker judges the
    model, so it opens, and a trial served stale does not close it."""
    _, f, clock = _setup(models=["m"])
    stale = _StaleIfError(NoParams(), Deps())
    stale.name = "stale"
    h = Harness.for_filters([f, stale])
    for _ in range(4):
        assert (await call(h, FAIL)).status == 200
    assert f.breakers["m"].state is State.OPEN
    clock.advance(5.1)
    assert (await call(h, FAIL)).status == 200  # a trial, served stale
    assert f.breakers["m"].state is State.OPEN


async def test_health_and_metadata_calls_neither_count_nor_get_refused() -> None:
    # Triton answers them from memory: counted, their quick 200s diluted the failure rate and
    # took half-open trials (closing the breaker while inference still failed).
    h, f, clock = _setup(models=["m"])
    for _ in range(4):
        await call(h, FAIL)
    assert f.breakers["m"].state is State.OPEN
    for path in ("/v2/models/m", "/v2/models/m/ready", "/v2/models/m/config"):
        r = await h.request("GET", path, upstream=OK)
        assert r.status == 200 and r.upstream_called, path
    clock.advance(5.1)  # trials due: metadata calls take none of them (nor close it)
    for _ in range(3):
        await h.request("GET", "/v2/models/m/ready", upstream=OK)
    assert f.breakers["m"].state is State.OPEN
    assert (await call(h, OK)).status == 200 and (await call(h, OK)).status == 200
    assert f.breakers["m"].state is State.CLOSED


async def test_failing_grpc_answers_open_the_breaker() -> None:
    # A gRPC failure is HTTP 200 with a grpc-status: the breaker counted only 5xx and never
    # opened on a gRPC route.
    h, f, _ = _setup()
    failing = UpstreamReply(200, {"content-type": "application/grpc", "grpc-status": "14"}, b"")
    not_found = UpstreamReply(200, {"content-type": "application/grpc", "grpc-status": "5"}, b"")
    for up in (not_found, not_found, not_found, not_found):  # the caller's mistake: no verdict
        await h.request("POST", "/v2/models/m/infer", body=b"{}", upstream=up, grpc=True)
    assert f.breakers["kserve_http"].state is State.CLOSED
    for _ in range(4):
        await h.request("POST", "/v2/models/m/infer", body=b"{}", upstream=failing, grpc=True)
    assert f.breakers["kserve_http"].state is State.OPEN
