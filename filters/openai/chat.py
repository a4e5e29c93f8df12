"""``POST /v1/chat/completions`` (non-streaming) <-> a KServe v2 infer on a text-generation
model with the ``sim_llm`` contract: inputs PROMPT (BYTES), MAX_TOKENS (INT32), TEMPERATURE
(FP32); outputs TEXT, PROMPT_TOKENS, COMPLETION_TOKENS, FINISH_REASON.

The conversation is flattened into one prompt, a line per message (``role: content``) and a
final ``assistant:``; a real OpenAI-compatible upstream needs no translation and takes a plain
passthrough route instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from filters.openai.embeddings import bad, resolve_model
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


def parse(
    req: dict[str, Any], models: dict[str, ChatModel]
) -> tuple[ChatCall, list[dict[str, Any]], list[dict[str, Any]]] | Decision:
    found = resolve_model(req, models)
    if not isinstance(found, tuple):
        return found
    model, spec = found
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        return bad("'stream' must be a boolean")
    if stream and spec.stream_model is None:
        return bad(f"'stream': true is not available for {model}")
    options = req.get("stream_options") or {}
    if not isinstance(options, dict):
        return bad("'stream_options' must be an object")
    if req.get("n", 1) != 1:
        return bad("'n' must be 1")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        return bad("'messages' must be a non-empty array")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return bad(f"'messages'[{i}] needs a 'role' among {sorted(ROLES)}")
        text = content_text(m.get("content"))
        if text is None:
            return bad(f"'messages'[{i}].content must be a string or text parts")
        lines.append(f"{m['role']}: {text}")
    prompt = "\n".join(lines) + "\nassistant:"
    if len(prompt) > spec.max_prompt_chars:
        return errors.error(
            413, "input_too_large",
            f"the conversation has {len(prompt)} characters; at most {spec.max_prompt_chars}",
        )  # fmt: skip
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens", spec.default_max_tokens))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return bad("'max_tokens' must be a positive integer")
    if max_tokens > spec.max_tokens_limit:
        return bad(f"'max_tokens' must be at most {spec.max_tokens_limit} for {model}")
    temperature = req.get("temperature", 1.0)
    if (
        not isinstance(temperature, int | float)
        or isinstance(temperature, bool)
        or not (0 <= temperature <= 2)
    ):
        return bad("'temperature' must be a number between 0 and 2")
    inputs = [
        {"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]},
        {"name": "MAX_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]},
        {"name": "TEMPERATURE", "shape": [1, 1], "datatype": "FP32", "data": [float(temperature)]},
    ]
    outputs = [{"name": n} for n in ("TEXT", "PROMPT_TOKENS", "COMPLETION_TOKENS", "FINISH_REASON")]
    call = ChatCall(model, spec, max_tokens, len(prompt), prompt, float(temperature), stream,
                    bool(options.get("include_usage", False)))  # fmt: skip
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

    def feed(self, chunk: bytes, last: bool) -> bytes:
        data = self.pending + chunk
        events, _, self.pending = data.rpartition(b"\n\n")
        out = [self._event(e) for e in events.split(b"\n\n") if e.strip()] if events else []
        if last:
            if self.pending.strip():
                out.append(self._event(self.pending))
                self.pending = b""
            if not self.done:  # the model's stream ended without its final event
                ended = {"type": "upstream_error", "message": "the model's stream ended early"}
                out.append(_sse({"error": ended}))
            out.append(b"data: [DONE]\n\n")
        return b"".join(out)

    def _event(self, raw: bytes) -> bytes:
        text = raw.strip()
        if not text.startswith(b"data:"):
            return b""
        try:
            ev = orjson.loads(text[5:].strip())
        except orjson.JSONDecodeError:
            return _sse({"error": {"type": "upstream_error", "message": "unreadable model event"}})
        if "error" in ev:
            self.done = True
            return _sse({"error": {"type": "upstream_error", "message": str(ev["error"])}})
        out = []
        delta: dict[str, str] = {"content": str(ev.get("TEXT", ""))}
        if not self.started:
            delta = {"role": "assistant", **delta}
            self.started = True
        out.append(self._chunk(delta, None))
        if "FINISH_REASON" in ev:
            self.done = True
            self.usage = Usage(int(ev.get("PROMPT_TOKENS", 0)), int(ev.get("COMPLETION_TOKENS", 0)))
            out.append(self._chunk({}, str(ev["FINISH_REASON"])))
            if self.call.include_usage:
                out.append(_sse({**self.head, "choices": [], "usage": _usage(self.usage)}))
        return b"".join(out)

    def _chunk(self, delta: dict[str, str], finish: str | None) -> bytes:
        return _sse({**self.head, "choices": [{"index": 0, "delta": delta,
                                                "finish_reason": finish}]})  # fmt: skip


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
