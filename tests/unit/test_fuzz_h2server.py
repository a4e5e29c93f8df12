"""Property-based fuzzing of the processor's HTTP/2 server (proxy/h2server.py) in-process:
sequences of frames, each valid, a little off or garbage (SETTINGS with values at and past
the protocol's bounds, padding longer than the frame, header blocks cut or random, gRPC
messages with wrong lengths or random protobufs, window updates of 0 or 2^31, unknown frame
types), fed in random chunks. Envoy is the only client, but a bug or a version change on its
side must not hang or kill the processor.

The properties, for every example: ``data_received`` never raises (asyncio would drop the
connection with a "fatal error"), the loop's exception handler sees nothing (no task dies
with an unretrieved exception), nothing loops forever (an alarm interrupts it after 1 s),
every stream handler ends once the connection is gone, and what the server wrote is
well-formed frames.

Derandomized for CI; ``FLOODWALL_FUZZ_EXAMPLES`` and ``FLOODWALL_FUZZ_SEED`` search further.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import struct
import time
from collections.abc import Iterator
from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from proxy import errors
from proxy.api import Decision, Deps, Filter, Headers, NoParams, RequestContext
from proxy.chain import Chain
from proxy.h2server import HEALTH_CHECK, PREFACE, PROCESS, H2Connection
from proxy.server import ProcessorServer
from proxy.testing import default_config
from tests.unit.test_h2server import frame as _frame
from tests.unit.test_server_translate import headers_msg

EXAMPLES = int(os.environ.get("FLOODWALL_FUZZ_EXAMPLES", "1000"))
SEED = int(os.environ.get("FLOODWALL_FUZZ_SEED", "0"))
DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)


class _Echo(Filter):
    """Answers each request with a small body: the stream then writes DATA and trailers."""

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        return errors.error(200, "ok", "x" * 64)


class _Transport:
    """What H2Connection writes to, kept for the frame check."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def writelines(self, chunks: list[bytes]) -> None:
        assert not self.closed, "written after close"
        for c in chunks:
            self.written += c

    def write(self, data: bytes) -> None:
        self.writelines([data])

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _block(path: str) -> bytes:
    return hpack.Encoder().encode(
        [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "p"),
         ("content-type", "application/grpc"), ("te", "trailers")]
    )  # fmt: skip


def _grpc(message: bytes, compressed: int = 0, length: int | None = None) -> bytes:
    n = len(message) if length is None else length
    return bytes([compressed]) + (n & 0xFFFFFFFF).to_bytes(4, "big") + message


VALID_REQUEST = headers_msg({":path": "/v2/x", ":method": "GET"}, eos=True).SerializeToString()
sids = st.sampled_from([1, 1, 3, 5, 0, 2, 0x7FFFFFFF]) | st.integers(0, 2**31 - 1)
bounds = st.sampled_from([0, 1, 16383, 16384, 2**24 - 1, 2**24, 2**31 - 1, 2**31, 2**32 - 1])
setting = st.tuples(st.sampled_from([4, 5, 4, 5, 1, 2, 3, 6, 8, 0, 0xFFFF]), bounds)
# The last: a :path whose Huffman-coded value does not decode (read when the stream starts).
BAD_HUFFMAN_PATH = b"\x04\x81\x00"
blocks = st.sampled_from(
    [_block(PROCESS), _block(HEALTH_CHECK), _block("/x.Y/Z"), BAD_HUFFMAN_PATH]
)
messages = st.one_of(
    st.just(VALID_REQUEST), st.binary(max_size=40), st.just(b""),
    st.just(VALID_REQUEST[: len(VALID_REQUEST) // 2]),
)  # fmt: skip
grpc_payloads = st.one_of(
    messages.map(_grpc),
    st.tuples(messages, st.sampled_from([0, 1, 2, 255])).map(lambda t: _grpc(t[0], t[1])),
    st.tuples(messages, bounds).map(lambda t: _grpc(t[0], 0, t[1])),
    st.binary(max_size=12),
)  # fmt: skip


@st.composite
def padded(draw: st.DrawFn, payload: bytes) -> tuple[int, bytes]:
    """(the PADDED flag or 0, the payload): a pad length that fits, or one past the frame."""
    if not draw(st.booleans()):
        return 0, payload
    pad = draw(st.integers(0, 4) | st.integers(0, 255))
    return 0x8, bytes([pad]) + payload + b"\0" * min(pad, draw(st.integers(0, 4)))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(
        ["headers", "headers", "continuation", "data", "data", "settings", "window", "ping",
         "rst", "goaway", "priority", "push", "unknown", "garbage"]))  # fmt: skip
    sid = draw(sids)
    if kind == "headers":
        block = draw(blocks | st.binary(max_size=30))
        cut = draw(st.none() | st.integers(0, len(block)))
        flags = draw(st.sampled_from([0x4, 0x4, 0x5, 0x1, 0x0, 0x24, 0x25]))
        pad_flag, payload = draw(padded(block[:cut] if flags & 0x4 else block[: cut or 0]))
        if flags & 0x20:
            payload = payload[:1] + b"\x00\x00\x00\x00\x10" + payload[1:]
        return _frame(HEADERS, flags | pad_flag, sid, payload)
    if kind == "continuation":
        return _frame(
            CONT, draw(st.sampled_from([0, 4])), sid, draw(blocks | st.binary(max_size=30))
        )
    if kind == "data":
        pad_flag, payload = draw(padded(draw(grpc_payloads)))
        return _frame(DATA, draw(st.sampled_from([0, 1])) | pad_flag, sid, payload)
    if kind == "settings":
        pairs = draw(st.lists(setting, max_size=3))
        payload = b"".join(struct.pack(">HI", k, v & 0xFFFFFFFF) for k, v in pairs)
        if draw(st.integers(0, 5)) == 0:
            payload += b"\x01"  # not a multiple of 6
        return _frame(
            SETTINGS, draw(st.sampled_from([0, 0, 1])), draw(st.sampled_from([0, 0, 1])), payload
        )
    if kind == "window":
        inc = draw(bounds)
        return _frame(
            WINDOW,
            0,
            draw(st.sampled_from([0, sid])),
            (inc & 0xFFFFFFFF).to_bytes(4, "big")[: draw(st.integers(0, 4))],
        )
    if kind == "ping":
        return _frame(
            PING,
            draw(st.sampled_from([0, 1])),
            draw(st.sampled_from([0, sid])),
            draw(st.binary(max_size=10)),
        )
    if kind == "rst":
        return _frame(RST, 0, sid, draw(st.binary(min_size=0, max_size=5)))
    if kind == "goaway":
        return _frame(GOAWAY, 0, 0, draw(st.binary(max_size=12)))
    if kind == "priority":
        return _frame(PRIORITY, 0, sid, draw(st.binary(max_size=6)))
    if kind == "push":
        return _frame(PUSH, 0x4, sid, draw(st.binary(max_size=10)))
    if kind == "unknown":
        return _frame(
            draw(st.integers(10, 255)), draw(st.integers(0, 255)), sid, draw(st.binary(max_size=10))
        )
    return draw(st.binary(min_size=1, max_size=20))  # garbage


def _valid_stream(sid: int, path: str, message: bytes) -> list[bytes]:
    return [_frame(HEADERS, 0x4, sid, _block(path)), _frame(DATA, 0x1, sid, _grpc(message))]


@st.composite
def conversations(draw: st.DrawFn) -> list[bytes]:
    """Valid streams (a Process call, a health check) with frames of any kind put among
    them and maybe one of theirs replaced: most examples are a frame or two from valid."""
    out = [_frame(SETTINGS, 0, 0, b"")]
    for sid in draw(st.sampled_from([[1], [1, 3], [3, 1], []])):
        path = draw(st.sampled_from([PROCESS, PROCESS, HEALTH_CHECK]))
        out += _valid_stream(sid, path, VALID_REQUEST if path == PROCESS else b"")
    for _ in range(draw(st.integers(0, 3))):
        out.insert(draw(st.integers(0, len(out))), draw(frames()))
    if draw(st.integers(0, 3)) == 0:
        out[draw(st.integers(0, len(out) - 1))] = draw(frames())
    return out


def _parse(written: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """The frames the server wrote: (type, flags, stream, payload); asserts each is whole."""
    pos = 0
    while pos < len(written):
        assert len(written) - pos >= 9, "a frame header cut short"
        hi, lo, ftype, flags, sid = struct.unpack_from(">BHBBI", written, pos)
        length = (hi << 16) | lo
        assert length <= 16384 or ftype == DATA, (ftype, length)  # the peer's default max
        assert pos + 9 + length <= len(written), "a frame cut short"
        yield ftype, flags, sid, written[pos + 9 : pos + 9 + length]
        pos += 9 + length


def _vm_bytes() -> int:
    """This process's virtual memory size now (what RLIMIT_AS limits)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


class _Alarm(BaseException):
    """Not an Exception: the server's handlers, which catch those, must not swallow it."""


def _alarm(signum: int, frame: Any) -> None:
    raise _Alarm("the server looped (no return within 1 s)")


@pytest.fixture(scope="module")
def processor() -> ProcessorServer:
    f = _Echo(NoParams(), Deps())
    f.name = "echo"
    return ProcessorServer(Chain(default_config(), [f]), "unix:/nonexistent", kind="h2")


async def _play(ps: ProcessorServer, data: bytes, cuts: list[int]) -> bytes:
    loop = asyncio.get_running_loop()
    faults: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, ctx: faults.append(ctx))
    # Every task the server makes, finished ones too (all_tasks() lists only the live).
    tasks: list[asyncio.Task[Any]] = []

    def factory(lp: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        t = asyncio.Task(coro, loop=lp, **kw)
        tasks.append(t)
        return t

    loop.set_task_factory(factory)
    assert ps._h2 is not None
    conn = H2Connection(ps._h2)
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    pos = 0
    for cut in [*sorted(cuts), len(data)]:
        if transport.closed:
            break
        conn.data_received(data[pos:cut])
        pos = max(pos, cut)
        await asyncio.sleep(0)
    for _ in range(20):  # let the stream handlers answer what they can
        await asyncio.sleep(0)
    conn.connection_lost(None)
    done, pending = await asyncio.wait(tasks, timeout=2) if tasks else (set(), set())
    assert not pending, f"{len(pending)} stream handlers did not end with the connection"
    for t in done:
        assert t.cancelled() or t.exception() is None, repr(t.exception())
    assert not conn.streams, "streams left registered after the connection ended"
    assert not faults, faults
    return bytes(transport.written)


def _play_guarded(ps: ProcessorServer, data: bytes, cuts: list[int]) -> bytes:
    """_play under a 1 s alarm and a memory cap."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    outer, started = signal.getitimer(signal.ITIMER_REAL), time.monotonic()  # pytest-timeout's
    signal.setitimer(signal.ITIMER_REAL, 1)
    # A runaway loop also fills memory (SETTINGS_MAX_FRAME_SIZE 0 once took 22 GB in 5 s,
    # and the kernel killed the run): capped for the example, a MemoryError fails it.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + (1 << 30), hard))
    try:
        return asyncio.run(_play(ps, data, cuts))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)
        left = outer[0] - (time.monotonic() - started)
        signal.setitimer(signal.ITIMER_REAL, max(left, 0.001) if outer[0] else 0, outer[1])


@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED == 0, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    sequence=conversations() | st.lists(frames(), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 400), max_size=4),
    preface=st.sampled_from([PREFACE] * 9 + [PREFACE[:-1] + b"x"]),
)
def test_no_frame_sequence_hangs_or_breaks_the_server(
    processor: ProcessorServer, sequence: list[bytes], cuts: list[int], preface: bytes
) -> None:
    written = _play_guarded(processor, preface + b"".join(sequence), cuts)
    kinds = [t for t, _, _, _ in _parse(written)]
    assert kinds[:2] == [SETTINGS, WINDOW]  # the server's preface comes first, always
    event("GOAWAY" if GOAWAY in kinds else "answered" if DATA in kinds else "other")


@pytest.mark.parametrize(
    ("frames_in", "code"),
    [
        # SETTINGS_MAX_FRAME_SIZE 0, then an answer to send: it was cut into empty DATA
        # frames forever (the processor hung, filling memory).
        ([_frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 0)),
          *_valid_stream(1, PROCESS, VALID_REQUEST)], 0x1),
        # A header name whose Huffman code does not decode: hpack's own error escaped.
        ([_frame(HEADERS, 0x4, 1, b"\x00\x81\x00")], 0x9),
        # PADDED with no payload at all: IndexError escaped.
        ([_frame(HEADERS, 0x4 | 0x8, 1, b"")], 0x1),
        ([_frame(DATA, 0x8, 1, b"\x05ab")], 0x1),  # padding longer than the frame
        ([_frame(WINDOW, 0, 0, b"\x00\x00\x00\x00")], 0x1),  # a zero increment
        ([_frame(WINDOW, 0, 0, b"\x7f\xff\xff\xff")], 0x3),  # past 2^31-1
        ([_frame(PING, 0, 0, b"1234")], 0x6),  # not 8 bytes
    ],
)  # fmt: skip
def test_inputs_that_once_broke_the_server_end_in_goaway(
    processor: ProcessorServer, frames_in: list[bytes], code: int
) -> None:
    written = _play_guarded(processor, PREFACE + b"".join(frames_in), [])
    goaways = [p for t, _, _, p in _parse(written) if t == GOAWAY]
    assert goaways and struct.unpack(">II", goaways[0][:8])[1] == code, goaways


def test_a_path_that_does_not_decode_is_answered_and_forgotten(processor: ProcessorServer) -> None:
    # Its Huffman code was decoded before the handler's try: the task died unanswered and
    # the stream kept one of max_streams for good.
    written = _play_guarded(processor, PREFACE + _frame(HEADERS, 0x5, 1, BAD_HUFFMAN_PATH), [])
    assert [(t, f & 0x1, sid) for t, f, sid, _ in _parse(written) if t == HEADERS] == [(1, 1, 1)]


def test_a_reset_stream_does_not_hold_a_drain_for_its_grace(processor: ProcessorServer) -> None:
    async def play() -> float:
        assert processor._h2 is not None
        conn = H2Connection(processor._h2)
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        conn.data_received(PREFACE + _frame(HEADERS, 0x4, 1, _block(PROCESS)))  # left open
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        stopping = asyncio.create_task(processor._h2.stop(grace=2))  # waits for stream 1
        await asyncio.sleep(0.01)
        conn.data_received(_frame(RST, 0, 1, b"\x00\x00\x00\x08"))  # the peer cancels it
        await stopping
        processor._h2.draining = False
        return time.monotonic() - t0

    assert asyncio.run(play()) < 1  # it waited out the whole 2 s
