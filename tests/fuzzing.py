"""Hypothesis strategies shared by the fuzz tests (tests/unit/test_fuzz_config.py,
tests/integration/test_fuzz_chain.py, tests/e2e/test_fuzz_gateway.py): any JSON, values that
confuse parsers, valid documents edited a little, and client requests to the shipped local
config (every route family, random and spoofed headers)."""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import strategies as st

scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=16,
)
# Values that confuse parsers: each type in the place of another, empties and extremes.
nasty = st.sampled_from(
    ["", "abc", "1", "-1", "1e309", "null", "\u0000", "x" * 5000, 0, -1, 1, 2**63, -(2**63),
     1e308, -0.0, 0.5, True, False, None, [], {}, [[]], [None], {"": None}, [1, "a"]]
) | json_values  # fmt: skip


def places(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON tree."""
    out: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        node = stack.pop()
        keys = (
            list(node)
            if isinstance(node, dict)
            else range(len(node))
            if isinstance(node, list)
            else []
        )
        for k in keys:
            out.append((node, k))
            stack.append(node[k])
    return out


@st.composite
def mutated(
    draw: st.DrawFn, valid: st.SearchStrategy[Any], edits: tuple[int, ...] = (0, 1, 1, 1, 2)
) -> Any:
    """A valid value, then up to two edits at places drawn evenly from its whole tree: a value
    replaced by a confusing one, a key dropped, an unknown key added. Most examples stay an
    edit or two from valid, where the parsers' edge cases are."""
    # Copies: strategies such as just() hand out one shared object, which an edit must not touch.
    value = copy.deepcopy(draw(valid))
    for _ in range(draw(st.sampled_from(edits))):
        where = places(value)
        edit = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if not where or draw(st.integers(0, 9)) == 0:  # the whole document
            value = copy.deepcopy(draw(nasty)) if edit == "replace" else value
            continue
        parent, key = draw(st.sampled_from(where))
        if edit == "replace":
            parent[key] = copy.deepcopy(draw(nasty))
        elif edit == "drop":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = copy.deepcopy(draw(nasty))
        else:
            parent.append(copy.deepcopy(draw(nasty)))
    return value


# --- client requests to the shipped local config (examples/local.yaml) -----------------

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

words = st.sampled_from(
    ["what", "is", "the", "capital", "of", "France", "don't", "cancel", "my", "subscription",
     "2024", "42", "refund", "Paris", "not", "\u00e9t\u00e9", "\u4e2d\u6587", "\u200b", "\x00"]
)  # fmt: skip
# No lone surrogates here (any JSON value elsewhere may have one: not UTF-8 once encoded).
prompts = st.lists(words, min_size=1, max_size=12).map(" ".join) | st.text(
    st.characters(codec="utf-8"), min_size=1, max_size=60
)


def maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
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


def encoded(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """JSON of the value, or that JSON broken: cut short, not UTF-8, or not JSON at all."""
    as_json = mutated(strategy).map(loose_json)
    return st.one_of(
        *[as_json] * 8,
        st.tuples(as_json, st.integers(0, 64)).map(lambda t: t[0][: t[1]]),
        as_json.map(lambda b: b.replace(b'"', b"\xff", 1)),
        st.binary(max_size=64),
        st.just(b"[" * 300 + b"]" * 300),
    )  # fmt: skip


def loose_json(v: Any) -> bytes:
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
    "/v1/chat/completions": (["POST"] * 5 + ["GET"], encoded(chat_body)),
    "/v1/embeddings": (["POST"] * 5 + ["PUT"], encoded(embeddings_body)),
    "/v1/jobs": (["POST"] * 5 + ["GET"], encoded(jobs_body)),
    "/v1/jobs/": (["GET", "DELETE"], st.just(b"")),
    "/v2/models/embedder/infer": (["POST"], encoded(kserve_body)),
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
        # A space cannot stand in a request line (http.client refuses to send one): escaped.
        job_id = st.sampled_from(["", "abc", "0" * 32, "../x", "%00", "a/b"]) | token
        path += draw(job_id).replace(" ", "%20")
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
