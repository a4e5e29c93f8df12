"""Circuit breaker per upstream model: closed / open / half-open over a rolling window.

Closed: calls pass and their outcomes fill a rolling window of one-second buckets; once the
window holds ``min_calls`` and the failure (or slow-call) share reaches its threshold, the
breaker opens. A call is slow when its response headers (its first byte) came later than
``slow_call_ms``: a long completion streamed by a healthy model is not slow. Open: calls are
refused at once with 503 ``circuit_open`` and a ``Retry-After`` of the time left. Half-open
(after ``open_s``): at most ``half_open_calls`` trial calls are in flight at once, the rest
refused; when that many trials ended without failing the breaker closes, the first failed
trial opens it again, and so do slow trials once they are ``slow_call_rate`` of
``half_open_calls``. The processor is one event loop, so each transition happens between
awaits and permits cannot be double-spent.

State is per processor process (as in Envoy's outlier detection): each process sees the
upstream's failures first-hand and needs no shared store to trip.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from filters.breaker.params import BreakerParams
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
from proxy.chain import calls_model
from proxy.config import RouteConfig

STATE = Gauge("floodwall_breaker_state", "0 closed, 1 open, 2 half-open", ["breaker"])
TRANSITIONS = Counter(
    "floodwall_breaker_transitions", "Breaker state changes, by breaker and new state",
    ["breaker", "to"],
)  # fmt: skip
REJECTED = Counter(
    "floodwall_breaker_rejected", "Calls refused by an open or half-open breaker", ["breaker"]
)


class State(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(slots=True)
class _Bucket:
    second: int = -1
    calls: int = 0
    failures: int = 0
    slow: int = 0


@dataclass(slots=True)
class Breaker:
    name: str
    p: BreakerParams
    state: State = State.CLOSED
    open_until: float = 0.0
    trials_in_flight: int = 0
    trials_ok: int = 0
    trials_slow: int = 0
    buckets: list[_Bucket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.buckets = [_Bucket() for _ in range(self.p.window_s)]
        STATE.labels(self.name).set(0)

    def admit(self, now: float) -> tuple[bool, bool]:
        """(admitted, as a half-open trial)."""
        if self.state is State.OPEN:
            if now < self.open_until:
                return False, False
            self._to(State.HALF_OPEN)
        if self.state is State.HALF_OPEN:
            if self.trials_in_flight >= self.p.half_open_calls:
                return False, False
            self.trials_in_flight += 1
            return True, True
        return True, False

    def record(self, now: float, *, failed: bool, slow: bool, trial: bool) -> None:
        if trial:
            self.trials_in_flight -= 1
            if self.state is not State.HALF_OPEN:
                return  # a trial that finished after another trial reopened the breaker
            if failed:
                self._open(now)
                return
            # Slow trials weigh as slow calls do when closed: a share of the trials.
            self.trials_slow += slow
            if slow and self.trials_slow >= self.p.slow_call_rate * self.p.half_open_calls:
                self._open(now)
                return
            self.trials_ok += 1
            if self.trials_ok >= self.p.half_open_calls:
                self._to(State.CLOSED)
            return
        if self.state is not State.CLOSED:
            return  # calls admitted before the breaker opened: their verdict is in
        b = self._bucket(now)
        b.calls += 1
        b.failures += failed
        b.slow += slow
        calls, failures, slows = self._totals(now)
        if calls >= self.p.min_calls and (
            failures >= self.p.failure_rate * calls or slows >= self.p.slow_call_rate * calls
        ):
            self._open(now)

    def release(self) -> None:
        """A trial that ended without a verdict (client gone): its permit comes back."""
        if self.trials_in_flight > 0:
            self.trials_in_flight -= 1

    def would_refuse(self, now: float) -> bool:
        if self.state is State.OPEN:
            return now < self.open_until
        if self.state is State.HALF_OPEN:
            return self.trials_in_flight >= self.p.half_open_calls
        return False

    def retry_after(self, now: float) -> float:
        return max(1.0, self.open_until - now) if self.state is State.OPEN else 1.0

    def _open(self, now: float) -> None:
        self.open_until = now + self.p.open_s
        self._to(State.OPEN)

    def _to(self, state: State) -> None:
        self.state = state
        self.trials_ok = self.trials_slow = 0
        if state is State.CLOSED:
            self.buckets = [_Bucket() for _ in range(self.p.window_s)]
        STATE.labels(self.name).set(int(state))
        TRANSITIONS.labels(self.name, state.name.lower()).inc()

    def _bucket(self, now: float) -> _Bucket:
        second = math.floor(now)
        b = self.buckets[second % len(self.buckets)]
        if b.second != second:
            b.second, b.calls, b.failures, b.slow = second, 0, 0, 0
        return b

    def _totals(self, now: float) -> tuple[int, int, int]:
        oldest = math.floor(now) - len(self.buckets) + 1
        live = [b for b in self.buckets if b.second >= oldest]
        return (sum(b.calls for b in live), sum(b.failures for b in live),
                sum(b.slow for b in live))  # fmt: skip


@dataclass(slots=True)
class _Ticket:
    breaker: Breaker
    trial: bool
    admitted: float  # on the filter's clock: a call's time to first byte runs from here
    first_byte: float | None = None
    grpc_failed: bool = False  # a trailers-only gRPC answer with a failing grpc-status


class BreakerFilter(Filter):
    Params = BreakerParams

    def __init__(self, params: BreakerParams, deps: Deps) -> None:
        super().__init__(params, deps)
        self.p = params
        self.breakers: dict[str, Breaker] = {}
        # ctx.state keys state by its factory: one factory per instance, so two breakers on
        # one route (one per route, one per model) each judge their own call only once.
        self._tickets = functools.partial(_Tickets)

    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        # Response headers: the chain records the upstream's status there for on_complete.
        out = {Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS}
        if route.model_in_body and self.p.models:
            out.add(Phase.REQUEST_BODY)  # the model is known once the body is read
        return frozenset(out)

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        if ctx.route is not None and ctx.route.model_in_body and self.p.models:
            return CONTINUE
        return self._admit(ctx)

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        return self._admit(ctx)

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        now = self.deps.clock.monotonic()
        # A gRPC failure (Triton's error, Envoy's "no healthy upstream") is HTTP 200 with a
        # grpc-status: read as such, the breaker never opened on a gRPC route.
        grpc_failed = ctx.grpc and headers.get("grpc-status", "0") in errors.GRPC_FAILED
        for t in ctx.state(self._tickets).items:
            if t.first_byte is None:
                t.first_byte = now
            t.grpc_failed = t.grpc_failed or grpc_failed
        return CONTINUE

    def _admit(self, ctx: RequestContext) -> Decision:
        if ctx.route is not None and not calls_model(ctx.route, ctx.path):
            # A KServe health or metadata call: Triton answers it from memory whether the
            # model works or not. Counted, its quick successes diluted the failure rate and
            # could take a half-open trial and close the breaker; refused, a readiness probe
            # could not see the model.
            return CONTINUE
        name = self._name(ctx)
        if name is None:
            return CONTINUE
        b = self.breakers.get(name)
        if b is None:
            b = self.breakers[name] = Breaker(name, self.p)
            self.deps.signals.gates[name] = b
        now = self.deps.clock.monotonic()
        admitted, trial = b.admit(now)
        if not admitted:
            REJECTED.labels(name).inc()
            return errors.error(
                503, "circuit_open",
                f"{name} is failing; calls are paused while it recovers",
                retry_after_s=b.retry_after(now),
            )  # fmt: skip
        ctx.state(self._tickets).items.append(_Ticket(b, trial, now))
        return CONTINUE

    def _name(self, ctx: RequestContext) -> str | None:
        if not self.p.models:
            return ctx.route_name
        return ctx.model if ctx.model in self.p.models else None

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        # The upstream's own status: a stale cached 200 served for its 503 is still a 503
        # (else the breaker would never open while stale answers hide the failures, and a
        # half-open trial would close it while the model is still down).
        upstream = outcome.upstream_status
        for t in ctx.state(self._tickets).items:
            if outcome.responded_by is not None or outcome.aborted or upstream is None:
                # No verdict on the upstream: a later filter answered, or the client left.
                if t.trial:
                    t.breaker.release()
                continue
            now = self.deps.clock.monotonic()
            failed = upstream >= 500 or t.grpc_failed
            # Time to first byte: the whole exchange would make every long completion slow.
            first_byte = t.first_byte if t.first_byte is not None else now
            slow = (first_byte - t.admitted) * 1000 >= self.p.slow_call_ms
            t.breaker.record(now, failed=failed, slow=slow, trial=t.trial)


@dataclass(slots=True)
class _Tickets:
    items: list[_Ticket] = field(default_factory=list)
