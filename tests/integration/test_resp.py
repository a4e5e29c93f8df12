"""The lean pipelined Redis connection (proxy/resp.py) against a real redis-server: replies
in order under concurrency, redis-py's exceptions, AUTH and SELECT, a killed Redis and a
frozen one, and which clients it refuses to stand in for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from proxy.resp import LeanRedis
from tests.helpers import RedisServer

pytestmark = pytest.mark.integration


async def test_concurrent_commands_get_their_own_replies(rc: aioredis.Redis) -> None:
    lean = LeanRedis.of(rc)
    assert lean is not None
    try:
        keys = [f"k{i}" for i in range(200)]
        await asyncio.gather(*(lean.execute("SET", k, i) for i, k in enumerate(keys)))
        got = await asyncio.gather(*(lean.execute("GET", k) for k in keys))
        assert got == [str(i).encode() for i in range(200)]
        assert await lean.execute("MGET", "k1", "missing") == [b"1", None]
        assert await lean.execute("INCRBY", "n", 5) == 5
    finally:
        await lean.close()


async def test_error_replies_raise_what_redis_py_raises(rc: aioredis.Redis) -> None:
    lean = LeanRedis.of(rc)
    assert lean is not None
    try:
        with pytest.raises(NoScriptError):
            await lean.execute("EVALSHA", "0" * 40, 0)
        with pytest.raises(ResponseError, match="unknown command"):
            await lean.execute("NOSUCHCOMMAND")
        # An error reply in a pipeline does not shift the replies that follow it.
        await lean.execute("SET", "s", "text")
        results = await asyncio.gather(
            lean.execute("INCR", "s"), lean.execute("GET", "s"), lean.execute("PING"),
            return_exceptions=True,
        )  # fmt: skip
        assert isinstance(results[0], ResponseError) and results[1:] == [b"text", b"PONG"]
    finally:
        await lean.close()


async def test_auth_and_database_from_the_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "auth", "--requirepass", "s3cret").start()
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        client = aioredis.Redis.from_url(url)
        lean = LeanRedis.of(client)
        assert lean is not None and lean.db == 3
        await lean.execute("SET", "where", "db3")
        assert await client.get("where") == b"db3"  # redis-py on the same database
        wrong = LeanRedis(host="127.0.0.1", port=server.port, password="nope")
        with pytest.raises(ResponseError):
            await wrong.execute("PING")
        await lean.close()
        await client.aclose()
    finally:
        server.stop()


async def test_a_killed_redis_fails_commands_and_a_restarted_one_serves_again(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "kill").start()
    lean = LeanRedis(host="127.0.0.1", port=server.port, connect_timeout_s=0.5)
    try:
        assert await lean.execute("PING") == b"PONG"
        server.kill()
        with pytest.raises(RedisConnectionError):
            await lean.execute("PING")
        with pytest.raises(RedisConnectionError):  # nothing listens: connecting fails
            await lean.execute("PING")
        server.start()
        assert await lean.execute("PING") == b"PONG"
    finally:
        await lean.close()
        server.stop()


async def test_reset_fails_what_a_frozen_redis_owes(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "frozen").start()
    lean = LeanRedis(host="127.0.0.1", port=server.port)
    try:
        assert await lean.execute("PING") == b"PONG"
        server.freeze()
        owed = asyncio.ensure_future(lean.execute("PING"))
        await asyncio.sleep(0.1)
        assert not owed.done()  # no read timeout here: the caller owns the budget
        lean.reset()
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(owed, 1)
        server.freeze(False)
        assert await lean.execute("PING") == b"PONG"  # a new connection
    finally:
        await lean.close()
        server.stop()


def test_it_stands_in_only_for_plain_connections() -> None:
    assert LeanRedis.of(aioredis.Redis.from_url("unix:///tmp/none.sock")) is not None
    assert LeanRedis.of(aioredis.Redis.from_url("rediss://127.0.0.1:6380")) is None
    assert LeanRedis.of(aioredis.RedisCluster(host="127.0.0.1", port=1)) is None
    assert LeanRedis.of(object()) is None


def test_it_runs_on_uvloop_as_the_processor_does(redis_server: RedisServer) -> None:
    import uvloop

    async def main() -> list[object]:
        lean = LeanRedis(host="127.0.0.1", port=redis_server.port)
        try:
            return list(await asyncio.gather(lean.execute("PING"), lean.execute("ECHO", "x")))
        finally:
            await lean.close()

    if redis_server.proc.poll() is not None:
        redis_server.start()
    assert uvloop.run(main()) == [b"PONG", b"x"]


class _RestartingRedis:
    """A server that answers AUTH with +OK and then closes, as a Redis going down right after
    accepting a connection does, then (from the second connection on) serves: +OK to AUTH,
    +PONG to PING, a granted take to EVALSHA."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _RestartingRedis:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        import hiredis

        self.connections += 1
        first = self.connections == 1
        parser = hiredis.Reader()
        try:
            while data := await r.read(65536):
                parser.feed(data)
                while (cmd := parser.gets()) is not False:
                    name = cmd[0].upper()
                    if name == b"AUTH":
                        w.write(b"+OK\r\n")
                        if first:
                            return  # +OK and the close go out together
                    elif name == b"PING":
                        w.write(b"+PONG\r\n")
                    else:
                        w.write(b"*3\r\n:1700000000000000\r\n:1\r\n:1700000000001000\r\n")
        finally:
            w.close()


async def test_a_connection_closed_right_after_auth_fails_the_command_not_hangs_it() -> None:
    """connection_lost can run before the caller resumes from the AUTH: the command must not
    go to the dead connection and wait for a reply nothing would give."""
    async with _RestartingRedis() as server:
        lean = LeanRedis(port=server.port, password="pw")
        try:
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(lean.execute("PING"), 1)
            assert await asyncio.wait_for(lean.execute("PING"), 1) == b"PONG"
        finally:
            await lean.close()


async def test_the_limiters_round_trips_recover_after_a_connection_closed_after_auth() -> None:
    """The rate limiter's store on that connection: its first calls fail, none stays in flight
    (every later check would wait behind it and fail RedisSilent), later calls get answers."""
    from filters.rate_limit.store import GcraStore, RedisSilent

    async with _RestartingRedis() as server:
        store = GcraStore(object(), timeout_s=0.05, max_wait_s=0.1)
        store.lean = LeanRedis(port=server.port, password="pw")
        nums = ["1000.0", "1000.0", "1.0", "0.0"]
        try:
            first = store.call("take", ["a"], nums)
            await asyncio.sleep(0)  # its round trip leaves: the next call waits for another
            second = store.call("take", ["b"], nums)
            for call in (first, second):
                with pytest.raises((RedisConnectionError, RedisSilent)):
                    await call
            await asyncio.sleep(0.1)
            assert not store._inflight
            assert await store.call("take", ["c"], nums) == [1, 1700000000000000, 1700000000001000]
        finally:
            await store.close()
