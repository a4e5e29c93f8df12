"""A base for policies that send a request to another model than the one it asked for
(``degrade``: to a lighter twin; ``canary``: to a weighted share of versions).

They act once the model is known: from the path on KServe HTTP (request headers), after the
API filter parsed the body on OpenAI routes, or the chain a unary call's message on KServe
gRPC (request body). They rewrite the KServe path Envoy forwards (``/v2/models/{model}/...``)
or, on gRPC, the message (proxy/kserve_grpc.py; a gRPC route they run on then refuses
streams, as any route whose filters read bodies). They also see the response headers, to say
which model answered.
"""

from __future__ import annotations

import re

from proxy import kserve_grpc
from proxy.api import CONTINUE, Decision, Filter, Headers, Mutate, Phase, RequestContext
from proxy.config import RouteConfig

_MODEL_IN_PATH = re.compile(r"^/v2/models/([^/?]+)")


class ModelSteeringFilter(Filter):
    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        step = Phase.REQUEST_BODY if route.model_in_body else Phase.REQUEST_HEADERS
        return frozenset({Phase.REQUEST_HEADERS, step, Phase.RESPONSE_HEADERS})

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        if ctx.route is not None and ctx.route.model_in_body:
            return CONTINUE  # the model is known once the API filter parsed the body
        return self.steer(ctx)

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        return self.steer(ctx)

    def steer(self, ctx: RequestContext) -> Decision:
        """Decides for a request whose model (``ctx.model``) is known."""
        raise NotImplementedError


def upstream_model(ctx: RequestContext) -> str | None:
    """The model the request goes upstream to (the KServe path's, or the gRPC message's), or
    None."""
    if kserve_grpc.on_grpc_route(ctx):
        return kserve_grpc.upstream_model(ctx)
    m = _MODEL_IN_PATH.match(ctx.upstream_path)
    return m.group(1) if m else None


def send_to(ctx: RequestContext, model: str) -> Decision:
    """Sends the request to ``model`` instead; later policies (breaker) judge that model."""
    if kserve_grpc.on_grpc_route(ctx):
        current = kserve_grpc.upstream_model(ctx)
        ctx.model = model
        if current is None or current == model:
            return CONTINUE
        return Mutate(body=kserve_grpc.with_model(ctx, model))
    m = _MODEL_IN_PATH.match(ctx.upstream_path)
    ctx.model = model
    if m is None or m.group(1) == model:
        return CONTINUE
    return Mutate(set_headers={":path": f"/v2/models/{model}" + ctx.upstream_path[m.end() :]})
