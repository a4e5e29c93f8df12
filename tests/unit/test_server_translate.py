"""The gRPC stream loop and the proto translation, with a real grpc.aio client (no Envoy),
against both servers (``processor.server``: grpc.aio and the h2 server)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from proxy import translate
from proxy.api import (
    CONTINUE,
    Decision,
    Deps,
    Filter,
    Headers,
    Mutate,
    NoParams,
    Outcome,
    Phase,
    RequestContext,
    Respond,
)
from proxy.chain import Chain
from proxy.server import ProcessorServer
from proxy.testing import default_config


def headers_msg(h: dict[str, str], eos: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=HeaderMap(
                headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in h.items()]
            ),
            end_of_stream=eos,
        )
    )


def test_headers_to_dict_reads_raw_value_and_joins_repeats() -> None:
    msg = headers_msg({"a": "1"}).request_headers
    msg.headers.headers.append(HeaderValue(key="a", raw_value=b"2"))
    msg.headers.headers.append(HeaderValue(key="b", value="legacy"))
    assert translate.headers_to_dict(msg) == {"a": "1,2", "b": "legacy"}


def test_response_for_each_decision() -> None:
    assert translate.response_for(Phase.REQUEST_HEADERS, CONTINUE).HasField("request_headers")
    m = translate.response_for(
        Phase.REQUEST_BODY, Mutate(set_headers={"x": "1"}, remove_headers=("y",), body=b"B")
    )
    common = m.request_body.response
    assert common.body_mutation.body == b"B"
    assert common.header_mutation.set_headers[0].header.raw_value == b"1"
    assert list(common.header_mutation.remove_headers) == ["y"]
    r = translate.response_for(
        Phase.REQUEST_HEADERS,
        Respond(429, b"{}", {"x-floodwall-error": "rate limited"}, grpc_status=8),
        grpc=True,
    )
    ir = r.immediate_response
    assert ir.status.code == 429 and ir.grpc_status.status == 8
    assert ir.details == "floodwall_rate_limited"  # one token: Envoy forbids spaces
    r = translate.response_for(Phase.REQUEST_HEADERS, Respond(429, b"{}", grpc_status=8))
    assert not r.immediate_response.HasField("grpc_status")  # HTTP callers get HTTP


class Slow(Filter):
    def __init__(self) -> None:
        super().__init__(NoParams(), Deps())
        self.name = "slow"
        self.outcomes: list[Outcome] = []
        self.entered = asyncio.Event()

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        if headers.get("x-slow"):
            self.entered.set()
            await asyncio.sleep(float(headers["x-slow"]))
        return Mutate(set_headers={"x-seen": ctx.route_name})

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        return CONTINUE

    async def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


@pytest.fixture(params=["grpcio", "h2"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _server(tmp_path: Path, f: Filter, kind: str) -> tuple[ProcessorServer, str]:
    addr = f"unix:{tmp_path}/p.sock"
    server = ProcessorServer(Chain(default_config(), [f]), addr, kind=kind)
    await server.start()
    return server, addr


async def test_stream_round_trip_and_complete(tmp_path: Path, kind: str) -> None:
    f = Slow()
    server, addr = await _server(tmp_path, f, kind)
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            reqs = [
                headers_msg({":path": "/v2/models", ":method": "GET"}, eos=True),
                pb.ProcessingRequest(
                    response_headers=pb.HttpHeaders(
                        headers=HeaderMap(headers=[HeaderValue(key=":status", raw_value=b"200")]),
                        end_of_stream=True,
                    )
                ),
            ]
            out = [r async for r in stub.Process(iter(reqs))]
        hm = out[0].request_headers.response.header_mutation
        assert hm.set_headers[0].header.key == "x-seen"
        assert out[1].HasField("response_headers")
        await asyncio.sleep(0.05)
        assert f.outcomes and f.outcomes[-1].status == 200 and not f.outcomes[-1].aborted
    finally:
        await server.drain_and_stop(0.1, 0)


async def test_client_abort_still_runs_on_complete(tmp_path: Path, kind: str) -> None:
    f = Slow()
    server, addr = await _server(tmp_path, f, kind)
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            call = stub.Process(iter([headers_msg({":path": "/v2/x", "x-slow": "30"})]))
            await asyncio.wait_for(f.entered.wait(), 5)
            call.cancel()
        for _ in range(100):
            if f.outcomes:
                break
            await asyncio.sleep(0.02)
        assert f.outcomes and f.outcomes[-1].aborted
    finally:
        await server.drain_and_stop(0.1, 0)


async def test_body_before_headers_passes_through_and_health_check(
    tmp_path: Path, kind: str
) -> None:
    f = Slow()
    server, addr = await _server(tmp_path, f, kind)
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            reqs = [pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x", end_of_stream=True))]
            out = [r async for r in stub.Process(iter(reqs))]
            assert out[0].HasField("response_body")
            check = ch.unary_unary("/grpc.health.v1.Health/Check")
            assert await check(b"") == b"\x08\x01"
        server._health.serving = False
        async with grpc.aio.insecure_channel(addr) as ch:
            assert await ch.unary_unary("/grpc.health.v1.Health/Check")(b"") == b"\x08\x02"
    finally:
        await server.drain_and_stop(0.1, 0)


async def test_drain_turns_not_serving_and_finishes_in_flight_streams(
    tmp_path: Path, kind: str
) -> None:
    f = Slow()
    server, addr = await _server(tmp_path, f, kind)
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pb_grpc.ExternalProcessorStub(ch)
        msg = headers_msg({":path": "/v2/x", "x-slow": "0.5"}, eos=True)
        call = stub.Process(iter([msg]))
        await asyncio.wait_for(f.entered.wait(), 5)
        drain = asyncio.create_task(server.drain_and_stop(drain_s=3.0, health_wait_s=0.2))
        await asyncio.sleep(0.05)
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        assert await check(b"") == b"\x08\x02"  # NOT_SERVING while draining
        out = [r async for r in call]  # the in-flight request still gets its answer
        assert out[0].request_headers.response.header_mutation.set_headers[0].header.key == (
            "x-seen"
        )
        await asyncio.wait_for(drain, 5)
    assert f.outcomes, "on_complete ran before the server stopped"


async def test_one_stall_is_not_overload() -> None:
    """A single blocking callback (a 1 s config reload, say) must not make the guard refuse
    requests once the loop keeps time again."""
    import time

    from proxy.guard import LagGuard

    guard = LagGuard(max_lag_s=0.05)
    guard.start()
    try:
        await asyncio.sleep(0.1)
        time.sleep(1.0)  # noqa: ASYNC251 - blocking the loop on purpose
        await asyncio.sleep(0.03)  # the late tick is counted
        assert guard.lag > 0 and not guard.overloaded()
    finally:
        await guard.stop()


async def test_lag_guard_refuses_new_requests_while_the_loop_runs_late(
    tmp_path: Path, kind: str
) -> None:
    import time

    from proxy.guard import LagGuard

    # Ticks of 200 ms and stretches of 300 ms: the smoothed lag ends well above the limit
    # and takes ~0.6 s to decay below it, longer than a slow box needs to open the channel.
    guard = LagGuard(max_lag_s=0.05, interval_s=0.2)
    f = Slow()
    addr = f"unix:{tmp_path}/g.sock"
    server = ProcessorServer(Chain(default_config(), [f]), addr, guard, kind=kind)
    await server.start()
    try:
        for _ in range(10):  # CPU-bound stretches: the loop runs late, again and again
            await asyncio.sleep(0.01)  # long enough for the guard's due tick to run
            time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop on purpose
        assert guard.lag > 0.05
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            reqs = [headers_msg({":path": "/v2/models", ":method": "GET"}, eos=True)]
            out = [r async for r in stub.Process(iter(reqs))]
        ir = out[0].immediate_response
        assert ir.status.code == 503 and b"overloaded" in ir.body
        assert not any(o.status == 200 for o in f.outcomes)  # no filter work was started
        # Once the loop keeps time again, requests pass.
        for _ in range(100):
            if guard.lag < 0.05:
                break
            await asyncio.sleep(0.02)
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            out = [r async for r in stub.Process(iter(reqs))]
        assert out[0].HasField("request_headers")
    finally:
        await server.drain_and_stop(0.1, 0)
        await guard.stop()


def _status_msg(status: bytes, eos: bool = False) -> pb.ProcessingRequest:
    h = HeaderMap(headers=[HeaderValue(key=":status", raw_value=status)])
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=h, end_of_stream=eos))


def _body_msg(body: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=eos))


class Ends(Filter):
    """Streams the response (a path ending in "stream") or reads it whole; records each
    outcome and what it saw of the body's end."""

    def __init__(self) -> None:
        super().__init__(NoParams(), Deps())
        self.name = "ends"
        self.outcomes: list[Outcome] = []
        self.body_ends: list[bool] = []

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        return Mutate(stream_response=True) if ctx.path.endswith("stream") else CONTINUE

    async def on_response_body(self, ctx: RequestContext, body: bytes) -> Decision:
        self.body_ends.append(ctx.end_of_stream)
        return CONTINUE

    async def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


async def _ends_by_itself(addr: str, msgs: list[pb.ProcessingRequest]) -> int:
    """Sends ``msgs`` and keeps the stream open (as Envoy does until its exchange ends): the
    processor must close it after the last message Envoy will send. Returns the answers."""
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pb_grpc.ExternalProcessorStub(ch)
        held = asyncio.Event()

        async def requests() -> object:
            for m in msgs:
                yield m
            await held.wait()

        answers = [r async for r in stub.Process(requests())]  # ends only if the server ends it
        held.set()
        return len(answers)


async def test_a_streamed_response_ends_at_its_trailers(tmp_path: Path, kind: str) -> None:
    """A gRPC stream ends with its trailers, never with a last body chunk: that is the end
    of the exchange (not a client that left), and the processor closes the stream there."""
    f = Ends()
    server, addr = await _server(tmp_path, f, kind)
    try:
        msgs = [
            headers_msg({":path": "/v2/models/m/generate_stream", ":method": "POST"}, eos=True),
            _status_msg(b"200"),
            _body_msg(b"message 1", eos=False),
            _body_msg(b"message 2", eos=False),
            pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
        ]  # fmt: skip
        assert await asyncio.wait_for(_ends_by_itself(addr, msgs), 5) == 5
        await asyncio.sleep(0.05)
        assert f.outcomes and not f.outcomes[-1].aborted and f.outcomes[-1].status == 200
        assert f.body_ends == [False, False]
    finally:
        await server.drain_and_stop(0.1, 0)


async def test_a_buffered_body_with_trailers_after_it_is_the_whole_body(
    tmp_path: Path, kind: str
) -> None:
    f = Ends()
    server, addr = await _server(tmp_path, f, kind)
    try:
        msgs = [
            headers_msg({":path": "/v2/models/m/infer", ":method": "GET"}, eos=True),
            _status_msg(b"200"),
            _body_msg(b"the whole answer", eos=False),  # trailers follow (an HTTP/2 upstream)
        ]
        assert await asyncio.wait_for(_ends_by_itself(addr, msgs), 5) == 3
        assert f.body_ends == [True]
    finally:
        await server.drain_and_stop(0.1, 0)


class Replaces(Filter):
    """Replaces the request body at its headers; reads request bodies otherwise (so the
    route's plan has a request-body phase), and no response phase."""

    def __init__(self) -> None:
        super().__init__(NoParams(), Deps())
        self.name = "replaces"
        self.outcomes: list[Outcome] = []

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        return Mutate(body=b"{}")

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        return CONTINUE

    async def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


async def test_a_body_replaced_at_the_headers_is_not_waited_for(tmp_path: Path, kind: str) -> None:
    """Envoy sends no request body after a filter replaced it at the request headers: with
    no response phase, the request headers were the last message."""
    f = Replaces()
    server, addr = await _server(tmp_path, f, kind)
    try:
        msgs = [headers_msg({":path": "/v2/models/m/infer", ":method": "POST"})]
        assert await asyncio.wait_for(_ends_by_itself(addr, msgs), 5) == 1
        await asyncio.sleep(0.05)
        assert f.outcomes and not f.outcomes[-1].aborted
    finally:
        await server.drain_and_stop(0.1, 0)
