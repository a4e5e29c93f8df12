"""``POST /v1/chat/completions`` (non-streaming) <-> a KServe v2 infer on a text-generation
model with the ``sim_llm`` contract: inputs PROMPT (BYTES), MAX_TOKENS (INT32), TEMPERATURE
(FP32); outputs TEXT, PROMPT_TOKENS, COMPLETION_TOKENS, FINISH_REASON.

The conversation is flattened into one prompt, a line per message (``role: content``) and a
final ``assistant:``; a real OpenAI-compatible upstream needs no translation and takes a plain
passthrough route instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

from filters.openai.embeddings import Accepted, bad, given, refuse_unsupported, resolve_model
from filters.openai.params import ChatModel
from proxy import errors
from proxy.api import Decision, Usage

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(slots=True)
class ChatCall:
    model: str
    spec: ChatModel
    max_tokens: int
    prompt_chars: int
    prompt: str = ""
    temperature: float = 1.0
    stream: bool = False
    include_usage: bool = False


def content_text(content: Any) -> str | None:
    """The text of a message's content: a string, or text parts joined; None otherwise."""
    if isinstance(content, str):
        return content
    # The array form: [{"type": "text", "text": ...}, ...]; other part types are not supported.
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _typed(kind: type, what: str) -> tuple[Callable[[Any], bool], str]:
    """Any value of ``kind``: for parameters that change nothing the model does."""

    def ok(v: Any) -> bool:
        return isinstance(v, kind) and (kind is bool or not isinstance(v, bool))

    return ok, f"must be {what}"


def _neutral(*values: Any) -> tuple[Callable[[Any], bool], str]:
    """Only the values that leave the answer as it is; a boolean never stands for 0 or 1."""

    def ok(v: Any) -> bool:
        return any(v == n and isinstance(v, bool) == isinstance(n, bool) for n in values)

    shown = ", ".join([*(orjson.dumps(n).decode() for n in values), "null"])
    return ok, f"is not supported by the served models (accepted: {shown})"


# Parameters the translation reads; any other must be in _ACCEPTED (see embeddings.Accepted).
_HANDLED = frozenset({"model", "messages", "stream", "stream_options", "n", "max_tokens",
                      "max_completion_tokens", "temperature"})  # fmt: skip
_ACCEPTED: Accepted = {
    # The caller's own bookkeeping, storage and routing hints: the answer is the same.
    "user": _typed(str, "a string"),
    "safety_identifier": _typed(str, "a string"),
    "prompt_cache_key": _typed(str, "a string"),
    "metadata": _typed(dict, "an object"),
    "store": _typed(bool, "a boolean"),
    "service_tier": _typed(str, "a string"),
    "seed": _typed(int, "an integer"),
    "parallel_tool_calls": _typed(bool, "a boolean"),  # no tools are offered to call
    # Sampling and output controls the served models lack, at the values that need none.
    "top_p": _neutral(1),
    "presence_penalty": _neutral(0),
    "frequency_penalty": _neutral(0),
    "logit_bias": _neutral({}),
    "logprobs": _neutral(False),
    "top_logprobs": _neutral(0),
    "stop": _neutral("", []),
    "tools": _neutral([]),
    "tool_choice": _neutral("none", "auto"),  # with no tools, neither calls one
    "functions": _neutral([]),
    "function_call": _neutral("none", "auto"),
    "response_format": _neutral({"type": "text"}),
    "modalities": _neutral(["text"]),
    # OpenAI parameters without a value that changes nothing: null (as if absent) only.
    **{k: _neutral()
       for k in ("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity")},
}  # fmt: skip
_STREAM_OPTIONS = frozenset({"include_usage", "include_obfuscation"})


def parse(
    req: dict[str, Any], models: dict[str, ChatModel]
) -> tuple[ChatCall, list[dict[str, Any]], list[dict[str, Any]]] | Decision:
    found = resolve_model(req, models)
    if not isinstance(found, tuple):
        return found
    model, spec = found
    refused = refuse_unsupported(req, _HANDLED, _ACCEPTED)
    if refused is not None:
        return refused
    stream = given(req, "stream", False)
    if not isinstance(stream, bool):
        return bad("'stream' must be a boolean")
    if stream and spec.stream_model is None:
        return bad(f"'stream': true is not available for {model}")
    options = given(req, "stream_options", {})
    if not isinstance(options, dict):
        return bad("'stream_options' must be an object")
    if req.get("stream_options") is not None and not stream:
        # As OpenAI: options of a stream that is not asked for would be silently unused.
        return bad("'stream_options' is only allowed when 'stream' is true")
    for key in options:
        if key not in _STREAM_OPTIONS:
            return bad(f"'stream_options'.{key[:100]!r} is not a supported option")
    include_usage = given(options, "include_usage", False)
    # include_obfuscation pads events against length side channels; plain events are valid.
    if not isinstance(include_usage, bool) or not isinstance(
        given(options, "include_obfuscation", True), bool
    ):
        return bad("'stream_options' values must be booleans")
    n = given(req, "n", 1)
    if n != 1 or isinstance(n, bool):
        return bad("'n' must be 1")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        return bad("'messages' must be a non-empty array")
    lines = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            return bad(f"'messages'[{i}] needs a 'role' among {sorted(ROLES)}")
        text = content_text(m.get("content"))
        if text is None:
            return bad(f"'messages'[{i}].content must be a string or text parts")
        lines.append(f"{role}: {text}")
    prompt = "\n".join(lines) + "\nassistant:"
    if len(prompt) > spec.max_prompt_chars:
        return errors.error(
            413, "input_too_large",
            f"the conversation has {len(prompt)} characters; at most {spec.max_prompt_chars}",
        )  # fmt: skip
    # max_completion_tokens replaced max_tokens; a null in either reads as absent.
    limit_key = "max_completion_tokens"
    if req.get(limit_key) is None:
        limit_key = "max_tokens"
    max_tokens = given(req, limit_key, spec.default_max_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return bad(f"{limit_key!r} must be a positive integer")
    if max_tokens > spec.max_tokens_limit:
        return bad(f"{limit_key!r} must be at most {spec.max_tokens_limit} for {model}")
    temperature = given(req, "temperature", 1.0)
    if not _number(temperature) or not (0 <= temperature <= 2):
        return bad("'temperature' must be a number between 0 and 2")
    inputs = [
        {"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]},
        {"name": "MAX_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]},
        {"name": "TEMPERATURE", "shape": [1, 1], "datatype": "FP32", "data": [float(temperature)]},
    ]
    outputs = [{"name": n} for n in ("TEXT", "PROMPT_TOKENS", "COMPLETION_TOKENS", "FINISH_REASON")]
    call = ChatCall(model, spec, max_tokens, len(prompt), prompt, float(temperature), stream,
                    include_usage)  # fmt: skip
    return call, inputs, outputs


def generate_body(call: ChatCall, parameters: dict[str, int]) -> bytes:
    """Triton's generate_stream request for the decoupled model: inputs by name."""
    body: dict[str, Any] = {
        "PROMPT": call.prompt,
        "MAX_TOKENS": call.max_tokens,
        "TEMPERATURE": call.temperature,
    }
    if parameters:
        body["parameters"] = parameters
    return orjson.dumps(body)


class StreamTranslator:
    """Triton's generate_stream events (``data: {"TEXT": ...}``, the last with the counts and
    FINISH_REASON) -> OpenAI ``chat.completion.chunk`` events, chunk by chunk: an event may
    arrive split across chunks, so the unfinished tail waits for the next one."""

    def __init__(self, call: ChatCall, request_id: str) -> None:
        self.call = call
        self.head = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": call.model,
        }
        self.pending = b""
        self.started = False
        self.usage: Usage | None = None
        self.done = False
        # Why the stream failed, once it did (its error event went to the client).
        self.error: str | None = None

    def feed(self, chunk: bytes, last: bool) -> bytes:
        data = self.pending + chunk
        events, _, self.pending = data.rpartition(b"\n\n")
        out = [self._event(e) for e in events.split(b"\n\n") if e.strip()] if events else []
        if last:
            if self.pending.strip():
                out.append(self._event(self.pending))
                self.pending = b""
            if not self.done:  # the model's stream ended without its final event
                self.error = self.error or "ended_early"
                ended = {"type": "upstream_error", "message": "the model's stream ended early"}
                out.append(_sse({"error": ended}))
            out.append(b"data: [DONE]\n\n")
        return b"".join(out)

    def _event(self, raw: bytes) -> bytes:
        # Never raises: a fault here would cut the client's stream without its [DONE].
        text = raw.strip()
        if not text.startswith(b"data:"):
            return b""
        try:
            ev = orjson.loads(text[5:].strip())
        except orjson.JSONDecodeError:
            ev = None
        if not isinstance(ev, dict):
            self.error = self.error or "unreadable_event"
            return _sse({"error": {"type": "upstream_error", "message": "unreadable model event"}})
        if "error" in ev:
            self.done = True
            self.error = self.error or "model_error"
            return _sse({"error": {"type": "upstream_error", "message": str(ev["error"])}})
        out = []
        delta: dict[str, str] = {"content": str(ev.get("TEXT", ""))}
        if not self.started:
            delta = {"role": "assistant", **delta}
            self.started = True
        out.append(self._chunk(delta, None))
        if "FINISH_REASON" in ev:
            self.done = True
            prompt, completion = ev.get("PROMPT_TOKENS"), ev.get("COMPLETION_TOKENS")
            # Counts the model did not give as numbers are unknown, not 0: usage stays None.
            if _count(prompt) and _count(completion):
                self.usage = Usage(prompt, completion)
            out.append(self._chunk({}, str(ev["FINISH_REASON"])))
            if self.call.include_usage and self.usage is not None:
                out.append(_sse({**self.head, "choices": [], "usage": _usage(self.usage)}))
        return b"".join(out)

    def _chunk(self, delta: dict[str, str], finish: str | None) -> bytes:
        return _sse({**self.head, "choices": [{"index": 0, "delta": delta,
                                                "finish_reason": finish}]})  # fmt: skip


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _usage(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total}  # fmt: skip


def render(resp: dict[str, Any], call: ChatCall, request_id: str) -> tuple[bytes, Usage]:
    out = {o["name"]: o["data"][0] for o in resp["outputs"]}
    usage = Usage(int(out["PROMPT_TOKENS"]), int(out["COMPLETION_TOKENS"]))
    body = orjson.dumps(
        {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": str(out["TEXT"])},
                    "finish_reason": str(out["FINISH_REASON"]),
                }
            ],
            "usage": _usage(usage),
        }
    )
    return body, usage
