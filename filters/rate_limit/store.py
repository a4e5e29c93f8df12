"""Redis side of the limiter: ``gcra.lua`` by EVALSHA, with the calls of one event-loop turn
sent together as one pipeline, so a processor under load makes one round trip per turn rather
than one per request."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

LUA = (Path(__file__).parent / "gcra.lua").read_text()
SHA = hashlib.sha1(LUA.encode()).hexdigest()

Reply = list[int]


@dataclass(slots=True)
class _Call:
    keys: Sequence[str]
    args: Sequence[str]
    future: asyncio.Future[Reply]
    # Called with the reply when it arrives after the caller stopped waiting (timeout, client
    # gone): a take that was granted by then must be given back.
    orphan: Callable[[Reply], None] | None


class GcraStore:
    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._pending: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def call(
        self,
        keys: Sequence[str],
        args: Sequence[str],
        orphan: Callable[[Reply], None] | None = None,
    ) -> asyncio.Future[Reply]:
        """Queues one script call; the future resolves to the script's reply. All ``keys``
        must hash to one slot on a Redis Cluster (the caller groups them)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Reply] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append(_Call(keys, args, fut, orphan))
        return fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies = await self._pipeline(batch)
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing:
                # A restarted or failed-over Redis has an empty script cache.
                await self.redis.script_load(LUA)
                again = await self._pipeline([batch[i] for i in missing])
                for i, r in zip(missing, again, strict=True):
                    replies[i] = r
        except BaseException as exc:
            for c in batch:
                if not c.future.done():
                    c.future.set_exception(_as_exception(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for c, r in zip(batch, replies, strict=True):
            if c.future.done():  # the caller gave up
                if c.orphan is not None and not isinstance(r, BaseException):
                    c.orphan(r)
            elif isinstance(r, BaseException):
                c.future.set_exception(r)
            else:
                c.future.set_result([int(x) for x in r])

    async def _pipeline(self, batch: Sequence[_Call]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for c in batch:
            pipe.evalsha(SHA, len(c.keys), *c.keys, *c.args)
        result: list[Any] = await pipe.execute(raise_on_error=False)
        return result

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _as_exception(exc: BaseException) -> Exception:
    if isinstance(exc, Exception):
        return exc
    return ConnectionError(f"redis call interrupted: {exc!r}")
