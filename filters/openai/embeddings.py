"""``POST /v1/embeddings``: the OpenAI body <-> a KServe v2 infer on an embedding model."""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson

from filters.openai.params import EmbeddingModel
from proxy import errors
from proxy.api import Decision, Usage

M = TypeVar("M")


@dataclass(slots=True)
class EmbeddingsCall:
    model: str
    spec: EmbeddingModel
    count: int
    encoding: str
    input_chars: list[int]


def parse(
    req: dict[str, Any], models: dict[str, EmbeddingModel]
) -> tuple[EmbeddingsCall, list[dict[str, Any]], list[dict[str, Any]]] | Decision:
    """Validates the OpenAI request: (call, KServe inputs, KServe outputs) or a refusal."""
    found = resolve_model(req, models)
    if not isinstance(found, tuple):
        return found
    model, spec = found
    refused = refuse_unsupported(req, _HANDLED, _ACCEPTED)
    if refused is not None:
        return refused
    texts = req.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return bad("'input' must be a string or an array of strings (token arrays are "
                   "not supported)")  # fmt: skip
    if not texts:
        return bad("'input' must not be empty")
    if len(texts) > spec.max_inputs:
        return errors.error(
            413, "input_too_large",
            f"'input' has {len(texts)} items; at most {spec.max_inputs} per request",
        )  # fmt: skip
    for i, t in enumerate(texts):
        if not t.strip():
            return bad(f"'input'[{i}] is empty")
        if len(t) > spec.max_input_chars:
            return errors.error(
                413, "input_too_large",
                f"'input'[{i}] has {len(t)} characters; at most {spec.max_input_chars}",
            )  # fmt: skip
    encoding = given(req, "encoding_format", "float")
    if encoding not in ("float", "base64"):
        return bad("'encoding_format' must be 'float' or 'base64'")
    dims = req.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or dims != spec.dimensions):
        return bad(f"'dimensions' must be {spec.dimensions} for {model}")
    inputs = [
        {"name": spec.input_name, "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}
    ]
    outputs = [{"name": spec.output_name}]
    if spec.tokens_output:
        outputs.append({"name": spec.tokens_output})
    call = EmbeddingsCall(model, spec, len(texts), encoding, [len(t) for t in texts])
    return call, inputs, outputs


def render(resp: dict[str, Any], call: EmbeddingsCall) -> tuple[bytes, Usage | None]:
    """The OpenAI body, and the token usage when the model reports it."""
    outputs = {o["name"]: o for o in resp["outputs"]}
    emb = outputs[call.spec.output_name]
    dim = emb["shape"][-1]
    flat = emb["data"]
    if len(flat) != call.count * dim:
        raise ValueError(f"expected {call.count}x{dim} values, got {len(flat)}")
    usage: Usage | None = None
    if call.spec.tokens_output and call.spec.tokens_output in outputs:
        usage = Usage(int(sum(outputs[call.spec.tokens_output]["data"])))
    tokens = usage.prompt_tokens if usage is not None else 0
    data: list[dict[str, Any]] = []
    for i in range(call.count):
        vec = flat[i * dim : (i + 1) * dim]
        value: Any = (
            base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
            if call.encoding == "base64"
            else vec
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    body = orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
    return body, usage


def resolve_model(req: dict[str, Any], models: dict[str, M]) -> tuple[str, M] | Decision:
    """The request's ``model`` and its configured spec, or the OpenAI-style refusal."""
    model = req.get("model")
    if not isinstance(model, str) or not model:
        return bad("'model' is required and must be a string")
    spec = models.get(model)
    if spec is None:
        return unknown_model(model, models)
    return model, spec


# A parameter the translation does not read -> (does this value change nothing?, what a
# refusal says). OpenAI clients send some of them by default; a value the served models would
# not honour is refused, never ignored: the caller would get an answer it did not ask for.
Accepted = Mapping[str, tuple[Callable[[Any], bool], str]]

_HANDLED = frozenset({"model", "input", "encoding_format", "dimensions"})
_ACCEPTED: Accepted = {
    "user": (lambda v: isinstance(v, str), "must be a string"),
    # Nothing streams here: the answer is one JSON document either way (as OpenAI's).
    "stream": (lambda v: isinstance(v, bool), "must be a boolean"),
}


def given(req: dict[str, Any], key: str, default: Any) -> Any:
    """An optional parameter's value: OpenAI reads an explicit null as the default."""
    value = req.get(key)
    return default if value is None else value


def refuse_unsupported(
    req: dict[str, Any], handled: frozenset[str], accepted: Accepted
) -> Decision | None:
    """The refusal for the first parameter that is neither ``handled`` by the translation nor
    at a value ``accepted`` as changing nothing (null always is); None when there is none."""
    for key, value in req.items():
        if key in handled:
            continue
        rule = accepted.get(key)
        if rule is None:
            return bad(f"{key[:100]!r} is not a supported parameter")
        if value is not None and not rule[0](value):
            return bad(f"{key!r} {rule[1]}")
    return None


def bad(message: str) -> Decision:
    return errors.error(400, "invalid_request_error", message)


def unknown_model(model: str, known: dict[str, Any]) -> Decision:
    return errors.error(
        404, "model_not_found",
        f"model {model[:100]!r} does not exist (known: {', '.join(sorted(known))})",
    )  # fmt: skip
