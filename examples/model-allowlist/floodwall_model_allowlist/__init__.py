"""Example Floodwall policy: which models each tenant may call.

A complete third-party filter in one file: typed params that fail loudly, the phases it
needs (and only those), a decision per request, a metric with bounded labels, and nothing
that touches Envoy's protobufs. See docs/writing-a-filter.md in the Floodwall repository.
"""

from __future__ import annotations

from typing import Annotated

from prometheus_client import Counter
from pydantic import Field, model_validator

from proxy import errors
from proxy.api import (
    CONTINUE,
    Decision,
    Deps,
    Filter,
    FilterParams,
    Headers,
    Phase,
    RequestContext,
)
from proxy.config import RouteConfig

# Labels: the filter's decision and the tenant only when the operator asks for it (a
# tenant label is unbounded in a multi-tenant deployment), never the key.
DECISIONS = Counter(
    "floodwall_model_allowlist_decisions",
    "Model allowlist decisions (allowed, refused)",
    ["decision"],
)

ModelName = Annotated[str, Field(min_length=1, max_length=256)]


class AllowlistParams(FilterParams):
    # tenant -> the models it may call. Tenants not listed get `default`.
    tenants: dict[str, list[ModelName]] = Field(default_factory=dict)
    # Models every tenant not listed may call; ["*"]: any model.
    default: list[ModelName] = Field(default_factory=lambda: ["*"])

    @model_validator(mode="after")
    def _no_empty_lists(self) -> AllowlistParams:
        empty = [t for t, models in self.tenants.items() if not models]
        if empty:
            raise ValueError(f"tenants {empty} allow no model at all; remove them or list some")
        return self


class ModelAllowlist(Filter):
    Params = AllowlistParams

    def __init__(self, params: AllowlistParams, deps: Deps) -> None:
        super().__init__(params, deps)
        self.p = params
        self.allowed = {t: frozenset(m) for t, m in params.tenants.items()}
        self.default = frozenset(params.default)

    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        # OpenAI routes name the model in the body (the `openai` filter puts it in ctx.model
        # at the body phase), KServe gRPC in its message (the chain reads it at the body
        # phase); KServe HTTP in the path, known from the headers. Asking for the body only
        # where needed keeps the other routes headers-only in Envoy.
        if route.model_in_body:
            return frozenset({Phase.REQUEST_BODY})
        return frozenset({Phase.REQUEST_HEADERS})

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        return self._check(ctx)

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        return self._check(ctx)

    def _check(self, ctx: RequestContext) -> Decision:
        if ctx.model is None:
            return CONTINUE  # not a model call (health, metadata): nothing to decide
        allowed = self.allowed.get(ctx.tenant or "", self.default)
        if "*" in allowed or ctx.model in allowed:
            DECISIONS.labels("allowed").inc()
            return CONTINUE
        DECISIONS.labels("refused").inc()
        return errors.error(403, "model_not_allowed", f"this key may not call model {ctx.model!r}")
