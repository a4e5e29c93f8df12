"""Leases: units a replica takes from a shared limit ahead of use, so that most checks of a
busy key stay in process memory instead of each making a Redis round trip.

The idea is Envoy's rate-limit quota service (RLQS) and Google's Doorman, on top of the same
GCRA script: a lease is an ordinary take of ``n`` units in Redis, all-or-nothing, so every
admitted request was still counted once by the shared limit (the sum over replicas never
exceeds the allowance). What changes is *when* a unit is counted: at its grant, up to
``lease_ms`` before the request that uses it. So:

- a replica holds at most ``lease_share`` of the limit's burst at any time;
- a lease is granted only while the key's bucket is at most half used (``headroom``): a key
  near its limit gets no leases, and every check of it goes to Redis, exact per request;
- units not used within ``lease_ms`` expire unused; they are never given back (a refund made
  after time passed could re-grant capacity that already drained, i.e. admit more than the
  limit). The cost is a shortfall: at most ``lease_share`` of the burst per replica.

Sizing is slow start: a key's first lease is small, each lease used up before it expires
doubles the next one (up to the cap), each that expires half unused halves it. A key with
little traffic on this replica never holds many units.

This module is the bookkeeping only (no Redis, no clock of its own: ``now`` is passed in).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Lease:
    units: float = 0.0  # granted and not yet used
    expires: float = 0.0  # monotonic seconds; the units are void from then on
    size: float = 0.0  # the next top-up asks for this many (0: not sized yet)
    pending: bool = False  # a top-up is in flight
    # The key's TAT in Redis after the last grant, in Redis microseconds: an estimate of the
    # bucket for the RateLimit header of requests served from the lease.
    tat_us: float = 0.0


@dataclass(frozen=True, slots=True)
class Expired:
    """Units that a lease lost unused (for the metric)."""

    units: float


class Leases:
    """Per-key leases of one limit in this process."""

    def __init__(self, cap: float, cost: float, ttl_s: float, max_keys: int = 50_000) -> None:
        if cap < 2 * cost:
            raise ValueError(f"a lease cap of {cap:g} units holds fewer than two requests")
        self.cap = cap
        self.cost = cost
        self.ttl_s = ttl_s
        self.first = min(cap, 4 * cost)
        self.max_keys = max_keys
        self._by_key: dict[str, Lease] = {}

    def get(self, key: str) -> Lease | None:
        return self._by_key.get(key)

    def take(self, key: str, cost: float, now: float) -> tuple[bool, Expired | None]:
        """Uses ``cost`` units of the key's lease if it has them. Also reports units that
        expired since the last look."""
        lease = self._by_key.get(key)
        if lease is None:
            return False, None
        expired = self._expire(lease, now)
        if lease.units >= cost:
            lease.units -= cost
            return True, expired
        return False, expired

    def give_back(self, key: str, cost: float, now: float) -> None:
        """Returns units taken by a request that was then refused or never went upstream.
        Only to this process' lease, and only while it is valid: never to Redis."""
        lease = self._by_key.get(key)
        if lease is not None and lease.expires > now:
            lease.units += cost

    def want(self, key: str, now: float) -> float:
        """How many units to ask Redis for now (0: none). Marks a top-up in flight."""
        lease = self._by_key.get(key)
        if lease is None:
            if len(self._by_key) >= self.max_keys:
                self._sweep(now)
            lease = self._by_key[key] = Lease(size=self.first)
        if lease.pending:
            return 0.0
        live = lease.units if lease.expires > now else 0.0
        if live >= lease.size / 2:
            return 0.0  # enough left: top up once half is used
        ask = min(lease.size, self.cap - live)
        if ask < self.cost:
            return 0.0
        lease.pending = True
        return ask

    def granted(self, key: str, units: float, tat_us: float, now: float) -> Expired | None:
        lease = self._by_key.setdefault(key, Lease(size=self.first))
        lease.pending = False
        expired = self._expire(lease, now)
        if expired is None and lease.expires and lease.units < lease.size / 2:
            # Half of the last lease went within its lifetime: the key is busy here.
            lease.size = min(self.cap, lease.size * 2)
        lease.units += units
        lease.expires = now + self.ttl_s
        lease.tat_us = tat_us
        return expired

    def refused(self, key: str) -> None:
        """Redis said no (the key is past half its burst) or failed: no lease this time."""
        lease = self._by_key.get(key)
        if lease is not None:
            lease.pending = False
            lease.size = self.first

    def held(self) -> float:
        return sum(lease.units for lease in self._by_key.values())

    def _expire(self, lease: Lease, now: float) -> Expired | None:
        if lease.expires > now or lease.units <= 0:
            return None
        lost = lease.units
        lease.units = 0.0
        if lost >= lease.size / 2:
            lease.size = max(self.first, lease.size / 2)
        return Expired(lost)

    def _sweep(self, now: float) -> None:
        # Keys are unbounded (client IPs, header values): drop the idle ones.
        self._by_key = {
            k: v for k, v in self._by_key.items() if v.pending or (v.expires > now and v.units)
        }
