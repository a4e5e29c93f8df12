"""Admission by priority: an adaptive concurrency limit per upstream model (``limiter.py``),
priority classes computed per request, reserved capacity, a short fair queue with a deadline,
and quick honest refusals (503 ``overloaded`` + ``Retry-After``) when saturated.

The class (``critical``, ``standard``, ``sheddable``) comes from a score: the weight of the
tenant's tier plus the weight of the request type (``x-request-type: batch`` or
interactive); callers listed as trusted may name their class in ``x-priority``. It is set on
``ctx.priority`` at the request headers, so the ``openai`` filter passes it to Triton as the
request's priority level along with the remaining deadline. The admission itself waits for
the model to be known (after ``openai`` on translated routes), except a refusal: when every
model seen on the route would refuse the class at once, the request is shed at its headers,
before Envoy sends the body and before later filters (a rate-limit check in Redis) spend
anything on it. Under overload most requests are refused, so what a refusal costs decides
how much CPU is left to the requests that are served.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from filters.admission.limiter import Limiter
from filters.admission.params import AdmissionParams
from proxy import errors
from proxy.api import (
    CONTINUE,
    Decision,
    Deps,
    Filter,
    Headers,
    Mutate,
    Outcome,
    Phase,
    RequestContext,
    prefers_async,
)
from proxy.chain import calls_model, kserve_model
from proxy.config import RouteConfig
from proxy.triton_load import TritonLoad

LIMIT = Gauge("floodwall_admission_limit", "Adaptive concurrency limit per model", ["model"])
INFLIGHT = Gauge("floodwall_admission_inflight", "Admitted calls in flight per model", ["model"])
DECISIONS = Counter(
    "floodwall_admission_decisions",
    "Admission decisions by model, class and decision (admitted, queued, shed_full, "
    "shed_timeout, shed_preempted)",
    ["model", "class", "decision"],
)
EARLY = Counter(
    "floodwall_admission_shed_at_headers",
    "Requests shed at their headers, before the body was read, by route and class",
    ["route", "class"],
)
QUEUE_SECONDS = Histogram(
    "floodwall_admission_queue_seconds",
    "Time admitted requests waited in the gateway's queue",
    ["model"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
# While refusing at the headers, one request per route this often still reaches the body.
PROBE_S = 0.05
_STREAM = Mutate(stream_response=True)


@dataclass(slots=True)
class _Ticket:
    name: str
    limiter: Limiter
    admitted: float
    load: int
    path: str  # the upstream path when admitted: a call steered elsewhere later is not timed
    rtt: float | None = None


@dataclass(slots=True)
class _State:
    tenant: str = "-"
    ticket: _Ticket | None = None


class AdmissionFilter(Filter):
    Params = AdmissionParams

    def __init__(self, params: AdmissionParams, deps: Deps) -> None:
        super().__init__(params, deps)
        self.p = params
        self.limiters: dict[str, Limiter] = {}
        self.load: TritonLoad | None = None
        self._shrunk_at: dict[str, float] = {}
        self._route_models: dict[str, set[str]] = {}  # models seen per route
        self._probe_at: dict[str, float] = {}  # per route: when a refusal may pass as a probe
        self._grpc_streams = frozenset(params.grpc_stream_methods)
        # ctx.state keys state by its factory: one factory per instance, so two admission
        # filters on one route (one per route, one per model) each keep their own ticket.
        self._state = functools.partial(_State)

    async def start(self) -> None:
        if self.p.saturation is not None:
            self.load = self.deps.signals.watch_triton(
                self.p.saturation.triton_metrics_url, self.deps.clock
            )

    async def stop(self) -> None:
        if self.p.saturation is not None:
            await self.deps.signals.unwatch_triton(self.p.saturation.triton_metrics_url)

    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        out = {Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS}
        if route.model_in_body and self.p.models:
            out.add(Phase.REQUEST_BODY)
        return frozenset(out)

    def hold_ms(self) -> float:
        # The fair queue holds a request's phase up to max_queue_ms: Envoy must wait that long.
        return self.p.max_queue_ms

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        st = ctx.state(self._state)
        st.tenant = ctx.tenant or "-"
        ctx.priority = self._classify(ctx, headers)
        if ctx.route is not None and ctx.route.model_in_body and self.p.models:
            # An async submission may be taken by `jobs` (which says so in ctx.deferred, at its
            # own headers phase, after this one): decide at the body, where that is known.
            if not self.p.shed_at_headers or prefers_async(headers):
                return CONTINUE
            return self._shed_early(ctx, ctx.priority)
        return await self._admit(ctx, st)

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        return await self._admit(ctx, ctx.state(self._state))

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        st = ctx.state(self._state)
        t = st.ticket
        if t is None:
            return CONTINUE
        now = self.deps.clock.monotonic()
        if t.rtt is None:
            t.rtt = now - t.admitted  # time to first byte
        grpc_status = headers.get("grpc-status", "0") if ctx.grpc else "0"
        if grpc_status != "0":
            # A trailers-only gRPC answer: the call ended here, and its HTTP status (200) says
            # nothing; its time is that of a refusal, not of the model's work.
            st.ticket = None
            self._release(t, None, grpc_status in errors.GRPC_FAILED, now)
            return CONTINUE
        status = ctx.upstream_status or 0
        if 200 <= status < 300 and (
            headers.get("content-type", "").startswith("text/event-stream")
            or (ctx.grpc and ctx.path.split("?", 1)[0] in self._grpc_streams)
        ):
            # The body streamed through the processor, even on a route where no filter reads
            # it: the exchange then ends, for the processor, with the stream, and the permit
            # is held until then (not given back as the stream starts).
            return _STREAM
        if not ctx.grpc:
            # A unary HTTP answer is complete at the model once its headers are sent: the
            # permit goes back now, not after the gateway has also handled the body (with the
            # gateway short of CPU, permits held there would leave the model idle).
            st.ticket = None
            self._settle(t, status, now, ctx.upstream_path)
        return CONTINUE

    def _classify(self, ctx: RequestContext, headers: Headers) -> str:
        pr = self.p.priority
        asked = headers.get(pr.priority_header)
        if asked in ("critical", "standard", "sheddable") and (
            ctx.key_id in pr.trusted_key_ids or ctx.tenant in pr.trusted_tenants
        ):
            return asked
        kind = "batch" if headers.get(pr.type_header, "").lower() == "batch" else "interactive"
        score = pr.tier_weights.get(ctx.tier or "", 0.0) + pr.type_weights.get(kind, 0.0)
        if score >= pr.critical_at:
            return "critical"
        return "standard" if score >= pr.standard_at else "sheddable"

    def _shed_early(self, ctx: RequestContext, cls: str) -> Decision:
        """Shed at the headers when every model seen on the route would refuse ``cls`` now.

        The model is in the body, so a request for a model not seen yet on the route would be
        refused too: one request per route every ``PROBE_S`` goes on to the body regardless,
        and a new model is seen (and its room known) within moments."""
        models = self._route_models.get(ctx.route_name, ())
        lims = [self.limiters[m] for m in models]
        tenant = ctx.tenant or "-"
        if not lims or any(
            lim.refusal(cls, self._max_wait(ctx, lim), tenant) is None for lim in lims
        ):
            return CONTINUE
        now = self.deps.clock.monotonic()
        if now >= self._probe_at.get(ctx.route_name, 0.0):
            self._probe_at[ctx.route_name] = now + PROBE_S
            return CONTINUE
        EARLY.labels(ctx.route_name, cls).inc()
        for m in models:
            self.deps.signals.pressed_at.setdefault(m, {})[cls] = now
        return _overloaded(ctx.route_name, cls, max(lim.retry_after_s() for lim in lims))

    def _max_wait(self, ctx: RequestContext, lim: Limiter) -> float:
        max_wait = self.p.max_queue_ms / 1000
        if ctx.deadline is not None:
            # Never wait past the point where the call could still finish in time.
            max_wait = min(max_wait, ctx.deadline - time.monotonic() - (lim.base_rtt or 0.0))
        return max_wait

    async def _admit(self, ctx: RequestContext, st: _State) -> Decision:
        if ctx.route is not None and not calls_model(ctx.route, ctx.path):
            return CONTINUE  # a KServe health or metadata call: neither timed nor held
        name = ctx.route_name if not self.p.models else ctx.model
        if ctx.deferred or name is None or (self.p.models and name not in self.p.models):
            return CONTINUE  # deferred: queued for later, the model is not called now
        lim = self.limiters.get(name)
        if lim is None:
            lim = self.limiters[name] = Limiter(self.p, self.deps.clock.monotonic)
        seen = self._route_models.setdefault(ctx.route_name, set())
        if name not in seen:
            seen.add(name)
            self._probe_at[ctx.route_name] = self.deps.clock.monotonic() + PROBE_S
        self._follow_triton(name, lim, ctx.upstream_path)
        cls = ctx.priority or "standard"
        now = self.deps.clock.monotonic()
        load = lim.inflight
        decision = await lim.acquire(cls, st.tenant, self._max_wait(ctx, lim))
        DECISIONS.labels(name, cls, decision).inc()
        if decision != "admitted":  # the limit binds: degrade may serve a lighter model
            self.deps.signals.pressed_at.setdefault(name, {})[cls] = self.deps.clock.monotonic()
        if decision == "queued":
            QUEUE_SECONDS.labels(name).observe(self.deps.clock.monotonic() - now)
        elif decision != "admitted":
            return _overloaded(name, cls, lim.retry_after_s())
        st.ticket = _Ticket(name, lim, self.deps.clock.monotonic(), load, ctx.upstream_path)
        LIMIT.labels(name).set(lim.limit)
        INFLIGHT.labels(name).set(lim.inflight)
        return CONTINUE

    def _follow_triton(self, name: str, lim: Limiter, upstream_path: str) -> None:
        """Triton's own queue, polled: a long one shrinks the limit, once per poll."""
        sat = self.p.saturation
        if sat is None or self.load is None:
            return
        load = self.load.models.get(kserve_model(upstream_path) or name)
        if load is None or load.at <= self._shrunk_at.get(name, 0.0):
            return  # no new poll since the last shrink
        if sat.saturated(load, self.deps.clock.monotonic()):
            lim.shrink()
            self._shrunk_at[name] = load.at

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> Awaitable[None] | None:
        t = ctx.state(self._state).ticket
        if t is None:
            return None
        now = self.deps.clock.monotonic()
        # The upstream's own status: a stale cached 200 served for its 503 is still a 503.
        upstream = outcome.upstream_status
        if outcome.aborted and outcome.responded_by is None and upstream is None:
            # The client left while the model worked on its call, and Triton does not cancel
            # an HTTP request on disconnect: the permit stays taken about as long as a call
            # takes (the smoothed RTT, at most the route's timeout), or a wave of clients that
            # time out and retry would pile calls on the model past the limit.
            rtt = t.limiter.rtt or t.limiter.base_rtt or 0.0
            cap = ctx.route.timeout_ms / 1000 if ctx.route is not None else rtt
            left = min(rtt, cap) - (now - t.admitted)
            if left > 0:
                return self._release_after(t, left)
        if outcome.aborted or outcome.responded_by is not None or upstream is None:
            self._release(t, None, False, now)
        else:
            self._settle(t, upstream, now, ctx.upstream_path)
        return None

    async def _release_after(self, t: _Ticket, delay_s: float) -> None:
        try:
            await self.deps.clock.sleep(delay_s)
        finally:  # also when cancelled at shutdown: the permit goes back either way
            self._release(t, None, False, self.deps.clock.monotonic())

    def _settle(self, t: _Ticket, status: int, now: float, path: str) -> None:
        """Releases the permit of a call the model answered with ``status``. Only a success
        times the model's work: a 4xx answered in a fraction of a millisecond taken as an
        RTT would become the no-load RTT, and every normal call would then look queued. Nor
        does a call a later filter sent to another model (``path``: degrade's lighter twin):
        its faster answers would set the no-load RTT too. A 5xx or a 429 (Triton's queue
        full) is congestion: it cuts the limit."""
        failed = status >= 500 or status == 429
        timed = 200 <= status < 300 and path == t.path
        rtt = (t.rtt if t.rtt is not None else now - t.admitted) if timed else None
        self._release(t, rtt, failed, now)

    def _release(self, t: _Ticket, rtt: float | None, failed: bool, now: float) -> None:
        t.limiter.release(rtt, failed=failed, now=now, load=t.load)
        LIMIT.labels(t.name).set(t.limiter.limit)
        INFLIGHT.labels(t.name).set(t.limiter.inflight)


def _overloaded(what: str, cls: str, retry_after_s: float) -> Decision:
    return errors.error(
        503, "overloaded", f"{what} is at capacity for {cls} requests; retry shortly",
        retry_after_s=retry_after_s,
    )  # fmt: skip
