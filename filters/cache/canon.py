"""What a request is, for the cache: its exact key, its semantic text and partition.

- **exact id**: a digest of the canonical request (keys sorted, fields that do not change the
  output dropped), so ``{"b":1,"a":2}`` and ``{"a":2,"b":1}`` are one entry;
- **semantic text**: the last user message (chat), ``prompt`` (completions) or the text at a
  configured JSON pointer; None when the request has none (then exact-only);
- **partition**: a digest of everything but that text (earlier turns of the conversation,
  the system prompt, every sampling parameter), so a paraphrased last question only ever
  matches entries with the very same conversation and parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from filters.openai.chat import content_text


def _is(kind: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, kind)


# Fields that never change the answer (streaming is decided before caching), per API, with
# the values its API filter accepts (filters/openai; null reads as absent). Only those are
# left out of the key: any other value stays in it, so such a request can never hit the
# entry of a valid one, and reaches the API filter, which refuses it.
IGNORABLE: dict[str, dict[str, Callable[[Any], bool]]] = {
    # stream_options only with "stream": true, which is never cached: not neutral here.
    "openai_chat": {"stream": _is(bool), "user": _is(str), "metadata": _is(dict),
                    "store": _is(bool), "service_tier": _is(str)},
    "openai_embeddings": {"stream": _is(bool), "user": _is(str)},
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Lookup:
    model: str
    exact_id: str
    partition: str
    text: str | None


class NotCacheable(Exception):
    """The request may be valid but its answer must not come from (or go to) the cache."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        # orjson reads 1,024 levels of nesting but writes 255: such a body (valid JSON the
        # API filter may accept) is served uncached, not a filter fault per request.
        raise NotCacheable("too_deep") from None


def pointer(doc: Any, ptr: str) -> Any:
    """RFC 6901 JSON pointer resolution; None when the path does not exist."""
    if ptr == "":
        return doc
    for raw in ptr.split("/")[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict):
            doc = doc.get(token)
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            return None
    return doc


def lookup(
    req: Any,
    *,
    api: str,
    model: str | None,
    max_temperature: float,
    text_pointer: str | None = None,
) -> Lookup:
    """The cache identity of a parsed request body; raises NotCacheable."""
    if not isinstance(req, dict):
        raise NotCacheable("not_json_object")
    if req.get("stream") is True:
        raise NotCacheable("streamed")
    ignorable = IGNORABLE.get(api, {})
    body = {k: v for k, v in req.items()
            if k not in ignorable or not (v is None or ignorable[k](v))}  # fmt: skip
    if api.startswith("openai"):
        model = req.get("model")
        if not isinstance(model, str) or not model:
            raise NotCacheable("no_model")
    if model is None:
        raise NotCacheable("no_model")
    text: str | None = None
    rest: Any = body
    if api == "openai_chat":
        temperature = req.get("temperature", 1.0)
        if not isinstance(temperature, int | float) or temperature > max_temperature:
            raise NotCacheable("nondeterministic")
        messages = req.get("messages")
        if isinstance(messages, list) and messages:
            last = messages[-1]
            if isinstance(last, dict) and last.get("role") == "user":
                text = content_text(last.get("content"))
                if text is not None:
                    rest = dict(body, messages=[*messages[:-1], {"role": "user"}])
    elif api == "openai_completions":
        if isinstance(req.get("prompt"), str):
            text = req["prompt"]
            rest = {k: v for k, v in body.items() if k != "prompt"}
    elif api != "openai_embeddings" and text_pointer:
        found = pointer(req, text_pointer)
        if isinstance(found, str):
            text = found
            rest = _without(body, text_pointer)
    canonical = _dumps(body)
    return Lookup(
        model=model,
        exact_id=_digest(model.encode(), canonical),
        partition=_digest(model.encode(), _dumps(rest)),
        text=text if text and text.strip() else None,
    )


def _without(doc: Any, ptr: str) -> Any:
    """A copy of ``doc`` with the value at ``ptr`` replaced by a marker."""
    copy = orjson.loads(orjson.dumps(doc))
    parts = [p.replace("~1", "/").replace("~0", "~") for p in ptr.split("/")[1:]]
    node = copy
    for token in parts[:-1]:
        node = node[int(token)] if isinstance(node, list) else node[token]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = "\x00text"
    else:
        node[last] = "\x00text"
    return copy
