"""Admission in process: the adaptive limit (and its no-load RTT that cannot ratchet up),
reserved capacity per class, shedding order, the fair queue with its deadline, and the
priority classes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from filters.admission.filter import PROBE_S, AdmissionFilter
from filters.admission.limiter import Limiter
from filters.admission.params import AdmissionParams
from proxy import errors
from proxy.api import CONTINUE, Deps, Filter, Headers, RequestContext
from proxy.chain import Chain
from proxy.config import ConfigError, FilterConfig
from proxy.registry import build_filters
from proxy.server import ProcessorServer
from proxy.testing import FakeClock, Harness, UpstreamReply, default_config


def _limiter(**kw: Any) -> Limiter:
    return Limiter(AdmissionParams.model_validate({"initial_limit": 10, **kw}))


# --- the limit -------------------------------------------------------------------------------


def test_limit_grows_without_queueing_and_shrinks_with_it() -> None:
    lim = _limiter(max_limit=40)
    now = 0.0
    for _ in range(20):  # RTT at its no-load value: nothing queued upstream
        lim.inflight += 1
        now += 0.01
        lim.release(0.010, failed=False, now=now, load=1)
    assert lim.limit == 30
    for _ in range(10):  # 3x the RTT under load: ~2/3 of the limit is queueing
        lim.inflight += 1
        now += 0.01
        lim.release(0.030, failed=False, now=now, load=25)
    assert lim.limit == 20
    lim.inflight += 1
    lim.release(0.030, failed=True, now=now)
    assert lim.limit == 18  # a failure cuts 10%


def test_no_load_rtt_cannot_ratchet_up_under_load() -> None:
    lim = _limiter(rtt_window_s=1.0)
    lim.inflight += 1
    lim.release(0.010, failed=False, now=0.0, load=1)
    assert lim.base_rtt == 0.010
    # Minutes of load: every RTT includes queueing and the window empties; base holds.
    for i in range(300):
        lim.inflight += 1
        lim.release(0.050, failed=False, now=1.0 + i, load=int(lim.limit))
    assert lim.base_rtt == 0.010
    # The limit settles where 3 to 6 calls wait upstream: limit x (1 - 10/50) in [3, 6].
    assert 3.75 <= lim.limit <= 7.5
    # A real slow-down seen at low load does move it, within one window.
    lim.inflight += 1
    lim.release(0.020, failed=False, now=400.0, load=0)
    assert lim.base_rtt == 0.020


# --- classes, reserves, queue ----------------------------------------------------------------


def test_reserved_capacity_per_class() -> None:
    lim = _limiter(reserve_critical=0.2, reserve_standard=0.1)
    assert (lim.cap("critical"), lim.cap("standard"), lim.cap("sheddable")) == (10, 8, 7)
    assert [lim.try_acquire("sheddable") for _ in range(8)] == [True] * 7 + [False]
    assert lim.try_acquire("standard") and not lim.try_acquire("standard")
    assert lim.try_acquire("critical") and lim.try_acquire("critical")
    assert not lim.try_acquire("critical")


async def test_queue_is_fair_across_tenants_and_by_class() -> None:
    lim = _limiter(initial_limit=1, min_limit=1, reserve_critical=0, reserve_standard=0)
    assert lim.try_acquire("standard")
    order: list[str] = []

    async def wait(cls: str, tenant: str) -> None:
        assert await lim.acquire(cls, tenant, 5.0) == "queued"
        order.append(f"{cls}:{tenant}")
        await asyncio.sleep(0)
        lim.release(None, failed=False, now=0.0)

    tasks = [asyncio.ensure_future(wait("standard", "noisy")) for _ in range(3)]
    tasks.append(asyncio.ensure_future(wait("standard", "quiet")))
    tasks.append(asyncio.ensure_future(wait("critical", "vip")))
    await asyncio.sleep(0)
    lim.release(None, failed=False, now=0.0)
    await asyncio.gather(*tasks)
    # Critical first; then the quiet tenant gets its turn before the noisy one's backlog.
    assert order[0] == "critical:vip"
    assert order[1:3] == ["standard:noisy", "standard:quiet"]
    assert lim.inflight == 0 and lim.waiting == 0


async def test_a_waiter_that_times_out_is_forgotten() -> None:
    lim = _limiter(initial_limit=1, min_limit=1, reserve_critical=0, reserve_standard=0)
    assert lim.try_acquire("standard")
    assert await lim.acquire("standard", "t", 0.01) == "shed_timeout"
    assert lim.waiting == 0 and not lim.queues["standard"]


async def test_a_full_queue_makes_room_for_a_higher_class() -> None:
    lim = _limiter(initial_limit=1, min_limit=1, max_queue=3, reserve_critical=0,
                   reserve_standard=0)  # fmt: skip
    assert lim.try_acquire("standard")
    waits = {
        name: asyncio.ensure_future(lim.acquire(cls, tenant, 5.0))
        for name, cls, tenant in [("noisy1", "sheddable", "noisy"),
                                  ("noisy2", "sheddable", "noisy"), ("quiet", "sheddable", "quiet")]
    }  # fmt: skip
    await asyncio.sleep(0)
    assert lim.waiting == 3
    # Full: a critical request takes the place of the noisiest tenant's newest sheddable one.
    vip = asyncio.ensure_future(lim.acquire("critical", "vip", 5.0))
    await asyncio.sleep(0)
    assert await waits["noisy2"] == "shed_preempted"
    assert lim.waiting == 3 and not waits["noisy1"].done()
    # Nobody below it to push out: a sheddable arrival is refused at once.
    assert lim.refusal("sheddable", 5.0) == "shed_full"
    assert await lim.acquire("sheddable", "late", 5.0) == "shed_full"
    lim.release(None, failed=False, now=0.0)
    assert await vip == "queued"  # the freed permit went to the critical waiter first
    for w in ("noisy1", "quiet"):
        lim.release(None, failed=False, now=0.0)
        assert await waits[w] == "queued"
    assert lim.waiting == 0 and lim.inflight == 1


async def test_a_wait_predicted_too_long_is_refused_at_once() -> None:
    lim = _limiter(initial_limit=1, min_limit=1, max_limit=1, reserve_critical=0,
                   reserve_standard=0)  # fmt: skip
    lim.inflight = 1
    lim.release(0.1, failed=False, now=0.0, load=1)  # calls hold a permit ~100 ms
    assert lim.rtt == pytest.approx(0.1)
    assert lim.try_acquire("standard")
    first = asyncio.ensure_future(lim.acquire("standard", "t", 1.0))
    await asyncio.sleep(0)
    # One waiter ahead, one permit, 100 ms a call: a second waiter would need ~200 ms.
    assert lim.predicted_wait_s("standard") == pytest.approx(0.2)
    assert lim.refusal("standard", 0.15) == "shed_timeout"
    assert lim.refusal("standard", 0.25) is None
    assert lim.refusal("critical", 0.15) is None  # critical goes ahead of standard waiters
    assert await lim.acquire("standard", "t", 0.15) == "shed_timeout"
    assert lim.waiting == 1
    lim.release(None, failed=False, now=0.0)
    assert await first == "queued"


async def test_lower_classes_are_refused_at_once_while_a_higher_class_takes_every_permit() -> None:
    clock = FakeClock()
    lim = Limiter(AdmissionParams.model_validate({"initial_limit": 10, "min_limit": 10,
                                                  "max_limit": 10}), clock.monotonic)  # fmt: skip
    lim.inflight = 1
    lim.release(0.1, failed=False, now=clock.now, load=1)  # a permit is held ~100 ms
    # Critical calls take a permit each as one frees: 100 grants a second, the model's pace.
    for _ in range(600):
        clock.advance(0.01)
        assert lim.try_acquire("critical")
        if lim.inflight == 10:
            lim.inflight -= 1
    assert lim.grant_rates()["critical"] == pytest.approx(100, rel=0.01)
    lim.inflight = 10
    # Nobody waits, yet a standard waiter would be overtaken by every critical arrival.
    assert lim.predicted_wait_s("standard") > 1.0
    assert lim.refusal("standard", 0.25) == "shed_timeout"
    assert await lim.acquire("standard", "t", 0.25) == "shed_timeout"
    assert lim.refusal("critical", 0.25) is None  # critical itself still queues
    # Critical traffic stops: within a few seconds its grant rate has decayed and standard
    # calls queue again for the permits that come free.
    clock.advance(5.0)
    assert lim.predicted_wait_s("standard") == pytest.approx(0.1 / 8, rel=0.1)  # 1 of 8
    assert lim.refusal("standard", 0.25) is None


# --- the filter ------------------------------------------------------------------------------


class _Identity(Filter):
    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Any:
        ctx.tenant, ctx.tier = headers.get("x-t", "t"), headers.get("x-tier", "standard")
        ctx.key_id = headers.get("x-k", "k")
        return CONTINUE


def _harness(clock: FakeClock, **params: Any) -> tuple[Harness, AdmissionFilter]:
    deps = Deps(clock=clock)
    ident = _Identity(_Identity.Params(), deps)
    ident.name = "ident"
    f = AdmissionFilter(AdmissionFilter.Params.model_validate(params), deps)
    f.name = "admission"
    return Harness.for_filters([ident, f]), f


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-tier": "premium"}, "critical"),  # 2 + interactive 1
        ({"x-tier": "premium", "x-request-type": "batch"}, "standard"),
        ({"x-tier": "free", "x-request-type": "batch"}, "sheddable"),
        ({"x-tier": "free", "x-priority": "critical"}, "standard"),  # untrusted: ignored
        ({"x-tier": "free", "x-priority": "critical", "x-k": "ops"}, "critical"),
    ],
)
async def test_priority_classes(headers: dict[str, str], expected: str) -> None:
    h, _ = _harness(FakeClock(), priority={"trusted_key_ids": ["ops"]})
    seen: list[str] = []

    def up(hdrs: dict[str, str], body: bytes) -> UpstreamReply:
        return UpstreamReply(200)

    class _Spy(Filter):
        async def on_request_headers(self, ctx: RequestContext, hs: Headers) -> Any:
            seen.append(ctx.priority or "")
            return CONTINUE

    spy = _Spy(_Spy.Params(), Deps())
    spy.name = "spy"
    h = Harness.for_filters([*h.chain.filters[:-1], spy])  # ident, admission, spy
    await h.request("GET", "/v2/models/m/infer", headers=headers, upstream=up)
    assert seen == [expected]


async def test_saturated_gateway_sheds_sheddable_first_with_retry_after() -> None:
    clock = FakeClock()
    h, f = _harness(clock, initial_limit=4, min_limit=4, max_queue_ms=0)
    gate = asyncio.Event()

    async def slow(headers: dict[str, str], body: bytes) -> UpstreamReply:
        await gate.wait()
        return UpstreamReply(200)

    busy = [
        asyncio.ensure_future(h.request("GET", "/v2/models/m/infer", upstream=slow))
        for _ in range(3)
    ]  # standard requests fill 3 = the standard share of 4
    await asyncio.sleep(0)
    batch = {"x-tier": "free", "x-request-type": "batch"}
    shed = await h.request("GET", "/v2/models/m/infer", headers=batch)
    assert shed.status == 503 and shed.json()["error"]["type"] == "overloaded"
    assert int(shed.headers["retry-after"]) >= 1
    vip = asyncio.ensure_future(
        h.request("GET", "/v2/models/m/infer", headers={"x-tier": "premium"}, upstream=slow)
    )
    await asyncio.sleep(0)
    assert not vip.done()  # admitted into the reserved room, now at the upstream
    gate.set()
    assert [(await t).status for t in [*busy, vip]] == [200] * 4
    assert f.limiters["kserve_http"].inflight == 0


class _BodyWatcher(_Identity):
    """First in the chain, so last at the response: sees admission's permits at the body."""

    admission: AdmissionFilter
    inflight: list[int]

    async def on_response_body(self, ctx: RequestContext, body: bytes) -> Any:
        self.inflight.append(self.admission.limiters["kserve_http"].inflight)
        return CONTINUE


@pytest.mark.parametrize(("content_type", "held"), [("application/json", 0),
                                                     ("text/event-stream", 1)])  # fmt: skip
async def test_a_unary_answer_gives_its_permit_back_at_its_headers(
    content_type: str, held: int
) -> None:
    deps = Deps(clock=FakeClock())
    watcher = _BodyWatcher(_BodyWatcher.Params(), deps)
    watcher.name = "watcher"
    f = AdmissionFilter(AdmissionFilter.Params(), deps)
    f.name = "admission"
    watcher.admission, watcher.inflight = f, []
    h = Harness.for_filters([watcher, f])
    reply = UpstreamReply(200, {"content-type": content_type}, b"data")
    assert (await h.request("GET", "/v2/models/m/infer", upstream=reply)).status == 200
    # The model is done with a unary call once it answers; a stream goes on until its end.
    assert watcher.inflight == [held]
    assert f.limiters["kserve_http"].inflight == 0
    assert f.limiters["kserve_http"].rtt is not None  # the call still counted for the limit


class _ModelInBody(_Identity):
    """Identity at the headers; the model from the body, as ``openai`` sets it."""

    bodies = 0

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Any:
        type(self).bodies += 1
        ctx.model = body.decode()
        return CONTINUE


async def test_refusal_at_the_headers_when_every_model_of_the_route_is_full() -> None:
    clock = FakeClock()
    deps = Deps(clock=clock)
    ident = _ModelInBody(_ModelInBody.Params(), deps)
    ident.name = "ident"
    f = AdmissionFilter(AdmissionFilter.Params.model_validate({
        "models": ["m", "n"], "initial_limit": 1, "min_limit": 1, "max_queue": 1,
        "reserve_critical": 0, "reserve_standard": 0}), deps)  # fmt: skip
    f.name = "admission"
    h = Harness.for_filters([ident, f])
    gate = asyncio.Event()

    async def slow(headers: dict[str, str], body: bytes) -> UpstreamReply:
        await gate.wait()
        return UpstreamReply(200)

    def call(tier: str, model: str = "m", upstream: Any = slow) -> Any:
        return asyncio.ensure_future(h.request("POST", "/v1/embeddings", headers={"x-tier": tier},
                                               body=model, upstream=upstream))  # fmt: skip

    busy = call("standard")
    await asyncio.sleep(0.01)
    waiter = call("free")  # sheddable, queued: the queue (1) is full
    await asyncio.sleep(0.01)
    bodies = _ModelInBody.bodies
    shed = await call("free")
    assert shed.status == 503 and shed.json()["error"]["type"] == "overloaded"
    assert _ModelInBody.bodies == bodies  # refused before the body was read
    # A critical request still has a way in (it may push the sheddable waiter out): its
    # body is read and admission decides there.
    vip = call("premium")
    await asyncio.sleep(0.01)
    assert _ModelInBody.bodies == bodies + 1
    assert (await waiter).status == 503
    # A model not seen yet on the route is refused with the rest, until a probe (one request
    # per route every PROBE_S) reaches the body; from then on its room is known.
    assert (await call("free", model="n", upstream=UpstreamReply(200))).status == 503
    clock.advance(PROBE_S)
    for _ in range(2):
        assert (await call("free", model="n", upstream=UpstreamReply(200))).status == 200
    gate.set()
    assert [(await t).status for t in (busy, vip)] == [200, 200]
    assert f.limiters["m"].inflight == 0 and f.limiters["m"].waiting == 0


class _Deferring(Filter):
    """Takes async submissions the way ``jobs`` does: says so at its headers phase, answers
    202 at the body."""

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Any:
        ctx.deferred = "respond-async" in headers.get("prefer", "")
        return CONTINUE

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Any:
        return errors.error(202, "accepted", "queued") if ctx.deferred else CONTINUE


async def test_an_async_submission_is_neither_shed_nor_holds_a_permit() -> None:
    deps = Deps(clock=FakeClock())
    ident = _ModelInBody(_ModelInBody.Params(), deps)
    f = AdmissionFilter(AdmissionFilter.Params.model_validate({
        "models": ["m"], "initial_limit": 1, "min_limit": 1, "max_queue": 0,
        "reserve_critical": 0, "reserve_standard": 0}), deps)  # fmt: skip
    jobs = _Deferring(_Deferring.Params(), deps)
    for flt, name in ((ident, "ident"), (f, "admission"), (jobs, "jobs")):  # admission first
        flt.name = name
    h = Harness.for_filters([ident, f, jobs])
    gate = asyncio.Event()

    async def slow(headers: dict[str, str], body: bytes) -> UpstreamReply:
        await gate.wait()
        return UpstreamReply(200)

    busy = asyncio.ensure_future(h.request("POST", "/v1/embeddings", body="m", upstream=slow))
    await asyncio.sleep(0.01)
    assert (await h.request("POST", "/v1/embeddings", body="m")).status == 503  # saturated
    queued = await h.request("POST", "/v1/embeddings", headers={"prefer": "respond-async"},
                             body="m")  # fmt: skip
    assert queued.status == 202
    assert f.limiters["m"].inflight == 1  # only the synchronous call holds a permit
    gate.set()
    assert (await busy).status == 200


def test_bad_admission_config_fails_at_start() -> None:
    with pytest.raises(ConfigError, match="reserve_critical"):
        build_filters([FilterConfig(name="a", type="admission", params={
            "reserve_critical": 0.6, "reserve_standard": 0.5})], Deps())  # fmt: skip


async def test_only_successes_are_timed_and_refusals_upstream_are_congestion() -> None:
    clock = FakeClock()
    h, f = _harness(clock)

    def answer(status: int, seconds: float) -> Any:
        def up(headers: dict[str, str], body: bytes) -> UpstreamReply:
            clock.advance(seconds)
            return UpstreamReply(status)

        return up

    for _ in range(10):
        await h.request("POST", "/v2/models/m/infer", body=b"{}", upstream=answer(200, 0.020))
    lim = f.limiters["kserve_http"]
    base, limit = lim.base_rtt, lim.limit
    assert base == pytest.approx(0.020)
    # A bad request answered at once says nothing of the model's pace: were it taken as the
    # no-load RTT, every normal call would look queued and the limit would fall.
    await h.request("POST", "/v2/models/m/infer", body=b"x", upstream=answer(400, 0.0002))
    assert lim.base_rtt == base and lim.limit == limit
    for _ in range(10):
        await h.request("POST", "/v2/models/m/infer", body=b"{}", upstream=answer(200, 0.020))
    assert lim.base_rtt == base and lim.limit >= limit
    # Triton refusing (429: its queue is full) is congestion, as a 5xx is: the limit is cut.
    limit = lim.limit
    await h.request("POST", "/v2/models/m/infer", body=b"{}", upstream=answer(429, 0.0002))
    assert lim.limit == pytest.approx(limit * 0.9) and lim.base_rtt == base
    assert lim.inflight == 0


@pytest.mark.parametrize(("grpc_status", "cut"), [("14", True), ("5", False)])
async def test_a_trailers_only_grpc_error_is_not_timed(grpc_status: str, cut: bool) -> None:
    h, f = _harness(FakeClock())
    reply = UpstreamReply(200, {"content-type": "application/grpc", "grpc-status": grpc_status},
                          b"")  # fmt: skip
    await h.request("POST", "/v2/models/m/infer", body=b"{}", upstream=reply, grpc=True)
    lim = f.limiters["kserve_http"]
    assert lim.inflight == 0 and lim.rtt is None and lim.base_rtt is None
    assert lim.limit == (16 * 0.9 if cut else 16)  # UNAVAILABLE cuts it; NOT_FOUND does not


async def test_two_admission_filters_on_one_route_keep_their_own_permits() -> None:
    deps = Deps(clock=FakeClock())
    per_route = AdmissionFilter(AdmissionFilter.Params(), deps)
    per_route.name = "per_route"
    per_model = AdmissionFilter(AdmissionFilter.Params(models=["m"]), deps)
    per_model.name = "per_model"
    h = Harness.for_filters([per_route, per_model])
    for _ in range(5):
        assert (await h.request("POST", "/v2/models/m/infer", body=b"{}")).status == 200
    for lim in (per_route.limiters["kserve_http"], per_model.limiters["m"]):
        assert lim.inflight == 0 and lim.rtt is not None


@pytest.mark.parametrize("kind", ["grpcio", "h2"])
async def test_a_stream_keeps_its_permit_to_its_end_with_admission_alone(
    tmp_path: Path, kind: Literal["grpcio", "h2"]
) -> None:
    f = AdmissionFilter(AdmissionFilter.Params(), Deps())
    f.name = "admission"
    addr = f"unix:{tmp_path}/p.sock"
    server = ProcessorServer(Chain(default_config(), [f]), addr, kind=kind)
    await server.start()

    def headers(field: str, h: dict[str, str], eos: bool) -> pb.ProcessingRequest:
        hm = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in h.items()])
        return pb.ProcessingRequest(**{field: pb.HttpHeaders(headers=hm, end_of_stream=eos)})

    def chunk(eos: bool) -> pb.ProcessingRequest:
        return pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: {}\n\n",
                                                               end_of_stream=eos))  # fmt: skip

    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            call = pb_grpc.ExternalProcessorStub(ch).Process()
            path = "/v2/models/sim_llm_stream/generate_stream"
            await call.write(headers("request_headers", {":path": path, ":method": "POST"}, True))
            assert (await call.read()).HasField("request_headers")
            lim = f.limiters["kserve_http"]
            await call.write(headers("response_headers", {
                ":status": "200", "content-type": "text/event-stream"}, False))  # fmt: skip
            answer = await call.read()
            # Envoy is asked to stream the body on (not to buffer it whole) ...
            assert answer.mode_override.response_body_mode == ProcessingMode.STREAMED
            # ... and the stream to the processor stays open: the permit is held meanwhile.
            for _ in range(3):
                assert lim.inflight == 1
                await call.write(chunk(eos=False))
                assert (await call.read()).HasField("response_body")
            await call.write(chunk(eos=True))
            assert (await call.read()).HasField("response_body")
            assert await call.read() is grpc.aio.EOF
        assert lim.inflight == 0 and lim.rtt is not None
    finally:
        await server.drain_and_stop(0.1, 0)


async def test_a_noisy_tenants_backlog_does_not_shed_a_quiet_tenant_of_its_class() -> None:
    # Round robin serves the quiet tenant's one request next; the wait predicted for it (and
    # the full queue) must not count the noisy tenant's whole backlog ahead of it.
    lim = _limiter(initial_limit=4, min_limit=4, max_queue=63, reserve_critical=0,
                   reserve_standard=0)  # fmt: skip
    for _ in range(4):
        assert lim.try_acquire("standard")
    lim.rtt = 0.1  # 40 permits a second come free
    noisy = [asyncio.ensure_future(lim.acquire("standard", "noisy", 60.0)) for _ in range(62)]
    await asyncio.sleep(0)
    assert lim.predicted_wait_s("standard", "quiet") == pytest.approx(2 / 40)
    assert lim.refusal("standard", 0.2, "quiet") is None
    assert lim.refusal("standard", 0.2, "noisy") == "shed_timeout"  # 63 of its own ahead
    quiet = asyncio.ensure_future(lim.acquire("standard", "quiet", 0.2))
    await asyncio.sleep(0)
    assert lim.waiting == 63  # full now
    # A second quiet tenant pushes out the noisy tenant's newest, not the other way round.
    other = asyncio.ensure_future(lim.acquire("standard", "other", 0.2))
    await asyncio.sleep(0)
    assert await noisy[-1] == "shed_preempted" and not other.done()
    assert await lim.acquire("standard", "noisy", 60.0) == "shed_full"
    for _ in range(3):  # round robin: noisy's head, quiet, other
        lim.release(None, failed=False, now=0.0)
    assert {await quiet, await other} == {"queued"}  # their turns came before the backlog's
    assert len(lim.queues["standard"]["noisy"]) == 60
    for w in noisy[:-1]:
        w.cancel()
    await asyncio.gather(*noisy[:-1], return_exceptions=True)


async def test_a_client_that_leaves_does_not_hand_back_the_models_work() -> None:
    # Triton does not cancel an HTTP call whose client left: the permit stays taken about as
    # long as a call takes, or clients that time out and retry pile calls past the limit.
    clock = FakeClock()
    h, f = _harness(clock, initial_limit=4, min_limit=4)
    assert (await h.request("GET", "/v2/models/m/infer", upstream=UpstreamReply(200))).status == 200
    lim = f.limiters["kserve_http"]
    lim.rtt = 0.5
    await h.request("GET", "/v2/models/m/infer", upstream=UpstreamReply(200), client_aborts=True)
    await h.chain.wait_background()
    assert clock.slept == [0.5] and lim.inflight == 0  # held for the RTT, then given back


async def test_only_model_calls_take_a_permit_and_a_time() -> None:
    # A metadata GET or a health probe answers in well under a millisecond: timed, it set the
    # no-load RTT so low that every inference looked queued (the limit could not grow), and a
    # probe waited for a permit under load.
    h, f = _harness(FakeClock())
    for path in ("/v2/models/m", "/v2/models/m/ready", "/v2/models/m/config", "/v2/health/ready",
                 "/v2/models/m/versions/1/stats", "/v2"):  # fmt: skip
        assert (await h.request("GET", path)).status == 200
    assert f.limiters == {}
    await h.request("POST", "/v2/models/m/versions/1/infer", body=b"{}")
    assert f.limiters["kserve_http"].rtt is not None


def test_calls_model_on_each_api() -> None:
    from proxy.chain import calls_model
    from proxy.config import RouteConfig

    grpc = RouteConfig.model_validate(
        {"name": "g", "match": {"prefix": "/inference."}, "api": "kserve_grpc", "upstream": "u"}
    )
    http = RouteConfig.model_validate({"name": "h", "match": {"prefix": "/"}, "upstream": "u"})
    emb = RouteConfig.model_validate(
        {"name": "e", "match": {"path": "/v1/embeddings"}, "api": "openai_embeddings",
         "upstream": "u"}
    )  # fmt: skip
    assert calls_model(grpc, "/inference.GRPCInferenceService/ModelInfer")
    assert calls_model(grpc, "/inference.GRPCInferenceService/ModelStreamInfer")
    assert not calls_model(grpc, "/inference.GRPCInferenceService/ServerLive")
    assert not calls_model(grpc, "/inference.GRPCInferenceService/ModelMetadata")
    assert calls_model(http, "/v2/models/m/infer?x=1")
    assert calls_model(http, "/v2/models/m/generate_stream")
    assert not calls_model(http, "/v2/models/m") and not calls_model(http, "/v2/health/live")
    assert calls_model(http, "/echo/anything")  # not KServe's: a passthrough call
    assert calls_model(emb, "/v1/embeddings")
