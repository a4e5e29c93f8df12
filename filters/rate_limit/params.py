from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from proxy.api import FilterParams

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

# What a limit's key can be made of. "header:<name>" takes a request header's value.
Part = Annotated[str, Field(pattern=r"^(tenant|key_id|model|route|client_ip|header:[a-z0-9-]+)$")]


def parse_duration(value: str | float) -> float:
    """Seconds from a number or a string such as "1s", "1m", "500ms", "1h"."""
    # ValueError (never TypeError or AttributeError): pydantic turns only it into the config
    # error naming the field. A boolean is not a number of seconds, nor is infinity.
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a duration (a finite number of seconds)")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration (say 1s, 1m, 500ms, 1h or seconds)")
    m = _DURATION.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a duration (say 1s, 1m, 500ms, 1h or seconds)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


class When(FilterParams):
    """Restricts a limit to some requests; every field given must match (None: any)."""

    routes: list[str] | None = None
    tenants: list[str] | None = None
    key_ids: list[str] | None = None
    tiers: list[str] | None = None
    models: list[str] | None = None


class Limit(FilterParams):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    # What the limit counts per distinct value of `key`; [] is one limit across all callers.
    key: list[Part]
    unit: Literal["requests", "tokens"] = "requests"
    # `rate` units per `period` sustained, `burst` units at once from idle (default: rate).
    rate: Annotated[float, Field(gt=0)]
    period: float = 1.0
    burst: Annotated[float, Field(gt=0)] | None = None
    # Units one request costs (requests only; a token limit charges the request's tokens).
    cost: Annotated[float, Field(gt=0)] = 1.0
    # Hold a request up to this long for its turn instead of refusing it (0: refuse at once).
    max_wait_ms: Annotated[float, Field(ge=0, le=60_000)] = 0.0
    # Redis unreachable or too slow: "open" keeps limiting in process memory at
    # `local_share` of the rate (say 1/replicas); "closed" refuses with 503.
    on_redis_error: Literal["open", "closed"] = "open"
    local_share: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Leases (see lease.py): each replica may take up to this share of the burst from Redis
    # ahead of use and admit from it in memory. 0: every check goes to Redis. For busy limits
    # far above any one caller's rate (global or per-route limits); a key past half its burst
    # gets no leases and is checked per request again.
    lease_share: Annotated[float, Field(ge=0, le=0.1)] = 0.0
    when: When = Field(default_factory=When)

    @field_validator("period", mode="before")
    @classmethod
    def _period(cls, v: str | float) -> float:
        seconds = parse_duration(v)
        if seconds <= 0:
            raise ValueError("period must be positive")
        return seconds

    @model_validator(mode="after")
    def _consistent(self) -> Limit:
        burst = self.burst_units
        if self.unit == "requests" and self.cost > burst:
            raise ValueError(f"cost {self.cost} exceeds burst {burst}: no request could pass")
        if self.unit == "tokens" and self.cost != 1.0:
            raise ValueError("cost applies to request limits; token limits charge tokens")
        fallback_burst = burst * self.local_share
        if self.on_redis_error == "open" and self.unit == "requests" and fallback_burst < self.cost:
            raise ValueError(
                f"burst x local_share = {fallback_burst:g} is below one request's cost: "
                "the fallback would refuse everything"
            )
        if self.lease_share:
            if self.unit != "requests" or self.max_wait_ms:
                raise ValueError(
                    "lease_share applies to request limits without max_wait_ms (token "
                    "limits settle per request; smoothing needs each request's exact turn)"
                )
            if self.lease_share * burst < 2 * self.cost:
                raise ValueError(
                    f"lease_share x burst = {self.lease_share * burst:g} holds fewer than two "
                    "requests: nothing to lease"
                )
        if len(set(self.key)) != len(self.key):
            raise ValueError("key lists a part twice")
        return self

    @property
    def burst_units(self) -> float:
        return self.burst if self.burst is not None else self.rate


class RateLimitParams(FilterParams):
    limits: Annotated[list[Limit], Field(min_length=1)]
    # Redis key prefix; keys are <prefix>:{<hash tag>}:<limit>:<digest of the key's values>.
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,32}$")] = "fw:rl"
    # Latency budget against a silent Redis: when Redis owes answers and has given none for
    # this long, it counts as down and each limit's on_redis_error applies. A process too
    # loaded to read Redis' replies in time is not a Redis failure (falling back then would
    # admit beyond the shared limit): the check waits on, up to max_check_ms, then sheds the
    # request (503 overloaded). Keep max_check_ms below the processor's message_timeout_ms.
    # Redis itself can go a while without CPU on a loaded host: 200 ms rather than tens.
    timeout_ms: Annotated[float, Field(gt=0, le=5000)] = 200.0
    max_check_ms: Annotated[float, Field(gt=0, le=30_000)] = 400.0
    # After a Redis failure, checks go straight to the fallback for this long, then retry.
    retry_redis_ms: Annotated[float, Field(ge=0, le=60_000)] = 1000.0
    # Proxies in front of Envoy whose x-forwarded-for entries are trusted (0: the client is
    # Envoy's peer). Entries a client wrote itself are never used.
    trusted_hops: Annotated[int, Field(ge=0, le=10)] = 0
    # Add RateLimit-Policy / RateLimit headers to admitted responses too (costs a phase).
    response_headers: bool = False
    # Remember "over limit until T" per key and refuse locally until then.
    local_deny_cache: bool = True
    # How long leased units stay usable (limits with lease_share > 0); also how far ahead of
    # its use a unit can be counted.
    lease_ms: Annotated[float, Field(gt=0, le=10_000)] = 100.0

    @model_validator(mode="after")
    def _unique(self) -> RateLimitParams:
        names = [lim.name for lim in self.limits]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate limit names: {sorted(dup)}")
        return self
