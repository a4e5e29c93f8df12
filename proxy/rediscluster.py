"""The Redis Cluster client every part of Floodwall uses with ``redis.cluster: true``.

redis-py's ``RedisCluster`` with three changes, for callers that give each call a short
budget (the cache's 100 ms, the job API's 200 ms) and cancel it when the budget runs out, and
for scripts that must run once:

- **The layout is read again after a call failed or was cancelled.** redis-py re-reads the
  cluster's slots only once its own socket timeout or a connection error hits; a budget that
  cancels the call first never lets that happen. After a primary hung (rather than died) and
  its replica took over, every budgeted call went on to the dead node for as long as it hung:
  in a test, 0 of 84 cache reads answered in the 17 s after the failover. Now a failure or a
  cancellation starts a check in the background (at most one a second): one node's
  ``CLUSTER SLOTS`` against the map in use, and a full re-read only when they differ (a
  re-read reopens every connection: one per cancelled call reopened 300 connections in 5 s).
- **A failed call is not sent again.** redis-py's cluster client retries a call up to ten
  times after a timeout or a lost connection, which runs a script a second time when the
  first run happened but its answer was lost: a rate-limit refund given twice admits more
  than the limit, a job submitted twice is counted twice. As the standalone client (no
  retries), a failure goes to the caller, whose budget and fallback handle it, and the
  layout is read again for the next call.
- **Bursts wait for a connection instead of failing.** The cluster client opens at most
  ``max_connections`` per node and refuses the next call at once (``MaxConnectionsError``);
  the standalone client's blocking pool makes it wait. Here at most ``max_connections``
  commands are in flight per client, and each node may open more than that, so a burst waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, cast

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

# What suggests the layout changed under us (a node gone, hung or no longer owning a slot).
_LAYOUT_FAULTS = (
    asyncio.CancelledError,
    TimeoutError,
    OSError,
    RedisConnectionError,
    RedisTimeoutError,
    RedisClusterException,
)
_REFRESH_EVERY_S = 1.0


class Cluster(RedisCluster):
    def __init__(self, **kwargs: Any) -> None:
        # max_connections: commands in flight at once. Per node: room for those plus
        # pipelines, which do not take a slot.
        in_flight = int(kwargs.pop("max_connections", 128))
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        super().__init__(max_connections=4 * in_flight, **kwargs)
        self._slots = asyncio.Semaphore(in_flight)
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0
        self._asked = 0  # which primary the next layout check asks: each in turn

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._slots:
            try:
                return await super().execute_command(*args, **kwargs)
            except _LAYOUT_FAULTS:
                self.refresh_layout()
                raise

    @classmethod
    def from_urls(cls, urls: str, **kwargs: Any) -> Cluster:
        """From one node's URL, or several separated by commas (the first carries the
        credentials and options): the client learns the cluster from the first node that
        answers, so one node down at start does not stop the process."""
        first, *more = (u.strip() for u in urls.split(",") if u.strip())
        if not more:
            return cast("Cluster", cls.from_url(first, **kwargs))
        kwargs.update(parse_url(first))
        if kwargs.pop("connection_class", None) is SSLConnection:
            kwargs["ssl"] = True
        nodes = []
        for url in (first, *more):
            parts = parse_url(url)
            nodes.append(ClusterNode(parts.get("host", "localhost"), parts.get("port", 6379)))
        kwargs.pop("host", None)
        kwargs.pop("port", None)
        return cls(startup_nodes=nodes, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _Pipeline(self, transaction)  # type: ignore[abstract]  # as redis-py does

    def refresh_layout(self) -> None:
        """Re-reads the cluster's slots and nodes in the background, unless that is under
        way or was done within the last second."""
        now = time.monotonic()
        if self._refresh is not None and not self._refresh.done():
            return
        if now - self._refreshed_at < _REFRESH_EVERY_S:
            return
        self._refreshed_at = now
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to refresh for
            self._refresh = asyncio.get_running_loop().create_task(self._reinitialize())

    async def _reinitialize(self) -> None:
        # Any node may be the one that is down or hung; the next failure tries another.
        with contextlib.suppress(Exception):
            if await self._layout_moved():
                await self.nodes_manager.initialize()

    async def _layout_moved(self) -> bool:
        """Whether a node's view of which primary serves which slots differs from ours."""
        self._asked += 1
        primaries = self.get_primaries()
        node = primaries[self._asked % len(primaries)]
        slots = await super().execute_command("CLUSTER SLOTS", target_nodes=node)
        known = self.nodes_manager.slots_cache
        for (start, end), shard in slots.items():
            host, port = shard["primary"][:2]
            for slot in (start, end):
                serving = known.get(slot)
                if not serving or serving[0].name != f"{host}:{port}":
                    return True
        return False

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            # wait() never raises the task's own cancellation, but lets a cancellation of
            # the caller through (a budget that ran out during redis-py's own aclose()).
            await asyncio.wait({self._refresh})
        await super().aclose()


class _Pipeline(ClusterPipeline):
    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute(*args, **kwargs)
        except _LAYOUT_FAULTS:
            client = self.cluster_client
            if isinstance(client, Cluster):
                client.refresh_layout()
            raise
