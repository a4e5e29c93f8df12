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
