"""An adaptive concurrency limit for one upstream model, with priority classes, reserved
capacity and a short fair queue. Pure logic on an injected clock; one event loop, so no locks.

Limit (Vegas): each successful call gives an RTT (other answers, 4xx refusals among them, say
nothing of the model's pace); the upstream's queue is estimated as
``limit x (1 - base / rtt)`` where ``base`` is the no-load RTT. Few queued: the limit grows by
one; many: it shrinks by one; a failed call (5xx, 429, timeout) cuts it by 10%. ``base`` is the
minimum RTT over a rolling window, taken only from calls made while at most half the limit was
in use: under load every RTT includes queueing, and letting those in would ratchet ``base``
(and so the limit) up with the load itself. With no low-load call in the window, ``base`` keeps
its last value rather than drifting.

Classes: critical may use the whole limit, standard all but ``reserve_critical`` of it,
sheddable all but both reserves; so lower classes are shed first and critical keeps room.
Waiters are served highest class first, round robin across tenants within a class, so one
noisy tenant cannot starve the others. A full queue makes room for a higher class by shedding
the newest waiter of the lowest class queued (from its tenant with the most waiters): lower
classes never keep a critical request out. A request whose predicted wait exceeds what it may
wait is refused at once rather than after its wait runs out. The prediction counts the waiters
of its class and above, drained at the pace permits come free less the pace at which the
classes above are taking them (a decayed rate of their grants): a class above that takes most
permits will also overtake every waiter queued now, so while critical calls alone fill the
model, standard ones are refused at once (at their headers, see the filter) instead of each
holding a body and a queue slot until its wait runs out.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from filters.admission.params import AdmissionParams

CLASSES = ("critical", "standard", "sheddable")
Shed = Literal["shed_full", "shed_timeout", "shed_preempted"]
Outcome = Literal["admitted", "queued", "shed_full", "shed_timeout", "shed_preempted"]
# Grant rates per class decay with this time constant: about the last second of grants.
RATE_TAU_S = 1.0


class Limiter:
    def __init__(self, p: AdmissionParams, clock: Callable[[], float] = time.monotonic) -> None:
        self.p = p
        self.clock = clock
        self.limit = float(p.initial_limit)
        self.inflight = 0
        self.waiting = 0
        # class -> tenant -> its waiters; dict order is the round-robin order of tenants
        self.queues: dict[str, dict[str, deque[asyncio.Future[bool]]]] = {c: {} for c in CLASSES}
        self.base_rtt: float | None = None
        self.rtt: float | None = None  # smoothed time a permit is held: the queue's pace
        self._low_load: deque[tuple[float, float]] = deque()  # (time, rtt), rtt increasing
        self._share = {
            "critical": 1.0,
            "standard": 1.0 - p.reserve_critical,
            "sheddable": 1.0 - p.reserve_critical - p.reserve_standard,
        }
        # Permits granted per second, per class (exponentially decayed; see _granted).
        self._rates = dict.fromkeys(CLASSES, 0.0)
        self._rates_at = 0.0

    def cap(self, cls: str) -> int:
        return max(1, math.floor(self.limit * self._share[cls]))

    def try_acquire(self, cls: str) -> bool:
        """A permit now, if the class has room and nobody of its class or above waits."""
        if self._has_room(cls):
            self.inflight += 1
            self._granted(cls)
            return True
        return False

    def refusal(self, cls: str, max_wait_s: float, tenant: str | None = None) -> Shed | None:
        """Why a request of ``cls`` (from ``tenant``) arriving now would be shed without
        waiting, or None when it would be admitted or queued."""
        if self._has_room(cls):
            return None
        full = self.waiting >= self.p.max_queue
        if max_wait_s <= 0 or (full and self._victim(cls, tenant) is None):
            return "shed_full"
        if self.predicted_wait_s(cls, tenant) > max_wait_s:
            return "shed_timeout"
        return None

    def predicted_wait_s(self, cls: str, tenant: str | None = None) -> float:
        """The wait of a new ``cls`` waiter of ``tenant``: those of the classes above go
        first, and in its class the tenants take turns (round robin), so of each other
        tenant's waiters at most one more than its own go before it (None: every waiter of
        its class goes first). Permits come free at about ``limit / rtt`` per second
        (``cap / rtt`` of them usable by the class), of which the classes above keep taking
        what they took lately."""
        if self.rtt is None:
            return 0.0
        i = CLASSES.index(cls)
        ahead = sum(len(q) for c in CLASSES[:i] for q in self.queues[c].values())
        own = self.queues[cls].get(tenant, ()) if tenant is not None else ()
        ahead += sum(
            len(q) if tenant is None or t == tenant else min(len(q), len(own) + 1)
            for t, q in self.queues[cls].items()
        )
        if i == 0:
            return (ahead + 1) * self.rtt / self.cap(cls)
        rates = self.grant_rates()
        taken_above = sum(rates[c] for c in CLASSES[:i])
        free = min(self.cap(cls), self.limit - taken_above * self.rtt) / self.rtt
        if free <= 0:
            return math.inf
        return (ahead + 1) / free

    def grant_rates(self) -> dict[str, float]:
        """Permits granted per second lately, per class."""
        now = self.clock()
        decay = math.exp(-(now - self._rates_at) / RATE_TAU_S)
        if decay < 1.0:
            for c in CLASSES:
                self._rates[c] *= decay
            self._rates_at = now
        return self._rates

    def _granted(self, cls: str) -> None:
        self.grant_rates()[cls] += 1.0 / RATE_TAU_S

    async def acquire(self, cls: str, tenant: str, max_wait_s: float) -> Outcome:
        """A permit now ("admitted"), after a wait of at most ``max_wait_s`` ("queued"), or
        the reason the caller must shed the request."""
        if self.try_acquire(cls):
            return "admitted"
        why = self.refusal(cls, max_wait_s, tenant)
        if why is not None:
            return why
        if self.waiting >= self.p.max_queue:
            self._preempt(cls, tenant)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.queues[cls].setdefault(tenant, deque()).append(fut)
        self.waiting += 1
        try:
            async with asyncio.timeout(max_wait_s):
                granted = await asyncio.shield(fut)
        except TimeoutError:
            if not fut.done():
                self._forget(cls, tenant, fut)
                return "shed_timeout"
            granted = fut.result()  # decided in the same instant the wait ran out
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                self.release(None, failed=False, now=0.0)  # granted, then the client left
            elif not fut.done():
                self._forget(cls, tenant, fut)
            raise
        return "queued" if granted else "shed_preempted"

    def _has_room(self, cls: str) -> bool:
        ahead = any(self.queues[c] for c in CLASSES[: CLASSES.index(cls) + 1])
        return not ahead and self.inflight < self.cap(cls)

    def _victim(self, cls: str, tenant: str | None = None) -> tuple[str, str] | None:
        """Whose waiter a new ``cls`` waiter of ``tenant`` pushes out of a full queue: the
        noisiest tenant of the lowest class below ``cls`` with waiters; else, in ``cls``, the
        noisiest tenant if it has at least two more waiters than ``tenant`` (fair shares
        within a class). None: the newcomer is refused instead."""
        for c in reversed(CLASSES[CLASSES.index(cls) + 1 :]):
            if self.queues[c]:
                tenants = self.queues[c]
                return c, max(tenants, key=lambda t: len(tenants[t]))
        tenants = self.queues[cls]
        if tenant is None or not tenants:
            return None
        noisiest = max(tenants, key=lambda t: len(tenants[t]))
        own = len(tenants.get(tenant, ()))
        return (cls, noisiest) if len(tenants[noisiest]) >= own + 2 else None

    def _preempt(self, cls: str, tenant: str | None = None) -> None:
        found = self._victim(cls, tenant)
        if found is None:
            return
        victim, tenant = found
        tenants = self.queues[victim]
        fut = tenants[tenant].pop()  # its newest: the one that has waited least
        if not tenants[tenant]:
            del tenants[tenant]
        self.waiting -= 1
        if not fut.done():
            fut.set_result(False)

    def release(self, rtt: float | None, *, failed: bool, now: float, load: int = 0) -> None:
        """A call ended: ``rtt`` is its time to first byte (None: no verdict), ``load`` the
        number in flight when it was admitted."""
        self.inflight -= 1
        if failed:
            self.limit = max(self.p.min_limit, self.limit * 0.9)
        elif rtt is not None:
            self._sample(rtt, load, now)
        self._dispatch()

    def shrink(self, factor: float = 0.9) -> None:
        """An outside congestion signal (Triton's queue is long)."""
        self.limit = max(self.p.min_limit, self.limit * factor)

    def retry_after_s(self) -> float:
        """How long the present queue would take to drain at the present pace."""
        rtt = self.base_rtt or 0.1
        return min(30.0, max(1.0, (self.waiting + 1) * rtt / max(1.0, self.limit)))

    def _sample(self, rtt: float, load: int, now: float) -> None:
        self.rtt = rtt if self.rtt is None else self.rtt + 0.1 * (rtt - self.rtt)
        window = self._low_load
        if load <= self.limit / 2:
            while window and window[-1][1] >= rtt:
                window.pop()
            window.append((now, rtt))
        while window and window[0][0] < now - self.p.rtt_window_s:
            window.popleft()
        if window:
            self.base_rtt = window[0][1]
        elif self.base_rtt is None:
            self.base_rtt = rtt
        queued = self.limit * (1 - self.base_rtt / rtt) if rtt > 0 else 0.0
        if queued < self.p.grow_below:
            self.limit = min(self.p.max_limit, self.limit + 1)
        elif queued > self.p.shrink_above:
            self.limit = max(self.p.min_limit, self.limit - 1)

    def _dispatch(self) -> None:
        for cls in CLASSES:
            tenants = self.queues[cls]
            while tenants and self.inflight < self.cap(cls):
                tenant = next(iter(tenants))
                q = tenants.pop(tenant)
                fut = q.popleft()
                if q:
                    tenants[tenant] = q  # to the back: round robin across tenants
                self.waiting -= 1
                if fut.done():
                    continue  # gave up meanwhile
                self.inflight += 1
                self._granted(cls)
                fut.set_result(True)
            if tenants:
                return  # this class is still waiting: lower classes wait behind it

    def _forget(self, cls: str, tenant: str, fut: Any) -> None:
        q = self.queues[cls].get(tenant)
        if q is not None and fut in q:
            q.remove(fut)
            self.waiting -= 1
            if not q:
                del self.queues[cls][tenant]
