"""Triton's own load signals, polled from its metrics endpoint a few times a second.

Per model: requests pending in Triton (``nv_inference_pending_request_count``) and the mean
time requests spent queued over the last poll interval (the rise of
``nv_inference_queue_duration_us`` over the rise of ``nv_inference_request_success``). One
poller per metrics URL per processor process, shared by every policy that asks (through
``Deps.signals``); a poll that fails leaves the last values to age out (``fresh``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field

from proxy.api import FilterParams, cancel_and_wait

log = logging.getLogger("floodwall.triton_load")

_SAMPLE = re.compile(
    r"^(nv_inference_pending_request_count|nv_inference_queue_duration_us|"
    r'nv_inference_request_success)\{model="([^"]+)",version="[^"]*"\} ([0-9.e+]+)$',
    re.M,
)


class SaturationParams(FilterParams):
    """Params of policies that watch Triton's load (admission, degrade)."""

    # Triton's metrics endpoint, polled 4 times a second (one poller per process and URL).
    triton_metrics_url: str
    # Saturated when the model's requests waited this long in Triton's queue on average over
    # the last poll interval, or when this many are pending there (None: not used).
    queue_ms_above: Annotated[float, Field(gt=0)] | None = 50.0
    pending_above: Annotated[int, Field(ge=1)] | None = None

    def saturated(self, load: ModelLoad | None, now: float) -> bool:
        if load is None or not load.fresh(now):
            return False  # no signal, or a stale one (metrics unreadable): not saturated
        return (self.queue_ms_above is not None and load.queue_ms > self.queue_ms_above) or (
            self.pending_above is not None and load.pending > self.pending_above
        )


@dataclass(frozen=True, slots=True)
class ModelLoad:
    pending: int
    queue_ms: float  # mean queue time of the requests finished in the last interval
    at: float  # monotonic time of the poll

    def fresh(self, now: float, max_age_s: float = 2.0) -> bool:
        return now - self.at <= max_age_s


def parse(text: str) -> dict[str, dict[str, float]]:
    """metric -> model -> value, summed over versions; a value past float's range (1e999)
    is left out, as an infinite count would stop the poller (int(inf))."""
    out: dict[str, dict[str, float]] = {}
    for name, model, value in _SAMPLE.findall(text):
        v = float(value)
        if math.isfinite(v):
            per = out.setdefault(name, {})
            per[model] = per.get(model, 0.0) + v
    return out


class TritonLoad:
    def __init__(
        self, url: str, interval_s: float = 0.25, now: Callable[[], float] = time.monotonic
    ) -> None:
        # now: the clock the policies compare ModelLoad.at with (their Deps.clock).
        self.now = now
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 8002
        self.path = parts.path or "/metrics"
        self.interval_s = interval_s
        self.models: dict[str, ModelLoad] = {}
        self._last: dict[str, tuple[float, float]] = {}  # model -> (queue_us, successes)
        self._task: asyncio.Task[None] | None = None
        self.users = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                self.update(await self._fetch(), self.now())
                if failing:
                    log.warning("Triton metrics at %s:%d readable again", self.host, self.port)
                failing = False
            except (OSError, TimeoutError, ValueError) as exc:
                if not failing:
                    log.warning("Triton metrics at %s:%d unreadable (%r): load signals age "
                                "out", self.host, self.port, exc)  # fmt: skip
                failing = True
            await asyncio.sleep(self.interval_s)

    def update(self, text: str, now: float) -> None:
        m = parse(text)
        pending = m.get("nv_inference_pending_request_count", {})
        queue = m.get("nv_inference_queue_duration_us", {})
        done = m.get("nv_inference_request_success", {})
        for model in set(pending) | set(queue):
            q, n = queue.get(model, 0.0), done.get(model, 0.0)
            q0, n0 = self._last.get(model, (q, n))
            self._last[model] = (q, n)
            waiting = int(pending.get(model, 0))
            if n > n0 and q >= q0:
                queue_ms = (q - q0) / (n - n0) / 1000
            elif n == n0 and waiting and model in self.models:
                # Nothing finished while requests wait (a hung model, a batch running for
                # seconds): no new mean, and 0 would read "not saturated" just when the
                # queue is longest. The last one stands.
                queue_ms = self.models[model].queue_ms
            else:
                queue_ms = 0.0  # idle, or counters restarted with Triton: nothing to say
            self.models[model] = ModelLoad(waiting, queue_ms, now)

    async def _fetch(self) -> str:
        async with asyncio.timeout(max(1.0, self.interval_s * 4)):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(
                    f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                raw = await reader.read()
            finally:
                writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise ValueError(f"metrics answered {head[:40]!r}")
        if b"chunked" in head.lower():
            body = _unchunk(body)
        return body.decode("utf-8", "replace")


def _unchunk(body: bytes) -> bytes:
    out: list[bytes] = []
    i = 0
    while True:
        j = body.index(b"\r\n", i)
        size = int(body[i:j].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[j + 2 : j + 2 + size])
        i = j + 2 + size + 2
