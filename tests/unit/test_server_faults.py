"""The stream boundary at its edges, against both servers: a drain that outlasts its grace, a
CancelledError that a filter raises (not a client abort), and the largest message Envoy can
send the processor with the largest allowed body."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from proxy.api import CONTINUE, Decision, Deps, Filter, Headers, NoParams, Outcome, RequestContext
from proxy.bootstrap import render
from proxy.chain import Chain
from proxy.config import MAX_REQUEST_BYTES, ConfigError, parse_config
from proxy.h2server import MAX_MESSAGE
from proxy.process import build_chain
from proxy.server import ProcessorServer
from proxy.testing import default_config
from tests.unit.test_server_translate import headers_msg


@pytest.fixture(params=["grpcio", "h2"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Settle(Filter):
    """Settles something in on_complete (a Redis round trip, say), which needs the filter
    not stopped yet; raises CancelledError on request when asked to."""

    def __init__(self) -> None:
        super().__init__(NoParams(), Deps())
        self.name = "settle"
        self.events: list[str] = []

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        if headers.get("x-cancel"):
            raise asyncio.CancelledError()  # e.g. a future it awaited was cancelled
        return CONTINUE

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        return CONTINUE

    async def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.events.append(f"complete aborted={outcome.aborted}")
        await asyncio.sleep(0.01)
        self.events.append("complete done")

    async def stop(self) -> None:
        self.events.append("stop")


async def _server(tmp_path: Path, f: Filter, kind: str) -> tuple[ProcessorServer, str]:
    addr = f"unix:{tmp_path}/p.sock"
    server = ProcessorServer(Chain(default_config(), [f]), addr, kind=kind)  # type: ignore[arg-type]
    await server.start()
    return server, addr


async def test_drain_past_its_grace_completes_streams_before_stopping_filters(
    tmp_path: Path, kind: str
) -> None:
    f = Settle()
    server, addr = await _server(tmp_path, f, kind)
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pb_grpc.ExternalProcessorStub(ch)
        never = asyncio.Event()

        async def requests() -> object:
            yield headers_msg({":path": "/v2/models/m/infer", ":method": "POST"}, eos=True)
            await never.wait()  # the response headers never come (a long upstream call)

        call = stub.Process(requests())
        await call.read()  # the request headers are answered: the stream stays open
        await server.drain_and_stop(0.2, 0)
        call.cancel()
    assert f.events == ["complete aborted=True", "complete done", "stop"]


async def test_cancelled_error_from_a_filter_is_a_fault_not_a_hang(
    tmp_path: Path, kind: str
) -> None:
    f = Settle()
    server, addr = await _server(tmp_path, f, kind)
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            msg = headers_msg({":path": "/v2/x", "x-cancel": "1"}, eos=True)
            out = await asyncio.wait_for(_all(stub.Process(iter([msg]))), 5)
        ir = out[0].immediate_response
        assert ir.status.code == 500
        assert orjson.loads(ir.body)["error"]["type"] == "internal_error"
        await asyncio.sleep(0.05)
        assert f.events[0] == "complete aborted=False"
    finally:
        await server.drain_and_stop(0.1, 0)


async def test_h2_stream_task_cancelled_from_outside_still_ends_the_stream(
    tmp_path: Path,
) -> None:
    """Not by a reset nor by stop() (say a task group tearing down): the peer gets an error."""
    f = Settle()
    server, addr = await _server(tmp_path, f, "h2")
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            never = asyncio.Event()

            async def requests() -> object:
                yield headers_msg({":path": "/v2/x"})
                await never.wait()

            call = stub.Process(requests())
            await call.read()
            assert server._h2 is not None
            (conn,) = server._h2.connections
            (stream,) = conn.streams.values()
            assert stream.task is not None
            stream.task.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await asyncio.wait_for(call.read(), 5)
        assert e.value.code() == grpc.StatusCode.INTERNAL
    finally:
        await server.drain_and_stop(0.1, 0)


async def _all(call: object) -> list[pb.ProcessingResponse]:
    return [r async for r in call]  # type: ignore[attr-defined]


_CFG = {
    "upstreams": {"up": {"endpoints": [{"address": "127.0.0.1", "port": 8000}]}},
    "routes": [{"name": "r", "match": {"prefix": "/"}, "upstream": "up"}],
}


def test_max_request_bytes_is_bounded_by_the_processors_message_size() -> None:
    with pytest.raises(ConfigError, match=r"listener.max_request_bytes: .*at most 32505856"):
        parse_config({**_CFG, "listener": {"max_request_bytes": MAX_REQUEST_BYTES + 1}})
    cfg = parse_config({**_CFG, "listener": {"max_request_bytes": MAX_REQUEST_BYTES}})
    boot = render(cfg, build_chain(cfg), Path("/tmp/fw"))
    # Envoy buffers a response for the processor up to the listener's buffer limit.
    (listener,) = boot["static_resources"]["listeners"]
    largest_response = listener["per_connection_buffer_limit_bytes"]
    assert largest_response >= MAX_REQUEST_BYTES
    for msg in (
        pb.ProcessingRequest(
            request_body=pb.HttpBody(body=bytes(MAX_REQUEST_BYTES), end_of_stream=True)
        ),
        pb.ProcessingRequest(
            response_body=pb.HttpBody(body=bytes(largest_response), end_of_stream=True)
        ),
    ):
        # Envoy adds attributes and metadata to some messages: leave room for them.
        assert msg.ByteSize() + 1024 * 1024 <= MAX_MESSAGE
