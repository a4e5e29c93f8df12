"""Optional OpenTelemetry tracing of the processor, exported with OTLP/gRPC.

A small tracer of our own on the OTLP protobufs (``opentelemetry-proto``) rather than the
OpenTelemetry SDK: the SDK's exporter pulls in ``googleapis-common-protos``, which overwrites
``google/api`` and ``google/rpc`` modules that ``xds-protos`` ships (the ext_proc protos need
those). What it does:

- continues the trace Envoy started: the ``traceparent`` Envoy sends with the ext_proc gRPC
  call (W3C trace context), else the client's request header, else a new trace (sampled at
  ``sample_ratio``);
- one span per request (``floodwall <route>``: route, request id, tenant, model, status) and a
  child span per filter phase (``<filter> <phase>``), so a slow policy shows in the trace;
- passes its span on upstream in ``traceparent`` (with Envoy's tracing on, Envoy's router
  replaces it with its own child span: one trace either way), so Triton, started with
  ``--trace-config mode=opentelemetry``, continues it;
- exports in batches every second from a background task; a full queue drops spans (counted)
  rather than slowing requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from proxy.api import cancel_and_wait

log = logging.getLogger("floodwall.tracing")

DROPPED = Counter("floodwall_trace_spans_dropped", "Spans dropped (queue full or export failed)")
EXPORTED = Counter("floodwall_trace_spans_exported", "Spans exported over OTLP")


@dataclass(slots=True)
class Span:
    trace_id: bytes
    span_id: bytes
    parent_id: bytes | None
    name: str
    start_ns: int
    end_ns: int = 0
    attrs: dict[str, str | int] = field(default_factory=dict)
    error: bool = False

    def traceparent(self) -> str:
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-01"


def parse_traceparent(value: str | None) -> tuple[bytes, bytes, bool] | None:
    """(trace id, parent span id, sampled) from a W3C ``traceparent``; None if malformed."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = (
            bytes.fromhex(parts[1]),
            bytes.fromhex(parts[2]),
            int(parts[3], 16),
        )
    except ValueError:
        return None
    if trace_id == bytes(16) or span_id == bytes(8):
        return None
    return trace_id, span_id, bool(flags & 1)


class Tracer:
    def __init__(
        self,
        endpoint: str,
        service_name: str,
        sample_ratio: float = 1.0,
        *,
        flush_s: float = 1.0,
        max_queue: int = 4096,
    ) -> None:
        self.endpoint = endpoint
        self.service_name = service_name
        self.sample_ratio = sample_ratio
        self.flush_s = flush_s
        self.max_queue = max_queue
        self._queue: list[Span] = []
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()

    def start_request(self, name: str, parent: str | None) -> Span | None:
        """The request's span, or None when the trace is not sampled."""
        ctx = parse_traceparent(parent)
        if ctx is not None:
            trace_id, parent_id, sampled = ctx
            if not sampled:
                return None
        else:
            if self._rng.random() >= self.sample_ratio:
                return None
            trace_id, parent_id = os.urandom(16), None
        return Span(trace_id, os.urandom(8), parent_id, name, time.time_ns())

    def child(self, parent: Span, name: str) -> Span:
        return Span(parent.trace_id, os.urandom(8), parent.span_id, name, time.time_ns())

    def end(self, span: Span) -> None:
        span.end_ns = time.time_ns()
        if len(self._queue) >= self.max_queue:
            DROPPED.inc()
            return
        self._queue.append(span)

    # --- export ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        await self._export()  # what is left

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self._export()

    async def _export(self) -> None:
        if not self._queue:
            return
        batch, self._queue = self._queue, []
        try:
            await export(self.endpoint, self.service_name, batch)
            EXPORTED.inc(len(batch))
        except Exception as exc:  # the collector is away: tracing must not hurt requests
            DROPPED.inc(len(batch))
            log.warning("trace export to %s failed: %r", self.endpoint, exc)


def require_otlp() -> None:
    """Fails at start, not at the first export, when the OTLP protobufs are missing."""
    try:
        import opentelemetry.proto.collector.trace.v1.trace_service_pb2  # noqa: F401
    except ImportError:
        from proxy.config import ConfigError

        raise ConfigError(
            "tracing is configured but opentelemetry-proto is missing: "
            "pip install 'floodwall[tracing]'"
        ) from None


_channels: dict[str, Any] = {}


async def export(endpoint: str, service_name: str, spans: list[Span]) -> None:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as svc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as svc_grpc
    from opentelemetry.proto.common.v1 import common_pb2 as common
    from opentelemetry.proto.resource.v1 import resource_pb2 as resource
    from opentelemetry.proto.trace.v1 import trace_pb2 as trace

    def kv(k: str, v: str | int) -> Any:
        value = (
            common.AnyValue(int_value=v)
            if isinstance(v, int)
            else common.AnyValue(string_value=str(v))
        )
        return common.KeyValue(key=k, value=value)

    server, internal = trace.Span.SPAN_KIND_SERVER, trace.Span.SPAN_KIND_INTERNAL
    error, unset = trace.Status.STATUS_CODE_ERROR, trace.Status.STATUS_CODE_UNSET
    out = []
    for s in spans:
        out.append(
            trace.Span(
                trace_id=s.trace_id,
                span_id=s.span_id,
                parent_span_id=s.parent_id or b"",
                name=s.name,
                # The request's span serves the call; the filter spans are steps inside it.
                kind=server if "floodwall.request" in s.attrs else internal,
                start_time_unix_nano=s.start_ns,
                end_time_unix_nano=s.end_ns,
                attributes=[kv(k, v) for k, v in s.attrs.items()],
                status=trace.Status(code=error if s.error else unset),
            )
        )
    req = svc.ExportTraceServiceRequest(
        resource_spans=[
            trace.ResourceSpans(
                resource=resource.Resource(attributes=[kv("service.name", service_name)]),
                scope_spans=[
                    trace.ScopeSpans(scope=common.InstrumentationScope(name="floodwall"), spans=out)
                ],
            )
        ]
    )
    channel = _channels.get(endpoint)
    if channel is None:
        channel = _channels[endpoint] = grpc.aio.insecure_channel(endpoint)
    stub = svc_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
    await stub.Export(req, timeout=5)
