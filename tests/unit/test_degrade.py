"""degrade + breaker sharing one process's signals: while a model's breaker would refuse,
eligible requests go to its lighter model (marked in the response); exempt ones do not."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY

from filters.admission.filter import AdmissionFilter
from filters.breaker.filter import BreakerFilter
from filters.degrade.filter import DegradeFilter
from proxy.api import CONTINUE, Deps, Filter, Headers, RequestContext
from proxy.config import ConfigError, FilterConfig
from proxy.registry import build_filters
from proxy.testing import FakeClock, Harness, UpstreamReply


class _Priority(Filter):
    """Stands in for admission: the priority class comes from a test header."""

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Any:
        ctx.priority = headers.get("x-test-priority")
        return CONTINUE


def _setup() -> tuple[Harness, FakeClock]:
    clock = FakeClock()
    deps = Deps(clock=clock)
    prio = _Priority(_Priority.Params(), deps)
    prio.name = "prio"
    degrade = DegradeFilter(DegradeFilter.Params(lighter={"m": "m_lite"}), deps)
    degrade.name = "degrade"
    breaker = BreakerFilter(
        BreakerFilter.Params(models=["m", "m_lite"], min_calls=4, open_s=5), deps
    )
    breaker.name = "breaker"
    return Harness.for_filters([prio, degrade, breaker]), clock


def _upstream(headers: dict[str, str], body: bytes) -> UpstreamReply:
    # "m" is down; its lighter stand-in works.
    return UpstreamReply(503 if headers[":path"].startswith("/v2/models/m/") else 200)


async def call(h: Harness, priority: str | None = None) -> Any:
    headers = {"x-test-priority": priority} if priority else {}
    return await h.request("POST", "/v2/models/m/infer", headers=headers, body=b"{}",
                           upstream=_upstream)  # fmt: skip


def _degraded(reason: str) -> float:
    labels = {"model": "m", "to": "m_lite", "reason": reason}
    return REGISTRY.get_sample_value("floodwall_degraded_total", labels) or 0.0


async def test_open_breaker_sends_eligible_requests_to_the_lighter_model() -> None:
    h, clock = _setup()
    assert [(await call(h)).status for _ in range(4)] == [503] * 4  # the breaker opens
    before = _degraded("breaker")
    r = await call(h)
    assert _degraded("breaker") == before + 1
    assert r.status == 200
    assert r.upstream_headers is not None
    assert r.upstream_headers[":path"] == "/v2/models/m_lite/infer"
    assert r.headers["x-floodwall-degraded"] == "m_lite"
    # Critical requests keep their model: the breaker refuses them honestly.
    critical = await call(h, priority="critical")
    assert critical.status == 503 and critical.json()["error"]["type"] == "circuit_open"
    # After open_s the breaker lets a trial through to "m" again instead of degrading.
    clock.advance(5.1)
    trial = await call(h)
    assert trial.upstream_headers is not None
    assert trial.upstream_headers[":path"] == "/v2/models/m/infer"


async def test_healthy_model_is_not_degraded() -> None:
    h, _ = _setup()

    def ok(headers: dict[str, str], body: bytes) -> UpstreamReply:
        return UpstreamReply(200)

    r = await h.request("POST", "/v2/models/m/infer", body=b"{}", upstream=ok)
    assert r.status == 200 and "x-floodwall-degraded" not in r.headers
    assert r.upstream_headers is not None and r.upstream_headers[":path"] == "/v2/models/m/infer"


# --- admission's pressure: the limit binds ------------------------------------------------------


class _Identity(Filter):
    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Any:
        ctx.tenant, ctx.tier = "t", headers.get("x-tier", "standard")
        return CONTINUE


async def test_degraded_while_admission_refuses_and_not_timed_by_it() -> None:
    clock = FakeClock()
    deps = Deps(clock=clock)
    ident = _Identity(_Identity.Params(), deps)
    ident.name = "ident"
    admission = AdmissionFilter(
        AdmissionFilter.Params(initial_limit=4, min_limit=4, max_limit=4, max_queue_ms=0), deps
    )
    admission.name = "admission"
    degrade = DegradeFilter(DegradeFilter.Params(lighter={"m": "m_lite"}), deps)
    degrade.name = "degrade"
    h = Harness.for_filters([ident, admission, degrade])
    gate = asyncio.Event()

    async def model(headers: dict[str, str], body: bytes) -> UpstreamReply:
        # The full model takes 20 ms, its lighter twin 1 ms; "slow" calls wait for the gate.
        if headers.get("x-test-slow"):
            await gate.wait()
        clock.advance(0.020 if headers[":path"].startswith("/v2/models/m/") else 0.001)
        return UpstreamReply(200)

    async def call(**headers: str) -> Any:
        return await h.request("POST", "/v2/models/m/infer", headers=headers, body=b"{}",
                               upstream=model)  # fmt: skip

    def lighter(r: Any) -> bool:
        assert r.status == 200 and r.upstream_headers is not None
        degraded = r.upstream_headers[":path"] == "/v2/models/m_lite/infer"
        assert ("x-floodwall-degraded" in r.headers) is degraded
        return degraded

    assert not lighter(await call())  # room: the model asked for
    lim = admission.limiters["kserve_http"]
    base = lim.base_rtt
    busy = [asyncio.ensure_future(call(**{"x-test-slow": "1"})) for _ in range(3)]
    await asyncio.sleep(0)  # standard's share (3 of 4) taken
    shed = await call(**{"x-tier": "batch"})
    assert shed.status == 503 and shed.json()["error"]["type"] == "overloaded"
    gate.set()
    assert [lighter(await t) for t in busy] == [False] * 3  # admitted before the refusal
    # Admission refused a call a moment ago: the next ones get the lighter model, except
    # critical ones; their 1 ms answers are not taken as the full model's no-load time.
    before = _degraded("pressure")
    assert lighter(await call()) and lighter(await call(**{"x-tier": "batch"}))
    assert _degraded("pressure") == before + 2
    assert not lighter(await call(**{"x-tier": "premium"}))
    assert lim.base_rtt == base == pytest.approx(0.020)
    # While critical calls wait too, the lighter model's calls would share their hardware.
    deps.signals.pressed_at["kserve_http"]["critical"] = clock.monotonic()
    assert not lighter(await call())
    clock.advance(1.01)  # pressure_hold_s after the refusals: the model asked for again
    assert not lighter(await call())
    assert lim.inflight == 0


def test_degrade_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="cannot stand in for itself"):
        build_filters([FilterConfig(name="d", type="degrade",
                                    params={"lighter": {"m": "m"}})], Deps())  # fmt: skip


# --- saturation: Triton's load, polled from its metrics ---------------------------------------

METRICS = """# HELP nv_inference_pending_request_count x
nv_inference_pending_request_count{model="m",version="1"} %d
nv_inference_queue_duration_us{model="m",version="1"} %d
nv_inference_request_success{model="m",version="1"} %d
nv_inference_request_success{model="other",version="1"} 5
"""


def test_triton_load_is_the_mean_queue_time_of_the_last_interval() -> None:
    from proxy.triton_load import TritonLoad

    load = TritonLoad("http://127.0.0.1:8002/metrics")
    load.update(METRICS % (0, 1_000, 10), now=1.0)
    assert load.models["m"].queue_ms == 0.0  # a first sample says nothing about an interval
    load.update(METRICS % (7, 601_000, 20), now=1.25)  # 10 requests waited 600 ms in all
    assert load.models["m"].queue_ms == pytest.approx(60.0)
    assert load.models["m"].pending == 7
    load.update(METRICS % (0, 50, 1), now=1.5)  # Triton restarted: counters from zero
    assert load.models["m"].queue_ms == 0.0
    assert load.models["m"].fresh(2.0) and not load.models["m"].fresh(9.0)
    # A count past float's range is left out, not the end of the poller (int(inf) raises).
    load.update(METRICS.replace(" %d\n", " 1e999\n", 1) % (601_000, 30), now=1.75)
    assert load.models["m"].pending == 0 and load.models["m"].at == 1.75


async def test_saturated_model_is_degraded_until_its_queue_drains() -> None:
    from proxy.triton_load import ModelLoad, TritonLoad

    clock = FakeClock()
    deps = Deps(clock=clock)
    d = DegradeFilter(
        DegradeFilter.Params.model_validate(
            {"lighter": {"m": "m_lite"},
             "saturation": {"triton_metrics_url": "http://127.0.0.1:1/metrics",
                            "queue_ms_above": 20}}
        ),
        deps,
    )  # fmt: skip
    d.name = "degrade"
    d.load = TritonLoad("http://127.0.0.1:1/metrics")  # fed by hand here, not polled
    h = Harness.for_filters([d])

    async def path() -> str:
        r = await h.request("POST", "/v2/models/m/infer", body=b"{}")
        assert r.upstream_headers is not None
        return r.upstream_headers[":path"]

    d.load.models["m"] = ModelLoad(pending=9, queue_ms=45.0, at=clock.monotonic())
    assert await path() == "/v2/models/m_lite/infer"
    d.load.models["m"] = ModelLoad(pending=0, queue_ms=3.0, at=clock.monotonic())
    assert await path() == "/v2/models/m/infer"
    d.load.models["m"] = ModelLoad(pending=9, queue_ms=45.0, at=clock.monotonic() - 10)
    assert await path() == "/v2/models/m/infer"  # stale signals (metrics unreadable) count not


def test_a_poll_with_nothing_finished_keeps_the_last_queue_time() -> None:
    from proxy.triton_load import SaturationParams, TritonLoad

    sat = SaturationParams(triton_metrics_url="http://127.0.0.1:8002/metrics")
    load = TritonLoad("http://127.0.0.1:8002/metrics")
    load.update(METRICS % (0, 1_000, 10), now=1.0)
    load.update(METRICS % (50, 601_000, 20), now=1.25)
    assert sat.saturated(load.models["m"], 1.25)
    # A hung model (or a batch running for seconds): nothing finished, 50 still wait.
    load.update(METRICS % (50, 601_000, 20), now=1.5)
    assert sat.saturated(load.models["m"], 1.5)
    assert load.models["m"].queue_ms == pytest.approx(60.0)
    load.update(METRICS % (0, 601_000, 20), now=1.75)  # idle: nobody waits
    assert load.models["m"].queue_ms == 0.0


async def test_not_degraded_to_a_lighter_model_whose_breaker_refuses() -> None:
    from proxy.triton_load import ModelLoad, TritonLoad

    clock = FakeClock()
    deps = Deps(clock=clock)
    d = DegradeFilter(
        DegradeFilter.Params.model_validate(
            {"lighter": {"m": "m_lite"},
             "saturation": {"triton_metrics_url": "http://127.0.0.1:1/metrics"}}
        ),
        deps,
    )  # fmt: skip
    d.name = "degrade"
    d.load = TritonLoad("http://127.0.0.1:1/metrics")  # fed by hand here, not polled
    breaker = BreakerFilter(
        BreakerFilter.Params(models=["m", "m_lite"], min_calls=4, open_s=5), deps
    )
    breaker.name = "breaker"
    h = Harness.for_filters([d, breaker])

    def lite_down(headers: dict[str, str], body: bytes) -> UpstreamReply:
        return UpstreamReply(503 if "/m_lite/" in headers[":path"] else 200)

    for _ in range(4):
        await h.request("POST", "/v2/models/m_lite/infer", body=b"{}", upstream=lite_down)
    assert breaker.breakers["m_lite"].would_refuse(clock.monotonic())
    # "m" is saturated, not failing: it serves rather than the lighter model's sure 503.
    d.load.models["m"] = ModelLoad(pending=9, queue_ms=400.0, at=clock.monotonic())
    r = await h.request("POST", "/v2/models/m/infer", body=b"{}", upstream=lite_down)
    assert r.status == 200 and "x-floodwall-degraded" not in r.headers
    assert r.upstream_headers is not None
    assert r.upstream_headers[":path"] == "/v2/models/m/infer"


async def test_triton_load_readings_carry_the_policies_clock() -> None:
    # They were stamped with time.monotonic() and compared with Deps.clock: under a fake
    # clock a reading was always fresh (or never).
    from proxy.api import Signals
    from proxy.testing import FakeClock

    sig, clock = Signals(), FakeClock(start=1000.0)
    load = sig.watch_triton("http://127.0.0.1:1/metrics", clock)
    try:
        assert load.now() == 1000.0
        clock.advance(5)
        assert load.now() == 1005.0
    finally:
        await sig.unwatch_triton("http://127.0.0.1:1/metrics")
