"""Degradation: send eligible requests to a lighter model while the one they asked for is
failing, instead of refusing them.

Triggers: the model's breaker would refuse the call (open, or half-open with all trial
permits taken); ``admission`` had to make a call for the model wait or refused one within
the last ``pressure_hold_s``; or, with ``saturation`` configured, Triton reports the model
saturated (mean queue time over the last quarter second, or pending requests, above a
threshold). Then non-exempt requests go to the lighter model (``embedder`` ->
``embedder_int8``: same output shape, cosine 0.995 to fp32) and the response says so in
``x-floodwall-degraded``. Not while the lighter model's own breaker would refuse it: that is
a sure 503, where the model asked for may still serve. Place it after ``openai`` (it reads
``ctx.model``) and ``admission``, and before ``breaker`` (which then judges the lighter
model's own health).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from prometheus_client import Counter

from filters.degrade.params import DegradeParams
from proxy.api import CONTINUE, Decision, Deps, Headers, Mutate, RequestContext
from proxy.steering import ModelSteeringFilter, send_to, upstream_model
from proxy.triton_load import TritonLoad

DEGRADED = Counter(
    "floodwall_degraded",
    "Requests sent to a lighter model, by model asked for, model used and why (breaker, "
    "pressure: admission's limit binds, saturation: Triton's queue)",
    ["model", "to", "reason"],
)


@dataclass(slots=True)
class _State:
    to: str | None = None


class DegradeFilter(ModelSteeringFilter):
    Params = DegradeParams

    def __init__(self, params: DegradeParams, deps: Deps) -> None:
        super().__init__(params, deps)
        # Per instance: two of this filter on one route keep their own request state.
        self._state = functools.partial(_State)
        self.p = params
        self.load: TritonLoad | None = None
        self._exempt = frozenset(params.exempt_priorities)

    async def start(self) -> None:
        if self.p.saturation is not None:
            self.load = self.deps.signals.watch_triton(
                self.p.saturation.triton_metrics_url, self.deps.clock
            )

    async def stop(self) -> None:
        if self.p.saturation is not None:
            await self.deps.signals.unwatch_triton(self.p.saturation.triton_metrics_url)

    def steer(self, ctx: RequestContext) -> Decision:
        model = ctx.model
        if model is None or model not in self.p.lighter:
            return CONTINUE
        if (ctx.priority or "standard") in self._exempt or (ctx.tier in self.p.exempt_tiers):
            return CONTINUE
        current = upstream_model(ctx)
        if current is None:
            return CONTINUE
        now = self.deps.clock.monotonic()
        if self.deps.signals.refusing(model, now):
            reason = "breaker"
        elif self._pressed(ctx, now):
            reason = "pressure"
        elif self._saturated(current, now):
            reason = "saturation"
        else:
            return CONTINUE
        to = self.p.lighter[model]
        if self.deps.signals.refusing(to, now):
            return CONTINUE  # a sure 503 there; the model asked for may still serve
        ctx.state(self._state).to = to
        DEGRADED.labels(model, to, reason).inc()
        return send_to(ctx, to)

    def _pressed(self, ctx: RequestContext, now: float) -> bool:
        """Admission lately made calls of a class this filter degrades wait or refused them,
        for the model (or the route), and no call of an exempt class. Once exempt (critical)
        calls wait too, every cycle of the model's hardware goes to them: the lighter model's
        calls would share it and slow them (measured in bench/overload.py: critical calls at
        4x, 80% of capacity on their own, 99.2% served and p99 357 ms with degradation on
        through such waits, against 100% and 133 ms without)."""
        hold = self.p.pressure_hold_s
        if hold is None:
            return False
        recent: set[str] = set()
        for key in (ctx.model, ctx.route_name):
            by_class = self.deps.signals.pressed_at.get(key or "", {})
            recent.update(c for c, at in by_class.items() if now - at <= hold)
        return bool(recent - self._exempt) and not recent & self._exempt

    def _saturated(self, triton_model: str, now: float) -> bool:
        sat = self.p.saturation
        if sat is None or self.load is None:
            return False
        return sat.saturated(self.load.models.get(triton_model), now)

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        to = ctx.state(self._state).to
        if to is None:
            return CONTINUE
        return Mutate(set_headers={"x-floodwall-degraded": to})
