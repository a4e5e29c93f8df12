"""OpenAI-compatible ``POST /v1/embeddings`` and ``POST /v1/chat/completions`` translated to and
from Triton's KServe v2 infer.

Request: validates the OpenAI body, rewrites it to a KServe v2 JSON infer request (with the
request's Triton priority and remaining deadline as request parameters) and the path to
``/v2/models/{triton_model}/infer``. Response: turns Triton's outputs into the OpenAI format
with ``usage``; upstream errors (Triton's or Envoy's) become the gateway's JSON error format.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import Counter, Histogram

from filters.openai import chat, embeddings
from filters.openai.params import OpenAIParams
from proxy import errors, metrics
from proxy.api import (
    CONTINUE,
    Decision,
    Deps,
    Filter,
    Headers,
    Mutate,
    Outcome,
    Phase,
    RequestContext,
    Usage,
)
from proxy.config import RouteConfig

_APIS = frozenset({"openai_embeddings", "openai_chat"})

# OpenTelemetry GenAI semantic conventions (metric and attribute names with dots as
# underscores, as Prometheus needs them; the spec's recommended buckets).
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per call (OTel gen_ai.client.token.usage)",
    ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304),
)
REQUEST_SECONDS = Histogram(
    "gen_ai_server_request_duration_seconds",
    "Duration of answered model calls (OTel gen_ai.server.request.duration)",
    ["gen_ai_operation_name", "gen_ai_request_model"],
    buckets=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96),
)
FIRST_TOKEN_SECONDS = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "Time to the first streamed chunk (OTel gen_ai.server.time_to_first_token)",
    ["gen_ai_request_model"],
    buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0),
)
TOKENS = Counter(
    "floodwall_tokens",
    'Tokens of answered calls by tenant ("all" unless tenant_metrics), model and type',
    ["tenant", "model", "type"],
)


@dataclass(slots=True)
class _State:
    call: embeddings.EmbeddingsCall | chat.ChatCall | None = None
    stream: chat.StreamTranslator | None = None
    first_chunk: bool = True
    stream_failed: bool = False
    envoy_error: str | None = None  # x-floodwall-error of Envoy's own reply, if it was one


class OpenAIFilter(Filter):
    Params = OpenAIParams

    def __init__(self, params: OpenAIParams, deps: Deps) -> None:
        super().__init__(params, deps)
        self.p = params
        for name, e in params.embedding_models.items():
            deps.signals.backend_models[name] = e.triton_model
        for name, c in params.chat_models.items():
            deps.signals.backend_models[name] = c.triton_model

    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        if route.api == "jobs":  # a batch envelope: its token estimate, nothing rewritten
            return frozenset({Phase.REQUEST_BODY})
        return frozenset(Phase) if route.api in _APIS else frozenset()

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        if not ctx.has_request_body:
            return embeddings.bad("request body is required (a JSON object)")
        # The content-type is not checked: many clients (curl -d) mislabel JSON; the body
        # must parse as JSON either way.
        return CONTINUE

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        if ctx.route is not None and ctx.route.api == "jobs":
            self._estimate_envelope(ctx, body)
            return CONTINUE
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            return embeddings.bad("request body is not valid JSON")
        if not isinstance(req, dict):
            return embeddings.bad("request body must be a JSON object")
        parsed = (
            chat.parse(req, self.p.chat_models)
            if ctx.route is not None and ctx.route.api == "openai_chat"
            else embeddings.parse(req, self.p.embedding_models)
        )
        if not isinstance(parsed, tuple):
            return parsed
        call, inputs, outputs = parsed
        ctx.state(_State).call = call
        ctx.model = call.model
        ctx.token_estimate = self._estimate(call)
        params = self._triton_parameters(ctx)
        if isinstance(call, chat.ChatCall) and call.stream:
            assert call.spec.stream_model is not None
            path = f"/v2/models/{call.spec.stream_model}/generate_stream"
            out = chat.generate_body(call, params)
        else:
            path = f"/v2/models/{call.spec.triton_model}/infer"
            infer: dict[str, Any] = {"inputs": inputs, "outputs": outputs}
            if params:
                infer["parameters"] = params
            out = orjson.dumps(infer)
        return Mutate(
            set_headers={
                ":path": path,
                "content-type": "application/json",
                "content-length": str(len(out)),
            },
            # We parse Triton's answer: it must not come back compressed.
            remove_headers=("accept-encoding",),
            body=out,
        )

    def _estimate_envelope(self, ctx: RequestContext, body: bytes) -> None:
        """A ``POST /v1/jobs`` envelope: the tokens its requests may use, summed, so token
        limits charge the job at submission like any call (the jobs filter refuses a bad
        envelope; requests that do not parse here are refused when they run)."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        items = doc.get("requests", [doc]) if isinstance(doc, dict) else None
        if not isinstance(items, list):
            return
        total, models = Usage(0, 0), set()
        for item in items:
            inner = item.get("body") if isinstance(item, dict) else None
            if not isinstance(inner, dict):
                continue
            url = item.get("url")
            parsed = (
                chat.parse(inner, self.p.chat_models) if url == "/v1/chat/completions"
                else embeddings.parse(inner, self.p.embedding_models) if url == "/v1/embeddings"
                else None
            )  # fmt: skip
            if not isinstance(parsed, tuple):
                continue
            u = self._estimate(parsed[0])
            total.prompt_tokens += u.prompt_tokens
            total.completion_tokens += u.completion_tokens
            models.add(parsed[0].model)
        if models:
            ctx.token_estimate = total
            # Limits keyed by model see the job's model (the jobs filter refuses a job that
            # mixes models; with another filter in its place, a mixed job has none).
            ctx.model = models.pop() if len(models) == 1 else None

    def _estimate(self, call: embeddings.EmbeddingsCall | chat.ChatCall) -> Usage:
        """Most tokens the call can use: the prompt estimated from its length (never below
        one token per text), plus the completion's ceiling for chat."""
        cpt = self.p.chars_per_token
        if isinstance(call, chat.ChatCall):
            return Usage(max(1, math.ceil(call.prompt_chars / cpt)), call.max_tokens)
        return Usage(sum(max(1, math.ceil(n / cpt)) for n in call.input_chars))

    def _triton_parameters(self, ctx: RequestContext) -> dict[str, int]:
        """Priority level and remaining deadline (µs), so Triton's queue policy can serve
        important requests first and drop ones that can no longer succeed."""
        params: dict[str, int] = {}
        if ctx.priority is not None and ctx.priority in self.p.triton_priority:
            params["priority"] = self.p.triton_priority[ctx.priority]
        if ctx.deadline is not None:
            params["timeout"] = max(1, int((ctx.deadline - time.monotonic()) * 1e6))
        return params

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        st = ctx.state(_State)
        st.envoy_error = headers.get(errors.ERROR_HEADER)  # Envoy's own reply, already typed
        call = st.call
        if isinstance(call, chat.ChatCall) and call.stream and ctx.response_status == 200:
            # Server-sent events, translated chunk by chunk as Triton produces them.
            st.stream = chat.StreamTranslator(call, ctx.request_id)
            return Mutate(
                set_headers={"content-type": "text/event-stream", "cache-control": "no-cache"},
                remove_headers=("content-length",),
                stream_response=True,
            )
        # Otherwise needed so the chain records the status before the body arrives; the body
        # phase rewrites the headers once the new length is known.
        return CONTINUE

    async def on_response_body(self, ctx: RequestContext, body: bytes) -> Decision:
        st = ctx.state(_State)
        if st.stream is not None and ctx.response_streamed:
            if st.first_chunk and body:
                st.first_chunk = False
                FIRST_TOKEN_SECONDS.labels(ctx.model or "-").observe(time.monotonic() - ctx.started)
            out = st.stream.feed(body, ctx.end_of_stream)
            # As soon as the model's final event gave the counts: a client that leaves before
            # the stream's end still settles (rate_limit) and counts the tokens it was sent.
            ctx.usage = st.stream.usage
            if st.stream.error is not None and not st.stream_failed:
                # The model failed after its 200: the client reads an error event. Counted,
                # and a 502 to whoever judges the model's health (breaker, metrics), not the
                # success its status said.
                st.stream_failed = True
                metrics.UPSTREAM_ERRORS.labels(ctx.route_name, f"stream_{st.stream.error}").inc()
                ctx.response_status = ctx.upstream_status = 502
            return Mutate(body=out)
        call = st.call
        status = ctx.response_status or 0
        if status != 200 or call is None:
            return _upstream_error(ctx, status, body, st.envoy_error)
        try:
            resp = orjson.loads(body)
            out, ctx.usage = (
                chat.render(resp, call, ctx.request_id)
                if isinstance(call, chat.ChatCall)
                else embeddings.render(resp, call)
            )
        except (ValueError, KeyError, TypeError, IndexError) as e:
            metrics.UPSTREAM_ERRORS.labels(ctx.route_name, "bad_body").inc()
            return _rewrite(
                errors.error(502, "upstream_error", f"unexpected response from model: {e}")
            )
        return Mutate(
            set_headers={"content-type": "application/json", "content-length": str(len(out))},
            body=out,
        )

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        call = ctx.state(_State).call
        if call is None or outcome.status != 200 or outcome.responded_by is not None:
            return
        op = "chat" if isinstance(call, chat.ChatCall) else "embeddings"
        model = ctx.model or "-"
        if not outcome.aborted:  # an aborted call's duration is the client's, not the model's
            REQUEST_SECONDS.labels(op, model).observe(outcome.duration_s)
        u = ctx.usage
        if u is None:
            return
        tenant = (ctx.tenant or "-") if self.p.tenant_metrics else "all"
        for kind, n in (("input", u.prompt_tokens), ("output", u.completion_tokens)):
            if kind == "output" and op == "embeddings":
                continue
            TOKEN_USAGE.labels(op, model, kind).observe(n)
            TOKENS.labels(tenant, model, kind).inc(n)


def _upstream_error(
    ctx: RequestContext, status: int, body: bytes, envoy_type: str | None = None
) -> Decision:
    """Triton's ``{"error": "..."}`` or Envoy's (mapped) local reply -> our error format."""
    metrics.UPSTREAM_ERRORS.labels(ctx.route_name, str(status)).inc()
    detail = _error_detail(body)
    if envoy_type == "upstream_reset":  # the connection broke: not an answer of the model's
        r = errors.error(502, "upstream_reset", f"the connection to the model was reset: {detail}")
    elif _triton_refused(detail):
        r = errors.error(
            503, "model_overloaded", f"the model's queue refused the request: {detail}",
            retry_after_s=1,
        )  # fmt: skip
    elif status == 400:
        r = errors.error(400, "invalid_request_error", f"model rejected the input: {detail}")
    elif status == 504:
        r = errors.error(504, "upstream_timeout", "the model did not answer in time")
    elif status in (404, 503) or status == 0:
        r = errors.error(
            503, "upstream_unavailable", f"the model is unavailable: {detail or status}",
            retry_after_s=1,
        )  # fmt: skip
    else:
        r = errors.error(502, "upstream_error", f"the model failed ({status}): {detail}")
    return _rewrite(r)


def _error_detail(body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        detail = body[:200].decode("utf-8", "replace").strip()
        if detail.startswith("data:"):  # an event-stream error: data: {"error": "..."}
            return _error_detail(body.strip()[5:])
        return detail
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(err, str):  # Triton: {"error": "..."}
        return err
    if isinstance(err, dict) and isinstance(err.get("message"), str):  # Envoy, mapped
        return str(err["message"])
    return ""


# Triton's words when its queue policy refuses a request (queue full, or the request's timeout
# expired in the queue); it answers those with 400/503 depending on the version.
_REFUSALS = ("exceeds maximum queue size", "timeout expired", "request timeout expired")


def _triton_refused(detail: str) -> bool:
    low = detail.lower()
    return any(word in low for word in _REFUSALS)


def _rewrite(r: Any) -> Decision:
    # The response phase rewrites status, headers and body of the upstream's reply.
    return Mutate(
        set_headers={":status": str(r.status), **r.headers, "content-length": str(len(r.body))},
        body=r.body,
    )
