"""Chat with "stream": true through the gateway: Triton's generate_stream events from the
decoupled stand-in (sim_llm_stream) become OpenAI chat.completion.chunk events as they come,
and the token limit is settled at the end of the stream."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Gateway
from tests.helpers import AUTH

pytestmark = pytest.mark.e2e

BODY = {"model": "sim-llm", "max_tokens": 24, "temperature": 0.7,
        "messages": [{"role": "user", "content": "Write about streams."}]}  # fmt: skip


def _events(text: str) -> list[Any]:
    out = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[6:]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_streamed_chat_matches_the_buffered_answer(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        whole = c.post("/v1/chat/completions", headers=AUTH, json=BODY).json()
        chunks = []
        with c.stream("POST", "/v1/chat/completions", headers=AUTH,
                      json={**BODY, "stream": True, "stream_options": {"include_usage": True}}
                      ) as r:  # fmt: skip
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for part in r.iter_raw():
                chunks.append(part)
    events = _events(b"".join(chunks).decode())
    assert len(chunks) > 1, "the answer came in one piece: not streamed"
    assert events[-1] == "[DONE]"
    deltas = [e for e in events[:-1] if e.get("choices")]
    assert deltas[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in deltas)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in deltas)
    # The stand-in is deterministic: streamed pieces join to the buffered answer.
    assert text == whole["choices"][0]["message"]["content"]
    assert deltas[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    usage = next(e["usage"] for e in events[:-1] if e.get("usage"))
    assert usage == whole["usage"]


def test_stream_refused_for_a_model_without_a_streaming_twin(gateway: Gateway) -> None:
    r = httpx.post(gateway.url + "/v1/embeddings", headers=AUTH,
                   json={"model": "embedder", "input": "x", "stream": True})  # fmt: skip
    assert r.status_code == 200  # embeddings ignore stream (as OpenAI does)
    r = httpx.post(gateway.url + "/v1/chat/completions", headers=AUTH,
                   json={**BODY, "stream": "yes"})  # fmt: skip
    assert r.status_code == 400


def test_streamed_tokens_are_settled_at_end_of_stream(gateway: Gateway) -> None:
    """The limited key's chat token limit reserves prompt estimate + max_tokens, then gives
    back what the stream did not use once it ends."""

    def refunded() -> float:
        text = httpx.get(gateway.metrics_url).text
        for line in text.splitlines():
            if line.startswith("floodwall_ratelimit_tokens_total{") and (
                'limit="limited_chat_tokens"' in line and 'kind="refunded"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = refunded()
    body = {**BODY, "max_tokens": 200, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"authorization": "Bearer fw-demo-limited"}) as r:  # fmt: skip
        assert r.status_code == 200
        events = _events(r.read().decode())
    usage = next(e["usage"] for e in events[:-1] if isinstance(e, dict) and e.get("usage"))
    # Prompt "user: Write about streams.\nassistant:" is 37 chars -> 10 estimated.
    reserved = 10 + 200
    deadline = time.monotonic() + 5
    while refunded() - before < reserved - usage["total_tokens"] - 0.5:
        assert time.monotonic() < deadline, (refunded() - before, usage)
        time.sleep(0.05)
    assert refunded() - before == pytest.approx(reserved - usage["total_tokens"])
