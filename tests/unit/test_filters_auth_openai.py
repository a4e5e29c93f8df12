"""The auth and openai filters, replayed through the harness with a fake upstream."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from filters.auth.filter import AuthFilter
from filters.auth.params import AuthParams
from filters.openai.filter import OpenAIFilter
from filters.openai.params import OpenAIParams
from proxy.api import Deps, Headers
from proxy.testing import Harness, UpstreamReply, default_config
from tests.helpers import sim_llm_answer

KEY = "sk-test-123"
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()


def auth() -> AuthFilter:
    f = AuthFilter(
        AuthParams.model_validate(
            {"keys": [{"id": "k1", "sha256": DIGEST, "tenant": "acme", "tier": "gold"}]}
        ),
        Deps(),
    )
    f.name = "auth"
    return f


def openai(max_inputs: int = 4, max_chars: int = 50) -> OpenAIFilter:
    f = OpenAIFilter(
        OpenAIParams.model_validate(
            {
                "embedding_models": {
                    "mini": {
                        "triton_model": "embedder",
                        "max_inputs": max_inputs,
                        "max_input_chars": max_chars,
                        "dimensions": 3,
                    }
                }
            }
        ),
        Deps(),
    )
    f.name = "openai"
    return f


def triton_reply(headers: Headers, body: bytes) -> UpstreamReply:
    req = json.loads(body)
    n = req["inputs"][0]["shape"][0]
    out = {
        "outputs": [
            {"name": "EMBEDDING", "shape": [n, 3], "datatype": "FP32",
             "data": [float(i) for i in range(n * 3)]},
            {"name": "TOKENS", "shape": [n, 1], "datatype": "INT32", "data": [5] * n},
        ]
    }  # fmt: skip
    return UpstreamReply(200, {"content-type": "application/json"}, json.dumps(out).encode())


BEARER = {"authorization": f"Bearer {KEY}"}


async def test_auth_maps_key_to_tenant_and_strips_the_credential() -> None:
    r = await Harness.for_filters([auth()]).request("GET", "/v2/models", headers=BEARER)
    assert r.status == 200
    assert r.upstream_headers is not None
    assert r.upstream_headers["x-floodwall-tenant"] == "acme"
    assert r.upstream_headers["x-floodwall-key-id"] == "k1"
    assert r.upstream_headers["x-floodwall-tier"] == "gold"
    assert "authorization" not in r.upstream_headers


async def test_auth_refuses_missing_and_unknown_keys_without_echoing_them() -> None:
    h = Harness.for_filters([auth()])
    for headers in ({}, {"authorization": "Bearer nope-secret"}, {"authorization": "Basic x"}):
        r = await h.request("GET", "/v2/models", headers=headers)
        assert r.status == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["type"] == "unauthorized"
        assert "nope-secret" not in r.body.decode()
        assert not r.upstream_called


def test_auth_refuses_two_keys_under_one_id_at_start() -> None:
    other = hashlib.sha256(b"another key").hexdigest()
    keys = [{"id": "k1", "sha256": DIGEST, "tenant": "a"}, {"id": "k1", "sha256": other,
                                                              "tenant": "b"}]  # fmt: skip
    with pytest.raises(ValidationError, match="k1"):
        AuthParams.model_validate({"keys": keys})


async def test_auth_gives_grpc_callers_unauthenticated() -> None:
    r = await Harness.for_filters([auth()]).request("POST", "/v2/x", grpc=True)
    assert r.decisions
    d = next(iter(r.decisions.values()))
    assert getattr(d, "grpc_status", None) == 16


async def test_embeddings_round_trip() -> None:
    h = Harness.for_filters([auth(), openai()])
    body = json.dumps({"model": "mini", "input": ["a", "b"]})
    r = await h.request("POST", "/v1/embeddings", headers=BEARER, body=body, upstream=triton_reply)
    assert r.status == 200, r.body
    assert r.upstream_headers is not None
    assert r.upstream_headers[":path"] == "/v2/models/embedder/infer"
    assert r.upstream_body is not None
    sent = json.loads(r.upstream_body)
    assert sent["inputs"][0] == {"name": "TEXT", "shape": [2, 1], "datatype": "BYTES",
                                 "data": ["a", "b"]}  # fmt: skip
    out = r.json()
    assert out["object"] == "list" and out["model"] == "mini"
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert out["data"][1]["embedding"] == [3.0, 4.0, 5.0]
    assert out["usage"] == {"prompt_tokens": 10, "total_tokens": 10}
    assert int(r.headers["content-length"]) == len(r.body)


async def test_embeddings_base64_encoding() -> None:
    h = Harness.for_filters([openai()])
    body = json.dumps({"model": "mini", "input": "a", "encoding_format": "base64"})
    r = await h.request("POST", "/v1/embeddings", body=body, upstream=triton_reply)
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert vec.tolist() == [0.0, 1.0, 2.0]


async def test_embeddings_bad_input() -> None:
    h = Harness.for_filters([openai(max_inputs=2, max_chars=10)])
    cases = [
        (b"{not json", 400, "invalid_request_error"),
        (b"[1, 2]", 400, "invalid_request_error"),
        (b'{"input": "x"}', 400, "invalid_request_error"),
        (b'{"model": 3, "input": "x"}', 400, "invalid_request_error"),
        (b'{"model": "gpt-9", "input": "x"}', 404, "model_not_found"),
        (b'{"model": "mini"}', 400, "invalid_request_error"),
        (b'{"model": "mini", "input": 42}', 400, "invalid_request_error"),
        (b'{"model": "mini", "input": [[1, 2]]}', 400, "invalid_request_error"),
        (b'{"model": "mini", "input": []}', 400, "invalid_request_error"),
        (b'{"model": "mini", "input": ""}', 400, "invalid_request_error"),
        (b'{"model": "mini", "input": ["a", "b", "c"]}', 413, "input_too_large"),
        (b'{"model": "mini", "input": "' + b"x" * 11 + b'"}', 413, "input_too_large"),
        (b'{"model": "mini", "input": "x", "encoding_format": "hex"}', 400,
         "invalid_request_error"),
        (b'{"model": "mini", "input": "x", "dimensions": 2}', 400, "invalid_request_error"),
        (b"\xff\xfe", 400, "invalid_request_error"),
    ]  # fmt: skip
    for body, status, type_ in cases:
        r = await h.request("POST", "/v1/embeddings", body=body, upstream=triton_reply)
        assert (r.status, r.json()["error"]["type"]) == (status, type_), body
        assert not r.upstream_called, body


async def test_embeddings_without_body_is_400() -> None:
    r = await Harness.for_filters([openai()]).request("POST", "/v1/embeddings")
    assert r.status == 400


async def test_upstream_errors_become_json() -> None:
    h = Harness.for_filters([openai()])
    body = json.dumps({"model": "mini", "input": "a"})
    cases = [
        (UpstreamReply(400, {}, b'{"error": "bad shape"}'), 400, "invalid_request_error"),
        (UpstreamReply(503, {}, b"no healthy upstream"), 503, "upstream_unavailable"),
        (UpstreamReply(504, {}, b"upstream request timeout"), 504, "upstream_timeout"),
        (UpstreamReply(500, {}, b'{"error": "oops"}'), 502, "upstream_error"),
        (UpstreamReply(200, {}, b'{"outputs": []}'), 502, "upstream_error"),
        (UpstreamReply(200, {}, b"garbage"), 502, "upstream_error"),
        # Envoy's reply for a connection reset: kept (it read upstream_error, as if the model
        # had answered with a failure).
        (UpstreamReply(502, {"x-floodwall-error": "upstream_reset"},
                       b'{"error":{"type":"upstream_reset","message":"upstream connect error"}}'),
         502, "upstream_reset"),
    ]  # fmt: skip
    for reply, status, type_ in cases:
        r = await h.request("POST", "/v1/embeddings", body=body, upstream=reply)
        assert (r.status, r.json()["error"]["type"]) == (status, type_), reply
        assert r.headers["content-type"] == "application/json"


def chat_filter() -> OpenAIFilter:
    f = OpenAIFilter(
        OpenAIParams.model_validate(
            {
                "chat_models": {"sim": {"triton_model": "sim_llm", "max_tokens_limit": 100}},
                "triton_priority": {"critical": 1, "sheddable": 2},
            }
        ),
        Deps(),
    )
    f.name = "openai"
    return f


CHAT_ROUTES = [
    {"name": "chat", "match": {"path": "/v1/chat/completions"}, "api": "openai_chat",
     "upstream": "up", "timeout_ms": 20000},
]  # fmt: skip


def sim_llm_reply(headers: Headers, body: bytes) -> UpstreamReply:
    req = json.loads(body)
    assert [i["name"] for i in req["inputs"]] == ["PROMPT", "MAX_TOKENS", "TEMPERATURE"]
    return sim_llm_answer()


async def test_a_negative_token_count_from_the_model_is_an_unreadable_answer() -> None:
    # Found by fuzzing the model's answers: -1 failed the token metrics in on_complete (a
    # fault) and would have refunded token limits past the reservation.
    names = [{"name": n} for n in ("PROMPT", "MAX_TOKENS", "TEMPERATURE")]
    good = sim_llm_reply({}, json.dumps({"inputs": names}).encode()).body

    def reply(count: int, name: str) -> UpstreamReply:
        out = json.loads(good)
        for o in out["outputs"]:
            if o["name"] == name:
                o["data"] = [count]
        return UpstreamReply(200, {"content-type": "application/json"}, json.dumps(out).encode())

    cfg = default_config(CHAT_ROUTES)
    h = Harness.for_filters([chat_filter()], cfg)
    body = json.dumps({"model": "sim", "messages": [{"role": "user", "content": "hi"}]})
    for name in ("PROMPT_TOKENS", "COMPLETION_TOKENS"):
        r = await h.request("POST", "/v1/chat/completions", body=body, upstream=reply(-1, name))
        assert (r.status, r.json()["error"]["type"]) == (502, "upstream_error"), name
    ok = await h.request(
        "POST", "/v1/chat/completions", body=body, upstream=reply(0, "PROMPT_TOKENS")
    )
    assert ok.status == 200
    emb = Harness.for_filters([openai()])
    neg = {"outputs": [{"name": "EMBEDDING", "shape": [1, 2], "data": [0.1, 0.2]},
                       {"name": "TOKENS", "shape": [1], "data": [-3]}]}  # fmt: skip
    one = json.dumps({"model": "mini", "input": "a"})
    r = await emb.request("POST", "/v1/embeddings", body=one,
                          upstream=UpstreamReply(200, {}, json.dumps(neg).encode()))  # fmt: skip
    assert (r.status, r.json()["error"]["type"]) == (502, "upstream_error")


async def test_chat_round_trip_with_priority_and_deadline() -> None:

    class Prioritise(AuthFilter):
        async def on_request_headers(self, ctx, headers):  # type: ignore[no-untyped-def]
            ctx.priority = "critical"
            return await super().on_request_headers(ctx, headers)

    a = Prioritise(auth().p, Deps())
    a.name = "auth"
    h = Harness.for_filters([a, chat_filter()], default_config(CHAT_ROUTES))
    body = {"model": "sim", "max_tokens": 5, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}  # fmt: skip
    r = await h.request("POST", "/v1/chat/completions", headers=BEARER, body=json.dumps(body),
                        upstream=sim_llm_reply)  # fmt: skip
    assert r.status == 200, r.body
    assert r.upstream_headers is not None and r.upstream_body is not None
    assert r.upstream_headers[":path"] == "/v2/models/sim_llm/infer"
    sent = json.loads(r.upstream_body)
    assert sent["inputs"][0]["data"] == ["system: be brief\nuser: hi\nassistant:"]
    assert sent["inputs"][1]["data"] == [5]
    assert sent["parameters"]["priority"] == 1
    assert 19_000_000 < sent["parameters"]["timeout"] <= 20_000_000
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "sim"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "lorem ipsum"}
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


async def test_chat_bad_input() -> None:

    h = Harness.for_filters([chat_filter()], default_config(CHAT_ROUTES))
    ok = [{"role": "user", "content": "x"}]
    cases = [
        ({"model": "sim"}, 400),
        ({"model": "sim", "messages": []}, 400),
        ({"model": "sim", "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ({"model": "sim", "messages": [{"role": "user", "content": 3}]}, 400),
        ({"model": "sim", "messages": ok, "max_tokens": 0}, 400),
        ({"model": "sim", "messages": ok, "max_tokens": 101}, 400),
        ({"model": "sim", "messages": ok, "temperature": 9}, 400),
        ({"model": "sim", "messages": ok, "stream": True}, 400),
        ({"model": "sim", "messages": ok, "n": 2}, 400),
        ({"model": "gpt-x", "messages": ok}, 404),
        ({"model": "sim", "messages": [{"role": "user", "content": "x" * 40000}]}, 413),
    ]
    for body, status in cases:
        r = await h.request("POST", "/v1/chat/completions", body=json.dumps(body),
                            upstream=sim_llm_reply)  # fmt: skip
        assert r.status == status, (body, r.body)
        assert not r.upstream_called


async def test_triton_queue_refusal_becomes_503_with_retry_after() -> None:
    h = Harness.for_filters([openai()])
    body = json.dumps({"model": "mini", "input": "a"})
    for status, text in ((503, "Exceeds maximum queue size"), (400, "Request timeout expired")):
        reply = UpstreamReply(status, {}, json.dumps({"error": text}).encode())
        r = await h.request("POST", "/v1/embeddings", body=body, upstream=reply)
        assert r.status == 503 and r.json()["error"]["type"] == "model_overloaded"
        assert int(r.headers["retry-after"]) >= 1


# --- chat streaming: Triton's generate_stream events -> OpenAI chunks -------------------------


def _translator(include_usage: bool = True) -> Any:
    from filters.openai.chat import ChatCall, StreamTranslator
    from filters.openai.params import ChatModel

    call = ChatCall("sim-llm", ChatModel(triton_model="m", stream_model="ms"), 8, 10,
                    stream=True, include_usage=include_usage)  # fmt: skip
    return StreamTranslator(call, "rid")


def _parsed(raw: bytes) -> list[Any]:
    return [
        b[6:] if b[6:] == "[DONE]" else json.loads(b[6:])
        for b in raw.decode().split("\n\n")
        if b.strip()
    ]


def test_stream_translation_survives_events_split_across_chunks() -> None:
    t = _translator()
    last = b'"PROMPT_TOKENS":3,"COMPLETION_TOKENS":3,"FINISH_REASON":"stop"'
    src = b'data: {"TEXT":"Hel"}\n\ndata: {"TEXT":"lo"}\n\ndata: {"TEXT":"!",' + last + b"}\n\n"
    out = b"".join(t.feed(src[i : i + 7], last=i + 7 >= len(src)) for i in range(0, len(src), 7))
    events = _parsed(out)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text == "Hello!"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [e["choices"][0]["finish_reason"] for e in events[:-2]][-1] == "stop"
    assert events[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert t.usage is not None and t.usage.total == 6


def test_stream_translation_reports_errors_and_early_ends() -> None:
    t = _translator(include_usage=False)
    events = _parsed(t.feed(b'data: {"error":"boom"}\n\n', last=True))
    assert events[0]["error"] == {"type": "upstream_error", "message": "boom"}
    assert events[-1] == "[DONE]"
    t = _translator()
    events = _parsed(t.feed(b'data: {"TEXT":"par', last=False) + t.feed(b'tial"}\n\n', last=True))
    assert events[0]["choices"][0]["delta"]["content"] == "partial"
    assert events[1]["error"]["message"] == "the model's stream ended early"
    assert t.usage is None


async def test_a_stream_that_fails_after_its_200_is_counted_as_a_failure() -> None:
    # The client read an error event, but metrics, the breaker and admission saw a 200 success.
    from prometheus_client import REGISTRY

    from filters.openai.filter import OpenAIFilter, _State
    from proxy.api import Deps, Mutate, RequestContext

    f = OpenAIFilter(OpenAIFilter.Params(), Deps())
    f.name = "openai"
    route = default_config().routes[0]
    ctx = RequestContext(route, started=0.0, request_id="r", method="POST", path="/v1/x",
                         grpc=False)  # fmt: skip
    ctx.response_status = ctx.upstream_status = 200
    ctx.response_streamed, ctx.end_of_stream = True, False
    ctx.state(_State).stream = _translator()
    labels = {"route": route.name, "status": "stream_model_error"}
    before = REGISTRY.get_sample_value("floodwall_upstream_errors_total", labels) or 0.0
    d = await f.on_response_body(ctx, b'data: {"TEXT":"Hel"}\n\n')
    assert isinstance(d, Mutate) and ctx.upstream_status == 200
    ctx.end_of_stream = True
    d = await f.on_response_body(ctx, b'data: {"error":"model crashed"}\n\n')
    assert isinstance(d, Mutate) and d.body is not None and b"model crashed" in d.body
    assert ctx.upstream_status == ctx.response_status == 502
    assert REGISTRY.get_sample_value("floodwall_upstream_errors_total", labels) == before + 1
