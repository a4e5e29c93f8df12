"""Per-key request and token limits, exact across replicas: GCRA run atomically in Redis.

Per request, every applicable limit is taken in one script call (one round trip, batched with
the other requests of the same event-loop turn); a refusal by any limit charges none. Token
limits reserve the request's ceiling (prompt estimate + max completion) before the model is
called and settle with the real usage when the request completes (aborted ones included).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from filters.rate_limit import gcra
from filters.rate_limit.lease import Expired, Leases
from filters.rate_limit.params import Limit, RateLimitParams
from filters.rate_limit.store import GcraStore, Overloaded, Reply
from proxy import errors
from proxy.api import (
    CONTINUE,
    REDIS_FAULTS,
    Decision,
    Deps,
    Filter,
    Headers,
    Mutate,
    Outcome,
    Phase,
    RequestContext,
)
from proxy.config import RouteConfig

DECISIONS = Counter(
    "floodwall_ratelimit_decisions",
    "Rate-limit decisions by limit and decision",
    ["limit", "decision"],
)
TOKENS = Counter(
    "floodwall_ratelimit_tokens",
    "Tokens reserved, refunded and charged after the fact, by limit",
    ["limit", "kind"],
)
REDIS_SECONDS = Histogram(
    "floodwall_ratelimit_redis_duration_seconds",
    "Latency of one rate-limit check against Redis",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
REDIS_ERRORS = Counter(
    "floodwall_ratelimit_redis_errors", "Failed rate-limit calls to Redis, by kind", ["kind"]
)
REDIS_UP = Gauge("floodwall_ratelimit_redis_up", "1 while the limiter reaches Redis, 0 in fallback")
LEASE_UNITS = Counter(
    "floodwall_ratelimit_lease_units",
    "Units of leased limits granted to this process by Redis, and expired unused (used: "
    'floodwall_ratelimit_decisions{decision="leased"})',
    ["limit", "kind"],
)
WAIT_SECONDS = Histogram(
    "floodwall_ratelimit_wait_seconds",
    "How long smoothed requests were held for their turn",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

_log = logging.getLogger("floodwall.rate_limit")
_DECISIONS = (
    "allowed", "delayed", "denied", "denied_cached", "fallback_allowed", "fallback_denied",
    "unavailable", "overloaded", "too_large", "leased",
)  # fmt: skip
_LEASE_KINDS = ("granted", "expired")


@dataclass(frozen=True, slots=True)
class _Limit:
    """A configured limit with its arithmetic and its advertised policy precomputed."""

    spec: Limit
    rule: gcra.Rule
    local_rule: gcra.Rule
    # Keys of limits that name the tenant or key share the tenant's hash tag, so on a Redis
    # Cluster a request's per-tenant and per-key limits are one atomic script in one slot.
    by_tenant: bool
    policy: str
    # The script's per-key numbers, as strings once (cost last; requests: fixed).
    nums: tuple[str, str]
    max_wait: str
    cost: str
    counters: dict[str, Any]
    # Leases of this limit in this process (None: every check goes to Redis), and the
    # script's max_wait for a top-up: negative, so a lease needs half the burst free.
    leases: Leases | None
    headroom: str

    @classmethod
    def of(cls, spec: Limit, lease_s: float) -> _Limit:
        rule = gcra.Rule.of(spec.rate, spec.period, spec.burst_units, exact=spec.unit == "tokens")
        quota, window = _policy_quota(spec.period * 1e6 / rule.interval_us, spec.period)
        policy = f'"{spec.name}";q={quota};w={window}'
        if spec.unit == "tokens":
            policy += ';qu="tokens"'  # not a registered unit: the draft's are requests/bytes
        return cls(
            spec,
            rule,
            rule.scaled(spec.local_share),
            any(p in ("tenant", "key_id") for p in spec.key),
            policy,
            (_num(rule.interval_us), _num(rule.tolerance_us)),
            _num(spec.max_wait_ms * 1000.0),
            _num(spec.cost),
            {d: DECISIONS.labels(spec.name, d) for d in _DECISIONS}
            | {f"lease_{k}": LEASE_UNITS.labels(spec.name, k) for k in _LEASE_KINDS},
            Leases(spec.lease_share * spec.burst_units, spec.cost, lease_s)
            if spec.lease_share
            else None,
            _num(-rule.tolerance_us / 2),
        )

    def count(self, decision: str) -> None:
        self.counters[decision].inc()

    @property
    def max_wait_us(self) -> float:
        return self.spec.max_wait_ms * 1000.0


@dataclass(slots=True)
class _Hold:
    """What one admitted request holds: refunded or settled in on_complete."""

    limits: list[_Limit]
    keys: list[str]
    costs: list[float]
    local: bool  # taken from the in-process fallback, not Redis
    leased: list[int]  # indexes of the limits served from this process' leases
    forwarded: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def requests_only(self) -> bool:
        """No token limit: a forwarded request has nothing to settle."""
        return all(lim.spec.unit == "requests" for lim in self.limits)


@dataclass(slots=True)
class _State:
    headers: Headers | None = None
    hold: _Hold | None = None
    checked: bool = False  # at the headers: the body phase has nothing left to check


class RateLimitFilter(Filter):
    Params = RateLimitParams

    def __init__(self, params: RateLimitParams, deps: Deps) -> None:
        super().__init__(params, deps)
        # Per instance: two of this filter on one route keep their own request state.
        self._state = functools.partial(_State)
        self.p = params
        self.limits = [_Limit.of(spec, params.lease_ms / 1000) for spec in params.limits]
        # Redis' clock minus this process' monotonic clock, in microseconds, from the last
        # reply: dates lease state for the RateLimit headers of requests served from leases.
        self._redis_offset_us = 0.0
        self.cluster = _is_cluster(deps.redis)
        self.store = (
            GcraStore(
                deps.redis,
                cluster=self.cluster,
                timeout_s=params.timeout_ms / 1000,
                max_wait_s=max(params.max_check_ms, params.timeout_ms) / 1000,
            )
            if deps.redis is not None
            else None
        )
        self.leasing = self.store is not None and any(lim.leases for lim in self.limits)
        self._keys: dict[tuple[str, str, tuple[str, ...]], str] = {}
        self.local = gcra.LocalLimiter()
        # key -> monotonic instant before which no request can pass it (see gcra.blocked_until)
        self.deny_cache: dict[str, float] = {}
        self.timeout_s = params.timeout_ms / 1000
        # The longest a check waits on Redis by its own rules (silence, then shedding).
        self.check_wait_s = max(params.max_check_ms, params.timeout_ms) / 1000
        self._late_logged = -math.inf
        self.redis_down_until = 0.0 if self.store is not None else math.inf
        self._by_route: dict[str, list[_Limit]] = {}
        self._body_routes: dict[str, bool] = {}
        self._background: set[asyncio.Future[Any]] = set()
        REDIS_UP.set(1 if self.store is not None else 0)

    # --- phases ------------------------------------------------------------------------------

    def route_refs(self) -> Collection[str]:
        return {r for spec in self.p.limits for r in spec.when.routes or ()}

    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        if not self._limits_for(route.name):
            return frozenset()
        out = {Phase.REQUEST_HEADERS}
        if self._after_body(route):
            out.add(Phase.REQUEST_BODY)
        if self.p.response_headers:
            out.add(Phase.RESPONSE_HEADERS)
        return frozenset(out)

    def _after_body(self, route: RouteConfig) -> bool:
        """On OpenAI routes (and for job envelopes) the model and the token estimate come
        from the body (the openai filter, placed before this one, sets them), on KServe gRPC
        the model (the chain reads it from the message): limits that use either wait for it."""
        found = self._body_routes.get(route.name)
        if found is None:
            found = (route.model_in_body or route.api == "jobs") and any(
                _needs_body(lim.spec) for lim in self._limits_for(route.name)
            )
            self._body_routes[route.name] = found
        return found

    def hold_ms(self) -> float:
        return max(spec.max_wait_ms for spec in self.p.limits)

    def _limits_for(self, route: str) -> list[_Limit]:
        found = self._by_route.get(route)
        if found is None:
            found = [
                lim
                for lim in self.limits
                if lim.spec.when.routes is None or route in lim.spec.when.routes
            ]
            self._by_route[route] = found
        return found

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        st = ctx.state(self._state)
        st.headers = headers
        if ctx.route is not None and ctx.has_request_body and self._waits_for_body(ctx):
            # Checked once the body is in (a bodiless request: now). A caller already known
            # to be over a limit the body cannot change is refused now, before the filters
            # between here and then (the cache's embedding and judge) work for it.
            if self.p.local_deny_cache:
                known = [
                    lim
                    for lim in self._limits_for(ctx.route.name)
                    if _applies(lim.spec, ctx) and "model" not in lim.spec.key
                ]
                keys = [self._key(lim, ctx, headers) for lim in known]
                refused = self._cached_refusal(known, keys, self.deps.clock.monotonic())
                if refused is not None:
                    return refused
            return CONTINUE
        st.checked = True
        return await self._check(ctx, st)

    def _waits_for_body(self, ctx: RequestContext) -> bool:
        """Whether a limit that applies to this caller needs the model or the token estimate
        (_after_body); a caller with request limits only is checked at the headers."""
        assert ctx.route is not None
        return self._after_body(ctx.route) and any(
            _needs_body(lim.spec) and _applies(lim.spec, ctx, model_known=False)
            for lim in self._limits_for(ctx.route.name)
        )

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        st = ctx.state(self._state)
        return CONTINUE if st.checked else await self._check(ctx, st)

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        hold = ctx.state(self._state).hold
        if hold is None or not hold.headers:
            return CONTINUE
        return Mutate(set_headers=hold.headers)

    # --- the check ---------------------------------------------------------------------------

    async def _check(self, ctx: RequestContext, st: _State) -> Decision:
        limits: list[_Limit] = []
        keys: list[str] = []
        costs: list[float] = []
        for lim in self._limits_for(ctx.route_name):
            if not _applies(lim.spec, ctx):
                continue
            if lim.spec.unit == "tokens":
                if ctx.token_estimate is None:
                    continue  # no token count on this route (a KServe passthrough)
                cost = float(ctx.token_estimate.total)
                if not lim.rule.fits(cost, lim.max_wait_us):
                    lim.count("too_large")
                    return errors.error(
                        413, "request_exceeds_limit",
                        f"the request may use {int(cost)} tokens; limit {lim.spec.name!r} "
                        f"allows at most {int(lim.spec.burst_units)} at once",
                    )  # fmt: skip
            else:
                cost = lim.spec.cost
            limits.append(lim)
            keys.append(self._key(lim, ctx, st.headers or {}))
            costs.append(cost)
        if not limits:
            return CONTINUE

        now = self.deps.clock.monotonic()
        if self.p.local_deny_cache:
            refused = self._cached_refusal(limits, keys, now, costs)
            if refused is not None:
                return refused

        verdict: gcra.Verdict | None = None
        leased: list[int] = []
        if now >= self.redis_down_until:
            if self.leasing:
                leased = self._from_leases(limits, keys, costs, now)
                if len(leased) == len(limits):
                    return self._admit_leased(st, limits, keys, costs, now)
            takes = [
                gcra.Take(lim.rule, c, lim.max_wait_us)
                for lim, c in zip(limits, costs, strict=True)
            ]
            try:
                budget = ctx.budget_s(self.check_wait_s)
                verdict = await self._shared(limits, keys, takes, costs, leased, now, budget)
            except Overloaded:
                # Redis is fine; this process could not get its answer in max_check_ms.
                self._unlease(limits, keys, costs, leased, now)
                for lim in limits:
                    lim.count("overloaded")
                return errors.error(
                    503, "overloaded", "the gateway is overloaded; retry shortly",
                    retry_after_s=1,
                )  # fmt: skip
            except asyncio.CancelledError:
                self._unlease(limits, keys, costs, leased, now)
                raise
            if verdict is None or not verdict.allowed:
                self._unlease(limits, keys, costs, leased, now)
                leased = []
        local = verdict is None
        if verdict is None:
            # A token request above the local share's burst (but within the shared one) could
            # never pass the fallback: a 429 would send the client to wait for a turn that
            # never comes, and admitting it anyway (capping its cost) would let each replica
            # exceed its share by up to that much per burst. Only the shared limit can judge
            # it: for this request the limit fails closed, as a "closed" limit does.
            closed = [
                lim
                for lim, c in zip(limits, costs, strict=True)
                if lim.spec.on_redis_error == "closed"
                or not lim.local_rule.fits(c, lim.max_wait_us)
            ]
            if closed:
                for lim in closed:
                    lim.count("unavailable")
                return errors.error(
                    503, "rate_limit_unavailable",
                    "the rate limiter's store is unavailable", retry_after_s=self._retry_s(),
                )  # fmt: skip
            local_takes = [
                gcra.Take(lim.local_rule, c, lim.max_wait_us)
                for lim, c in zip(limits, costs, strict=True)
            ]
            verdict = self.local.take(keys, local_takes, now * 1e6)

        rules = [lim.local_rule if local else lim.rule for lim in limits]
        if not local:
            self._remember_blocks(limits, keys, rules, verdict, now)
        if not verdict.allowed:
            return self._refusal(limits, rules, verdict, costs, local)

        kind = "fallback_allowed" if local else "allowed"
        if verdict.wait_us > 0:
            kind = "delayed"
        for i, lim in enumerate(limits):
            lim.count("leased" if i in leased else kind)
            if lim.spec.unit == "tokens":
                TOKENS.labels(lim.spec.name, "reserved").inc(costs[i])
        hold = _Hold(limits, keys, costs, local, leased)
        if self.p.response_headers:
            hold.headers = _headers(limits, rules, verdict)
        st.hold = hold
        if verdict.wait_us > 0:
            # Smoothing: hold the request until its slot. A client that leaves meanwhile
            # cancels this task; on_complete then gives the slot back.
            WAIT_SECONDS.observe(verdict.wait_us / 1e6)
            await self.deps.clock.sleep(verdict.wait_us / 1e6)
        hold.forwarded = True
        return CONTINUE

    async def _shared(
        self,
        limits: list[_Limit],
        keys: list[str],
        takes: list[gcra.Take],
        costs: list[float],
        leased: list[int],
        now: float,
        budget_s: float,
    ) -> gcra.Verdict | None:
        """The verdict of the shared limits: those in ``leased`` were served from this
        process' leases, the others are taken in Redis (the leases' top-ups ride along in the
        same round trip). None when Redis failed or went silent, or gave no answer within
        ``budget_s``."""
        top_up = (lambda: self._top_up(limits, keys, now)) if self.leasing else None
        if not leased:
            return await self._take_redis(limits, keys, takes, costs, top_up, budget_s)
        rest = [i for i in range(len(limits)) if i not in leased]
        v = await self._take_redis(
            [limits[i] for i in rest], [keys[i] for i in rest], [takes[i] for i in rest],
            [costs[i] for i in rest], top_up, budget_s,
        )  # fmt: skip
        if v is None:
            return None
        tats = [0.0] * len(limits)
        waits = [0.0] * len(limits)
        for j, i in enumerate(rest):
            tats[i], waits[i] = v.tats[j], v.waits_us[j]
        for i in leased:
            tats[i] = self._lease_tat(limits[i], keys[i], v.now_us)
        return gcra.Verdict(v.allowed, v.now_us, tuple(tats), tuple(waits))

    async def _take_redis(
        self,
        limits: list[_Limit],
        keys: list[str],
        takes: list[gcra.Take],
        costs: list[float],
        queued: Callable[[], None] | None = None,
        budget_s: float | None = None,
    ) -> gcra.Verdict | None:
        """All-or-nothing take in Redis; None when Redis failed or went silent, or (a
        ``budget_s`` shorter than the store's own bounds) gave no answer within it.
        ``queued`` runs once the calls are queued: what it queues goes in the same round
        trip."""
        assert self.store is not None
        groups = self._groups(keys)
        t0 = time.perf_counter()
        futures = []
        for idx in groups:
            gkeys = [keys[i] for i in idx]
            nums: list[str] = []
            for i in idx:
                lim = limits[i]
                nums += [*lim.nums, lim.cost if lim.spec.unit == "requests" else _num(costs[i]),
                         lim.max_wait]  # fmt: skip
            orphan = self._give_back(gkeys, [limits[i] for i in idx], [costs[i] for i in idx])
            futures.append(self.store.call("take", gkeys, nums, orphan))
        if queued is not None:
            queued()
        try:
            if budget_s is not None and budget_s < self.check_wait_s:
                # The filters before this one spent most of the phase: wait only for what
                # is left of it.
                await asyncio.wait(futures, timeout=budget_s)
                for f in futures:
                    failed = f.exception() if f.done() and not f.cancelled() else None
                    if failed is not None:
                        raise failed  # handled below, as the plain wait's would be
                if not all(f.done() for f in futures):
                    if budget_s <= 0 or self.store.silent_s() < budget_s / 2:
                        # No time at all, or Redis kept answering (this process is behind:
                        # event-loop lag): the overload the store's max_wait_s sheds, not a
                        # reason to admit from the fallback.
                        raise Overloaded()
                    # Redis silent: the fallback, as if it were down, without marking it
                    # down (the store's own timeout decides that; this request is late).
                    self._release(futures, groups, keys, limits, costs)
                    REDIS_ERRORS.labels("budget").inc()
                    self._late_log()
                    return None
            replies = [await f for f in futures]  # sent together: one wait
        except REDIS_FAULTS as exc:
            self._release(futures, groups, keys, limits, costs)
            self._redis_failed(exc)
            return None
        except (Overloaded, asyncio.CancelledError):
            # Shed, or the stream went away (client gone, Envoy's message timeout).
            self._release(futures, groups, keys, limits, costs)
            raise
        REDIS_SECONDS.observe(time.perf_counter() - t0)
        self._redis_ok()
        self._redis_offset_us = replies[0][1] - self.deps.clock.monotonic() * 1e6
        verdicts = [
            gcra.from_reply(r[0] == 1, r[1], r[2:], [takes[i] for i in idx])
            for r, idx in zip(replies, groups, strict=True)
        ]
        if len(verdicts) == 1:
            return verdicts[0]
        # Several slots (Redis Cluster, limits with different hash tags): granted groups are
        # given back when another refused, so a refused request holds nothing.
        allowed = all(v.allowed for v in verdicts)
        if not allowed:
            for g, (v, idx) in enumerate(zip(verdicts, groups, strict=True)):
                if v.allowed:
                    self._adjust_redis([keys[i] for i in idx], [limits[i] for i in idx],
                                       [-costs[i] for i in idx])  # fmt: skip
                    # Its TATs as they stood before the take, as for any refusal: the ones
                    # after it would put a block in the deny cache that the refund lifted.
                    before = [
                        max(v.now_us, math.floor(tat - takes[i].cost * takes[i].rule.interval_us))
                        for tat, i in zip(v.tats, idx, strict=True)
                    ]
                    verdicts[g] = gcra.Verdict(False, v.now_us, tuple(before), v.waits_us)
        tats: list[float] = [0.0] * len(keys)
        waits: list[float] = [0.0] * len(keys)
        for v, idx in zip(verdicts, groups, strict=True):
            for j, i in enumerate(idx):
                tats[i], waits[i] = v.tats[j], v.waits_us[j]
        return gcra.Verdict(allowed, verdicts[0].now_us, tuple(tats), tuple(waits))

    def _groups(self, keys: Sequence[str]) -> list[list[int]]:
        if not self.cluster:
            return [list(range(len(keys)))]
        from redis.crc import key_slot

        by_slot: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            by_slot.setdefault(key_slot(k.encode()), []).append(i)
        return list(by_slot.values())

    def _release(
        self,
        futures: list[asyncio.Future[Reply]],
        groups: list[list[int]],
        keys: list[str],
        limits: list[_Limit],
        costs: list[float],
    ) -> None:
        """The take failed as a whole (a slot's node down, shed, the stream gone): gives back
        what the slots that answered granted. Calls still owed are cancelled; their late
        grants come back to the orphan handler."""
        for f, idx in zip(futures, groups, strict=True):
            if f.done() and not f.cancelled() and f.exception() is None and f.result()[0] == 1:
                self._adjust_redis([keys[i] for i in idx], [limits[i] for i in idx],
                                   [-costs[i] for i in idx])  # fmt: skip
        _cancel(futures)

    def _give_back(
        self, keys: list[str], limits: list[_Limit], costs: list[float]
    ) -> Callable[[Reply], None]:
        """For a reply that arrives after the caller gave up: undo a grant nobody used."""

        def orphan(reply: Reply) -> None:
            if reply[0] == 1:
                self._adjust_redis(keys, limits, [-c for c in costs])

        return orphan

    # --- leases ------------------------------------------------------------------------------

    def _from_leases(
        self, limits: list[_Limit], keys: list[str], costs: list[float], now: float
    ) -> list[int]:
        """The limits this request can take from this process' leases (taken)."""
        out: list[int] = []
        for i, lim in enumerate(limits):
            if lim.leases is None:
                continue
            ok, expired = lim.leases.take(keys[i], costs[i], now)
            if expired is not None:
                lim.counters["lease_expired"].inc(expired.units)
            if ok:
                out.append(i)
        return out

    def _admit_leased(
        self, st: _State, limits: list[_Limit], keys: list[str], costs: list[float], now: float
    ) -> Decision:
        """Every limit of the request was served from this process' leases: no round trip."""
        self._top_up(limits, keys, now)
        for lim in limits:
            lim.count("leased")
        hold = _Hold(limits, keys, costs, False, list(range(len(limits))), forwarded=True)
        if self.p.response_headers:
            now_us = now * 1e6 + self._redis_offset_us
            pairs = zip(limits, keys, strict=True)
            tats = tuple(self._lease_tat(lim, k, now_us) for lim, k in pairs)
            verdict = gcra.Verdict(True, now_us, tats, (0.0,) * len(limits))
            hold.headers = _headers(limits, [lim.rule for lim in limits], verdict)
        st.hold = hold
        return CONTINUE

    def _unlease(
        self, limits: list[_Limit], keys: list[str], costs: list[float], leased: list[int],
        now: float,
    ) -> None:  # fmt: skip
        """A request that took leased units and was then refused, shed or cancelled."""
        for i in leased:
            leases = limits[i].leases
            assert leases is not None
            leases.give_back(keys[i], costs[i], now)

    def _lease_tat(self, lim: _Limit, key: str, now_us: float) -> float:
        lease = lim.leases.get(key) if lim.leases is not None else None
        return max(lease.tat_us, now_us) if lease is not None else now_us

    def _top_up(self, limits: list[_Limit], keys: list[str], now: float) -> None:
        """Asks Redis for more units for the leases that run low (no waiting: the reply
        tops the lease up when it comes)."""
        assert self.store is not None
        for lim, key in zip(limits, keys, strict=True):
            if lim.leases is None:
                continue
            size = lim.leases.want(key, now)
            if size:
                fut = self.store.call("take", [key], [*lim.nums, _num(size), lim.headroom])
                fut.add_done_callback(functools.partial(self._leased, lim, key, size))

    def _leased(self, lim: _Limit, key: str, size: float, fut: asyncio.Future[Reply]) -> None:
        leases = lim.leases
        assert leases is not None
        if fut.cancelled() or fut.exception() is not None:
            leases.refused(key)  # the request path counts and reports Redis failures
            return
        reply = fut.result()
        if reply[0] != 1:
            leases.refused(key)  # past half its burst: this key is checked per request
            return
        now = self.deps.clock.monotonic()
        self._redis_offset_us = reply[1] - now * 1e6
        expired: Expired | None = leases.granted(key, size, reply[2], now)
        lim.counters["lease_granted"].inc(size)
        if expired is not None:
            lim.counters["lease_expired"].inc(expired.units)

    # --- refusals ----------------------------------------------------------------------------

    def _cached_refusal(
        self,
        limits: list[_Limit],
        keys: list[str],
        now: float,
        costs: list[float] | None = None,
    ) -> Decision | None:
        """Refuses from the deny cache, with the answer Redis would give: ``costs`` (None:
        not known yet, at the headers) make a token request's Retry-After the time until it
        fits, not until one token does."""
        for i, (lim, key) in enumerate(zip(limits, keys, strict=True)):
            until = self.deny_cache.get(key)
            if until is None:
                continue
            if until <= now:
                del self.deny_cache[key]
                continue
            lim.count("denied_cached")
            rule, least = lim.rule, _least_cost(lim.spec)
            cost = max(costs[i], least) if costs is not None else least
            # Whole microseconds, as from Redis: the clock's conversion adds float noise that
            # a ceiling would turn into a second more.
            wait = round(until - now + (cost - least) * rule.interval_us / 1e6, 6)
            # RateLimit's t, as from Redis: until the bucket is full again (its TAT).
            slack_us = rule.tolerance_us + lim.max_wait_us - least * rule.interval_us
            full = round(until - now + slack_us / 1e6, 6)
            return errors.error(
                429, "rate_limited", f"rate limit {lim.spec.name!r} exceeded",
                retry_after_s=wait,
                headers={"ratelimit-policy": lim.policy,
                         "ratelimit": f'"{lim.spec.name}";r=0;t={math.ceil(full)}'},
            )  # fmt: skip
        return None

    def _remember_blocks(
        self,
        limits: list[_Limit],
        keys: list[str],
        rules: list[gcra.Rule],
        verdict: gcra.Verdict,
        now: float,
    ) -> None:
        if not self.p.local_deny_cache:
            return
        for lim, key, rule, tat in zip(limits, keys, rules, verdict.tats, strict=True):
            blocked = gcra.blocked_until(tat, rule, lim.max_wait_us, _least_cost(lim.spec))
            if blocked > verdict.now_us:
                # Redis time -> this process' monotonic clock, via the reply's "now".
                self.deny_cache[key] = now + (blocked - verdict.now_us) / 1e6
        if len(self.deny_cache) > 100_000:
            self.deny_cache = {k: v for k, v in self.deny_cache.items() if v > now}

    def _refusal(
        self,
        limits: list[_Limit],
        rules: list[gcra.Rule],
        verdict: gcra.Verdict,
        costs: list[float],
        local: bool,
    ) -> Decision:
        retry_us = 0.0
        worst = limits[0]
        for lim, wait in zip(limits, verdict.waits_us, strict=True):
            over = wait - lim.max_wait_us
            if over > 0:
                lim.count("fallback_denied" if local else "denied")
                if over > retry_us:
                    retry_us, worst = over, lim
        return errors.error(
            429, "rate_limited", f"rate limit {worst.spec.name!r} exceeded",
            retry_after_s=retry_us / 1e6, headers=_headers(limits, rules, verdict),
        )  # fmt: skip

    # --- settlement --------------------------------------------------------------------------

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> Awaitable[None] | None:
        # Most requests have nothing to settle (request limits, forwarded): no task for them.
        hold = ctx.state(self._state).hold
        if hold is None or (hold.forwarded and hold.requests_only):
            return None
        return self._settle(ctx, outcome, hold)

    async def _settle(self, ctx: RequestContext, outcome: Outcome, hold: _Hold) -> None:
        deltas: list[float] = []
        for lim, cost in zip(hold.limits, hold.costs, strict=True):
            if not hold.forwarded:
                # Left while waiting for its turn: it never used its slot.
                deltas.append(-cost)
            elif lim.spec.unit == "requests":
                deltas.append(0.0)
            else:
                deltas.append(_settle(cost, ctx, outcome) - cost)
        for i in hold.leased:
            if deltas[i] < 0:  # never went upstream: back to the lease, not to Redis
                self._unlease(hold.limits, hold.keys, hold.costs, [i],
                              self.deps.clock.monotonic())  # fmt: skip
                deltas[i] = 0.0
        for lim, d in zip(hold.limits, deltas, strict=True):
            if lim.spec.unit == "tokens" and d:
                TOKENS.labels(lim.spec.name, "charged" if d > 0 else "refunded").inc(abs(d))
        todo = [(lim, k, d) for lim, k, d in zip(hold.limits, hold.keys, deltas, strict=True) if d]
        if not todo:
            return
        for _, key, d in todo:
            if d < 0:
                self.deny_cache.pop(key, None)
        if hold.local:
            now_us = self.deps.clock.monotonic() * 1e6
            for lim, key, d in todo:
                self.local.adjust(key, lim.local_rule, d, now_us)
            return
        for idx in self._groups([k for _, k, _ in todo]):
            fut = self._adjust_redis(
                [todo[i][1] for i in idx], [todo[i][0] for i in idx], [todo[i][2] for i in idx]
            )
            try:
                async with asyncio.timeout(self.timeout_s * 4):
                    await asyncio.shield(fut)
            except REDIS_FAULTS as exc:
                REDIS_ERRORS.labels("settle").inc()
                ctx.log.warning("rate limit settlement failed (%r): %d limit(s) unsettled",
                                exc, len(idx))  # fmt: skip

    def _late_log(self) -> None:
        now = time.monotonic()
        if now - self._late_logged >= 10.0:  # every request of a frozen spell would log
            self._late_logged = now
            _log.warning(
                "rate limit check ran out of its phase's time with Redis silent: limits "
                "fall back (on_redis_error) for it; counted in "
                'floodwall_ratelimit_redis_errors_total{kind="budget"}'
            )

    def _adjust_redis(
        self, keys: list[str], limits: list[_Limit], deltas: list[float]
    ) -> asyncio.Future[Reply]:
        assert self.store is not None
        nums: list[str] = []
        for lim, d in zip(limits, deltas, strict=True):
            nums += [lim.nums[0], _num(d)]
        fut = self.store.call("adjust", keys, nums)
        # Refunds of orphans are fire-and-forget: keep a reference, read the outcome.
        self._background.add(fut)
        fut.add_done_callback(self._adjusted)
        return fut

    def _adjusted(self, fut: asyncio.Future[Any]) -> None:
        self._background.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            REDIS_ERRORS.labels("adjust").inc()

    # --- Redis health ------------------------------------------------------------------------

    def _redis_failed(self, exc: BaseException) -> None:
        REDIS_ERRORS.labels(errors.fault_kind(exc)).inc()
        if self.redis_down_until == 0.0:
            _log.warning(
                "Redis unreachable (%r): limits fall back (on_redis_error open: in-process "
                "share; closed: 503)", exc,
            )  # fmt: skip
        REDIS_UP.set(0)
        self.redis_down_until = self.deps.clock.monotonic() + self.p.retry_redis_ms / 1000

    def _redis_ok(self) -> None:
        if self.redis_down_until != 0.0:
            self.redis_down_until = 0.0
            REDIS_UP.set(1)
            _log.warning("Redis reachable again: limits are shared across replicas again")

    def _retry_s(self) -> float:
        return max(1.0, self.p.retry_redis_ms / 1000)

    # --- keys --------------------------------------------------------------------------------

    def _key(self, lim: _Limit, ctx: RequestContext, headers: Headers) -> str:
        # The hot path: one memo lookup (no generator: this runs per limit per request).
        parts = lim.spec.key
        tenant = (ctx.tenant or "-") if lim.by_tenant else ""
        if not parts:
            values: tuple[str, ...] = ()
        elif len(parts) == 1:
            values = (self._part(parts[0], ctx, headers),)
        else:
            values = tuple([self._part(p, ctx, headers) for p in parts])
        memo = (lim.spec.name, tenant, values)
        key = self._keys.get(memo)
        if key is None:
            digest = hashlib.blake2b("\x1f".join(values).encode(), digest_size=12).hexdigest()
            tag = _short(tenant) if lim.by_tenant else lim.spec.name
            key = f"{self.p.prefix}:{{{tag}}}:{lim.spec.name}:{digest}"
            if len(self._keys) >= 50_000:
                self._keys.clear()  # bounded: client IPs and header values are unbounded
            self._keys[memo] = key
        return key

    def _part(self, part: str, ctx: RequestContext, headers: Headers) -> str:
        if part == "tenant":
            return ctx.tenant or "-"
        if part == "key_id":
            return ctx.key_id or "-"
        if part == "model":
            return ctx.model or "-"
        if part == "route":
            return ctx.route_name
        if part == "client_ip":
            return client_ip(headers.get("x-forwarded-for", ""), self.p.trusted_hops)
        return headers.get(part[7:], "-")  # header:<name>

    async def stop(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.store is not None:
            await self.store.close()


def client_ip(xff: str, trusted_hops: int) -> str:
    """The client address from x-forwarded-for, which Envoy (use_remote_address) ends with the
    peer's address: the entry ``trusted_hops`` places from the right. Entries further left were
    written by the client and could be anything."""
    entries = [e.strip() for e in xff.split(",") if e.strip()]
    if not entries:
        return "-"
    return entries[max(0, len(entries) - 1 - trusted_hops)]


def _applies(spec: Limit, ctx: RequestContext, *, model_known: bool = True) -> bool:
    """``model_known`` False: before the body named the model, a limit on some models may
    apply."""
    w = spec.when
    return (
        (w.tenants is None or ctx.tenant in w.tenants)
        and (w.key_ids is None or ctx.key_id in w.key_ids)
        and (w.tiers is None or ctx.tier in w.tiers)
        and (w.models is None or not model_known or ctx.model in w.models)
    )


def _needs_body(spec: Limit) -> bool:
    """On OpenAI routes the model and the token estimate come from the body."""
    return spec.unit == "tokens" or "model" in spec.key or bool(spec.when.models)


def _settle(reserved: float, ctx: RequestContext, outcome: Outcome) -> float:
    """What a forwarded request finally costs a token limit."""
    if ctx.usage is not None:
        return float(ctx.usage.total)
    if outcome.responded_by is not None:
        return 0.0  # a later filter answered (cache hit, shed): the model never ran
    if outcome.aborted:
        # The client left after the request went upstream; the model may well have finished
        # (Triton does not cancel HTTP requests on disconnect): keep the reservation.
        return reserved
    # The upstream's status first: a stale cached 200 served for its 503 produced nothing new.
    status = outcome.upstream_status if outcome.upstream_status is not None else outcome.status
    if status is not None and status >= 400 and not ctx.response_streamed:
        return 0.0  # failed without usage: nothing was produced for the caller
    # A stream that failed after its 200 (judged a 502) may have sent text: kept, as one whose
    # client left.
    return reserved


def _headers(limits: list[_Limit], rules: list[gcra.Rule], verdict: gcra.Verdict) -> Headers:
    """IETF draft-ietf-httpapi-ratelimit-headers: RateLimit-Policy and RateLimit lists."""
    state = []
    for lim, rule, tat in zip(limits, rules, verdict.tats, strict=True):
        r = gcra.remaining(tat, rule, verdict.now_us)
        t = math.ceil(gcra.reset_s(tat, verdict.now_us))
        state.append(f'"{lim.spec.name}";r={r};t={t}')
    return {
        "ratelimit-policy": ", ".join(lim.policy for lim in limits),
        "ratelimit": ", ".join(state),
    }


def _cancel(futures: list[asyncio.Future[Reply]]) -> None:
    for f in futures:
        if f.done():
            if not f.cancelled():
                f.exception()  # read, so asyncio does not log it as never retrieved
        else:
            f.cancel()


def _least_cost(spec: Limit) -> float:
    """The fewest units a request can take from this limit (what the deny cache waits for)."""
    return spec.cost if spec.unit == "requests" else 1.0


def _policy_quota(rate: float, period_s: float) -> tuple[int, int]:
    """RateLimit-Policy's quota and window (whole seconds) for ``rate`` per ``period_s`` (the
    rule's effective rate), never promising more, give or take the 0.1% that whole
    microseconds take from a rate: 2.5/s is q=5;w=2, 0.1/s q=1;w=10, and anything no whole
    window matches is rounded down."""
    per_s = rate / period_s
    base = max(1, round(period_s))

    def whole(q: float) -> int | None:
        n = round(q)
        return n if n >= 1 and abs(q - n) <= 0.001 * n else None

    if per_s * base < 1:
        return 1, math.ceil(0.999 / per_s)
    for w in range(base, 10 * base + 1, base):  # a window the rate fills in whole units
        n = whole(per_s * w)
        if n is not None:
            return n, w
    return math.floor(per_s * base), base


def _num(x: float) -> str:
    return repr(float(x))


def _short(value: str) -> str:
    return hashlib.blake2b(value.encode(), digest_size=6).hexdigest()


def _is_cluster(redis: Any) -> bool:
    if redis is None:
        return False
    from redis.asyncio.cluster import RedisCluster

    return isinstance(redis, RedisCluster)
