"""Redis side of the limiter: ``gcra.lua`` by EVALSHA, with the calls of one event-loop turn
sent together as one pipeline, so a processor under load makes one round trip per turn rather
than one per request."""

from __future__ import annotations

import asyncio
import hashlib
import time
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
    """At most ``max_inflight`` pipelines are in flight; calls made meanwhile gather into the
    next one. Under load that is one round trip for many checks and a bounded number of Redis
    connections, rather than a connection per concurrent request."""

    def __init__(self, redis: Any, max_inflight: int = 2) -> None:
        self.redis = redis
        self.max_inflight = max_inflight
        self._pending: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # When a pipeline last came back: a caller whose budget ran out can tell "Redis stopped
        # answering" from "this process is too busy to read the answers" (event-loop lag).
        self.last_reply = 0.0
        self._sent_at: dict[object, float] = {}

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
        if not self._pending and len(self._tasks) < self.max_inflight:
            loop.call_soon(self._flush)
        self._pending.append(_Call(keys, args, fut, orphan))
        return fut

    def _flush(self) -> None:
        if not self._pending or len(self._tasks) >= self.max_inflight:
            return  # the pipeline in flight flushes what gathered when it comes back
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._flush()

    def silent_s(self) -> float:
        """How long Redis has owed an answer without giving any: 0 when nothing is in flight
        or a reply came since the oldest pipeline in flight was sent."""
        if not self._sent_at:
            return 0.0
        since = max(self.last_reply, min(self._sent_at.values()))
        return max(0.0, time.monotonic() - since)

    async def _send(self, batch: list[_Call]) -> None:
        me = object()
        self._sent_at[me] = time.monotonic()
        try:
            await self._send_batch(batch)
        finally:
            del self._sent_at[me]

    async def _send_batch(self, batch: list[_Call]) -> None:
        try:
            replies = await self._pipeline(batch)
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing:
                # A restarted or failed-over Redis has an empty script cache.
                await self.redis.script_load(LUA)
                again = await self._pipeline([batch[i] for i in missing])
                for i, r in zip(missing, again, strict=True):
                    replies[i] = r
            self.last_reply = time.monotonic()
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
            # execute_command: redis-py's cluster pipeline refuses its evalsha() method, but
            # routes EVALSHA by key slot when sent this way.
            pipe.execute_command("EVALSHA", SHA, len(c.keys), *c.keys, *c.args)
        result: list[Any] = await pipe.execute(raise_on_error=False)
        return result

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _as_exception(exc: BaseException) -> Exception:
    if isinstance(exc, Exception):
        return exc
    return ConnectionError(f"redis call interrupted: {exc!r}")
