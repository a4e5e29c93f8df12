"""A test harness for filter authors: replays the ext_proc phases of one request through a
chain in-process, playing Envoy's part (applying mutations, calling a fake upstream), so a
policy can be unit-tested without Envoy, gRPC or a model server.

    h = Harness.for_filters([MyFilter(MyFilter.Params(...), Deps(clock=fake_clock))])
    result = await h.request("POST", "/v1/embeddings", headers={...}, body=b"...")
    assert result.status == 429
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.api import (
    Continue,
    Decision,
    Filter,
    Headers,
    Mutate,
    OnError,
    Outcome,
    Phase,
    Respond,
)
from proxy.chain import Chain
from proxy.config import ConfigError, FilterConfig, FloodwallConfig, parse_config


class FakeClock:
    """A clock that moves only when told (``advance``) or when a filter sleeps on it."""

    def __init__(self, start: float = 1_000.0, wall: float = 1_700_000_000.0) -> None:
        self.now = start
        self._wall_offset = wall - start
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + self._wall_offset

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


@dataclass
class UpstreamReply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    body: bytes = b"{}"


Upstream = Callable[[Headers, bytes], Awaitable[UpstreamReply] | UpstreamReply]


@dataclass
class Result:
    """What the client got, what the upstream saw, and what each phase decided."""

    status: int
    headers: Headers
    body: bytes
    upstream_called: bool
    upstream_headers: Headers | None
    upstream_body: bytes | None
    decisions: dict[Phase, Decision]
    responded_by: str | None
    outcome: Outcome | None

    def json(self) -> Any:
        return json.loads(self.body)


def default_config(routes: list[dict[str, Any]] | None = None, **processor: Any) -> FloodwallConfig:
    """A config with one upstream ``up`` and ``routes``; ``processor`` overrides fields of
    the processor section (``message_timeout_ms``: what each phase may take, which bounds
    every filter's own budgets, see RequestContext.budget_s)."""
    return parse_config(
        {
            "processor": processor,
            "upstreams": {"up": {"endpoints": [{"address": "127.0.0.1", "port": 1}]}},
            "routes": routes
            or [
                {"name": "embeddings", "match": {"path": "/v1/embeddings"},
                 "api": "openai_embeddings", "upstream": "up"},
                {"name": "kserve_http", "match": {"prefix": "/v2"}, "upstream": "up"},
            ],
        }
    )  # fmt: skip


class _OutcomeRecorder(Filter):
    """Appended last so the harness can report the Outcome the chain built."""

    def __init__(self) -> None:
        from proxy.api import Deps, NoParams

        super().__init__(NoParams(), Deps())
        self.name = "_harness"
        self.last: Outcome | None = None

    def on_complete(self, ctx: Any, outcome: Outcome) -> None:
        self.last = outcome


class Harness:
    """``on_error``: for filters the config does not list, what a fault does (``closed``, the
    default, answers 500; ``open`` skips the filter), all alike or per filter name."""

    def __init__(
        self,
        config: FloodwallConfig,
        filters: list[Filter],
        on_error: OnError | Mapping[str, OnError] = "closed",
    ) -> None:
        from proxy.registry import class_problem

        for f in filters:  # what the registry refuses at start, refused here too
            problem = class_problem(type(f))
            if problem is not None:
                raise ConfigError(f"filter {f.name}: {problem}")
        self.recorder = _OutcomeRecorder()

        def mode(name: str) -> OnError:
            return on_error if isinstance(on_error, str) else on_error.get(name, "closed")

        cfg = config.model_copy(
            update={
                "filters": [
                    *config.filters,
                    *(
                        FilterConfig(name=f.name, type="_test", on_error=mode(f.name))
                        for f in filters
                        if f.name not in {fc.name for fc in config.filters}
                    ),
                ]
            }
        )
        self.chain = Chain(cfg, [*filters, self.recorder])

    @classmethod
    def for_filters(
        cls,
        filters: list[Filter],
        config: FloodwallConfig | None = None,
        *,
        on_error: OnError | Mapping[str, OnError] = "closed",
    ) -> Harness:
        return cls(config or default_config(), filters, on_error)

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
        upstream: Upstream | UpstreamReply | None = None,
        grpc: bool = False,
        client_aborts: bool = False,
    ) -> Result:
        """Plays one request. ``client_aborts``: the client leaves while the upstream works
        (no response phases run; on_complete sees an aborted outcome). Cancelling the call
        itself is a client leaving during the request phases."""
        if isinstance(body, str):
            body = body.encode()
        h: Headers = {":method": method, ":path": path, ":authority": "test", ":scheme": "http"}
        if grpc:
            h["content-type"] = "application/grpc"
        h.update({k.lower(): v for k, v in (headers or {}).items()})
        ctx, plan = self.chain.context(h)
        ctx.has_request_body = bool(body)
        decisions: dict[Phase, Decision] = {}
        req_body = body or b""

        async def run(phase: Phase, data: Any) -> tuple[Decision, str | None]:
            if phase is not Phase.REQUEST_HEADERS and not plan.by_phase[phase]:
                return Continue(), None
            d, by = await self.chain.run(plan, phase, ctx, data)
            decisions[phase] = d
            return d, by

        async def done(
            status: int, hdrs: Headers, b: bytes, by: str | None, sent: bool, counted: int = 0
        ) -> Result:
            # counted: the status the chain counts, when it is not the one the client reads.
            task = self.chain.finish(ctx, plan, by, counted or status, True)
            if task is not None:
                await task
            return Result(
                status, hdrs, b, upstream_called=sent,
                upstream_headers=dict(h) if sent else None,
                upstream_body=req_body if sent else None,
                decisions=decisions, responded_by=by, outcome=self.recorder.last,
            )  # fmt: skip

        # Request phases; a Respond ends the exchange before the upstream is called.
        try:
            for phase, present in (
                (Phase.REQUEST_HEADERS, True),
                (Phase.REQUEST_BODY, bool(body)),
            ):
                if not present or phase not in plan.phases:
                    continue
                d, by = await run(phase, h if phase is Phase.REQUEST_HEADERS else req_body)
                if isinstance(d, Respond):
                    return await done(d.status, dict(d.headers), d.body, by, sent=False)
                req_body = _apply(h, d, req_body)
        except asyncio.CancelledError:
            self.chain.finish(ctx, plan, None, None, False)  # as the server does
            raise

        reply = await _call(upstream, h, req_body)
        if client_aborts:
            task = self.chain.finish(ctx, plan, None, None, False)
            if task is not None:
                await task
            return Result(
                0, {}, b"", upstream_called=True, upstream_headers=dict(h),
                upstream_body=req_body, decisions=decisions, responded_by=None,
                outcome=self.recorder.last,
            )  # fmt: skip
        rh: Headers = {":status": str(reply.status), **reply.headers}
        rbody = reply.body
        for phase in (Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY):
            if phase not in plan.phases:
                continue
            d, by = await run(phase, rh if phase is Phase.RESPONSE_HEADERS else rbody)
            if isinstance(d, Respond):
                return await done(d.status, dict(d.headers), d.body, by, sent=True)
            rbody = _apply(rh, d, rbody)
        status = int(rh.pop(":status"))
        # As the server does for a forwarded answer: the chain's view of the status once it
        # saw the response headers (a gRPC failure's grpc-status included).
        final = ctx.response_status if ctx.response_status is not None else status
        return await done(status, rh, rbody, None, sent=True, counted=final)


def _apply(headers: Headers, d: Decision, body: bytes) -> bytes:
    """Plays Envoy: applies a Mutate to the headers; returns the (maybe replaced) body."""
    if not isinstance(d, Mutate):
        return body
    for k in d.remove_headers:
        headers.pop(k, None)
    headers.update(d.set_headers)
    if d.body is None:
        return body
    length = headers.get("content-length")
    if length is not None and length != str(len(d.body)):
        # What Envoy does with a buffered body that its content-length does not describe.
        raise AssertionError(f"Envoy would answer 500: content-length {length} for a body "
                             f"of {len(d.body)} bytes")  # fmt: skip
    return d.body


async def _call(
    upstream: Upstream | UpstreamReply | None, h: Headers, body: bytes
) -> UpstreamReply:
    if upstream is None:
        return UpstreamReply()
    if isinstance(upstream, UpstreamReply):
        return upstream
    r = upstream(dict(h), body)
    if isinstance(r, UpstreamReply):
        return r
    return await r
