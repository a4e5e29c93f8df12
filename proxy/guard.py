"""The processor's last line of defence: event-loop lag.

A processor short of CPU answers every phase late; past Envoy's ``message_timeout`` each late
answer becomes a 504 after the processor has spent its CPU anyway. The guard measures how late
the event loop runs (a timer every 20 ms, smoothed); while that lag is above ``max_lag_s`` new
requests are refused at their first message with a quick 503 ``overloaded``, before any filter
work, so the CPU goes to the requests already admitted.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Counter, Gauge

from proxy.api import cancel_and_wait

LAG = Gauge("floodwall_event_loop_lag_seconds", "Smoothed lateness of the processor's event loop")
REFUSED = Counter(
    "floodwall_guard_refused", "Requests refused by the processor's lag guard (overloaded)"
)


class LagGuard:
    def __init__(self, max_lag_s: float, interval_s: float = 0.02) -> None:
        self.max_lag_s = max_lag_s
        self.interval_s = interval_s
        self.lag = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    def overloaded(self) -> bool:
        if self.lag > self.max_lag_s:
            REFUSED.inc()
            return True
        return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.interval_s)
            # Smoothed over ~5 ticks, each tick counting at most twice the limit: one slow
            # callback (a 1 s reload) is not overload and must not refuse requests after the
            # loop has caught up; a backlog (late tick after tick) is, within ~4 ticks.
            late = min(max(0.0, loop.time() - t0 - self.interval_s), 2 * self.max_lag_s)
            self.lag += 0.2 * (late - self.lag)
            LAG.set(self.lag)
