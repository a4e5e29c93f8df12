"""GCRA (the generic cell rate algorithm), the arithmetic shared by the Redis script and the
in-process fallback.

One number per limit and key is the whole state: the theoretical arrival time (TAT), the
instant at which the bucket would be empty again, in microseconds. A limit of ``rate`` per
``period`` with ``burst`` has an emission interval ``T = period / rate`` (rounded up to whole
microseconds, as TATs are, except for fast token limits: see Rule.of) and a tolerance
``tau = burst * T``. A request of ``cost`` units is admitted at ``now`` when

    max(TAT, now) + cost * T - tau <= now + max_wait

and then TAT moves to ``max(TAT, now) + cost * T``. So ``burst`` units can pass at once from
idle, then one per ``T``: at most ``burst + t / T`` units in any interval of length ``t``,
with no window edges to double up at. ``gcra.lua`` is this file in Lua; the integration tests
run both on the same inputs and compare.

Several limits are taken together (all-or-nothing): if any one refuses, none is charged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rule:
    """The arithmetic of one limit, in microseconds."""

    interval_us: float  # T: time one unit takes to drain (whole microseconds from 1 ms)
    tolerance_us: float  # tau: burst * T

    @classmethod
    def of(cls, rate: float, period_s: float, burst: float, *, exact: bool = False) -> Rule:
        """``exact``: keep a fractional T where rounding it up would cost over 0.1% of the
        rate (token limits: a take costs many units, see below)."""
        t = period_s * 1e6 / rate
        interval = float(math.ceil(t))
        if not exact or interval <= t * 1.001:
            # Whole microseconds: TATs are whole (rounded up on every take), so with a
            # fraction in T each take would round up a little more than tau allows for and
            # the last unit of a burst would never fit (rate 3 with burst 3 admitted 2, with
            # burst 1 nothing). Rounding T up errs on the strict side by under a microsecond
            # per unit: nothing from T = 1 ms up, 1% at 10,000 units a second, half the rate
            # at 2M a second (T = 0.5 us).
            return cls(interval, burst * interval)
        # A fast token limit (100M tokens a minute: T = 0.6 us, rounded up 40% short of its
        # rate). Exact, each take still rounds the TAT up by under a microsecond: a request
        # costs under a microsecond's worth of tokens more than it should (under 2 at 100M a
        # minute), and takes that add up to the whole burst exactly may miss it by as much.
        # tau rounded up lets one request of the whole burst fit from idle.
        return cls(t, float(math.ceil(burst * t)))

    def fits(self, cost: float, max_wait_us: float = 0.0) -> bool:
        """Whether a request of ``cost`` units can pass at all: from an idle bucket."""
        return math.ceil(cost * self.interval_us) - self.tolerance_us <= max_wait_us

    def scaled(self, share: float) -> Rule:
        """The same limit at ``share`` of its rate and burst (a replica's local share)."""
        t = self.interval_us / share
        # round(): burst x share carries float error (2.9999...) that would cost a unit.
        burst = round(self.tolerance_us / self.interval_us * share, 6)
        if self.interval_us == math.floor(self.interval_us):  # whole microseconds, as above
            interval = float(math.ceil(t))
            return Rule(interval, float(round(burst * interval)))
        return Rule(t, float(math.ceil(burst * t)))


@dataclass(frozen=True, slots=True)
class Take:
    """One limit's part in a take: its rule, the cost, how long a request may wait for it."""

    rule: Rule
    cost: float
    max_wait_us: float = 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of taking several limits at ``now``.

    ``tats`` are the TATs after the take (when refused: as they stand, never before ``now``);
    ``waits_us`` is, per limit, how long the request must wait until it fits (0 when it fits
    now; for a refused limit, the time until a retry would fit).
    """

    allowed: bool
    now_us: float
    tats: tuple[float, ...]
    waits_us: tuple[float, ...]

    @property
    def wait_us(self) -> float:
        return max(self.waits_us, default=0.0)


def take(tats: Sequence[float | None], takes: Sequence[Take], now_us: float) -> Verdict:
    """All-or-nothing take of several limits. ``None`` is a key with no state (idle)."""
    new: list[float] = []
    waits: list[float] = []
    allowed = True
    for tat, t in zip(tats, takes, strict=True):
        base = now_us if tat is None or tat < now_us else tat
        # Round up: a fraction of a microsecond is never given away.
        after = math.ceil(base + t.cost * t.rule.interval_us)
        wait = after - t.rule.tolerance_us - now_us
        if wait < 0:
            wait = 0.0
        if wait > t.max_wait_us:
            allowed = False
        new.append(after)
        waits.append(wait)
    if not allowed:
        old = tuple(now_us if tat is None or tat < now_us else tat for tat in tats)
        return Verdict(False, now_us, old, tuple(waits))
    return Verdict(True, now_us, tuple(new), tuple(waits))


def from_reply(
    allowed: bool, now_us: float, tats: Sequence[float], takes: Sequence[Take]
) -> Verdict:
    """The Verdict for the script's reply (it returns TATs only; the waits follow from them)."""
    if not allowed:
        return take(tats, takes, now_us)
    pairs = zip(tats, takes, strict=True)
    waits = tuple(max(0.0, tat - t.rule.tolerance_us - now_us) for tat, t in pairs)
    return Verdict(True, now_us, tuple(tats), waits)


def adjust(tat: float | None, rule: Rule, delta: float, now_us: float) -> float | None:
    """Charges (``delta`` > 0) or refunds (< 0) units after the fact: settlement of a token
    reservation, or the refund of a request that never went upstream. Returns the new TAT,
    None when the bucket is back to idle."""
    base = now_us if tat is None or tat < now_us else tat
    after = math.ceil(base + delta * rule.interval_us)
    return after if after > now_us else None


def remaining(tat: float, rule: Rule, now_us: float) -> int:
    """Units that would still pass at ``now`` (the RateLimit header's ``r``)."""
    base = tat if tat > now_us else now_us
    return max(0, math.floor((rule.tolerance_us - (base - now_us)) / rule.interval_us + 1e-9))


def reset_s(tat: float, now_us: float) -> float:
    """Seconds until the bucket is idle (full burst available) again."""
    return max(0.0, (tat - now_us) / 1e6)


def blocked_until(tat: float, rule: Rule, max_wait_us: float, min_cost: float = 1.0) -> float:
    """The instant before which no request (of at least ``min_cost``) can pass this limit,
    given its TAT.

    TATs only grow between refunds, so a cache of this value can refuse locally without ever
    refusing something Redis would admit, refunds aside."""
    return tat + min_cost * rule.interval_us - rule.tolerance_us - max_wait_us


class LocalLimiter:
    """The same arithmetic in process memory: the fallback while Redis is unreachable."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._tats: dict[str, float] = {}
        self._max_keys = max_keys

    def take(self, keys: Sequence[str], takes: Sequence[Take], now_us: float) -> Verdict:
        # Whole microseconds, as Redis' clock: from a fractional now, the take's rounding up
        # would leave the last unit of a burst a fraction of a microsecond short.
        now_us = math.floor(now_us)
        verdict = take([self._tats.get(k) for k in keys], takes, now_us)
        if verdict.allowed:
            if len(self._tats) > self._max_keys:
                self._expire(now_us)
            for k, tat in zip(keys, verdict.tats, strict=True):
                self._tats[k] = tat
        return verdict

    def adjust(self, key: str, rule: Rule, delta: float, now_us: float) -> None:
        tat = adjust(self._tats.get(key), rule, delta, math.floor(now_us))
        if tat is None:
            self._tats.pop(key, None)
        else:
            self._tats[key] = tat

    def _expire(self, now_us: float) -> None:
        # Idle keys carry no information (an absent key is idle): drop them to bound memory.
        self._tats = {k: v for k, v in self._tats.items() if v > now_us}
