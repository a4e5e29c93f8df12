"""Chain semantics, through the shipped phase-replay harness."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from proxy.api import (
    CONTINUE,
    Decision,
    Deps,
    Filter,
    Headers,
    Mutate,
    NoParams,
    OnError,
    Outcome,
    Phase,
    RequestContext,
    Respond,
    cancel_and_wait,
)
from proxy.config import parse_config
from proxy.testing import Harness, UpstreamReply, default_config


class Recorder(Filter):
    """Records what it saw; optionally mutates, answers or raises in one phase."""

    def __init__(self, name: str, log: list[str], **behaviour: Any) -> None:
        super().__init__(NoParams(), Deps())
        self.name = name
        self.log = log
        self.b = behaviour
        self.seen_headers: Headers = {}
        self.outcome: Outcome | None = None

    def _act(self, phase: str) -> Decision:
        self.log.append(f"{self.name}.{phase}")
        if self.b.get("raise_in") == phase:
            raise RuntimeError("boom")
        if self.b.get("respond_in") == phase:
            return Respond(status=418, body=b"teapot")
        if phase in self.b.get("mutate", {}):
            return self.b["mutate"][phase]
        return CONTINUE

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        self.seen_headers = dict(headers)
        return self._act("req_h")

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        self.seen_body = body
        return self._act("req_b")

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        return self._act("resp_h")

    async def on_response_body(self, ctx: RequestContext, body: bytes) -> Decision:
        self.seen_resp_body = body
        return self._act("resp_b")

    async def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.log.append(f"{self.name}.complete")
        self.outcome = outcome


def harness(*filters: Filter, on_error: dict[str, OnError] | None = None) -> Harness:
    return Harness.for_filters(list(filters), on_error=on_error or {})


async def test_request_phases_in_order_response_phases_reversed() -> None:
    log: list[str] = []
    h = harness(Recorder("a", log), Recorder("b", log))
    r = await h.request("POST", "/v1/embeddings", body=b"{}")
    assert r.status == 200
    assert log == [
        "a.req_h", "b.req_h", "a.req_b", "b.req_b",
        "b.resp_h", "a.resp_h", "b.resp_b", "a.resp_b",
        "a.complete", "b.complete",
    ]  # fmt: skip


async def test_mutations_accumulate_and_later_filters_see_them() -> None:
    log: list[str] = []
    a = Recorder("a", log, mutate={"req_h": Mutate(set_headers={"x-one": "1"})})
    b = Recorder("b", log, mutate={"req_h": Mutate(set_headers={"x-two": "2"})})
    r = await harness(a, b).request("GET", "/v2/models")
    assert b.seen_headers["x-one"] == "1"
    assert r.upstream_headers is not None
    assert r.upstream_headers["x-one"] == "1" and r.upstream_headers["x-two"] == "2"


async def test_body_mutation_is_seen_by_the_next_filter_and_the_upstream() -> None:
    log: list[str] = []
    a = Recorder("a", log, mutate={"req_b": Mutate(body=b"rewritten")})
    b = Recorder("b", log)
    r = await harness(a, b).request("POST", "/v1/embeddings", body=b"original")
    assert b.seen_body == b"rewritten"
    assert r.upstream_body == b"rewritten"


async def test_a_replaced_body_goes_with_its_own_content_length() -> None:
    """Envoy answers 500 for a buffered body its content-length does not describe (the
    harness plays that): whichever filter replaced the body last, the chain sends the new
    length, in the request and in the response."""
    log: list[str] = []
    first = Mutate(body=b"first", set_headers={"content-length": "5"})
    a = Recorder("a", log, mutate={"req_b": first, "resp_b": Mutate(body=b"{}")})
    b = Recorder("b", log, mutate={"req_b": Mutate(body=b"the second, longer")})
    up = UpstreamReply(200, {"content-length": "8"}, b"original")
    r = await harness(a, b).request("POST", "/v1/embeddings", body=b"original",
                                    headers={"content-length": "8"}, upstream=up)  # fmt: skip
    assert r.upstream_body == b"the second, longer"
    assert r.upstream_headers is not None and r.upstream_headers["content-length"] == "18"
    assert r.body == b"{}" and r.headers["content-length"] == "2"


async def test_respond_stops_the_chain_but_complete_runs_for_all() -> None:
    log: list[str] = []
    a = Recorder("a", log, respond_in="req_h")
    b = Recorder("b", log)
    r = await harness(a, b).request("GET", "/v2/models")
    assert r.status == 418 and r.body == b"teapot"
    assert not r.upstream_called
    assert "b.req_h" not in log
    assert log[-2:] == ["a.complete", "b.complete"]
    assert b.outcome is not None and b.outcome.responded_by == "a"
    assert b.outcome.status == 418


class SyncComplete(Filter):
    """A plain-def on_complete (metrics-style); ``fail`` makes it raise."""

    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        super().__init__(NoParams(), Deps())
        self.name, self.log, self.fail = name, log, fail

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.log.append(f"{self.name}.complete")
        if self.fail:
            raise RuntimeError("boom in on_complete")


class AwaitsSometimes(Filter):
    """Returns a coroutine only for requests with something to settle (like rate_limit)."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(NoParams(), Deps())
        self.name, self.log = name, log

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> Any:
        if outcome.status == 200:
            return None
        return self._settle()

    async def _settle(self) -> None:
        await asyncio.sleep(0)
        self.log.append(f"{self.name}.settled")


def _faults(name: str) -> float:
    labels = {"filter": name, "kind": "exception"}
    return REGISTRY.get_sample_value("floodwall_filter_faults_total", labels) or 0.0


async def test_a_plain_def_on_complete_runs_inline_without_a_task() -> None:
    log: list[str] = []
    h = harness(SyncComplete("a", log), AwaitsSometimes("b", log))
    ctx, plan = h.chain.context({":method": "GET", ":path": "/v2/models"})
    assert h.chain.finish(ctx, plan, None, 200, True) is None  # nothing left to await
    assert log == ["a.complete"]
    task = h.chain.finish(ctx, plan, "a", 503, True)
    assert task is not None and log == ["a.complete", "a.complete"]
    await task
    assert log[-1] == "b.settled"


async def test_a_raising_plain_on_complete_is_counted_and_the_others_still_run() -> None:
    log: list[str] = []
    before = _faults("bad")
    h = harness(SyncComplete("bad", log, fail=True), Recorder("c", log))
    r = await h.request("GET", "/v2/models")
    assert r.status == 200
    assert log[-2:] == ["bad.complete", "c.complete"]
    assert _faults("bad") == before + 1


async def test_fault_closed_answers_500_json_and_is_counted() -> None:
    log: list[str] = []
    a = Recorder("a", log, raise_in="req_h")
    before = (
        REGISTRY.get_sample_value(
            "floodwall_filter_faults_total", {"filter": "a", "kind": "exception"}
        )
        or 0.0
    )
    r = await harness(a, Recorder("b", log), on_error={"a": "closed"}).request("GET", "/v2/x")
    assert r.status == 500
    assert r.json()["error"]["type"] == "internal_error"
    assert "boom" not in r.body.decode()  # internals stay in the logs
    after = REGISTRY.get_sample_value(
        "floodwall_filter_faults_total", {"filter": "a", "kind": "exception"}
    )
    assert after == before + 1


async def test_fault_open_skips_the_filter() -> None:
    log: list[str] = []
    a = Recorder("a", log, raise_in="req_h")
    r = await harness(a, Recorder("b", log), on_error={"a": "open"}).request("GET", "/v2/x")
    assert r.status == 200 and r.upstream_called
    assert "b.req_h" in log


@pytest.mark.parametrize("on_error", ["closed", "open"])
async def test_a_header_envoy_would_refuse_is_the_filters_fault(on_error: OnError) -> None:
    """Envoy refuses a whole mutation with a CR, LF or NUL in a value (or a bad name) and
    answers 500, past the filter's on_error: the chain judges it first, as that filter's."""
    labels = {"filter": "a", "kind": "bad_header"}
    before = REGISTRY.get_sample_value("floodwall_filter_faults_total", labels) or 0.0
    log: list[str] = []
    bad = Mutate(set_headers={"x-ok": "1", "x-echo": "a\r\nset-cookie: x"})
    a = Recorder("a", log, mutate={"req_h": bad})
    r = await harness(a, Recorder("b", log), on_error={"a": on_error}).request("GET", "/v2/x")
    assert REGISTRY.get_sample_value("floodwall_filter_faults_total", labels) == before + 1
    if on_error == "closed":
        assert r.status == 500 and r.json()["error"]["type"] == "internal_error"
    else:  # the filter's decision is skipped, whole
        assert r.status == 200 and r.upstream_headers is not None
        assert "x-echo" not in r.upstream_headers and "x-ok" not in r.upstream_headers


@pytest.mark.parametrize(
    ("decision", "kind", "why"),
    [
        # A value that is not a str raised TypeError past the fault boundary: not counted,
        # the filter not named (found writing a filter from the docs alone).
        (Mutate(set_headers={"x-a": 1}), "bad_header", "is a int, not a str"),  # type: ignore[dict-item]
        (Mutate(body="text"), "bad_decision", "Mutate.body is a str"),  # type: ignore[arg-type]
        (Respond(status=99), "bad_decision", "Respond.status 99"),
        (Respond(status=429, body="x"), "bad_decision", "Respond.body is a str"),  # type: ignore[arg-type]
        (Respond(status=429, headers={"retry-after": "1\r\nx: y"}), "bad_header", "CR, LF"),
        # Shapes that raised inside the check itself, or passed it wrongly (a str of names
        # removed each of its letters as a header), found by review.
        (Mutate(set_headers=[("x-a", "1")]), "bad_header", "not a mapping"),  # type: ignore[arg-type]
        (Mutate(remove_headers="x-keep"), "bad_decision", "tuple of header names"),  # type: ignore[arg-type]
        (Respond(status=429, headers=None), "bad_header", "not a mapping"),  # type: ignore[arg-type]
        (Respond(status=429, grpc_status="8"), "bad_decision", "not a gRPC status"),  # type: ignore[arg-type]
    ],
)  # fmt: skip
async def test_a_decision_that_cannot_be_carried_out_is_the_filters_fault(
    decision: Decision, kind: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    labels = {"filter": "a", "kind": kind}
    before = REGISTRY.get_sample_value("floodwall_filter_faults_total", labels) or 0.0
    a = Recorder("a", [], mutate={"req_h": decision})
    r = await harness(a).request("GET", "/v2/x")
    assert r.status == 500 and r.json()["error"]["type"] == "internal_error"
    assert REGISTRY.get_sample_value("floodwall_filter_faults_total", labels) == before + 1
    assert "filter a returned an invalid decision in request_headers" in caplog.text
    assert why in caplog.text


async def test_a_faulting_filter_is_logged_with_its_phase_and_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = Recorder("a", [], raise_in="req_b")
    h = harness(a)
    for _ in range(3):
        await h.request("POST", "/v2/x", body=b"{}")
    first, *more = [r for r in caplog.records if "failed closed" in r.getMessage()]
    assert "filter a failed closed in request_body (exception)" in first.getMessage()
    assert first.exc_info is not None and first.exc_info[0] is RuntimeError  # where it broke
    # Once per filter, phase and exception type: a bug every request hits logs one traceback.
    assert len(more) == 2 and all(r.exc_info is None for r in more)


def test_the_harness_refuses_a_filter_the_registry_would() -> None:
    from proxy.config import ConfigError

    class SyncHook(Filter):
        def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:  # type: ignore[override]
            return CONTINUE

    with pytest.raises(ConfigError, match=r"on_request_headers must be an `async def`"):
        Harness.for_filters([SyncHook(NoParams(), Deps())])


async def test_client_sent_internal_headers_are_stripped_before_filters() -> None:
    log: list[str] = []
    a = Recorder("a", log)
    r = await harness(a).request(
        "GET", "/v2/x", headers={"x-floodwall-tenant": "evil", "X-Floodwall-Priority": "critical"}
    )
    assert not any(k.startswith("x-floodwall-") for k in a.seen_headers)
    assert r.upstream_headers is not None
    assert not any(k.startswith("x-floodwall-") for k in r.upstream_headers)


async def test_internal_header_set_by_a_filter_survives_the_strip() -> None:
    log: list[str] = []
    a = Recorder("a", log, mutate={"req_h": Mutate(set_headers={"x-floodwall-tenant": "t1"})})
    r = await harness(a).request("GET", "/v2/x", headers={"x-floodwall-tenant": "evil"})
    assert r.upstream_headers is not None
    assert r.upstream_headers["x-floodwall-tenant"] == "t1"


async def test_unknown_route_is_404_json() -> None:
    r = await harness().request("GET", "/nope")
    assert r.status == 404
    assert r.json()["error"]["type"] == "not_found"


async def test_wrong_method_is_405() -> None:
    cfg = default_config(
        [{"name": "e", "match": {"path": "/e"}, "upstream": "up", "methods": ["POST"]}]
    )
    r = await Harness.for_filters([], cfg).request("GET", "/e")
    assert r.status == 405 and r.headers["allow"] == "POST"


async def test_filter_returning_a_non_decision_is_a_fault() -> None:
    class Bad(Filter):
        async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Any:
            return "yes"

    f = Bad(NoParams(), Deps())
    f.name = "bad"
    r = await harness(f).request("GET", "/v2/x")
    assert r.status == 500


async def test_route_scoped_filters_only_run_on_their_routes() -> None:
    log: list[str] = []
    a = Recorder("a", log)
    cfg = parse_config(
        {
            **default_config().model_dump(mode="json"),
            "filters": [{"name": "a", "type": "x", "routes": ["embeddings"]}],
        }
    )
    h = Harness.for_filters([a], cfg)
    await h.request("GET", "/v2/x")
    assert log == []
    await h.request("POST", "/v1/embeddings", body=b"{}")
    assert "a.req_h" in log


async def test_phases_not_overridden_are_not_requested() -> None:
    class HeadersOnly(Filter):
        async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
            return CONTINUE

    f = HeadersOnly(NoParams(), Deps())
    h = harness(f)
    route = h.chain.config.routes[0]
    from proxy.api import Phase

    assert h.chain.phases_for(route) == frozenset({Phase.REQUEST_HEADERS})


@pytest.mark.parametrize("status", [200, 503])
async def test_outcome_reports_upstream_status(status: int) -> None:
    log: list[str] = []
    a = Recorder("a", log)
    await harness(a).request("GET", "/v2/x", upstream=UpstreamReply(status=status))
    assert a.outcome is not None and a.outcome.status == status and not a.outcome.aborted
    assert a.outcome.upstream_status == status


async def test_cancel_and_wait_stops_a_loop_that_swallowed_its_cancellation() -> None:
    """What redis-py does when a cancel lands as its read timeout fires: the first
    CancelledError is lost and the loop goes on."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    loop_task = asyncio.create_task(stubborn())
    finished = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.02)
    await asyncio.wait_for(cancel_and_wait([loop_task, finished], retry_s=0.05), timeout=5)
    assert swallowed == 1 and loop_task.cancelled() and finished.done()


def test_ctx_log_keeps_the_callers_extra_fields_beside_the_request_id() -> None:
    # The stock LoggerAdapter replaced a filter's extra= with its own (Python < 3.13).
    from proxy.api import RequestContext
    from proxy.logs import JsonFormatter

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("floodwall.request")
    logger.addHandler(handler)
    try:
        RequestContext(None, started=0.0, request_id="r1").log.warning(
            "over", extra={"bytes": 9, "limit": 8}
        )
    finally:
        logger.removeHandler(handler)
    line = json.loads(JsonFormatter().format(records[-1]))
    assert (line["request_id"], line["route"], line["bytes"], line["limit"]) == (
        "r1",
        "unknown",
        9,
        8,
    )


def grpc_config(http_route: dict[str, Any]) -> Any:
    """A gRPC KServe route ("grpc") and ``http_route``."""
    grpc_up = {"protocol": "grpc", "endpoints": [{"address": "127.0.0.1", "port": 2}]}
    return parse_config({
        "upstreams": {"up": {"endpoints": [{"address": "127.0.0.1", "port": 1}]}, "g": grpc_up},
        "routes": [
            {"name": "grpc", "match": {"prefix": "/inference."}, "api": "kserve_grpc",
             "upstream": "g"},
            {**http_route, "upstream": "up"},
        ],
    })  # fmt: skip


def test_the_jobs_filter_reads_no_request_bodies_on_a_grpc_route() -> None:
    # Envoy would buffer the route's calls and the chain refuse its streams (a ModelStreamInfer
    # client that waits for answers before closing its side would hang): the jobs filter
    # (routes left out: all) asked for them. Filters that need the model may (test_kserve_grpc).
    from filters.jobs.filter import JobsFilter
    from filters.jobs.params import JobsParams

    cfg = grpc_config({"name": "jobs", "match": {"prefix": "/v1/jobs"}, "api": "jobs"})
    jobs = JobsFilter(JobsParams(), Deps())
    jobs.name = "jobs"
    h = Harness(cfg, [jobs])
    grpc_route, jobs_route = cfg.routes
    assert Phase.REQUEST_BODY not in h.chain.phases_for(grpc_route)
    assert Phase.REQUEST_BODY in h.chain.phases_for(jobs_route)


async def test_a_failed_grpc_call_counts_as_its_grpc_status_says() -> None:
    # HTTP 200 with grpc-status 14: counted as a 2xx success in metrics and traces before.
    class Watcher(Filter):  # a filter that sees the response headers, so the chain does
        def phases(self, route: Any) -> frozenset[Phase]:
            return frozenset({Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS})

    w = Watcher(NoParams(), Deps())
    w.name = "watcher"
    h = Harness.for_filters([w])
    unavailable = UpstreamReply(200, {"content-type": "application/grpc", "grpc-status": "14"})
    before = (
        REGISTRY.get_sample_value(
            "floodwall_requests_total", {"route": "kserve_http", "status": "5xx"}
        )
        or 0.0
    )
    r = await h.request("POST", "/v2/models/m/infer", body=b"", upstream=unavailable, grpc=True)
    assert r.outcome.status == 503 and r.outcome.upstream_status == 200
    after = REGISTRY.get_sample_value(
        "floodwall_requests_total", {"route": "kserve_http", "status": "5xx"}
    )
    assert after == before + 1
    ok = UpstreamReply(200, {"content-type": "application/grpc"})
    r = await h.request("POST", "/v2/models/m/infer", body=b"", upstream=ok, grpc=True)
    assert r.outcome.status == 200


def test_a_grpc_calls_deadline_is_its_grpc_timeout_within_the_route_timeout() -> None:
    # gRPC calls had no deadline: admission could queue one past the point its client gave up.
    from proxy.chain import grpc_timeout_s

    assert grpc_timeout_s("250m") == 0.25 and grpc_timeout_s("2S") == 2.0
    assert grpc_timeout_s("1H") == 3600.0 and grpc_timeout_s("500000u") == 0.5
    for bad in (None, "", "5", "m", "123456789S", "-5S", "5s", "٣S"):
        assert grpc_timeout_s(bad) is None, bad
    cfg = grpc_config({"name": "http", "match": {"prefix": "/v2"}})
    h = Harness(cfg, [])
    grpc = {":path": "/inference.GRPCInferenceService/ModelInfer",
            "content-type": "application/grpc"}  # fmt: skip
    ctx, _ = h.chain.context({**grpc, "grpc-timeout": "250m"}, started=100.0)
    assert ctx.deadline == pytest.approx(100.25)
    ctx, _ = h.chain.context({**grpc, "grpc-timeout": "1H"}, started=100.0)
    assert ctx.deadline == pytest.approx(130.0)  # the route's 30 s: Envoy's cap too
    ctx, _ = h.chain.context(grpc, started=100.0)
    assert ctx.deadline == pytest.approx(130.0)


class _Spender(Filter):
    """Sleeps ``spend_s`` in each request phase, then notes what budget a 10 s call gets."""

    def __init__(self, spend_s: float, hold_ms: float = 0.0) -> None:
        super().__init__(NoParams(), Deps())
        self.name = "spender"
        self.spend_s = spend_s
        self._hold_ms = hold_ms
        self.budgets: list[float] = []

    def hold_ms(self) -> float:
        return self._hold_ms

    async def _spend(self, ctx: RequestContext) -> Decision:
        await asyncio.sleep(self.spend_s)
        self.budgets.append(ctx.budget_s(10.0))
        return CONTINUE

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        return await self._spend(ctx)

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        return await self._spend(ctx)


@pytest.mark.parametrize("hold_ms", [0.0, 300.0])
async def test_each_phase_gives_its_filters_what_is_left_of_envoys_message_timeout(
    hold_ms: float,
) -> None:
    # Envoy's message timeout (message_timeout_ms plus the filters' holds) less a margin
    # (10%, at most 50 ms), per phase: the clock starts again at each message. A filter's
    # calls leave the waits it and the later filters may make unspent: the second's hold
    # (an admission queue, say) is kept from the first and from the second's own calls.
    first, second = _Spender(0.0), _Spender(0.1, hold_ms)
    h = harness(first, second)
    total_s = (h.chain.config.processor.message_timeout_ms + hold_ms) / 1000
    budget_s = total_s - min(0.05, total_s / 10)
    assert h.chain.phase_budget_s == pytest.approx(budget_s)
    r = await h.request("POST", "/v1/embeddings", body=b"{}")
    assert r.status == 200
    kept_s = hold_ms / 1000
    assert first.budgets == [pytest.approx(budget_s - kept_s, abs=0.01)] * 2
    assert second.budgets == [pytest.approx(budget_s - kept_s - 0.1, abs=0.03)] * 2


async def test_a_spent_phase_leaves_nothing_and_no_deadline_leaves_the_own_budget() -> None:
    ctx = RequestContext(None, started=0.0)
    assert ctx.budget_s(0.25) == 0.25  # outside a chain (a worker, a test): no phase
    ctx.phase_deadline = 0.0  # long past
    assert ctx.budget_s(0.25) == 0.0
