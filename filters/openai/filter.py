"""OpenAI-compatible ``POST /v1/embeddings`` translated to and from Triton's KServe v2 infer.

Request: validates the OpenAI body, rewrites it to a KServe v2 JSON infer request and the path to
``/v2/models/{triton_model}/infer``. Response: turns Triton's outputs into the OpenAI list format
with ``usage``; upstream errors (Triton's or Envoy's) become the gateway's JSON error format.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from filters.openai.params import EmbeddingModel, OpenAIParams
from proxy import errors, metrics
from proxy.api import (
    CONTINUE,
    Decision,
    Deps,
    Filter,
    Headers,
    Mutate,
    Phase,
    RequestContext,
)
from proxy.config import RouteConfig


@dataclass(slots=True)
class _State:
    model: str = ""
    spec: EmbeddingModel | None = None
    count: int = 0
    encoding: str = "float"


def _bad(message: str) -> Decision:
    return errors.error(400, "invalid_request_error", message)


class OpenAIFilter(Filter):
    Params = OpenAIParams

    def __init__(self, params: OpenAIParams, deps: Deps) -> None:
        super().__init__(params, deps)
        self.models = params.embedding_models

    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        if route.api == "openai_embeddings":
            return frozenset(Phase)
        return frozenset()

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        if not ctx.has_request_body:
            return _bad("request body is required (JSON with 'model' and 'input')")
        # The content-type is not checked: many clients (curl -d) mislabel JSON; the body
        # must parse as JSON either way.
        return CONTINUE

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _bad("request body is not valid JSON")
        if not isinstance(req, dict):
            return _bad("request body must be a JSON object")
        model = req.get("model")
        if not isinstance(model, str) or not model:
            return _bad("'model' is required and must be a string")
        spec = self.models.get(model)
        if spec is None:
            return errors.error(
                404, "model_not_found", f"model {model[:100]!r} does not exist (known: "
                f"{', '.join(sorted(self.models))})",
            )  # fmt: skip
        texts = req.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return _bad("'input' must be a string or an array of strings (token arrays are "
                        "not supported)")  # fmt: skip
        if not texts:
            return _bad("'input' must not be empty")
        if len(texts) > spec.max_inputs:
            return errors.error(
                413, "input_too_large",
                f"'input' has {len(texts)} items; at most {spec.max_inputs} per request",
            )  # fmt: skip
        for i, t in enumerate(texts):
            if not t.strip():
                return _bad(f"'input'[{i}] is empty")
            if len(t) > spec.max_input_chars:
                return errors.error(
                    413, "input_too_large",
                    f"'input'[{i}] has {len(t)} characters; at most {spec.max_input_chars}",
                )  # fmt: skip
        encoding = req.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            return _bad("'encoding_format' must be 'float' or 'base64'")
        dims = req.get("dimensions")
        if dims is not None and dims != spec.dimensions:
            return _bad(f"'dimensions' must be {spec.dimensions} for {model}")
        st = ctx.state(_State)
        st.model, st.spec, st.count, st.encoding = model, spec, len(texts), encoding
        outputs = [{"name": spec.output_name}]
        if spec.tokens_output:
            outputs.append({"name": spec.tokens_output})
        infer = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": spec.input_name,
                        "shape": [len(texts), 1],
                        "datatype": "BYTES",
                        "data": texts,
                    }
                ],
                "outputs": outputs,
            }
        )
        return Mutate(
            set_headers={
                ":path": f"/v2/models/{spec.triton_model}/infer",
                "content-type": "application/json",
                "content-length": str(len(infer)),
            },
            # We parse Triton's answer: it must not come back compressed.
            remove_headers=("accept-encoding",),
            body=infer,
        )

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        # Needed so the chain records the status before the body arrives; the body phase
        # rewrites the headers once the new length is known.
        return CONTINUE

    async def on_response_body(self, ctx: RequestContext, body: bytes) -> Decision:
        st = ctx.state(_State)
        status = ctx.response_status or 0
        if status != 200 or st.spec is None:
            return _upstream_error(ctx, status, body)
        try:
            out = _to_openai(orjson.loads(body), st)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            metrics.UPSTREAM_ERRORS.labels(ctx.route_name, "bad_body").inc()
            return errors.error(502, "upstream_error", f"unexpected response from model: {e}")
        return Mutate(
            set_headers={"content-type": "application/json", "content-length": str(len(out))},
            body=out,
        )


def _to_openai(resp: dict[str, Any], st: _State) -> bytes:
    assert st.spec is not None
    outputs = {o["name"]: o for o in resp["outputs"]}
    emb = outputs[st.spec.output_name]
    dim = emb["shape"][-1]
    flat = emb["data"]
    if len(flat) != st.count * dim:
        raise ValueError(f"expected {st.count}x{dim} values, got {len(flat)}")
    tokens = 0
    if st.spec.tokens_output and st.spec.tokens_output in outputs:
        tokens = int(sum(outputs[st.spec.tokens_output]["data"]))
    data: list[dict[str, Any]] = []
    for i in range(st.count):
        vec = flat[i * dim : (i + 1) * dim]
        value: Any = (
            base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
            if st.encoding == "base64"
            else vec
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": st.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _upstream_error(ctx: RequestContext, status: int, body: bytes) -> Decision:
    """Triton's ``{"error": "..."}`` or Envoy's plain-text local reply -> our error format."""
    metrics.UPSTREAM_ERRORS.labels(ctx.route_name, str(status)).inc()
    detail = ""
    try:
        parsed = orjson.loads(body)
        err = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(err, str):  # Triton: {"error": "..."}
            detail = err
        elif isinstance(err, dict) and isinstance(err.get("message"), str):  # Envoy, mapped
            detail = err["message"]
    except orjson.JSONDecodeError:
        detail = body[:200].decode("utf-8", "replace").strip()
    if status == 400:
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
    # The response phase cannot answer "immediately" any more than the request phase can: we
    # rewrite status, headers and body of the upstream's reply instead.
    return Mutate(
        set_headers={
            ":status": str(r.status),
            **r.headers,
            "content-length": str(len(r.body)),
        },
        body=r.body,
    )
