"""A lean pipelined Redis connection for hot paths that send one kind of command many times.

redis-py spends about 90-160 µs of CPU per command on this machine (connection pool, retry
wrapper, command packing, response callbacks); writing RESP directly to one connection and
parsing replies with hiredis (the C parser redis-py uses too) costs 16-45 µs
(`bench/rate_limit.py` reports both side by side). On a processor that also runs the gateway's
other filters on the same core, that difference is CPU the model or the other requests need.

Replies come back in the order the commands were sent (RESP has no request ids), so each
command's future waits in a FIFO. The connection opens on first use and again after it is lost
or reset; a lost connection fails every outstanding command with redis-py's
``ConnectionError``, an error reply raises the exception redis-py would (``NoScriptError``
for NOSCRIPT, else ``ResponseError``), so callers keep one set of faults to handle. There is
no read timeout here: the caller owns the latency budget and calls ``reset()`` when Redis has
gone silent (see ``filters/rate_limit/store.py``).

Only plain TCP and unix-socket URLs (with AUTH and SELECT); TLS and Redis Cluster stay on
redis-py (``LeanRedis.of`` returns None for them).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        # uvloop's transports are not asyncio.Transport subclasses: only write() and abort()
        # are used.
        self.transport: Any = None
        self.lost: Exception | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            fut = self.waiters.popleft()
            if fut.done():
                continue  # its caller was cancelled
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(_error(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"connection to Redis lost: {exc or 'closed'}")

    def fail(self, why: str) -> None:
        """Fails every outstanding command; the connection is not used again."""
        if self.lost is None:
            self.lost = RedisConnectionError(why)
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(self.lost)


def _error(message: str) -> ResponseError:
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


def pack(args: tuple[Any, ...]) -> bytes:
    """One command as a RESP array of bulk strings (str, bytes, int)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class LeanRedis:
    def __init__(
        self,
        *,
        path: str | None = None,
        host: str = "127.0.0.1",
        port: int = 6379,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        connect_timeout_s: float = 1.0,
    ) -> None:
        self.path, self.host, self.port = path, host, port
        self.username, self.password, self.db = username, password, db
        self.connect_timeout_s = connect_timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    @classmethod
    def of(cls, client: Any) -> LeanRedis | None:
        """The same server as a redis-py asyncio client, or None where this class cannot
        stand in for it (TLS, cluster, anything that is not a plain connection pool)."""
        from redis.asyncio.connection import Connection, UnixDomainSocketConnection

        pool = getattr(client, "connection_pool", None)
        kind = getattr(pool, "connection_class", None)
        if kind not in (Connection, UnixDomainSocketConnection):
            return None  # SSLConnection, a cluster client, a test's fake
        kw = pool.connection_kwargs  # type: ignore[union-attr]
        return cls(
            path=kw.get("path") if kind is UnixDomainSocketConnection else None,
            host=kw.get("host", "127.0.0.1"),
            port=int(kw.get("port", 6379)),
            username=kw.get("username"),
            password=kw.get("password"),
            db=int(kw.get("db") or 0),
            connect_timeout_s=kw.get("socket_connect_timeout") or kw.get("socket_timeout") or 1.0,
        )

    async def execute(self, *args: Any) -> Any:
        proto = self._proto
        if proto is None or proto.lost is not None:
            proto = await self._connect()
            if proto.lost is not None:
                # Closed right after AUTH/SELECT, before this caller resumed (a restarting
                # Redis): a command written now would wait for a reply nothing can give.
                raise proto.lost
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.transport.write(pack(args))
        proto.waiters.append(fut)
        return await fut

    def reset(self) -> None:
        """Drop the connection (outstanding commands fail); the next command reconnects."""
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.transport.abort()
            # abort() on a transport that is already closed does not call connection_lost
            # again: fail what it still owes here, or its callers would wait forever.
            proto.fail("connection to Redis reset")

    async def close(self) -> None:
        self.reset()

    async def _connect(self) -> _Protocol:
        # Commands issued while connecting share the one attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            proto = await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None
        return proto

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path is not None:
                    _, proto = await loop.create_unix_connection(_Protocol, self.path)
                else:
                    _, proto = await loop.create_connection(_Protocol, self.host, self.port)
                setup: list[tuple[Any, ...]] = []
                if self.password is not None:
                    setup.append(("AUTH", self.username, self.password) if self.username
                                 else ("AUTH", self.password))  # fmt: skip
                if self.db:
                    setup.append(("SELECT", self.db))
                futs = []
                for cmd in setup:
                    fut: asyncio.Future[Any] = loop.create_future()
                    proto.transport.write(pack(cmd))
                    proto.waiters.append(fut)
                    futs.append(fut)
                try:
                    for fut in futs:
                        await fut
                except BaseException:
                    proto.transport.abort()  # refused AUTH or SELECT: not a usable connection
                    raise
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from exc
        self._proto = proto
        return proto
