"""Redis side of the limiter: ``gcra.lua`` by EVALSHA.

Calls made while a round trip is under way gather into the next one: on a single Redis all of
them go as ONE script call (the script takes a batch of requests, each still all-or-nothing
on its own keys), on a Redis Cluster as one pipeline of per-request calls (a script's keys
must share a slot). So a loaded processor makes one round trip for many checks and holds a
bounded number of connections, not one per request.

A watchdog (one timer per store, not one per check) fails outstanding calls with
``RedisSilent`` when Redis owes answers and has given none for ``timeout_s``, and with
``Overloaded`` a call that has waited ``max_wait_s`` while Redis kept answering (this process
is too busy to get to it).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from proxy.resp import LeanRedis

LUA = (Path(__file__).parent / "gcra.lua").read_text()
SHA = hashlib.sha1(LUA.encode()).hexdigest()

Reply = list[int]  # [allowed (1/0), now_us, tat_1, ..., tat_n]


class RedisSilent(TimeoutError):
    """Redis owed answers and gave none for the whole latency budget."""


class Overloaded(Exception):
    """Redis answers, but this process could not get this call's answer in time."""


@dataclass(slots=True)
class _Call:
    op: str  # "take" or "adjust"
    keys: Sequence[str]
    nums: Sequence[str]  # per key: 4 numbers (take) or 2 (adjust), see gcra.lua
    future: asyncio.Future[Reply]
    # Called with the reply when it arrives after the caller stopped waiting (timeout, client
    # gone): a take that was granted by then must be given back.
    orphan: Callable[[Reply], None] | None
    queued: float = field(default_factory=time.monotonic)


class GcraStore:
    def __init__(
        self,
        redis: Any,
        *,
        cluster: bool = False,
        timeout_s: float = 0.2,
        max_wait_s: float = 0.4,
        max_inflight: int = 2,
    ) -> None:
        self.redis = redis
        self.cluster = cluster
        # EVALSHA on a single Redis goes over a lean connection (proxy/resp.py: a quarter of
        # redis-py's CPU per round trip); cluster and TLS stay on redis-py.
        self.lean = None if cluster else LeanRedis.of(redis)
        self.timeout_s = timeout_s
        self.max_wait_s = max_wait_s
        self.max_inflight = max_inflight
        self.round_trips = 0
        # When a round trip last came back: tells "Redis stopped answering" from "this
        # process is too busy to read the answers" (event-loop lag).
        self.last_reply = 0.0
        self._pending: list[_Call] = []
        self._inflight: dict[asyncio.Task[None], tuple[float, list[_Call]]] = {}
        self._watchdog: asyncio.Handle | None = None
        self._suspect = 0
        # After close(): calls fail at once (a settlement of a request that outlived its
        # filter); the lean connection would otherwise reconnect with nobody to close it.
        self.closed = False

    def call(
        self,
        op: str,
        keys: Sequence[str],
        nums: Sequence[str],
        orphan: Callable[[Reply], None] | None = None,
    ) -> asyncio.Future[Reply]:
        """Queues one script call; the future resolves to its reply. All ``keys`` must hash
        to one slot on a Redis Cluster (the caller groups them)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Reply] = loop.create_future()
        if self.closed:
            fut.set_exception(RedisConnectionError("the rate limiter's store is closed"))
            return fut
        if not self._pending and len(self._inflight) < self.max_inflight:
            loop.call_soon(self._flush)
        self._pending.append(_Call(op, keys, nums, fut, orphan))
        if self._watchdog is None:
            self._watchdog = loop.call_later(min(self.timeout_s, 0.025), self._watch)
        return fut

    def silent_s(self) -> float:
        """How long Redis has owed an answer without giving any: 0 when nothing is in flight
        or a reply came since the oldest round trip in flight was sent."""
        if not self._inflight:
            return 0.0
        sent = min(t for t, _ in self._inflight.values())
        return max(0.0, time.monotonic() - max(self.last_reply, sent))

    # --- sending -----------------------------------------------------------------------------

    def _flush(self) -> None:
        self._pending = [c for c in self._pending if not c.future.done() or c.op == "adjust"]
        if not self._pending or len(self._inflight) >= self.max_inflight:
            return  # a round trip in flight flushes what gathered when it comes back
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._inflight[task] = (time.monotonic(), batch)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        del self._inflight[task]
        self._flush()

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies = await self._round_trip(batch)
        except BaseException as exc:
            for c in batch:
                if not c.future.done():
                    c.future.set_exception(_as_exception(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self.last_reply = time.monotonic()
        for c, r in zip(batch, replies, strict=True):
            if c.future.done():  # the caller gave up
                if c.orphan is not None and not isinstance(r, BaseException):
                    c.orphan(r)
            elif isinstance(r, BaseException):
                c.future.set_exception(r)
            else:
                c.future.set_result(r)

    async def _round_trip(self, batch: list[_Call]) -> list[Reply | BaseException]:
        self.round_trips += 1
        try:
            out = await self._execute(batch)
        except NoScriptError:
            # A restarted or failed-over Redis has an empty script cache (on a single Redis
            # the batch is one script call: nothing of it ran).
            await self._load()
            return await self._execute(batch)
        # On a cluster each node answers for its own calls: those that found the script ran,
        # and must not run twice (a take or refund applied twice). Only the others go again.
        missed = [i for i, r in enumerate(out) if isinstance(r, NoScriptError)]
        if missed:
            await self._load()
            again = await self._execute([batch[i] for i in missed])
            for i, r in zip(missed, again, strict=True):
                out[i] = r
        return out

    async def _load(self) -> None:
        if self.lean is not None:
            await self.lean.execute("SCRIPT", "LOAD", LUA)
        else:
            await self.redis.script_load(LUA)

    async def _execute(self, batch: list[_Call]) -> list[Reply | BaseException]:
        if not self.cluster:
            args = _script_args(batch)
            if self.lean is not None:
                return _split(await self.lean.execute("EVALSHA", *args), batch)
            return _split(await self.redis.execute_command("EVALSHA", *args), batch)
        # A cluster pipeline routes each call by its keys' slot; execute_command because
        # redis-py's cluster pipeline refuses its evalsha() method.
        pipe = self.redis.pipeline()
        for c in batch:
            pipe.execute_command("EVALSHA", *_script_args([c]))
        raw = await pipe.execute(raise_on_error=False)
        out: list[Reply | BaseException] = []
        for c, r in zip(batch, raw, strict=True):
            out.append(r if isinstance(r, BaseException) else _split(r, [c])[0])
        return out

    # --- the watchdog ------------------------------------------------------------------------

    def _watch(self) -> None:
        self._watchdog = None
        calls = self._pending + [c for _, b in self._inflight.values() for c in b]
        calls = [c for c in calls if not c.future.done()]
        if not calls:
            return
        loop = asyncio.get_running_loop()
        if self.silent_s() >= self.timeout_s:
            # libuv runs due timers before it polls for I/O: after a stretch without CPU the
            # reply may already sit in the socket. Let the loop poll and read a few times.
            if self._suspect < 8:
                self._suspect += 1
                self._watchdog = loop.call_soon(self._watch)
                return
            for c in calls:
                c.future.set_exception(RedisSilent(f"Redis silent for {self.silent_s():.3f} s"))
            if self.lean is not None:
                # Its round trips in flight would wait forever on a frozen Redis (the lean
                # connection has no read timeout): drop it, the next round trip reconnects.
                self.lean.reset()
        else:
            now = time.monotonic()
            for c in calls:
                if now - c.queued >= self.max_wait_s:
                    c.future.set_exception(Overloaded())
        self._suspect = 0
        self._watchdog = loop.call_later(min(self.timeout_s, 0.025), self._watch)

    async def close(self) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self._pending = self._pending, []
        for c in pending:
            if not c.future.done():
                c.future.set_exception(RedisConnectionError("the rate limiter's store is closed"))
        if self._inflight:
            # Replies due (a refund sent just before the stop) get a moment to arrive; a
            # frozen Redis does not hold the stop up.
            await asyncio.wait(list(self._inflight), timeout=max(1.0, self.timeout_s))
        if self.lean is not None:
            await self.lean.close()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)


def _script_args(batch: Sequence[_Call]) -> list[str | int]:
    keys: list[str] = []
    argv: list[str | int] = ["", len(batch)]
    for c in batch:
        keys.extend(c.keys)
        argv += [c.op, len(c.keys), *c.nums]
    return [SHA, len(keys), *keys, *argv]


def _split(raw: list[Any], batch: Sequence[_Call]) -> list[Reply | BaseException]:
    """The script's flat reply (now, then per request: allowed and its TATs) per call."""
    now = int(raw[0])
    out: list[Reply | BaseException] = []
    i = 1
    for c in batch:
        n = len(c.keys)
        out.append([int(raw[i]), now, *(int(x) for x in raw[i + 1 : i + 1 + n])])
        i += 1 + n
    return out


def _as_exception(exc: BaseException) -> Exception:
    if isinstance(exc, Exception):
        return exc
    return ConnectionError(f"redis call interrupted: {exc!r}")
