"""Property-based fuzzing of the shipped local config's whole chain against a real Redis.

Every filter of ``examples/local.yaml`` (auth, cache, openai, admission, rate_limit, jobs,
degrade, breaker) sees generated requests on every route: bodies that are nearly valid
(a field missing, of the wrong type, out of range, nested, huge, not UTF-8), random headers
(Cache-Control, Prefer, Idempotency-Key, spoofed ``x-floodwall-*``, webhooks, grpc-timeout),
and generated upstream answers (any status, any body, broken JSON, SSE that stops early).

The properties, for every example:
- no filter faults: bad input is a decision (an error answer), never an exception;
- every answer the chain makes itself is the documented JSON error (or a job/cache answer)
  with a status the README lists, and never a 500;
- the chain completes every request (the harness waits for on_complete).

Hypothesis runs derandomized (the same examples every CI run); set
``FLOODWALL_FUZZ_EXAMPLES`` (default 1000) and ``FLOODWALL_FUZZ_SEED`` to search further.
Triton is not started: the embedder, the judge and Triton's metrics are stand-ins or a dead
port, so the model-facing code takes its failure paths too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from filters.cache.filter import CacheFilter
from proxy import metrics
from proxy.api import Deps, Headers
from proxy.config import parse_config
from proxy.process import make_redis
from proxy.registry import build_filters
from proxy.testing import Harness, UpstreamReply
from tests.fuzzing import json_values, mutated
from tests.helpers import RedisServer, free_ports, local_config_dict

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FLOODWALL_FUZZ_EXAMPLES", "1000"))
SEED = int(os.environ.get("FLOODWALL_FUZZ_SEED", "0"))
# What the chain itself may answer (README's error table, the job API, cache hits).
ANSWERED = {200, 202, 400, 401, 403, 404, 405, 409, 413, 415, 429, 431, 503, 504}
SPOOFED = [
    "x-floodwall-tenant",
    "x-floodwall-priority",
    "x-floodwall-cache",
    "x-floodwall-key-id",
    "x-floodwall-degraded",
    "X-Floodwall-Tenant",
]
SPOOF = "spoofed-by-the-client"
KEYS = ["fw-demo-key", "fw-demo-batch", "fw-demo-limited", "fw-demo-worker", "nope", ""]


class _WordsEmbedder:
    """Texts sharing words get close vectors (the model is not under test here)."""

    async def embed(self, text: str) -> np.ndarray[Any, Any]:
        v = np.zeros(64, dtype=np.float32)
        for w in re.findall(r"\w+", text.lower()):
            v[int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1.0
        return v

    async def close(self) -> None:
        pass


class _OverlapJudge:
    async def same_answer(self, cached: str, asked: str) -> float:
        a, b = set(cached.lower().split()), set(asked.lower().split())
        return len(a & b) / max(1, len(a | b))

    async def close(self) -> None:
        pass


# --- the chain under test -----------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # One loop for every example: the filters' Redis connections and background tasks live
    # on it (hypothesis calls the test synchronously, once per example).
    lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture(scope="module")
def harness(
    tmp_path_factory: pytest.TempPathFactory, loop: asyncio.AbstractEventLoop
) -> Iterator[Harness]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    (dead,) = free_ports(1)  # Triton: nothing listens here
    data = local_config_dict()
    text = orjson.dumps(data).decode()
    for port in ("8000", "8001", "8002"):
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{dead}")
    data = orjson.loads(text)
    for up in data["upstreams"].values():
        up["endpoints"] = [{"address": "127.0.0.1", "port": dead}]
    cfg = parse_config(data)

    async def build() -> tuple[Harness, Any]:
        redis = make_redis(server.url, 2000)
        deps = Deps(redis=redis, upstreams={n: u.base_url for n, u in cfg.upstreams.items()})
        filters = build_filters(cfg.filters, deps)
        for i, f in enumerate(filters):
            if isinstance(f, CacheFilter):  # the semantic path with stand-in models
                c = CacheFilter(f.p, deps, _WordsEmbedder(), _OverlapJudge())
                c.name = f.name
                filters[i] = c
        h = Harness(cfg, filters)
        await h.chain.start()
        return h, redis

    h, redis = loop.run_until_complete(build())
    try:
        yield h
    finally:
        loop.run_until_complete(h.chain.stop())
        loop.run_until_complete(redis.aclose())
        server.stop()


# --- strategies ---------------------------------------------------------------------------

words = st.sampled_from(
    ["what", "is", "the", "capital", "of", "France", "don't", "cancel", "my", "subscription",
     "2024", "42", "refund", "Paris", "not", "\u00e9t\u00e9", "\u4e2d\u6587", "\u200b", "\x00"]
)  # fmt: skip
# No lone surrogates here (any JSON value elsewhere may have one: not UTF-8 once encoded).
prompts = st.lists(words, min_size=1, max_size=12).map(" ".join) | st.text(
    st.characters(codec="utf-8"), min_size=1, max_size=60
)


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the plausible value, sometimes anything at all."""
    return st.one_of(*[value] * 6, json_values)


message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "user", "system", "assistant"]),
     "content": prompts | st.lists(st.fixed_dictionaries(
         {"type": st.just("text"), "text": prompts}), min_size=1, max_size=3)},
)  # fmt: skip
chat_body = st.fixed_dictionaries(
    {"model": st.just("sim-llm"), "messages": st.lists(message, min_size=1, max_size=4)},
    optional={"max_tokens": st.integers(1, 2000), "temperature": st.sampled_from([0, 0.0, 0.7]),
              "stream": st.booleans(), "user": st.text(max_size=8), "seed": st.integers(0, 9)},
)  # fmt: skip
embeddings_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["all-MiniLM-L6-v2", "embedder", "embedder_int8"]),
     "input": prompts | st.lists(prompts, min_size=1, max_size=5)},
    optional={"encoding_format": st.sampled_from(["float", "base64"]), "user": st.text()},
)  # fmt: skip
one_job = st.fixed_dictionaries(
    {"url": st.sampled_from(["/v1/embeddings", "/v1/chat/completions"]),
     "body": embeddings_body | chat_body},
    optional={"method": st.just("POST")},
)  # fmt: skip
jobs_body = one_job | st.fixed_dictionaries({"requests": st.lists(one_job, min_size=1, max_size=4)})
kserve_body = st.fixed_dictionaries(
    {"inputs": st.lists(st.fixed_dictionaries(
        {"name": st.just("TEXT"), "datatype": st.just("BYTES"), "shape": st.just([1, 1]),
         "data": st.lists(prompts, min_size=1, max_size=1)}), min_size=1, max_size=1)},
    optional={"parameters": st.fixed_dictionaries({}, optional={"priority": st.integers(0, 3)})},
)  # fmt: skip


def _encode(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """JSON of the value, or that JSON broken: cut short, not UTF-8, or not JSON at all."""
    as_json = mutated(strategy).map(_dumps)
    return st.one_of(
        *[as_json] * 8,
        st.tuples(as_json, st.integers(0, 64)).map(lambda t: t[0][: t[1]]),
        as_json.map(lambda b: b.replace(b'"', b"\xff", 1)),
        st.binary(max_size=64),
        st.just(b"[" * 300 + b"]" * 300),
    )  # fmt: skip


def _dumps(v: Any) -> bytes:
    # The stdlib writes what orjson refuses: integers past 64 bits, NaN and Infinity (not
    # JSON), and lone surrogates (not UTF-8 once encoded).
    return json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")


token = st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=24)
header_values: dict[str, st.SearchStrategy[str]] = {
    "cache-control": st.lists(st.sampled_from(
        ["no-cache", "no-store", "max-age=0", "max-age=60", "max-age=-1", "max-age=abc",
         "max-age=99999999999999999999", "only-if-cached", "max-stale", 'x="y,z"', ""]),
        max_size=3).map(", ".join) | token,
    "prefer": st.sampled_from(["respond-async", "respond-async, wait=5", "wait=x", ""]) | token,
    "idempotency-key": token | st.text(max_size=300),
    "floodwall-webhook": st.sampled_from(
        ["http://127.0.0.1:9/hook", "https://hooks.example.com/", "ftp://x/", ""]) | token,
    "x-forwarded-for": st.lists(st.sampled_from(
        ["10.0.0.1", "::1", "not-an-ip", "999.1.1.1", " ", ""]), max_size=4).map(", ".join),
    "x-floodwall-tenant": token, "x-floodwall-priority": token, "x-floodwall-cache": token,
    "x-priority": st.sampled_from(["critical", "standard", "sheddable", "x"]) | token,
    "x-job-tenant": token, "x-request-type": st.sampled_from(["batch", "interactive"]) | token,
    "grpc-timeout": st.sampled_from(["1S", "100m", "0n", "99999999H", "x", ""]) | token,
    "content-type": st.sampled_from(["application/json", "text/plain", "application/grpc",
                                     "multipart/form-data"]),
    "x-request-id": token, "traceparent": token, "accept": token,
}  # fmt: skip
ROUTES: dict[str, tuple[list[str], st.SearchStrategy[bytes]]] = {
    "/v1/chat/completions": (["POST"] * 5 + ["GET"], _encode(chat_body)),
    "/v1/embeddings": (["POST"] * 5 + ["PUT"], _encode(embeddings_body)),
    "/v1/jobs": (["POST"] * 5 + ["GET"], _encode(jobs_body)),
    "/v1/jobs/": (["GET", "DELETE"], st.just(b"")),
    "/v2/models/embedder/infer": (["POST"], _encode(kserve_body)),
    "/v2": (["GET"], st.just(b"")),
}


# Each family its own test and examples, so that a rare field of one is not starved by others.
FAMILIES = {
    "chat": ["/v1/chat/completions"],
    "embeddings": ["/v1/embeddings"],
    "jobs": ["/v1/jobs", "/v1/jobs/"],
    "kserve": ["/v2/models/embedder/infer", "/v2"],
}


@st.composite
def requests(draw: st.DrawFn, paths: list[str]) -> tuple[str, str, str, dict[str, str], bytes]:
    route = path = draw(st.sampled_from(paths))
    methods, bodies = ROUTES[path]
    if path == "/v1/jobs/":
        path += draw(st.sampled_from(["", "abc", "0" * 32, "../x", "%00", "a/b"]) | token)
    if draw(st.integers(0, 5)) == 0:
        path += draw(st.sampled_from(["?", "?a=1", "#x", "//", "?x=%ff"]))
    headers: dict[str, str] = {}
    # Mostly a known key, so that most examples get past auth to the policies behind it.
    key = draw(st.sampled_from(KEYS[:3] * 4 + KEYS))
    if key or draw(st.booleans()):
        headers["authorization"] = draw(
            st.sampled_from(
                [f"Bearer {key}"] * 6 + [f"bearer {key}", key, f"Bearer  {key}", "Basic eA=="]
            )
        )
    for name in draw(st.lists(st.sampled_from(sorted(header_values)), max_size=4, unique=True)):
        headers[name] = draw(header_values[name])
    # An internal header no client may set: it must never reach the model.
    headers[draw(st.sampled_from(SPOOFED))] = SPOOF
    return route, draw(st.sampled_from(methods)), path, headers, draw(bodies)


def _kserve(outputs: dict[str, Any]) -> UpstreamReply:
    """Triton's KServe v2 answer: one output per name, each value its data."""
    body = {
        "model_name": "m",
        "outputs": [
            {"name": k, "datatype": "BYTES", "shape": [1], "data": v} for k, v in outputs.items()
        ],
    }
    return UpstreamReply(200, {"content-type": "application/json"}, _dumps(body))


def _stream(events: list[Any], cut: int | None) -> UpstreamReply:
    """Triton's generate_stream: SSE events, maybe cut short mid-event."""
    raw = b"".join(b"data: " + _dumps(e) + b"\n\n" for e in events)
    return UpstreamReply(200, {"content-type": "text/event-stream"}, raw[:cut])


count = _maybe(st.integers(0, 10**6))
chat_answer = st.builds(lambda text, p, c, fin: _kserve(
    {"TEXT": [text], "PROMPT_TOKENS": [p], "COMPLETION_TOKENS": [c], "FINISH_REASON": [fin]}),
    _maybe(st.text(max_size=20)), count, count, _maybe(st.sampled_from(["stop", "length"])),
)  # fmt: skip
stream_answer = st.builds(
    lambda texts, last, cut: _stream([*({"TEXT": t} for t in texts), last], cut),
    st.lists(st.text(max_size=8), max_size=3),
    _maybe(st.fixed_dictionaries({"TEXT": st.text(max_size=8), "FINISH_REASON": st.just("stop"),
                                  "PROMPT_TOKENS": count, "COMPLETION_TOKENS": count})
           | st.just({"error": "model failed"})),
    st.none() | st.none() | st.integers(0, 200),
)  # fmt: skip


def _embedding_answer(request: bytes, dim: int, tokens: Any) -> UpstreamReply:
    """The embedder's answer, one vector per text the request carried."""
    try:
        n = len(orjson.loads(request)["inputs"][0]["data"])
    except (orjson.JSONDecodeError, LookupError, TypeError):
        n = 1
    body = {"model_name": "embedder", "outputs": [
        {"name": "EMBEDDING", "datatype": "FP32", "shape": [n, dim], "data": [0.5] * n * dim},
        {"name": "TOKENS", "datatype": "INT64", "shape": [n], "data": tokens}]}  # fmt: skip
    return UpstreamReply(200, {"content-type": "application/json"}, _dumps(body))


embedding_answer = st.builds(
    lambda dim, tokens: lambda request: _embedding_answer(request, dim, tokens),
    st.integers(1, 4), _maybe(st.lists(st.integers(0, 300), min_size=1, max_size=1)),
)  # fmt: skip
any_reply = st.one_of(
    st.builds(UpstreamReply,
              st.sampled_from([200, 200, 400, 404, 429, 500, 502, 503, 504]),
              st.fixed_dictionaries({"content-type": st.sampled_from(
                  ["application/json", "text/event-stream", "text/plain"])},
                  optional={"cache-control": header_values["cache-control"],
                            "retry-after": token, "content-length": token}),
              _encode(json_values)),
    st.just(UpstreamReply(200, {"content-type": "text/event-stream"}, b"data: {\"choi")),
)  # fmt: skip
# Mostly what the route's model would answer, so that the response side's parsing runs.
REPLIES = {
    "/v1/chat/completions": st.one_of(chat_answer, stream_answer, any_reply),
    "/v1/embeddings": st.one_of(embedding_answer, embedding_answer, any_reply),
}


# --- the property -------------------------------------------------------------------------


def _faults() -> float:
    return sum(s.value for m in metrics.FILTER_FAULTS.collect() for s in m.samples
               if s.name.endswith("_total"))  # fmt: skip


@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED == 0, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_input_makes_a_filter_fault(
    harness: Harness, loop: asyncio.AbstractEventLoop, family: str, data: st.DataObject
) -> None:
    route, method, path, headers, body = data.draw(requests(FAMILIES[family]), label="request")
    reply = data.draw(REPLIES.get(route, any_reply), label="upstream reply")
    before = _faults()
    seen: list[Headers] = []

    def upstream(h: Headers, b: bytes) -> UpstreamReply:
        seen.append(h)
        return reply if isinstance(reply, UpstreamReply) else reply(b)

    result = loop.run_until_complete(
        asyncio.wait_for(
            harness.request(method, path, headers=headers, body=body, upstream=upstream), 30
        )
    )
    # `pytest --hypothesis-show-statistics` shows how the examples spread over the answers.
    event(f"{route} -> {result.status} by {result.responded_by}")
    assert _faults() == before, f"a filter faulted on {method} {path} {headers} {body[:200]!r}"
    if result.responded_by is not None:
        assert result.status in ANSWERED, (result.status, result.body[:300])
        if result.status >= 400:
            err = orjson.loads(result.body)["error"]
            assert isinstance(err["type"], str) and isinstance(err["message"], str)
    for h in seen:  # what reached the model carries no client-made internal header
        assert SPOOF not in h.values(), h
    if result.responded_by is None:
        assert SPOOF not in result.headers.values(), result.headers
