"""The ext_proc gRPC server: the stream loop, and nothing else.

One bidirectional stream per HTTP request. The loop turns each message into a chain phase and
each decision back into a message; faults are caught here, at the stream boundary, counted per
kind and mapped to an answer by ``errors.fault_response``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from proxy import errors, metrics, translate
from proxy.api import CONTINUE, Mutate, Phase, RequestContext, Respond
from proxy.chain import Chain, RoutePlan
from proxy.guard import LagGuard
from proxy.h2server import MAX_MESSAGE, H2Server

log = logging.getLogger("floodwall.server")

_HEADER_PHASES = (Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS)


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, chain: Chain, guard: LagGuard | None = None) -> None:
        self.chain = chain
        self.guard = guard

    async def Process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        # Explicit read()/write() instead of an async generator: measurably fewer event-loop
        # hops per message in grpc.aio (the stream loop is the processor's hot path).
        # The chain this stream started on, kept to its end (a config reload swaps
        # self.chain for new streams only).
        chain = self.chain
        chain.streams += 1
        ctx: RequestContext | None = None
        plan: RoutePlan | None = None
        responded_by: str | None = None
        status: int | None = None
        reached_end = False
        read, write = context.read, context.write
        metrics.STREAMS_ACTIVE.inc()
        try:
            while not reached_end:
                req = await read()
                if req is grpc.aio.EOF:
                    break
                field = req.WhichOneof("request")
                phase = translate.PHASE_OF_FIELD.get(field or "")
                if phase is None:
                    if field in translate.TRAILERS:
                        await write(translate.TRAILERS[field])
                        if field == "response_trailers" and ctx is not None:
                            # Sent only for a streamed response (translate._STREAM_RESPONSE):
                            # the end of a gRPC stream, the last message Envoy sends.
                            ctx.end_of_stream = reached_end = True
                        continue
                    metrics.STREAM_FAULTS.labels("unexpected_message").inc()
                    log.warning("ignoring ext_proc message %r", field)
                    continue
                if phase is Phase.REQUEST_HEADERS:
                    msg = req.request_headers
                    headers = translate.headers_to_dict(msg)
                    tp = _traceparent(context) if chain.tracer is not None else None
                    ctx, plan = chain.context(headers, traceparent=tp)
                    ctx.has_request_body = not msg.end_of_stream
                    if self.guard is not None and self.guard.overloaded():
                        r = _OVERLOADED
                        responded_by, status, reached_end = "guard", r.status, True
                        metrics.count_response(ctx.route_name, "guard", r)
                        await write(translate.immediate(r, grpc=ctx.grpc))
                        break
                    data: object = headers
                elif ctx is None or plan is None:
                    # A filter before ext_proc answered (e.g. Envoy's 413) and its reply is
                    # now encoded through us: nothing of ours applies, let it pass.
                    await write(translate.response_for(phase, CONTINUE))
                    continue
                elif phase is Phase.RESPONSE_HEADERS:
                    msg = req.response_headers
                    data = translate.headers_to_dict(msg)
                    ctx.has_response_body = not msg.end_of_stream
                elif phase is Phase.REQUEST_BODY:
                    data = req.request_body.body
                else:
                    data = req.response_body.body
                    # A buffered body is the whole body even when trailers follow it (gRPC,
                    # HTTP/2 upstreams), though Envoy then sends it with end_of_stream false.
                    ctx.end_of_stream = req.response_body.end_of_stream or not ctx.response_streamed
                decision, by = await chain.run(plan, phase, ctx, data)
                if isinstance(decision, Respond):
                    responded_by, status = by or "chain", decision.status
                    metrics.count_response(ctx.route_name, responded_by, decision)
                    reached_end = True
                    await write(translate.immediate(decision, grpc=ctx.grpc))
                    break
                if (
                    phase in _HEADER_PHASES
                    and isinstance(decision, Mutate)
                    and decision.body is not None
                ):
                    # A body replaced at the headers: Envoy sends no body of that direction.
                    if phase is Phase.REQUEST_HEADERS:
                        ctx.has_request_body = False
                    else:
                        ctx.has_response_body = False
                await write(translate.response_for(phase, decision))
                # After the last phase Envoy will send, close our side at once: Envoy treats
                # a clean close then as "processing complete", and the stream is freed now
                # rather than when the HTTP exchange ends.
                reached_end = _is_last(plan, phase, ctx)
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and _task_cancelled():
                raise  # the client aborted or the server stops: nobody to answer
            # A CancelledError otherwise came from a filter (say a future it awaited was
            # cancelled): a fault like any other, or Envoy would wait for an answer until its
            # message timeout.
            kind = errors.fault_kind(exc)
            metrics.STREAM_FAULTS.labels(kind).inc()
            ours = isinstance(exc, errors.FilterFault)
            log.error("stream fault (%s): %r", kind, exc, exc_info=not ours)
            if not reached_end:
                r = errors.fault_response(exc)
                responded_by, status, reached_end = "server", r.status, True
                await write(translate.immediate(r, grpc=ctx.grpc if ctx else False))
        finally:
            metrics.STREAMS_ACTIVE.dec()
            chain.streams -= 1
            if ctx is not None and plan is not None:
                chain.finish(ctx, plan, responded_by, status, reached_end)


def _task_cancelled() -> bool:
    """True if this stream's task was cancelled (grpc.aio and H2Server cancel it when the
    client resets the stream or the server stops), not merely handed a CancelledError."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _traceparent(context: grpc.aio.ServicerContext) -> str | None:
    """The trace context Envoy sends with the ext_proc call (gRPC metadata), if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            return str(value)
    return None


_OVERLOADED = errors.error(
    503, "overloaded", "the gateway is overloaded; retry shortly", retry_after_s=1
)


def _is_last(plan: RoutePlan, phase: Phase, ctx: RequestContext) -> bool:
    """True once the stream reached the last phase Envoy will send for this request."""
    phases = plan.phases
    if phase is Phase.RESPONSE_BODY:
        return not ctx.response_streamed or ctx.end_of_stream
    if phase is Phase.RESPONSE_HEADERS:  # a streamed body comes whatever the route's phases
        return not ctx.has_response_body or (
            Phase.RESPONSE_BODY not in phases and not ctx.response_streamed
        )
    if Phase.RESPONSE_HEADERS in phases or Phase.RESPONSE_BODY in phases:
        return False
    if phase is Phase.REQUEST_BODY:
        return True
    return Phase.REQUEST_BODY not in phases or not ctx.has_request_body


class ProcessorServer:
    """The server Envoy calls (``kind``: "h2", proxy/h2server.py, or "grpcio", grpc.aio) with
    a standard gRPC health service; on drain the health turns NOT_SERVING first so Envoy
    moves new streams elsewhere before we stop."""

    def __init__(
        self,
        chain: Chain,
        address: str,
        guard: LagGuard | None = None,
        kind: Literal["grpcio", "h2"] = "grpcio",
    ) -> None:
        self.chain = chain
        self.address = address
        self.guard = guard
        self.processor = ExternalProcessor(chain, guard)
        self._health = _Health()
        self._h2: H2Server | None = None
        self._h2_stopped = asyncio.Event()
        if kind == "h2":
            self._h2 = H2Server(address, self.processor.Process, self._health.status)
            return
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_concurrent_streams", 10000),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        )
        pb_grpc.add_ExternalProcessorServicer_to_server(self.processor, self._server)
        self._server.add_generic_rpc_handlers((self._health.handler(),))

    async def start(self) -> None:
        if self.guard is not None:
            self.guard.start()
        await self.chain.start()
        if self._h2 is not None:
            await self._h2.start()
            self._health.serving = True
            return
        port = self._server.add_insecure_port(self.address)
        if port == 0:
            raise OSError(f"cannot listen on {self.address} (in use?)")
        await self._server.start()
        self._health.serving = True

    @property
    def ready(self) -> bool:
        return self._health.serving

    def swap_chain(self, chain: Chain) -> None:
        """New streams run on ``chain`` from now on (config reload)."""
        self.chain = chain
        self.processor.chain = chain

    async def drain_and_stop(
        self,
        drain_s: float,
        health_wait_s: float,
        before_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Stops taking streams, lets those running finish (up to the grace), then stops the
        chain's filters; ``before_stop`` runs in between (the reloader's older chains: their
        settlements still use filters the current chain carried over)."""
        self._health.serving = False
        metrics.DRAINING.set(1)
        # Give Envoy's health check time to see NOT_SERVING before refusing streams.
        await asyncio.sleep(min(health_wait_s, drain_s))
        if self._h2 is not None:
            await self._h2.stop(grace=max(0.0, drain_s - health_wait_s))
            self._h2_stopped.set()
        else:
            await self._server.stop(grace=max(0.0, drain_s - health_wait_s))
        if before_stop is not None:
            await before_stop()
        await self.chain.wait_background()
        await self.chain.stop()

    async def wait(self) -> None:
        if self._h2 is not None:
            await self._h2_stopped.wait()
        else:
            await self._server.wait_for_termination()


class _Health:
    """grpc.health.v1.Health/Check for Envoy's grpc_health_check of the processor cluster.

    Hand-encoded (HealthCheckResponse is one enum field) to avoid grpcio-health-checking, whose
    protobuf pin conflicts with tritonclient's.
    """

    SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
    NOT_SERVING = b"\x08\x02"  # HealthCheckResponse{status: NOT_SERVING}

    def __init__(self) -> None:
        self.serving = False

    def status(self) -> bytes:
        return self.SERVING if self.serving else self.NOT_SERVING

    async def check(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self.status()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check, request_deserializer=None, response_serializer=None
                )
            },
        )
