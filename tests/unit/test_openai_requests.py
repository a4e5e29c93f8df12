"""The openai filter's edges: request parameters it cannot honour are refused by name, null
reads as the default, a bad model event never cuts a stream, a client leaving after the last
event keeps the usage, upstream errors count once, and params that cannot work fail at start."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from filters.openai.chat import ChatCall, StreamTranslator
from filters.openai.filter import TOKENS, OpenAIFilter
from filters.openai.params import ChatModel, OpenAIParams
from proxy import metrics
from proxy.api import Deps, Headers, Phase, Usage
from proxy.testing import Harness, UpstreamReply, default_config
from tests.helpers import sim_llm_answer

ROUTES = [
    {"name": "chat", "match": {"path": "/v1/chat/completions"}, "api": "openai_chat",
     "upstream": "up", "timeout_ms": 20000},
    {"name": "embeddings", "match": {"path": "/v1/embeddings"}, "api": "openai_embeddings",
     "upstream": "up"},
    {"name": "jobs", "match": {"prefix": "/v1/jobs"}, "api": "jobs", "upstream": "up"},
]  # fmt: skip
OK = [{"role": "user", "content": "hi"}]


def _openai(model: str = "sim") -> OpenAIFilter:
    f = OpenAIFilter(
        OpenAIParams.model_validate(
            {
                "chat_models": {
                    model: {"triton_model": "sim_llm", "stream_model": "sim_llm_stream"}
                },
                "embedding_models": {"mini": {"triton_model": "embedder", "dimensions": 3}},
            }
        ),
        Deps(),
    )
    f.name = "openai"
    return f


def _harness(model: str = "sim") -> Harness:
    return Harness.for_filters([_openai(model)], default_config(ROUTES))


def _sim(headers: Headers, body: bytes) -> UpstreamReply:
    return sim_llm_answer(text="a b")


def _emb(headers: Headers, body: bytes) -> UpstreamReply:
    n = json.loads(body)["inputs"][0]["shape"][0]
    out = {"outputs": [{"name": "EMBEDDING", "shape": [n, 3], "datatype": "FP32",
                        "data": [0.5] * (3 * n)}]}  # fmt: skip
    return UpstreamReply(200, {}, json.dumps(out).encode())


async def _chat(h: Harness, body: dict[str, Any]) -> Any:
    return await h.request("POST", "/v1/chat/completions", body=json.dumps(body), upstream=_sim)


@pytest.mark.parametrize("role", [["user"], {"x": 1}, None, 3])
async def test_a_role_that_is_not_a_string_is_400(role: Any) -> None:
    r = await _chat(_harness(), {"model": "sim", "messages": [{"role": role, "content": "x"}]})
    assert r.status == 400 and r.json()["error"]["type"] == "invalid_request_error", r.body
    assert "'messages'[0]" in r.json()["error"]["message"]
    assert not r.upstream_called


async def test_a_jobs_envelope_with_a_bad_role_is_not_a_fault() -> None:
    # The envelope's token estimate parses each request: a bad one is skipped (the jobs filter
    # refuses it when it runs), never a 500 from the gateway.
    inner = {"model": "sim", "messages": [{"role": ["user"], "content": "x"}]}
    env = {"requests": [{"url": "/v1/chat/completions", "body": inner}]}
    r = await _harness().request("POST", "/v1/jobs", body=json.dumps(env), upstream=UpstreamReply())
    assert r.status == 200 and r.responded_by is None, r.body


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"bogus_field": 1}, "bogus_field"),
        ({"bogus_field": None}, "bogus_field"),
        ({"stop": ["STOP"]}, "stop"),
        ({"stop": "STOP"}, "stop"),
        ({"stop": 5}, "stop"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"top_p": 0.5}, "top_p"),
        ({"top_p": True}, "top_p"),
        ({"presence_penalty": 1}, "presence_penalty"),
        ({"frequency_penalty": -0.5}, "frequency_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"seed": "x"}, "seed"),
        ({"user": 5}, "user"),
        ({"n": True}, "n"),
        ({"stream": True, "stream_options": {"include_usage": "no"}}, "stream_options"),
        ({"stream": True, "stream_options": {"bogus": True}}, "stream_options"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # no stream asked
        ({"stream": False, "stream_options": {}}, "stream_options"),
    ],
)
async def test_chat_parameters_the_models_cannot_honour_are_refused_by_name(
    extra: dict[str, Any], field: str
) -> None:
    r = await _chat(_harness(), {"model": "sim", "messages": OK, **extra})
    assert r.status == 400, r.body
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and f"'{field}'" in err["message"], err
    assert not r.upstream_called


async def test_chat_parameters_at_neutral_values_are_accepted() -> None:
    h = _harness()
    plain = await _chat(h, {"model": "sim", "messages": OK})
    neutral = {
        "user": "u1", "seed": 7, "metadata": {"a": "b"}, "store": False, "service_tier": "auto",
        "safety_identifier": "s", "prompt_cache_key": "k", "parallel_tool_calls": True,
        "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False,
        "top_logprobs": None, "logit_bias": {}, "stop": None, "tools": [], "tool_choice": "none",
        "response_format": {"type": "text"}, "modalities": ["text"], "audio": None,
    }  # fmt: skip
    r = await _chat(h, {"model": "sim", "messages": OK, **neutral})
    assert r.status == 200, r.body
    assert r.upstream_body is not None and plain.upstream_body is not None
    assert json.loads(r.upstream_body)["inputs"] == json.loads(plain.upstream_body)["inputs"]


async def test_embeddings_parameters_are_checked_the_same_way() -> None:
    h = _harness()
    for body, status in (
        ({"model": "mini", "input": "x", "bogus": 1}, 400),
        ({"model": "mini", "input": "x", "user": 5}, 400),
        ({"model": "mini", "input": "x", "dimensions": True}, 400),
        ({"model": "mini", "input": "x", "user": "u1"}, 200),
        ({"model": "mini", "input": "x", "encoding_format": None, "dimensions": None}, 200),
    ):
        r = await h.request("POST", "/v1/embeddings", body=json.dumps(body), upstream=_emb)
        assert r.status == status, (body, r.body)
    assert json.loads(r.body)["data"][0]["embedding"] == [0.5, 0.5, 0.5]  # float, the default


@pytest.mark.parametrize(
    ("extra", "max_tokens", "temperature"),
    [
        ({"max_tokens": None}, 64, 1.0),
        ({"max_completion_tokens": None}, 64, 1.0),
        ({"max_completion_tokens": None, "max_tokens": 5}, 5, 1.0),
        ({"max_completion_tokens": 6, "max_tokens": 5}, 6, 1.0),
        ({"temperature": None}, 64, 1.0),
        ({"n": None, "stream": None, "stream_options": None}, 64, 1.0),
        ({"stream": False, "stream_options": None}, 64, 1.0),
    ],
)
async def test_null_reads_as_the_default(
    extra: dict[str, Any], max_tokens: int, temperature: float
) -> None:
    r = await _chat(_harness(), {"model": "sim", "messages": OK, **extra})
    assert r.status == 200, r.body
    assert r.upstream_headers is not None and r.upstream_body is not None
    assert r.upstream_headers[":path"] == "/v2/models/sim_llm/infer"
    sent = {i["name"]: i["data"][0] for i in json.loads(r.upstream_body)["inputs"]}
    assert (sent["MAX_TOKENS"], sent["TEMPERATURE"]) == (max_tokens, temperature)


async def test_the_limit_field_named_in_the_refusal_is_the_one_sent() -> None:
    r = await _chat(_harness(), {"model": "sim", "messages": OK, "max_completion_tokens": 0})
    assert "'max_completion_tokens'" in r.json()["error"]["message"]


def _translator(include_usage: bool) -> StreamTranslator:
    call = ChatCall("sim", ChatModel(triton_model="m", stream_model="ms"), 8, 10,
                    stream=True, include_usage=include_usage)  # fmt: skip
    return StreamTranslator(call, "rid")


def _events(raw: bytes) -> list[Any]:
    return [b[6:] if b[6:] == "[DONE]" else json.loads(b[6:])
            for b in raw.decode().split("\n\n") if b.strip()]  # fmt: skip


@pytest.mark.parametrize(
    "event",
    [
        b"data: [1]\n\n",
        b'data: "x"\n\n',
        b"data: null\n\n",
        b"data: 3\n\n",
        b'data: {"FINISH_REASON":"stop","PROMPT_TOKENS":"n/a","COMPLETION_TOKENS":1}\n\n',
        b'data: {"FINISH_REASON":"stop","PROMPT_TOKENS":1,"COMPLETION_TOKENS":[2]}\n\n',
        b'data: {"FINISH_REASON":"stop","PROMPT_TOKENS":true,"COMPLETION_TOKENS":1}\n\n',
    ],
)
def test_a_model_event_that_cannot_be_read_never_cuts_the_stream(event: bytes) -> None:
    t = _translator(include_usage=True)
    events = _events(t.feed(event, last=True))
    assert events[-1] == "[DONE]"
    assert t.usage is None
    assert not any(e.get("usage") for e in events[:-1])
    if not event.startswith(b"data: {"):
        assert events[0]["error"] == {"type": "upstream_error", "message": "unreadable model event"}


async def test_a_client_leaving_after_the_last_event_keeps_the_usage() -> None:
    # The model's final event came, the client left before the stream's end: rate limits
    # settle on the real counts and the tokens sent are counted; the call is not timed.
    f = _openai("sim-abort")
    chain = Harness.for_filters([f], default_config(ROUTES)).chain
    hd = {":method": "POST", ":path": "/v1/chat/completions"}
    ctx, plan = chain.context(hd)
    ctx.has_request_body = True
    body = {"model": "sim-abort", "stream": True, "max_tokens": 50, "messages": OK}
    await chain.run(plan, Phase.REQUEST_HEADERS, ctx, hd)
    await chain.run(plan, Phase.REQUEST_BODY, ctx, json.dumps(body).encode())
    await chain.run(plan, Phase.RESPONSE_HEADERS, ctx, {":status": "200"})
    ctx.end_of_stream = False
    last = b'data: {"TEXT":"a b","PROMPT_TOKENS":3,"COMPLETION_TOKENS":2,"FINISH_REASON":"stop"}'
    await chain.run(plan, Phase.RESPONSE_BODY, ctx, last + b"\n\n")
    tokens = TOKENS.labels("all", "sim-abort", "output")
    before = tokens._value.get()
    task = chain.finish(ctx, plan, None, None, False)
    if task is not None:
        await task
    assert ctx.usage == Usage(3, 2)
    assert tokens._value.get() == before + 2
    timed = REGISTRY.get_sample_value(
        "gen_ai_server_request_duration_seconds_count",
        {"gen_ai_operation_name": "chat", "gen_ai_request_model": "sim-abort"},
    )
    assert not timed


async def test_a_streamed_upstream_error_is_counted_once() -> None:
    counter = metrics.UPSTREAM_ERRORS.labels("chat", "400")
    before = counter._value.get()
    body = {"model": "sim", "messages": OK, "stream": True}
    r = await _harness().request(
        "POST", "/v1/chat/completions", body=json.dumps(body),
        upstream=UpstreamReply(400, {}, b'data: {"error":"prompt too long"}\n\n'),
    )  # fmt: skip
    assert r.status == 400 and "prompt too long" in r.json()["error"]["message"]
    assert counter._value.get() == before + 1


def test_a_default_max_tokens_above_the_limit_fails_at_start() -> None:
    model = {"triton_model": "m", "default_max_tokens": 200, "max_tokens_limit": 100}
    with pytest.raises(ValidationError, match="default_max_tokens"):
        OpenAIParams.model_validate({"chat_models": {"sim": model}})
    ChatModel(triton_model="m", default_max_tokens=100, max_tokens_limit=100)
