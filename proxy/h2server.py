"""A small HTTP/2 server for the two gRPC methods Envoy calls on the processor.

Why: with grpc.aio, about two thirds of the processor's CPU per request went to grpc's C core
and its poller thread (a cross-thread wake-up per stream event), not to Floodwall. Envoy
opens one ext_proc stream per HTTP request, so that cost is paid per request. This server
speaks just what Envoy needs, on the asyncio loop (uvloop) itself:

- ``/envoy.service.ext_proc.v3.ExternalProcessor/Process`` (bidirectional stream), served by
  the same ``ExternalProcessor.Process`` loop as under grpc.aio, through a context with the
  ``read``/``write``/``invocation_metadata`` it uses;
- ``/grpc.health.v1.Health/Check`` (unary), for Envoy's active health check;
- anything else: ``UNIMPLEMENTED``.

HTTP/2 (RFC 9113) as a server over cleartext (TCP or a unix socket, prior knowledge, as
Envoy's ``http2_protocol_options`` cluster connects): SETTINGS, PING, WINDOW_UPDATE with flow
control both ways, HEADERS + CONTINUATION, padding, RST_STREAM (a client abort cancels the
stream's handler, so ``on_complete`` still runs), GOAWAY on drain, a concurrent-stream cap.
HPACK (RFC 7541): a complete decoder with the default 4096-byte dynamic table (Envoy
indexes the headers that repeat on every stream, so most fields are table references);
literals that are not indexed keep their value encoded until read (the stream reads
``:path`` and, when tracing, ``traceparent``). Responses use constant, stateless header
blocks (never indexed), so our encoder has no state. No TLS, no server push, no compression
of messages (Envoy sends none to ext_proc).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hpack.exceptions import HPACKError  # a name's Huffman code that does not decode
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from proxy import metrics

log = logging.getLogger("floodwall.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Error codes
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, REFUSED_STREAM, CANCEL = 0x0, 0x1, 0x3, 0x7, 0x8
FRAME_SIZE_ERROR, COMPRESSION_ERROR = 0x6, 0x9

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

_FRAME = struct.Struct(">BHBBI")  # length (24 bits as 8 + 16), type, flags, stream id
_WINDOW = 1 << 24  # our receive window per stream (we advertise it)
_CONN_WINDOW = 1 << 30  # our receive window for the connection
_MAX_FRAME = 1 << 20  # the largest frame we accept
# The largest gRPC message the processor accepts, here and under grpc.aio (proxy/server.py);
# listener.max_request_bytes is bounded to fit (proxy/config.py).
MAX_MESSAGE = 64 * 1024 * 1024
_MAX_HEADER_BLOCK = 256 * 1024
_MAX_BUFFERED_OUT = 8 * 1024 * 1024  # a writer waits while this much is queued on its stream


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman: stateless."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


# ":status: 200" is static entry 8; the rest literal: the blocks are the same every time.
_RESPONSE_HEADERS = b"\x88" + _literal(b"content-type", b"application/grpc")


def _trailers(status: int, message: str = "") -> bytes:
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", _percent(message)[:120])
    return block


def _trailers_only(status: int, message: str = "") -> bytes:
    return b"\x88" + _literal(b"content-type", b"application/grpc") + _trailers(status, message)


def _percent(text: str) -> bytes:
    out = bytearray()
    for b in text.encode():
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


_OK_TRAILERS = _trailers(0)


_HUFFMAN_MEMO: dict[bytes, str] = {}


class HpackError(Exception):
    pass


class HpackDecoder:
    """RFC 7541 decoder. Fields come back as (name, raw value, huffman) with the value still
    encoded; ``value()`` decodes one (memoised: the same values recur)."""

    STATIC = HeaderTable.STATIC_TABLE

    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = max_size  # what we advertised (the peer may shrink it further)
        self.size_limit = 4096  # current, per the last dynamic table size update
        self.table: deque[tuple[bytes, bytes]] = deque()
        self.size = 0
        self._names: dict[bytes, bytes] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes, bool]]:
        out: list[tuple[bytes, bytes, bool]] = []
        i, n = 0, len(block)
        while i < n:
            b = block[i]
            if b & 0x80:  # indexed field
                idx, i = _int(block, i, 7)
                name, value = self._entry(idx)
                out.append((name, value, False))
            elif b & 0xC0 == 0x40:  # literal, incremental indexing
                idx, i = _int(block, i, 6)
                name, i = self._name(block, i, idx)
                raw, huff, i = _string(block, i)
                value = decode_huffman(raw) if huff else raw
                out.append((name, value, False))
                self._add(name, value)
            elif b & 0xE0 == 0x20:  # dynamic table size update
                size, i = _int(block, i, 5)
                if size > self.max_size:
                    raise HpackError(f"table size update {size} above {self.max_size}")
                self.size_limit = size
                self._evict(0)
            else:  # literal without indexing (0000) or never indexed (0001)
                idx, i = _int(block, i, 4)
                name, i = self._name(block, i, idx)
                raw, huff, i = _string(block, i)
                out.append((name, raw, huff))
        return out

    @staticmethod
    def value(raw: bytes, huff: bool) -> str:
        if not huff:
            return raw.decode("latin-1")
        # Short values recur on every stream (the :path): decode each once.
        v = _HUFFMAN_MEMO.get(raw)
        if v is None:
            v = decode_huffman(raw).decode("latin-1")
            if len(raw) <= 128 and len(_HUFFMAN_MEMO) < 4096:
                _HUFFMAN_MEMO[raw] = v
        return v

    def _name(self, block: bytes, i: int, idx: int) -> tuple[bytes, int]:
        if idx:
            return self._entry(idx)[0], i
        raw, huff, i = _string(block, i)
        if not huff:
            return raw, i
        name = self._names.get(raw)
        if name is None:
            name = decode_huffman(raw)
            if len(self._names) < 1024:
                self._names[raw] = name
        return name, i

    def _entry(self, idx: int) -> tuple[bytes, bytes]:
        if 1 <= idx <= len(self.STATIC):
            return self.STATIC[idx - 1]
        d = idx - len(self.STATIC) - 1
        if 0 <= d < len(self.table):
            return self.table[d]
        raise HpackError(f"header index {idx} out of range")

    def _add(self, name: bytes, value: bytes) -> None:
        need = len(name) + len(value) + 32
        self._evict(need)
        if need <= self.size_limit:
            self.table.appendleft((name, value))
            self.size += need

    def _evict(self, room: int) -> None:
        while self.table and self.size + room > self.size_limit:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32


def _int(data: bytes, i: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    value = data[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        if i >= len(data) or shift > 28:
            raise HpackError("bad integer")
        b = data[i]
        i += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _string(data: bytes, i: int) -> tuple[bytes, bool, int]:
    if i >= len(data):
        raise HpackError("truncated string")
    huff = bool(data[i] & 0x80)
    length, i = _int(data, i, 7)
    if i + length > len(data):
        raise HpackError("truncated string")
    return data[i : i + length], huff, i + length


class _Stream:
    __slots__ = (
        "blocked",
        "buf",
        "conn",
        "drained",
        "fields",
        "id",
        "inbox",
        "local_closed",
        "out",
        "owed",
        "remote_closed",
        "sent_headers",
        "task",
        "waiter",
        "window",
    )

    def __init__(self, conn: H2Connection, sid: int, fields: list[tuple[bytes, bytes, bool]]):
        self.conn = conn
        self.id = sid
        self.fields = fields
        self.buf = bytearray()  # DATA not yet a whole gRPC message
        self.inbox: deque[bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.remote_closed = False
        self.local_closed = False
        self.sent_headers = False
        self.window = conn.peer_initial_window  # what we may still send
        self.out: deque[tuple[int, bytes, int]] = deque()  # frames waiting for window
        self.blocked = 0  # bytes of DATA in ``out``
        self.drained: asyncio.Event | None = None
        self.owed = 0  # received DATA not yet given back by WINDOW_UPDATE
        self.task: asyncio.Task[None] | None = None

    def header(self, name: bytes) -> str | None:
        for n, raw, huff in self.fields:
            if n == name:
                return HpackDecoder.value(raw, huff)
        return None

    # --- the handler's side --------------------------------------------------------------

    async def read_message(self) -> bytes | None:
        """The next whole gRPC message; None once the peer ended its side."""
        while not self.inbox:
            if self.remote_closed:
                return None
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.inbox.popleft()

    async def write_message(self, payload: bytes) -> None:
        if self.local_closed:
            raise ConnectionResetError("stream closed")
        conn = self.conn
        if not self.sent_headers:
            self.sent_headers = True
            conn.send_frame(HEADERS, END_HEADERS, self.id, _RESPONSE_HEADERS)
        conn.send_data(self, b"\x00" + len(payload).to_bytes(4, "big") + payload, 0)
        if self.blocked > _MAX_BUFFERED_OUT:
            self.drained = self.drained or asyncio.Event()
            self.drained.clear()
            await self.drained.wait()

    def finish(self, status: int, message: str = "") -> None:
        """Ends our side with trailers (or a trailers-only answer)."""
        if self.local_closed:
            return
        self.local_closed = True
        conn = self.conn
        if self.sent_headers:
            block = _OK_TRAILERS if status == 0 and not message else _trailers(status, message)
        else:
            block = _trailers_only(status, message)
        conn.send_headers_after_data(self, block, END_STREAM | END_HEADERS)
        if not self.remote_closed and not self.out:
            # gRPC over HTTP/2: a server done before the client half-closed resets the
            # stream with NO_ERROR, so the client stops sending.
            conn.send_frame(RST_STREAM, 0, self.id, NO_ERROR.to_bytes(4, "big"))
            self.remote_closed = True
        conn.maybe_forget(self)

    # --- the connection's side ------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 5:
            if buf[0]:
                raise _StreamError(self.id, "compressed gRPC messages are not supported")
            n = int.from_bytes(buf[1:5], "big")
            if n > MAX_MESSAGE:
                raise _StreamError(self.id, f"message of {n} bytes is too large")
            if len(buf) < 5 + n:
                break
            with memoryview(buf) as view:  # one copy, not two (bytes of a bytearray slice)
                self.inbox.append(bytes(view[5 : 5 + n]))
            del buf[: 5 + n]
        self._wake()

    def end_remote(self) -> None:
        self.remote_closed = True
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class _StreamError(Exception):
    def __init__(self, sid: int, message: str) -> None:
        super().__init__(message)
        self.sid = sid


class _Context:
    """What ``ExternalProcessor.Process`` uses of a grpc.aio ServicerContext."""

    __slots__ = ("_stream",)

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream

    async def read(self) -> Any:
        data = await self._stream.read_message()
        if data is None:
            return grpc.aio.EOF
        return pb.ProcessingRequest.FromString(data)

    async def write(self, message: Any) -> None:
        await self._stream.write_message(message.SerializeToString())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            (n.decode("latin-1"), HpackDecoder.value(raw, huff))
            for n, raw, huff in self._stream.fields
            if not n.startswith(b":")
        )


Handler = Callable[[Any, Any], Awaitable[None]]


class H2Connection(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.inbuf = bytearray()
        self.preface = False
        self.decoder = HpackDecoder(max_size=4096)
        self.streams: dict[int, _Stream] = {}
        self.last_sid = 0
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.send_window = 65535  # connection-level, what we may still send
        self.owed = 0  # connection-level received DATA not yet given back
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.blocked: dict[int, _Stream] = {}  # streams with DATA waiting for window
        self.header_sid = 0  # a header block in progress (CONTINUATION expected)
        self.header_flags = 0
        self.header_block = bytearray()
        self.going_away = False
        self.closed = False

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.connections.add(self)
        settings = struct.pack(
            ">HIHIHIHI",
            # HEADER_TABLE_SIZE: the protocol's default, said explicitly. Envoy then indexes
            # what repeats on every stream; a 0-byte table (all literals) measured 25-30 µs
            # more of Envoy's CPU and 15-20 µs more of ours per request.
            0x1, 4096,
            0x3, self.server.max_streams,  # MAX_CONCURRENT_STREAMS
            0x4, _WINDOW,  # INITIAL_WINDOW_SIZE
            0x5, _MAX_FRAME,  # MAX_FRAME_SIZE
        )  # fmt: skip
        self.send_frame(SETTINGS, 0, 0, settings)
        self.send_frame(WINDOW_UPDATE, 0, 0, (_CONN_WINDOW - 65535).to_bytes(4, "big"))
        if self.going_away or self.server.draining:
            self.goaway()

    def data_received(self, data: bytes) -> None:
        buf = self.inbuf
        buf += data
        try:
            if not self.preface:
                if len(buf) < len(PREFACE):
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise _ConnError(PROTOCOL_ERROR, "not an HTTP/2 prior-knowledge preface")
                del buf[: len(PREFACE)]
                self.preface = True
            pos = 0
            end = len(buf)
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = _FRAME.unpack_from(buf, pos)
                length = (hi << 16) | lo
                if length > _MAX_FRAME:
                    raise _ConnError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - pos < 9 + length:
                    break
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self._frame(ftype, flags, sid & 0x7FFFFFFF, payload)
            del buf[:pos]
        except _ConnError as e:
            log.warning("HTTP/2 connection error: %s", e)
            metrics.STREAM_FAULTS.labels("http2").inc()
            self.send_frame(
                GOAWAY, 0, 0, struct.pack(">II", self.last_sid, e.code) + str(e).encode()
            )
            self._flush()
            self._close()
        if self.out and not self.flush_scheduled:
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for s in list(self.streams.values()):
            self._cancel(s)
        self.streams.clear()
        self.server.stream_done()

    # --- frames in ------------------------------------------------------------------------

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self.header_sid and ftype != CONTINUATION:
            raise _ConnError(PROTOCOL_ERROR, "header block interrupted")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            self._headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            if sid != self.header_sid:
                raise _ConnError(PROTOCOL_ERROR, "CONTINUATION on the wrong stream")
            self.header_block += payload
            if len(self.header_block) > _MAX_HEADER_BLOCK:
                raise _ConnError(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                self._header_block_done()
        elif ftype == SETTINGS:
            if sid != 0:
                raise _ConnError(PROTOCOL_ERROR, "SETTINGS on a stream")
            if flags & ACK:
                if payload:
                    raise _ConnError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            else:
                self._settings(payload)
                self.send_frame(SETTINGS, ACK, 0)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == PING:
            if sid != 0 or len(payload) != 8:
                raise _ConnError(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self.send_frame(PING, ACK, 0, payload)
        elif ftype == RST_STREAM:
            s = self.streams.pop(sid, None)
            if s is not None:
                self._forget_reset(s)
        elif ftype == GOAWAY:
            self.going_away = True
        # PRIORITY, PUSH_PROMISE (never from a client) and unknown types: ignored.

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnError(PROTOCOL_ERROR, "DATA on stream 0")
        n = len(payload)
        self.owed += n
        if self.owed >= _CONN_WINDOW // 2:
            self.send_frame(WINDOW_UPDATE, 0, 0, self.owed.to_bytes(4, "big"))
            self.owed = 0
        if flags & PADDED:
            payload = _unpad(payload)
        s = self.streams.get(sid)
        if s is None or s.remote_closed:
            return  # a stream we reset or finished: its DATA only counts for the connection
        s.owed += n
        if s.owed >= _WINDOW // 2 and not flags & END_STREAM:
            self.send_frame(WINDOW_UPDATE, 0, sid, s.owed.to_bytes(4, "big"))
            s.owed = 0
        try:
            s.deliver(payload)
        except _StreamError as e:
            self._reset(s, e)
            return
        if flags & END_STREAM:
            s.end_remote()
            self.maybe_forget(s)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnError(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise _ConnError(FRAME_SIZE_ERROR, "HEADERS priority block cut short")
            payload = payload[5:]
        self.header_sid = sid
        self.header_flags = flags
        self.header_block = bytearray(payload)
        if flags & END_HEADERS:
            self._header_block_done()

    def _header_block_done(self) -> None:
        sid, flags, block = self.header_sid, self.header_flags, bytes(self.header_block)
        self.header_sid = 0
        self.header_block = bytearray()
        try:
            fields = self.decoder.decode(block)  # always, to keep the table in step
        except (HpackError, HPACKError, IndexError, UnicodeDecodeError) as e:
            raise _ConnError(COMPRESSION_ERROR, f"bad header block: {e}") from e
        s = self.streams.get(sid)
        if s is not None:  # trailers from the client: only END_STREAM matters
            if flags & END_STREAM:
                s.end_remote()
                self.maybe_forget(s)
            return
        if sid % 2 == 0 or sid <= self.last_sid:
            return  # not a new client stream (one we already closed): ignore
        self.last_sid = sid
        if self.going_away or len(self.streams) >= self.server.max_streams:
            self.send_frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big"))
            return
        s = _Stream(self, sid, fields)
        self.streams[sid] = s
        if flags & END_STREAM:
            s.remote_closed = True
        s.task = self.loop.create_task(self._serve(s))

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise _ConnError(FRAME_SIZE_ERROR, "SETTINGS length")
        for off in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, off)
            if key == 0x4:  # INITIAL_WINDOW_SIZE: applies to open streams too
                if value > 0x7FFFFFFF:
                    raise _ConnError(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.streams.values():
                    s.window += delta
                self._pump()
            elif key == 0x5:
                # RFC 9113 6.5.2: 16384 to 2^24-1. A smaller value was taken as is: 0 made
                # send_data cut a message into empty frames forever.
                if not 16384 <= value <= 0xFFFFFF:
                    raise _ConnError(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                self.peer_max_frame = value
            # HEADER_TABLE_SIZE concerns our encoder, which never indexes; others: ignored.

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnError(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if inc == 0 or self.send_window + inc > 0x7FFFFFFF:
                raise _ConnError(PROTOCOL_ERROR if inc == 0 else FLOW_CONTROL_ERROR,
                                 f"connection WINDOW_UPDATE of {inc}")  # fmt: skip
            self.send_window += inc
        else:
            s = self.streams.get(sid)
            if s is None:
                return
            if inc == 0 or s.window + inc > 0x7FFFFFFF:
                # A stream error: that stream is reset, the others go on.
                code = PROTOCOL_ERROR if inc == 0 else FLOW_CONTROL_ERROR
                self._reset(s, _StreamError(sid, f"WINDOW_UPDATE of {inc}"), code)
                return
            s.window += inc
        self._pump()

    # --- frames out -----------------------------------------------------------------------

    def send_frame(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self.out.append(_frame(ftype, flags, sid, payload))
        self._schedule_flush()

    def send_data(self, s: _Stream, data: bytes, flags: int) -> None:
        """DATA within the flow-control windows; the rest waits for WINDOW_UPDATE."""
        if s.out or len(data) > min(s.window, self.send_window):
            s.out.append((DATA, data, flags))
            s.blocked += len(data)
            self.blocked[s.id] = s
            self._pump()
            return
        s.window -= len(data)
        self.send_window -= len(data)
        limit = self.peer_max_frame
        while len(data) > limit:
            self.out.append(_frame(DATA, 0, s.id, data[:limit]))
            data = data[limit:]
        self.out.append(_frame(DATA, flags, s.id, data))
        self._schedule_flush()

    def send_headers_after_data(self, s: _Stream, block: bytes, flags: int) -> None:
        if s.out:
            s.out.append((HEADERS, block, flags))
        else:
            self.send_frame(HEADERS, flags, s.id, block)

    def _pump(self) -> None:
        for sid, s in list(self.blocked.items()):
            while s.out:
                ftype, data, flags = s.out[0]
                if ftype == HEADERS:
                    s.out.popleft()
                    self.send_frame(HEADERS, flags, sid, data)
                    continue
                room = min(s.window, self.send_window, self.peer_max_frame)
                if room <= 0:
                    break
                chunk, rest = data[:room], data[room:]
                s.window -= len(chunk)
                self.send_window -= len(chunk)
                s.blocked -= len(chunk)
                if rest:
                    s.out[0] = (DATA, rest, flags)
                    self.out.append(_frame(DATA, 0, sid, chunk))
                else:
                    s.out.popleft()
                    self.out.append(_frame(DATA, flags, sid, chunk))
            if not s.out:
                del self.blocked[sid]
                if s.local_closed and not s.remote_closed:
                    self.send_frame(RST_STREAM, 0, sid, NO_ERROR.to_bytes(4, "big"))
                    s.remote_closed = True
                self.maybe_forget(s)
            if s.drained is not None and s.blocked <= _MAX_BUFFERED_OUT:
                s.drained.set()
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # One write per event-loop turn: the frames of many streams go out together.
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and not self.closed:
            self.transport.writelines(self.out)
        self.out = []

    # --- streams ----------------------------------------------------------------------------

    async def _serve(self, s: _Stream) -> None:
        try:
            # Inside the try: a value's Huffman code is decoded here, and may not decode.
            path = s.header(b":path")
            if path == PROCESS:
                await self.server.process(None, _Context(s))
                s.finish(0)
            elif path == HEALTH_CHECK:
                await s.read_message()
                await s.write_message(self.server.health())
                s.finish(0)
            else:
                s.finish(12, f"method {path} not implemented")  # UNIMPLEMENTED
        except asyncio.CancelledError:
            # Reset by the peer or the connection gone: the stream is closed and this does
            # nothing. Cancelled otherwise, the peer would wait for an answer until its timeout.
            s.finish(13, "cancelled")  # INTERNAL
        except ConnectionResetError:
            pass
        except _StreamError as e:
            s.finish(8, str(e))  # RESOURCE_EXHAUSTED
        except Exception as e:
            log.exception("stream handler failed")
            s.finish(13, type(e).__name__)  # INTERNAL
        finally:
            s.task = None
            self.maybe_forget(s)

    def maybe_forget(self, s: _Stream) -> None:
        if s.local_closed and s.remote_closed and not s.out and s.task is None:
            if self.streams.get(s.id) is s:
                del self.streams[s.id]
                self.server.stream_done()
            if self.going_away and not self.streams:
                self._flush()
                self._close()

    def _reset(self, s: _Stream, e: _StreamError, code: int = PROTOCOL_ERROR) -> None:
        log.warning("stream %d reset: %s", s.id, e)
        self.send_frame(RST_STREAM, 0, s.id, code.to_bytes(4, "big"))
        self.streams.pop(s.id, None)
        self._forget_reset(s)

    def _forget_reset(self, s: _Stream) -> None:
        """A stream reset by either side: nothing more goes out on it, and a drain waiting
        for the last stream learns it is gone (it waited out its whole grace otherwise)."""
        self.blocked.pop(s.id, None)
        self._cancel(s)
        self.server.stream_done()

    def _cancel(self, s: _Stream) -> None:
        s.local_closed = s.remote_closed = True
        s.out.clear()
        if s.task is not None and not s.task.done():
            s.task.cancel()
        s._wake()
        if s.drained is not None:
            s.drained.set()

    def goaway(self) -> None:
        """No new streams on this connection; it closes when its streams are done."""
        if self.closed:
            return
        self.going_away = True
        self.send_frame(GOAWAY, 0, 0, struct.pack(">II", self.last_sid, NO_ERROR))
        if not self.streams:
            self._flush()
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


def _unpad(payload: bytes) -> bytes:
    """A PADDED frame's content: its first byte says how much padding ends it."""
    if not payload or payload[0] >= len(payload):
        raise _ConnError(PROTOCOL_ERROR, "padding as long as the frame")
    return payload[1 : len(payload) - payload[0]]


class _ConnError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class H2Server:
    """Listens on ``address`` (``unix:/path`` or ``host:port``) and serves the two methods."""

    def __init__(
        self,
        address: str,
        process: Handler,
        health: Callable[[], bytes],
        max_streams: int = 10000,
    ) -> None:
        self.address = address
        self.process = process
        self.health = health
        self.max_streams = max_streams
        self.connections: set[H2Connection] = set()
        self.draining = False
        self._server: asyncio.AbstractServer | None = None
        self._idle: asyncio.Event = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.address.startswith("unix:"):
            path = self.address[5:]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale socket of a previous run
            self._server = await loop.create_unix_server(lambda: H2Connection(self), path)
        else:
            host, _, port = self.address.rpartition(":")
            self._server = await loop.create_server(
                lambda: H2Connection(self), host.strip("[]") or None, int(port)
            )

    def stream_done(self) -> None:
        if self.draining and not any(c.streams for c in self.connections):
            self._idle.set()

    async def stop(self, grace: float) -> None:
        """GOAWAY to every connection, then wait up to ``grace`` for their streams; the ones left
        are cancelled, and returns once their handlers have ended."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.goaway()
        if any(c.streams for c in self.connections):
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        # Streams still open after the grace are cancelled, and awaited: their handlers'
        # cleanup (on_complete) must run before the caller stops the filters.
        left: list[asyncio.Task[None]] = []
        for c in list(self.connections):
            for s in list(c.streams.values()):
                if s.task is not None:
                    left.append(s.task)
                c._cancel(s)
            c._flush()
            c._close()
        if left:
            await asyncio.wait(left)
        if self._server is not None:
            await self._server.wait_closed()
