"""The filter API: what policy authors write against.

Filters see plain headers (``dict[str, str]`` with lower-case names, pseudo-headers such as
``:path`` included) and bytes bodies, and answer with a decision value. They never see ext_proc
protobufs: ``proxy.translate`` is the only module that does.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisClusterException, RedisError

if TYPE_CHECKING:
    from proxy.config import RouteConfig
    from proxy.triton_load import TritonLoad

Headers = dict[str, str]


# --- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Continue:
    """Let the request (or response) go on unchanged."""


CONTINUE = Continue()


@dataclass(frozen=True, slots=True)
class Mutate:
    """Change headers and/or replace the body, then go on. Mutations of a phase accumulate."""

    set_headers: Mapping[str, str] = field(default_factory=dict)
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None
    # From on_response_headers: have the response body come as it arrives, a response_body
    # phase per chunk (ctx.end_of_stream marks the last), instead of buffered whole (SSE).
    stream_response: bool = False


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client now (an Envoy immediate response); ends the chain.

    ``grpc_status`` is used when the caller speaks gRPC; Envoy then sends ``body`` (the JSON
    error) as the grpc-message and ``headers`` as trailing metadata. ``message`` is the error's
    human-readable text alone (for logs and traces).
    """

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    grpc_status: int | None = None
    message: str = ""


Decision = Continue | Mutate | Respond


class Phase(enum.Enum):
    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"


# --- injected dependencies ---------------------------------------------------------------------


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def time(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Gate(Protocol):
    def would_refuse(self, now: float) -> bool: ...


class Signals:
    """Process-local health signals policies share (one per processor process): a breaker
    publishes its gate per model, so degradation can steer around a model before the breaker
    would refuse the call; admission says when it last had to make a call for a model wait
    or refuse it, so degradation can serve the lighter model while admission is the limit;
    Triton's load (pending requests, queue time) is polled once per metrics URL for every
    policy that watches it."""

    def __init__(self) -> None:
        self.gates: dict[str, Gate] = {}
        # Model (or route, for an admission without models) -> priority class -> when
        # admission last made a call of the class wait or refused one (monotonic seconds on
        # Deps.clock).
        self.pressed_at: dict[str, dict[str, float]] = {}
        # Client-facing model name -> the backend (Triton) model serving it, registered by
        # API filters (openai), so other policies can follow a model's versions and load.
        self.backend_models: dict[str, str] = {}
        self._triton: dict[str, TritonLoad] = {}

    def refusing(self, model: str, now: float) -> bool:
        gate = self.gates.get(model)
        return gate is not None and gate.would_refuse(now)

    def watch_triton(self, metrics_url: str, clock: Clock | None = None) -> TritonLoad:
        """Starts (or shares) the poller of one Triton's metrics; pair with ``unwatch``.
        ``clock``: the one its readings are stamped with (the caller's Deps.clock, which it
        compares them with)."""
        from proxy.triton_load import TritonLoad

        load = self._triton.get(metrics_url)
        if load is None:
            now = clock.monotonic if clock is not None else time.monotonic
            load = self._triton[metrics_url] = TritonLoad(metrics_url, now=now)
            load.start()
        load.users += 1
        return load

    async def unwatch_triton(self, metrics_url: str) -> None:
        load = self._triton.get(metrics_url)
        if load is not None:
            load.users -= 1
            if load.users <= 0:
                del self._triton[metrics_url]
                await load.stop()


# What a call on ``Deps.redis`` raises when Redis is slow, gone or failing over: catch these to
# fall back, never a bare Exception. RedisClusterException is not a RedisError (a cluster with
# no reachable node raises it); OSError and TimeoutError come from the sockets themselves.
REDIS_FAULTS = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
)


@dataclass(frozen=True)
class Deps:
    """What a filter may use besides its params; tests pass fakes here.

    ``redis`` is a ``redis.asyncio.Redis`` or ``RedisCluster`` (``redis.cluster: true``; keep a
    script's or a multi-key command's keys in one hash slot) or anything with their
    interface, or None when the deployment has no Redis; ``upstreams`` maps upstream names to
    their base URLs.
    """

    clock: Clock = field(default_factory=SystemClock)
    rng: random.Random = field(default_factory=random.Random)
    redis: Any = None
    upstreams: Mapping[str, str] = field(default_factory=dict)
    signals: Signals = field(default_factory=Signals)


# --- per-request context -----------------------------------------------------------------------


@dataclass(slots=True)
class Usage:
    """Tokens of one model call (OpenAI's ``usage``)."""

    prompt_tokens: int
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        # A count a model reported as -1 would refund token limits past what was reserved and
        # fail the token metrics (found by fuzzing the model's answers): a ValueError here is
        # an unreadable answer (502) where the answer is translated.
        if self.prompt_tokens < 0 or self.completion_tokens < 0:
            raise ValueError(
                f"negative token counts {self.prompt_tokens}, {self.completion_tokens}"
            )

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


_log = logging.getLogger("floodwall.request")
S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request ended, as far as the processor saw it."""

    status: int | None  # HTTP status sent to the client, if known
    aborted: bool  # the stream ended before the phases the route expects (client went away)
    responded_by: str | None  # name of the filter that answered, if one did
    duration_s: float
    # The status the upstream answered with, before any filter rewrote it (a stale cached
    # 200 for a 503): what judges the upstream's health. None: no answer from it.
    upstream_status: int | None = None


def bearer_token(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (the scheme in any case), or
    None: no value, another scheme, a bare token, an empty one."""
    scheme, _, token = (value or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def prefers_async(headers: Headers) -> bool:
    """The client asked for an asynchronous answer (RFC 7240 ``Prefer: respond-async``)."""
    prefer = headers.get("prefer", "")
    return any(p.split(";", 1)[0].strip().lower() == "respond-async" for p in prefer.split(","))


class _RequestLog(logging.LoggerAdapter[logging.Logger]):
    """Stamps each line with the request id and route and keeps the caller's own ``extra``
    fields (the stock adapter replaces them with its own before Python 3.13)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **(self.extra or {})}
        return msg, kwargs


class RequestContext:
    """One per ext_proc stream (one HTTP request). Filters read and annotate it."""

    __slots__ = (
        "_log",
        "_state",
        "deadline",
        "deferred",
        "end_of_stream",
        "grpc",
        "has_request_body",
        "has_response_body",
        "key_id",
        "method",
        "model",
        "path",
        "phase_deadline",
        "priority",
        "request_body",
        "request_id",
        "response_status",
        "response_streamed",
        "route",
        "span",
        "started",
        "tenant",
        "tier",
        "token_estimate",
        "upstream_path",
        "upstream_status",
        "usage",
    )

    def __init__(
        self,
        route: RouteConfig | None,
        *,
        started: float,
        request_id: str = "",
        method: str = "",
        path: str = "",
        grpc: bool = False,
    ) -> None:
        self.route = route
        self.started = started
        self.request_id = request_id or uuid.uuid4().hex
        self.method = method
        self.path = path
        self.grpc = grpc
        self.tenant: str | None = None
        self.tier: str | None = None
        self.key_id: str | None = None
        self.priority: str | None = None
        self.deadline: float | None = None
        # When this filter's own calls must be over in the phase being processed, on the
        # time.monotonic() clock: Envoy's message timeout, less a margin and the deliberate
        # waits (hold_ms) of this filter and those after it. Set by the chain before each
        # filter runs. See budget_s.
        self.phase_deadline: float | None = None
        # The status the client gets (a filter may rewrite the upstream's) and the one the
        # upstream answered with (what judges its health), from the response headers on.
        self.response_status: int | None = None
        self.upstream_status: int | None = None
        # Set by the route's API filter (openai): the model the caller asked for, the tokens
        # the call may use at most (prompt estimate + max completion), then the real usage.
        self.model: str | None = None
        # The :path the request goes upstream with: the client's, or what a filter rewrote.
        self.upstream_path = path
        self.token_estimate: Usage | None = None
        self.usage: Usage | None = None
        # The request body as the client sent it (set before the body phase's first filter;
        # filters may rewrite the body Envoy forwards, this stays the original).
        self.request_body: bytes | None = None
        # Set (at the request headers) by a filter that will answer the request itself and
        # hand the work on for later (jobs: an async submission answered 202): the model is
        # not called now, so policies that protect it (admission) let the request pass.
        self.deferred = False
        # False when the headers ended the message (Envoy then sends no body phase).
        self.has_request_body = True
        self.has_response_body = True
        # A streamed response body (see Mutate.stream_response) comes in chunks; end_of_stream
        # is True on the last one (always True for a buffered body).
        self.response_streamed = False
        self.end_of_stream = True
        self._state: dict[type[Any], Any] = {}
        self._log: logging.LoggerAdapter[logging.Logger] | None = None
        # The request's trace span when tracing is on and the trace sampled (proxy.tracing).
        self.span: Any = None

    def budget_s(self, own_s: float) -> float:
        """A filter's own budget for a call (a Redis round trip, a model call), cut to what
        is left of this phase: filters run one after another within a message, so their
        budgets add up, and past Envoy's message timeout the client gets a 504 whatever the
        filters would have decided. 0 when nothing is left (the call then fails at once,
        into the filter's own fault path: fail open, 503, a miss)."""
        if self.phase_deadline is None:
            return own_s
        return max(0.0, min(own_s, self.phase_deadline - time.monotonic()))

    @property
    def route_name(self) -> str:
        return self.route.name if self.route is not None else "unknown"

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger that stamps every line with the request id (built on first use)."""
        if self._log is None:
            self._log = _RequestLog(_log, {"request_id": self.request_id, "route": self.route_name})
        return self._log

    def state(self, kind: Callable[[], S]) -> S:
        """Typed per-filter state: ``ctx.state(MyState)`` creates it on first use."""
        try:
            value: S = self._state[kind]  # type: ignore[index]
        except KeyError:
            value = kind()
            self._state[kind] = value  # type: ignore[index]
        return value


# --- filters -----------------------------------------------------------------------------------


class FilterParams(BaseModel):
    """Base for a filter's params: frozen, unknown fields are errors, not ignored, and no
    number is NaN or infinite (a limit, a timeout or a TTL of infinity is a typo's outcome that
    would fail later, at the first request)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class NoParams(FilterParams):
    pass


OnError = Literal["open", "closed"]
AdminHandler = Callable[[dict[str, str], dict[str, str]], Awaitable[tuple[int, Any]]]


class Filter:
    """A policy. Override only the phases you need: the chain (and the rendered Envoy config)
    skip phases no filter on a route overrides, so unused phases cost nothing."""

    Params: ClassVar[type[FilterParams]] = NoParams

    def __init__(self, params: FilterParams, deps: Deps) -> None:
        self.params = params
        self.deps = deps
        self.name: str = type(self).__name__.lower()  # the registry sets the configured name

    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        """The phases this filter needs on ``route``: by default those it overrides."""
        return frozenset(p for p in Phase if _overrides(type(self), p))

    def hold_ms(self) -> float:
        """The longest this filter may hold one phase on purpose (a smoothing wait, a queue):
        the rendered Envoy message timeout adds the sum over the chain, so Envoy does not give
        up on a processor that is waiting as configured."""
        return 0.0

    def route_refs(self) -> Collection[str]:
        """Route names this filter's params refer to: each must be a configured route (a typo
        would silently leave the route without the policy), checked at start and reload."""
        return ()

    def admin_routes(self) -> Mapping[str, AdminHandler]:
        """Endpoints this filter adds to the processor's admin server (``POST <path>``): each
        gets the query parameters and the request headers (lower-case names) and answers
        ``(status, JSON-able body)``. Authenticate in the handler: the admin server doesn't."""
        return {}

    async def start(self) -> None:
        """Called once before traffic (open connections, warm caches)."""

    async def stop(self) -> None:
        """Called once at shutdown."""

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        return CONTINUE

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        return CONTINUE

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        return CONTINUE

    async def on_response_body(self, ctx: RequestContext, body: bytes) -> Decision:
        return CONTINUE

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> Awaitable[None] | None:
        """Always called once per request, also when the client aborted or a filter answered.

        Write it as ``async def`` when it awaits (settling with Redis): it then runs in a task
        of its own after the exchange. A plain ``def`` (returning None) runs inline and costs
        no task, which matters at thousands of requests a second: write metrics-only ones so.
        A filter that settles only some requests returns a coroutine for those and None for
        the rest (see filters/rate_limit)."""
        return None


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, retry_s: float = 0.2) -> None:
    """Cancels ``tasks`` and waits until every one has finished.

    A single ``cancel()`` is not enough for loops around client libraries: redis-py (like
    others built on a read timeout) loses a cancellation that lands as its socket timeout
    fires, and the task goes on looping (redis/redis-py#2028, #2551). So whatever is still
    running after ``retry_s`` is cancelled again, until it stops.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    for t in pending:
        t.cancel()
    while pending:
        _done, pending = await asyncio.wait(pending, timeout=retry_s)
        for t in pending:
            logging.getLogger("floodwall").warning(
                "task %s ignored its cancellation; cancelling it again", t.get_name()
            )
            t.cancel()
    for t in tasks:  # retrieve results so no "exception never retrieved" is logged
        if t.done() and not t.cancelled():
            t.exception()


def _overrides(cls: type[Filter], phase: Phase) -> bool:
    attr = "on_" + phase.value
    return getattr(cls, attr) is not getattr(Filter, attr)


def overrides_complete(cls: type[Filter]) -> bool:
    return cls.on_complete is not Filter.on_complete
