"""The processor's HTTP/2 server (proxy/h2server.py) at the protocol level: HPACK against an
independent encoder, flow control with messages far beyond the windows, many concurrent
streams, and frames a grpc client never sends (padding, CONTINUATION, bad input) written by
hand. The ext_proc behaviour of both servers is in test_server_translate.py."""

from __future__ import annotations

import asyncio
import random
import struct
from pathlib import Path

import grpc
import hpack
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from proxy import errors
from proxy.api import Decision, Deps, Filter, Headers, NoParams, RequestContext
from proxy.chain import Chain
from proxy.h2server import PREFACE, HpackDecoder
from proxy.server import ProcessorServer
from proxy.testing import default_config
from tests.unit.test_server_translate import headers_msg

# --- HPACK -----------------------------------------------------------------------------------


def test_hpack_decoder_agrees_with_an_independent_encoder() -> None:
    """hpack's encoder indexes and Huffman-codes freely: 300 blocks decoded in order keep the
    dynamic table in step (evictions included) and give back every field."""
    rng = random.Random(7)
    enc = hpack.Encoder()
    dec = HpackDecoder(max_size=4096)
    names = ["x-request-id", "traceparent", "content-type", ":path", "x-custom-" + "a" * 40]
    for _ in range(300):
        fields = [(":method", "POST"), (":scheme", "http")]
        for _ in range(rng.randint(1, 8)):
            value = "".join(rng.choice("abcdef0123456789-/ ") for _ in range(rng.randint(0, 90)))
            fields.append((rng.choice(names), value))
        got = [(n.decode(), HpackDecoder.value(raw, huff)) for n, raw, huff in dec.decode(
            enc.encode(fields, huffman=rng.random() < 0.7))]  # fmt: skip
        assert got == fields
    assert dec.size <= 4096


def test_hpack_size_update_to_zero_empties_the_table() -> None:
    enc = hpack.Encoder()
    dec = HpackDecoder(max_size=4096)
    dec.decode(enc.encode([("x-a", "1"), ("x-b", "2")]))
    assert dec.table
    enc.header_table_size = 0  # the encoder announces it at the start of its next block
    fields = dec.decode(enc.encode([("x-c", "3")]))
    assert not dec.table and [(n, HpackDecoder.value(r, h)) for n, r, h in fields] == [
        (b"x-c", "3")
    ]


# --- through a grpc client -------------------------------------------------------------------


class Big(Filter):
    """Answers every request with a body of ``x-size`` bytes."""

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        return errors.error(200, "big", "x" * int(headers.get("x-size", "10")))


async def _server(tmp_path: Path) -> tuple[ProcessorServer, str]:
    f = Big(NoParams(), Deps())
    f.name = "big"
    addr = f"unix:{tmp_path}/h2.sock"
    server = ProcessorServer(Chain(default_config(), [f]), addr, kind="h2")
    await server.start()
    return server, addr


async def test_messages_far_beyond_the_flow_control_windows(tmp_path: Path) -> None:
    """5 MB up (grpc's windows start at 64 KiB), 3 MB down, on three streams at once."""
    server, addr = await _server(tmp_path)
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)

            async def one(size: int) -> int:
                msg = headers_msg({":path": "/v2/x", "x-size": str(size), "x-pad": "p" * 5_000_000})
                out = [r async for r in stub.Process(iter([msg]))]
                return len(out[0].immediate_response.body)

            sizes = await asyncio.gather(one(3_000_000), one(1_000_000), one(10))
        assert sizes[0] > 3_000_000 and sizes[1] > 1_000_000 and sizes[2] < 1000
    finally:
        await server.drain_and_stop(0.1, 0)


async def test_many_concurrent_streams_on_one_connection(tmp_path: Path) -> None:
    server, addr = await _server(tmp_path)
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)

            async def one(i: int) -> bytes:
                msg = headers_msg({":path": "/v2/x", "x-size": str(i)}, eos=True)
                out = [r async for r in stub.Process(iter([msg]))]
                return out[0].immediate_response.body

            bodies = await asyncio.gather(*(one(i) for i in range(1, 501)))
        assert [b.count(b"x") for b in bodies] == list(range(1, 501))
    finally:
        await server.drain_and_stop(0.1, 0)


async def test_unknown_method_is_unimplemented(tmp_path: Path) -> None:
    server, addr = await _server(tmp_path)
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary("/some.Service/Method")(b"")
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.drain_and_stop(0.1, 0)


# --- frames written by hand ------------------------------------------------------------------


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


async def read_frames(
    reader: asyncio.StreamReader, until: int, sid: int | None = None
) -> list[tuple[int, int, int, bytes]]:
    """Frames until one of type ``until`` (on ``sid`` if given) arrives, or the connection
    closes."""
    out = []
    while True:
        try:
            head = await asyncio.wait_for(reader.readexactly(9), 5)
        except asyncio.IncompleteReadError:
            return out
        hi, lo, ftype, flags, fsid = struct.unpack(">BHBBI", head)
        payload = await reader.readexactly((hi << 16) | lo)
        out.append((ftype, flags, fsid, payload))
        if ftype == until and (sid is None or fsid == sid):
            return out


async def test_padding_priority_and_continuation_are_understood(tmp_path: Path) -> None:
    server, addr = await _server(tmp_path)
    try:
        reader, writer = await asyncio.open_unix_connection(addr[5:])
        block = hpack.Encoder().encode(
            [(":method", "POST"), (":scheme", "http"),
             (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
             (":authority", "p"), ("content-type", "application/grpc"), ("te", "trailers")]
        )  # fmt: skip
        msg = headers_msg({":path": "/v2/x", "x-size": "5"}, eos=True).SerializeToString()
        grpc_msg = b"\x00" + len(msg).to_bytes(4, "big") + msg
        writer.write(
            PREFACE
            + frame(4, 0, 0)  # SETTINGS
            # HEADERS: padded (3 bytes), with a priority block, the rest in CONTINUATION
            + frame(1, 0x8 | 0x20, 1, b"\x03" + b"\x00\x00\x00\x00\x10" + block[:10] + b"\0" * 3)
            + frame(9, 0x4, 1, block[10:])
            + frame(6, 0, 0, b"12345678")  # PING in between
            + frame(0, 0x1 | 0x8, 1, b"\x02" + grpc_msg + b"\0\0")  # DATA, padded, END_STREAM
        )
        frames = await read_frames(reader, until=1, sid=1)  # up to our first HEADERS
        frames += await read_frames(reader, until=1, sid=1)  # and the trailers
        kinds = [(t, s) for t, _, s, _ in frames]
        assert (6, 0) in kinds  # PING answered
        assert [p for t, f, s, p in frames if t == 6 and f & 1] == [b"12345678"]
        data = b"".join(p for t, _, s, p in frames if t == 0 and s == 1)
        reply = pb.ProcessingResponse.FromString(data[5:])
        assert reply.immediate_response.body.count(b"x") == 5
        assert frames[-1][0] == 1 and frames[-1][1] & 0x1  # trailers end the stream
        writer.close()
        await writer.wait_closed()
    finally:
        await server.drain_and_stop(0.1, 0)


async def test_bad_input_gets_a_clean_refusal_not_a_crash(tmp_path: Path) -> None:
    server, addr = await _server(tmp_path)
    try:
        # Not HTTP/2: GOAWAY, connection closed.
        reader, writer = await asyncio.open_unix_connection(addr[5:])
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        frames = await read_frames(reader, until=7)
        assert frames and frames[-1][0] == 7
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
        # A compressed gRPC message (not supported): that stream is reset, the connection
        # and other streams live on.
        reader, writer = await asyncio.open_unix_connection(addr[5:])
        block = hpack.Encoder().encode(
            [(":method", "POST"), (":scheme", "http"), (":authority", "p"),
             (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process")]
        )  # fmt: skip
        writer.write(PREFACE + frame(4, 0, 0) + frame(1, 0x4, 1, block)
                     + frame(0, 0x1, 1, b"\x01\x00\x00\x00\x01z"))  # fmt: skip
        frames = await read_frames(reader, until=3)
        assert frames[-1][0] == 3 and frames[-1][2] == 1  # RST_STREAM on stream 1
        writer.close()
        await writer.wait_closed()
        async with grpc.aio.insecure_channel(addr) as ch:
            assert await ch.unary_unary("/grpc.health.v1.Health/Check")(b"") == b"\x08\x01"
    finally:
        await server.drain_and_stop(0.1, 0)
