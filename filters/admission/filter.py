"""Admission by priority: an adaptive concurrency limit per upstream model (``limiter.py``),
priority classes computed per request, reserved capacity, a short fair queue with a deadline,
and quick honest refusals (503 ``overloaded`` + ``Retry-After``) when saturated.

The class (``critical``, ``standard``, ``sheddable``) comes from a score: the weight of the
tenant's tier plus the weight of the request type (``x-request-type: batch`` or
interactive); callers listed as trusted may name their class in ``x-priority``. It is set on
``ctx.priority`` at the request headers, so the ``openai`` filter passes it to Triton as the
request's priority level along with the remaining deadline. The admission itself waits for
the model to be known (after ``openai`` on translated routes).
"""

from __future__ import annotations

import time
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
    Outcome,
    Phase,
    RequestContext,
)
from proxy.chain import kserve_model
from proxy.config import RouteConfig
from proxy.triton_load import TritonLoad

LIMIT = Gauge("floodwall_admission_limit", "Adaptive concurrency limit per model", ["model"])
INFLIGHT = Gauge("floodwall_admission_inflight", "Admitted calls in flight per model", ["model"])
DECISIONS = Counter(
    "floodwall_admission_decisions",
    "Admission decisions by model, class and decision (admitted, queued, shed_full, shed_timeout)",
    ["model", "class", "decision"],
)
QUEUE_SECONDS = Histogram(
    "floodwall_admission_queue_seconds",
    "Time admitted requests waited in the gateway's queue",
    ["model"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


@dataclass(slots=True)
class _Ticket:
    name: str
    limiter: Limiter
    admitted: float
    load: int
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

    async def start(self) -> None:
        if self.p.saturation is not None:
            self.load = self.deps.signals.watch_triton(self.p.saturation.triton_metrics_url)

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
        st = ctx.state(_State)
        st.tenant = ctx.tenant or "-"
        ctx.priority = self._classify(ctx, headers)
        if ctx.route is not None and ctx.route.model_in_body and self.p.models:
            return CONTINUE
        return await self._admit(ctx, st)

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        return await self._admit(ctx, ctx.state(_State))

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        t = ctx.state(_State).ticket
        if t is not None and t.rtt is None:
            t.rtt = self.deps.clock.monotonic() - t.admitted  # time to first byte
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

    async def _admit(self, ctx: RequestContext, st: _State) -> Decision:
        name = ctx.route_name if not self.p.models else ctx.model
        if name is None or (self.p.models and name not in self.p.models):
            return CONTINUE
        lim = self.limiters.get(name)
        if lim is None:
            lim = self.limiters[name] = Limiter(self.p)
        self._follow_triton(name, lim, ctx.upstream_path)
        cls = ctx.priority or "standard"
        now = self.deps.clock.monotonic()
        max_wait = self.p.max_queue_ms / 1000
        if ctx.deadline is not None:
            # Never wait past the point where the call could still finish in time.
            max_wait = min(max_wait, ctx.deadline - time.monotonic() - (lim.base_rtt or 0.0))
        load = lim.inflight
        if lim.try_acquire(cls):
            decision = "admitted"
        elif await lim.acquire(cls, st.tenant, max_wait):
            decision = "queued"
            QUEUE_SECONDS.labels(name).observe(self.deps.clock.monotonic() - now)
        else:
            full = lim.waiting >= self.p.max_queue or max_wait <= 0
            DECISIONS.labels(name, cls, "shed_full" if full else "shed_timeout").inc()
            return errors.error(
                503, "overloaded",
                f"{name} is at capacity for {cls} requests; retry shortly",
                retry_after_s=lim.retry_after_s(),
            )  # fmt: skip
        DECISIONS.labels(name, cls, decision).inc()
        st.ticket = _Ticket(name, lim, self.deps.clock.monotonic(), load)
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

    async def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        t = ctx.state(_State).ticket
        if t is None:
            return
        now = self.deps.clock.monotonic()
        if outcome.aborted or outcome.responded_by is not None or outcome.status is None:
            t.limiter.release(None, failed=False, now=now)
        else:
            rtt = t.rtt if t.rtt is not None else now - t.admitted
            t.limiter.release(rtt, failed=outcome.status >= 500, now=now, load=t.load)
        LIMIT.labels(t.name).set(t.limiter.limit)
        INFLIGHT.labels(t.name).set(t.limiter.inflight)
