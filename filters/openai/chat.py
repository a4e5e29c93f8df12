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


def _content_text(content: Any) -> str | None:
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
    if req.get("stream"):
        return bad("'stream': true is not supported yet by this gateway")
    if req.get("n", 1) != 1:
        return bad("'n' must be 1")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        return bad("'messages' must be a non-empty array")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return bad(f"'messages'[{i}] needs a 'role' among {sorted(ROLES)}")
        text = _content_text(m.get("content"))
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
    return ChatCall(model, spec, max_tokens, len(prompt)), inputs, outputs


def render(resp: dict[str, Any], call: ChatCall, request_id: str) -> tuple[bytes, Usage]:
    out = {o["name"]: o["data"][0] for o in resp["outputs"]}
    prompt_tokens, completion_tokens = int(out["PROMPT_TOKENS"]), int(out["COMPLETION_TOKENS"])
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
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )
    return body, Usage(prompt_tokens, completion_tokens)
