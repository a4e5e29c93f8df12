"""Degradation: send eligible requests to a lighter model while the one they asked for is
failing, instead of refusing them.

Today's trigger is the model's breaker: when it would refuse the call (open, or half-open with
all trial permits taken), non-exempt requests go to the lighter model (``embedder`` ->
``embedder_int8``: same output shape, cosine 0.995 to fp32) and the response says so in
``x-floodwall-degraded``. Place it after ``openai`` (it reads ``ctx.model``) and before
``breaker`` (which then judges the lighter model's own health). Saturation as a trigger needs
the admission filter's load signals (issue #6, not built yet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prometheus_client import Counter

from filters.degrade.params import DegradeParams
from proxy.api import CONTINUE, Decision, Deps, Filter, Headers, Mutate, Phase, RequestContext
from proxy.config import RouteConfig

DEGRADED = Counter(
    "floodwall_degraded", "Requests sent to a lighter model, by model asked for and model used",
    ["model", "to"],
)  # fmt: skip

_BODY_APIS = frozenset({"openai_embeddings", "openai_chat"})
_MODEL_IN_PATH = re.compile(r"^/v2/models/[^/?]+")


@dataclass(slots=True)
class _State:
    to: str | None = None


class DegradeFilter(Filter):
    Params = DegradeParams

    def __init__(self, params: DegradeParams, deps: Deps) -> None:
        super().__init__(params, deps)
        self.p = params

    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        if route.api == "kserve_grpc":
            return frozenset()  # the model is inside the protobuf body: not rewritable here
        step = Phase.REQUEST_BODY if route.api in _BODY_APIS else Phase.REQUEST_HEADERS
        return frozenset({Phase.REQUEST_HEADERS, step, Phase.RESPONSE_HEADERS})

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        if ctx.route is not None and ctx.route.api in _BODY_APIS:
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
        if not self.deps.signals.refusing(model, self.deps.clock.monotonic()):
            return CONTINUE
        to = self.p.lighter[model]
        path, n = _MODEL_IN_PATH.subn(f"/v2/models/{to}", ctx.upstream_path, count=1)
        if not n:
            return CONTINUE
        ctx.state(_State).to = to
        ctx.model = to
        DEGRADED.labels(model, to).inc()
        return Mutate(set_headers={":path": path})

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        to = ctx.state(_State).to
        if to is None:
            return CONTINUE
        return Mutate(set_headers={"x-floodwall-degraded": to})
