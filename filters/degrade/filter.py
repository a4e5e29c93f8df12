"""Degradation: send eligible requests to a lighter model while the one they asked for is
failing, instead of refusing them.

Triggers: the model's breaker would refuse the call (open, or half-open with all trial
permits taken), or, with ``saturation`` configured, Triton reports the model saturated (mean
queue time over the last quarter second, or pending requests, above a threshold). Then
non-exempt requests go to the lighter model (``embedder`` -> ``embedder_int8``: same output
shape, cosine 0.995 to fp32) and the response says so in ``x-floodwall-degraded``. Place it
after ``openai`` (it reads ``ctx.model``) and before ``breaker`` (which then judges the
lighter model's own health).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prometheus_client import Counter

from filters.degrade.params import DegradeParams
from proxy.api import CONTINUE, Decision, Deps, Filter, Headers, Mutate, Phase, RequestContext
from proxy.config import RouteConfig
from proxy.triton_load import TritonLoad

DEGRADED = Counter(
    "floodwall_degraded", "Requests sent to a lighter model, by model asked for and model used",
    ["model", "to"],
)  # fmt: skip

_MODEL_IN_PATH = re.compile(r"^/v2/models/([^/?]+)")


@dataclass(slots=True)
class _State:
    to: str | None = None


class DegradeFilter(Filter):
    Params = DegradeParams

    def __init__(self, params: DegradeParams, deps: Deps) -> None:
        super().__init__(params, deps)
        self.p = params
        self.load: TritonLoad | None = None

    async def start(self) -> None:
        if self.p.saturation is not None:
            self.load = self.deps.signals.watch_triton(self.p.saturation.triton_metrics_url)

    async def stop(self) -> None:
        if self.p.saturation is not None:
            await self.deps.signals.unwatch_triton(self.p.saturation.triton_metrics_url)

    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        if route.api == "kserve_grpc":
            return frozenset()  # the model is inside the protobuf body: not rewritable here
        step = Phase.REQUEST_BODY if route.model_in_body else Phase.REQUEST_HEADERS
        return frozenset({Phase.REQUEST_HEADERS, step, Phase.RESPONSE_HEADERS})

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        if ctx.route is not None and ctx.route.model_in_body:
            return CONTINUE  # the model is known once the openai filter parsed the body
        return self._steer(ctx)

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        return self._steer(ctx)

    def _steer(self, ctx: RequestContext) -> Decision:
        model = ctx.model
        if model is None or model not in self.p.lighter:
            return CONTINUE
        if (ctx.priority or "standard") in self.p.exempt_priorities or (
            ctx.tier in self.p.exempt_tiers
        ):
            return CONTINUE
        m = _MODEL_IN_PATH.match(ctx.upstream_path)
        if m is None:
            return CONTINUE
        now = self.deps.clock.monotonic()
        if not (self.deps.signals.refusing(model, now) or self._saturated(m.group(1), now)):
            return CONTINUE
        to = self.p.lighter[model]
        path = f"/v2/models/{to}" + ctx.upstream_path[m.end() :]
        ctx.state(_State).to = to
        ctx.model = to
        DEGRADED.labels(model, to).inc()
        return Mutate(set_headers={":path": path})

    def _saturated(self, triton_model: str, now: float) -> bool:
        sat = self.p.saturation
        if sat is None or self.load is None:
            return False
        return sat.saturated(self.load.models.get(triton_model), now)

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        to = ctx.state(_State).to
        if to is None:
            return CONTINUE
        return Mutate(set_headers={"x-floodwall-degraded": to})
