"""The filter chain: runs the configured filters phase by phase and merges their decisions.

Semantics (the contract filter authors rely on):

- Request phases run filters in config order, response phases in reverse order (the onion
  model Envoy uses), so a filter that rewrote the request sees the response first.
- ``Mutate``s of one phase accumulate and later filters see the mutated headers/body.
- The first ``Respond`` ends the phase and the request: no later filter runs.
- Client-sent ``x-floodwall-*`` headers are stripped before any filter sees the request, so
  nobody can spoof tenant, priority or cache state.
- A filter that raises is a fault: counted per filter and kind, then either skipped
  (``on_error: open``) or turned into an error answer by ``errors.fault_response`` (``closed``).
- ``on_complete`` runs once per request for every filter on the route, whatever happened:
  called when the exchange ends; an awaitable it returns (an ``async def`` returns one) is
  awaited in a task of its own, so a client abort cannot cut it short. One that returns
  None (a plain ``def``: metrics, a counter) costs no task.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy import errors, kserve_grpc, metrics
from proxy.api import (
    CONTINUE,
    Continue,
    Decision,
    Filter,
    Headers,
    Mutate,
    Outcome,
    Phase,
    RequestContext,
    Respond,
    overrides_complete,
)
from proxy.config import ConfigError, FilterConfig, FloodwallConfig, RouteConfig, is_grpc

log = logging.getLogger("floodwall.chain")

INTERNAL_PREFIX = "x-floodwall-"
_REQUEST_PHASES = (Phase.REQUEST_HEADERS, Phase.REQUEST_BODY)


@dataclass(slots=True)
class _Bound:
    """A filter as placed on one route, with its metric children bound once."""

    filter: Filter
    on_error: str
    timers: dict[Phase, Any]
    # Per phase: the deliberate waits (hold_ms) of this filter and of those after it in the
    # phase, in seconds: time the filters before it must leave unspent.
    reserve_s: dict[Phase, float] = field(default_factory=dict)


@dataclass(slots=True)
class RoutePlan:
    route: RouteConfig | None
    by_phase: dict[Phase, tuple[_Bound, ...]]
    complete: tuple[_Bound, ...]
    phases: frozenset[Phase] = field(default_factory=frozenset)
    # A gRPC route where a filter reads request bodies: each unary call's model is read from
    # its message (proxy/kserve_grpc.py) and streams are refused.
    reads_grpc_bodies: bool = False


class _Accumulator:
    """Merges the Mutates of one phase."""

    __slots__ = ("body", "remove", "set", "stream")

    def __init__(self) -> None:
        self.set: dict[str, str] = {}
        self.remove: list[str] = []
        self.body: bytes | None = None
        self.stream = False

    def add(self, m: Mutate, headers: Headers | None) -> None:
        for k in m.remove_headers:
            k = k.lower()
            self.set.pop(k, None)
            if k not in self.remove:
                self.remove.append(k)
            if headers is not None:
                headers.pop(k, None)
        for k, v in m.set_headers.items():
            k = k.lower()
            self.set[k] = v
            if k in self.remove:
                self.remove.remove(k)
            if headers is not None:
                headers[k] = v
        if m.body is not None:
            self.body = m.body
        self.stream = self.stream or m.stream_response

    def decision(self) -> Decision:
        if not self.set and not self.remove and self.body is None and not self.stream:
            return CONTINUE
        return Mutate(
            set_headers=self.set,
            remove_headers=tuple(self.remove),
            body=self.body,
            stream_response=self.stream,
        )


class Chain:
    def __init__(self, config: FloodwallConfig, filters: Sequence[Filter]) -> None:
        self.config = config
        self.filters = list(filters)
        # Set by the process when tracing is configured (proxy.tracing.Tracer).
        self.tracer: Any = None
        # Streams running on this chain (a reloaded-away chain retires when this reaches 0).
        self.streams = 0
        self._background: set[asyncio.Task[None]] = set()
        # (filter, phase, exception type) whose traceback was logged: once is enough to find
        # the line, and a bug hit by every request must not log a traceback per request.
        self._traced: set[tuple[str, Phase, type[BaseException]]] = set()
        # What each phase may take before Envoy gives up on it (bootstrap's message_timeout),
        # less a margin for the trip to and from Envoy and the event loop's own delays.
        total_s = (config.processor.message_timeout_ms + self.max_hold_ms()) / 1000
        self.phase_budget_s = total_s - min(0.05, total_s / 10)
        fconf: dict[str, FilterConfig] = {fc.name: fc for fc in config.filters}
        self._plans: dict[str | None, RoutePlan] = {}
        for route in [*config.routes, None]:
            self._plans[route.name if route else None] = self._plan(route, fconf)

    def _plan(self, route: RouteConfig | None, fconf: dict[str, FilterConfig]) -> RoutePlan:
        bound: list[tuple[_Bound, frozenset[Phase]]] = []
        for f in self.filters:
            fc = fconf.get(f.name)
            on_error = fc.on_error if fc else "closed"
            if (
                route is not None
                and fc is not None
                and fc.routes is not None
                and (route.name not in fc.routes)
            ):
                continue
            phases = f.phases(route) if route is not None else frozenset({Phase.REQUEST_HEADERS})
            if (
                route is not None
                and route.grpc
                and Phase.REQUEST_BODY in phases
                and fc is not None
                and fc.routes is None
                and route.name not in f.route_refs()
            ):
                # Reading a gRPC route's messages changes the route (Envoy holds each call,
                # streams are refused): only where the config names the route. A filter for
                # "all routes" that did not apply to gRPC before must not start doing so.
                raise ConfigError(
                    f"filter {f.name!r} would read the messages of gRPC route {route.name!r} "
                    "for their model (Envoy then holds each call there and streams are refused), "
                    "but covers it only as one of all routes: list the routes it runs on in its "
                    "`routes`, with the gRPC route to apply it there"
                )
            timers = {p: metrics.FILTER_SECONDS.labels(f.name, p.value) for p in Phase}
            bound.append((_Bound(f, on_error, timers), phases))
        by_phase: dict[Phase, tuple[_Bound, ...]] = {}
        for p in Phase:
            items = [b for b, ph in bound if p in ph]
            if p in (Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY):
                items.reverse()
            by_phase[p] = tuple(items)
            later = 0.0
            for b in reversed(items):
                later += b.filter.hold_ms() / 1000
                b.reserve_s[p] = later
        complete = tuple(b for b, _ in bound if overrides_complete(type(b.filter)))
        phases = frozenset(p for p in Phase if by_phase[p]) | {Phase.REQUEST_HEADERS}
        reads_grpc_bodies = route is not None and route.grpc and Phase.REQUEST_BODY in phases
        if reads_grpc_bodies:
            assert route is not None
            readers = [b.filter.name for b in by_phase[Phase.REQUEST_BODY]]
            # A warning: degrade, canary or a filter of one's own that names a gRPC route left
            # its calls alone before session 27, and now changes how the route serves.
            log.warning(
                "gRPC route %r: %s read request bodies, so Envoy buffers each call's request "
                "and its model is read from the message; ModelStreamInfer is refused there "
                "(UNIMPLEMENTED; the README's \"KServe gRPC and per-model policies\")", route.name,
                ", ".join(readers),
            )  # fmt: skip
        return RoutePlan(route, by_phase, complete, phases, reads_grpc_bodies)

    def plan(self, route: RouteConfig | None) -> RoutePlan:
        return self._plans[route.name if route is not None else None]

    def phases_for(self, route: RouteConfig) -> frozenset[Phase]:
        """What Envoy must send the processor on ``route`` (drives the rendered config)."""
        return self._plans[route.name].phases

    def max_hold_ms(self) -> int:
        # Filters run one after another within a phase, so their deliberate waits add up.
        return int(sum(f.hold_ms() for f in self.filters) + 0.999)

    def context(
        self, headers: Headers, *, started: float | None = None, traceparent: str | None = None
    ) -> tuple[RequestContext, RoutePlan]:
        path = headers.get(":path", "")
        # Envoy's route choice, content-type included: a non-gRPC request on a gRPC route's
        # path goes on to a later route in Envoy, and must meet that route's filters here.
        grpc = is_grpc(headers.get("content-type", ""))
        route = self.config.route_for(path, grpc=grpc)
        t0 = time.monotonic() if started is None else started
        ctx = RequestContext(
            route,
            started=t0,
            request_id=headers.get("x-request-id", ""),
            method=headers.get(":method", ""),
            path=path,
            grpc=grpc,
        )
        if route is not None and route.api == "kserve_http":
            ctx.model = kserve_model(path)
        plan = self.plan(route)
        if plan.reads_grpc_bodies:
            ctx.state(kserve_grpc.GrpcCall).encoding = headers.get("grpc-encoding")
        if route is not None:
            # Envoy gives up at the route timeout (a gRPC call: at its grpc-timeout if
            # shorter, as max_stream_duration's grpc_timeout_header_max makes it): no
            # upstream work is useful after it.
            limit_s = route.timeout_ms / 1000
            if route.grpc:
                limit_s = min(limit_s, grpc_timeout_s(headers.get("grpc-timeout")) or limit_s)
            ctx.deadline = t0 + limit_s
        if self.tracer is not None:
            ctx.span = self.tracer.start_request(
                f"floodwall {ctx.route_name}", traceparent or headers.get("traceparent")
            )
        return ctx, plan

    async def run(
        self, plan: RoutePlan, phase: Phase, ctx: RequestContext, data: Any
    ) -> tuple[Decision, str | None]:
        """Runs one phase. ``data`` is the headers dict (mutated in place) or the body.

        Returns the merged decision and, for a Respond, the name of the filter that answered.
        """
        acc = _Accumulator()
        span = ctx.span
        phase_end = time.monotonic() + self.phase_budget_s
        if phase is Phase.REQUEST_HEADERS:
            _sanitize(data, acc)
            if span is not None:  # the trace goes on upstream (to Triton) from our span
                acc.set["traceparent"] = span.traceparent()
            route = plan.route
            if route is None:
                return errors.error(404, "not_found", f"no route for {ctx.path!r}"), None
            if route.methods is not None and ctx.method not in route.methods:
                return (
                    errors.error(
                        405,
                        "method_not_allowed",
                        f"{ctx.method} is not allowed on {route.match.path or route.match.prefix}",
                        headers={"allow": ", ".join(route.methods)},
                    ),
                    None,
                )
            if plan.reads_grpc_bodies:
                refused = _unreadable_call(ctx)
                if refused is not None:
                    return refused, None
        elif phase is Phase.REQUEST_BODY:
            ctx.request_body = data
            if plan.reads_grpc_bodies:
                # The model Triton will run (a filter reading bodies on a gRPC route needs it).
                model = kserve_grpc.call_model(
                    ctx.state(kserve_grpc.GrpcCall), ctx.path, data,
                    self.config.listener.max_request_bytes,
                )  # fmt: skip
                if isinstance(model, Respond):
                    return model, None
                ctx.model = model
        elif phase is Phase.RESPONSE_HEADERS:
            status = data.get(":status")
            if status and status.isdigit():
                ctx.response_status = ctx.upstream_status = int(status)
            if ctx.grpc and data.get("grpc-status", "0") != "0":
                # A trailers-only gRPC error is HTTP 200: the client got the failure its
                # grpc-status names (metrics and traces counted it as a success).
                ctx.response_status = errors.HTTP_OF_GRPC.get(data["grpc-status"], 500)
        is_headers = phase in (Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS)
        for b in plan.by_phase[phase]:
            f = b.filter
            # What this filter's own calls may spend (ctx.budget_s): the phase, less the
            # waits it and the filters after it may still make (admission's queue, say).
            ctx.phase_deadline = phase_end - b.reserve_s[phase]
            t0 = time.perf_counter()
            child = None if span is None else self.tracer.child(span, f"{f.name} {phase.value}")
            try:
                if phase is Phase.REQUEST_HEADERS:
                    d = await f.on_request_headers(ctx, data)
                elif phase is Phase.REQUEST_BODY:
                    d = await f.on_request_body(ctx, data)
                elif phase is Phase.RESPONSE_HEADERS:
                    d = await f.on_response_headers(ctx, data)
                else:
                    d = await f.on_response_body(ctx, data)
            except Exception as exc:
                b.timers[phase].observe(time.perf_counter() - t0)
                kind = errors.fault_kind(exc)
                if child is not None:
                    child.error = True
                    child.attrs["floodwall.fault"] = kind
                    self.tracer.end(child)
                metrics.FILTER_FAULTS.labels(f.name, kind).inc()
                # A bug's traceback is logged, once per filter, phase and exception type (its
                # author needs the line); a dependency's timeout or outage never is.
                trace = None
                if kind == "exception" and (f.name, phase, type(exc)) not in self._traced:
                    self._traced.add((f.name, phase, type(exc)))
                    trace = exc
                if b.on_error == "open":
                    ctx.log.warning("filter %s failed open in %s (%s): %r", f.name, phase.value,
                                    kind, exc, exc_info=trace)  # fmt: skip
                    continue
                ctx.log.error("filter %s failed closed in %s (%s): %r", f.name, phase.value,
                              kind, exc, exc_info=trace)  # fmt: skip
                return errors.fault_response(exc), f.name
            b.timers[phase].observe(time.perf_counter() - t0)
            if child is not None:
                child.attrs["floodwall.decision"] = type(d).__name__.lower()
                self.tracer.end(child)
            cls = d.__class__
            if cls is Continue:
                continue
            bad = _bad_mutate(d) if cls is Mutate else _bad_decision(d)  # type: ignore[arg-type]
            if bad is not None:
                # Envoy would reject the whole mutation and answer 500, past this filter's
                # on_error and without naming it (or the translation to its protobufs would
                # raise past the fault boundary): judged here, as a fault of the filter.
                kind, why = bad
                metrics.FILTER_FAULTS.labels(f.name, kind).inc()
                ctx.log.error("filter %s returned an invalid decision in %s: %s", f.name,
                              phase.value, why)  # fmt: skip
                if b.on_error == "open":
                    continue
                return errors.error(500, "internal_error", "internal error in the gateway"), f.name
            if isinstance(d, Respond):
                return d, f.name
            if isinstance(d, Mutate):
                if d.stream_response and phase is Phase.RESPONSE_HEADERS:
                    ctx.response_streamed = True
                elif ":path" in d.set_headers and phase in _REQUEST_PHASES:
                    ctx.upstream_path = d.set_headers[":path"]
                elif (
                    phase not in _REQUEST_PHASES
                    and not ctx.response_streamed  # Envoy ignores it on a streamed body
                    and d.set_headers.get(":status", "").isdigit()
                ):
                    # A reply rewritten (say a 200 whose body could not be read, now a 502):
                    # the filters after this one, the cache's store among them, and the
                    # request's metrics see the status the client gets. The upstream's own
                    # stays in ctx.upstream_status, for those judging its health.
                    ctx.response_status = int(d.set_headers[":status"])
                acc.add(d, data if is_headers else None)
                if d.body is not None and not is_headers:
                    data = d.body
        if acc.body is not None and not is_headers and not ctx.response_streamed:
            # Envoy refuses (a 500) a buffered body whose length is not the content-length it
            # is sent with: whichever filter replaced it last, the length is the new body's.
            acc.set["content-length"] = str(len(acc.body))
            if "content-length" in acc.remove:
                acc.remove.remove("content-length")
        return acc.decision(), None

    def finish(
        self,
        ctx: RequestContext,
        plan: RoutePlan,
        responded_by: str | None,
        status: int | None,
        reached_end: bool,
    ) -> asyncio.Task[None] | None:
        """Counts the request and calls each ``on_complete``; what they left to await runs in
        one task of its own, so a cancelled stream (client abort) cannot skip it. Returns
        the task, if there is one."""
        final = status if status is not None else ctx.response_status
        metrics.REQUESTS.labels(ctx.route_name, _status_class(final)).inc()
        if ctx.span is not None:
            self._end_span(ctx, final, responded_by, reached_end)
        if not reached_end:
            metrics.ABORTED.labels(ctx.route_name).inc()
        if not plan.complete:
            return None
        outcome = Outcome(
            status=final,
            aborted=not reached_end,
            responded_by=responded_by,
            duration_s=time.monotonic() - ctx.started,
            upstream_status=ctx.upstream_status,
        )
        left: list[tuple[_Bound, Awaitable[None]]] = []
        for b in plan.complete:
            try:
                awaitable = b.filter.on_complete(ctx, outcome)
            except Exception as exc:
                self._complete_fault(b, ctx, exc)
                continue
            if awaitable is not None:
                left.append((b, awaitable))
        if not left:
            return None
        task = asyncio.get_running_loop().create_task(self.complete(left, ctx))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _end_span(
        self, ctx: RequestContext, status: int | None, by: str | None, reached_end: bool
    ) -> None:
        span = ctx.span
        a = span.attrs
        a["floodwall.request"] = 1
        a["floodwall.route"] = ctx.route_name
        a["floodwall.request_id"] = ctx.request_id
        if status is not None:
            a["http.response.status_code"] = status
        if ctx.tenant:
            a["floodwall.tenant"] = ctx.tenant  # an id, never the key
        if ctx.model:
            # From the client's path on KServe routes (any length, even on a 401): bounded.
            a["gen_ai.request.model"] = ctx.model[:128]
        if by:
            a["floodwall.responded_by"] = by
        if not reached_end:
            a["floodwall.aborted"] = 1
        span.error = status is not None and status >= 500
        self.tracer.end(span)

    async def wait_background(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def complete(
        self, left: list[tuple[_Bound, Awaitable[None]]], ctx: RequestContext
    ) -> None:
        """Awaits what the filters' ``on_complete`` returned, in chain order (``left`` is
        consumed)."""
        try:
            while left:
                b, awaitable = left.pop(0)
                try:
                    await awaitable
                except Exception as exc:
                    self._complete_fault(b, ctx, exc)
        finally:
            for _, rest in left:  # cancelled (shutdown): close what never ran
                if inspect.iscoroutine(rest):
                    rest.close()

    @staticmethod
    def _complete_fault(b: _Bound, ctx: RequestContext, exc: Exception) -> None:
        metrics.FILTER_FAULTS.labels(b.filter.name, errors.fault_kind(exc)).inc()
        ctx.log.error("filter %s on_complete failed: %r", b.filter.name, exc)

    async def start(self) -> None:
        for f in self.filters:
            await f.start()

    async def stop(self) -> None:
        for f in self.filters:
            try:
                await f.stop()
            except Exception as exc:
                log.error("filter %s stop failed: %r", f.name, exc)


def _unreadable_call(ctx: RequestContext) -> Respond | None:
    """Refuses, on a gRPC route whose filters read request bodies, a call whose message they
    cannot read: a streaming call (Envoy would hold its messages until the client closed its
    side, and a ModelStreamInfer client waits for answers first: it would hang; each message
    may also name another model), or one without a message (no body phase would come, and
    the per-model policies would never run; Triton refuses it anyway)."""
    if ctx.path.split("?", 1)[0] not in kserve_grpc.STREAM_METHODS:
        if ctx.has_request_body:
            return None
        return errors.error(
            400, "invalid_request_error", "a unary call carries one request message; none came"
        )
    return errors.error(
        501, "not_implemented",
        f"streaming calls are not served on route {ctx.route_name!r}: its policies read each "
        "call's request message; use the unary ModelInfer, or a route for streams",
    )  # fmt: skip


def kserve_model(path: str) -> str | None:
    """The model named by a KServe v2 HTTP path (``/v2/models/{name}[/versions/{v}]/...``)."""
    parts = path.split("?", 1)[0].split("/", 4)
    if len(parts) >= 4 and parts[1] == "v2" and parts[2] == "models" and parts[3]:
        return parts[3]
    return None


_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout_s(value: str | None) -> float | None:
    """A grpc-timeout header (at most 8 digits and a unit, per the gRPC HTTP/2 protocol) in
    seconds; None when absent or malformed."""
    if not value or len(value) > 9 or not value[:-1].isdigit() or not value[:-1].isascii():
        return None
    unit = _GRPC_TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit


# The KServe v2 calls that run a model; the others (health, metadata, config, statistics,
# readiness) answer at once.
_KSERVE_HTTP_INFERENCE = frozenset({"infer", "generate", "generate_stream"})
_KSERVE_GRPC_INFERENCE = frozenset(
    kserve_grpc.SERVICE + m for m in ("ModelInfer", "ModelStreamInfer")
)


def calls_model(route: RouteConfig, path: str) -> bool:
    """Whether a request runs the model, rather than asking Triton about it: a KServe
    metadata or health call is not one (their sub-millisecond answers would read as the
    model's no-load time, and a health probe would wait for a permit). Paths of other APIs,
    and passthrough paths outside KServe's, count as model calls."""
    bare = path.split("?", 1)[0]
    if route.api == "kserve_grpc":
        return bare in _KSERVE_GRPC_INFERENCE
    if route.api != "kserve_http" or not (bare == "/v2" or bare.startswith("/v2/")):
        return True
    return kserve_model(bare) is not None and bare.rsplit("/", 1)[-1] in _KSERVE_HTTP_INFERENCE


# What Envoy accepts in a header mutation: a token (or a pseudo-header) for the name, and a
# value without CR, LF or NUL.
_HEADER_NAME = re.compile(r":?[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_GOOD_NAMES: set[str] = set()


def _bad_header(headers: Mapping[str, str]) -> str | None:
    """Why Envoy would refuse these headers (the first bad one, its value left out), or None."""
    if headers.__class__ is not dict and not isinstance(headers, Mapping):
        return f"headers are a {type(headers).__name__}, not a mapping"
    for k, v in headers.items():
        if k not in _GOOD_NAMES:
            if not isinstance(k, str) or not _HEADER_NAME.fullmatch(k):
                return f"header name {str(k)[:64]!r}"
            if len(_GOOD_NAMES) < 4096:  # filters set a few names, again and again
                _GOOD_NAMES.add(k)
        if v.__class__ is not str and not isinstance(v, str):
            return f"value of header {k!r} is a {type(v).__name__}, not a str"
        if "\r" in v or "\n" in v or "\x00" in v:
            return f"value of header {k!r} has CR, LF or NUL"
    return None


# Checked on every decision a filter returns: each test is skipped when its field is empty,
# so the common decisions (a body-only Mutate per streamed chunk) cost a few attribute reads.
def _bad_mutate(d: Mutate) -> tuple[str, str] | None:
    body, remove = d.body, d.remove_headers
    if body is not None and body.__class__ is not bytes and not isinstance(body, bytes):
        return "bad_decision", f"Mutate.body is a {type(body).__name__}, not bytes"
    if remove and (isinstance(remove, str) or not all(isinstance(k, str) for k in remove)):
        return "bad_decision", "Mutate.remove_headers must be a tuple of header names"
    if d.set_headers:
        bad = _bad_header(d.set_headers)
        return None if bad is None else ("bad_header", bad)
    return None


def _bad_decision(d: object) -> tuple[str, str] | None:
    """Why a decision other than a plain Mutate cannot be carried out (kind, reason), or None."""
    if isinstance(d, Mutate):
        return _bad_mutate(d)
    if isinstance(d, Respond):
        if not isinstance(d.status, int) or not 200 <= d.status <= 599:
            return "bad_decision", f"Respond.status {d.status!r} is not an HTTP status"
        if not isinstance(d.body, bytes):
            return "bad_decision", f"Respond.body is a {type(d.body).__name__}, not bytes"
        g = d.grpc_status
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or not 0 <= g <= 16):
            return "bad_decision", f"Respond.grpc_status {g!r} is not a gRPC status code"
        bad = _bad_header(d.headers)
        return None if bad is None else ("bad_header", bad)
    if isinstance(d, Continue):
        return None
    return "bad_decision", f"{d!r} is not a Decision (Continue, Mutate or Respond)"


def _status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status else "unknown"


def _sanitize(headers: Headers, acc: _Accumulator) -> None:
    spoofed = [k for k in headers if k.startswith(INTERNAL_PREFIX)]
    if spoofed:
        metrics.SPOOFED_HEADERS.inc(len(spoofed))
        for k in spoofed:
            del headers[k]
            acc.remove.append(k)
