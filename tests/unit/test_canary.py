"""Canary splits: the weights hold over many callers, a caller sticks to its target, the
answer and the metrics say which target served, and a reload moves the traffic."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from filters.auth.filter import AuthFilter
from filters.canary.filter import REQUESTS, CanaryFilter
from filters.canary.params import CanaryParams
from filters.openai.filter import OpenAIFilter
from filters.openai.params import OpenAIParams
from proxy.api import Deps
from proxy.config import load_config
from proxy.process import build_chain
from proxy.reload import Reloader
from proxy.testing import Harness, UpstreamReply, default_config

KEYS = [f"key-{i}" for i in range(400)]


def _auth() -> AuthFilter:
    keys = [
        {"id": k, "tenant": f"t{i % 7}", "sha256": hashlib.sha256(k.encode()).hexdigest()}
        for i, k in enumerate(KEYS)
    ]
    f = AuthFilter(AuthFilter.Params.model_validate({"keys": keys}), Deps())
    f.name = "auth"
    return f


def _harness(split: dict[str, Any], rng: random.Random | None = None) -> Harness:
    canary = CanaryFilter(
        CanaryParams.model_validate({"splits": {"embedder": split}}),
        Deps(rng=rng or random.Random(7)),
    )
    canary.name = "canary"
    return Harness.for_filters([_auth(), canary])


async def _call(h: Harness, key: str) -> tuple[str, str]:
    r = await h.request(
        "POST",
        "/v2/models/embedder/infer",
        body=b"{}",
        headers={"authorization": f"Bearer {key}"},
        upstream=UpstreamReply(),
    )
    assert r.status == 200 and r.upstream_headers is not None
    return r.upstream_headers[":path"], r.headers["x-floodwall-canary"]


SPLIT = {"targets": [{"model": "embedder", "weight": 95}, {"model": "embedder_v2", "weight": 5}]}


@pytest.mark.parametrize("sticky", ["key", "none"])
async def test_weights_hold_over_many_callers(sticky: str) -> None:
    h = _harness({**SPLIT, "sticky": sticky})
    served = [(await _call(h, k))[1] for k in KEYS * 2]
    share = served.count("embedder_v2") / len(served)
    assert 0.02 < share < 0.09, share  # 5% of 800
    path, target = await _call(h, KEYS[0])
    assert path == f"/v2/models/{target}/infer"


async def test_a_key_sticks_to_its_target() -> None:
    h = _harness(SPLIT)
    for k in KEYS[:50]:
        first = await _call(h, k)
        assert all([await _call(h, k) == first for _ in range(3)])


async def test_outcomes_are_counted_per_target() -> None:
    h = _harness({"targets": [{"model": "embedder_v2", "weight": 1}]})
    before = REQUESTS.labels("embedder", "embedder_v2", "5xx")._value.get()
    r = await h.request(
        "POST",
        "/v2/models/embedder/infer",
        body=b"{}",
        headers={"authorization": f"Bearer {KEYS[0]}"},
        upstream=UpstreamReply(status=503),
    )
    assert r.status == 503
    assert REQUESTS.labels("embedder", "embedder_v2", "5xx")._value.get() == before + 1


def test_bad_splits_fail_loudly() -> None:
    for bad in (
        {"targets": []},
        {"targets": [{"model": "a", "weight": 0}]},
        {"targets": [{"model": "a", "weight": 1}, {"model": "a", "weight": 2}]},
        {"targets": [{"model": "a", "weight": -1}]},
        {"targets": [{"model": "a/../b", "weight": 1}]},
        # A streamed call could land on a target that cannot stream.
        {
            "targets": [
                {"model": "a", "weight": 1, "stream_model": "a_s"},
                {"model": "b", "weight": 1},
            ]
        },
        {
            "targets": [
                {"model": "a", "weight": 1, "stream_model": "b"},
                {"model": "b", "weight": 1, "stream_model": "b_s"},
            ]
        },
        {
            "targets": [
                {"model": "a", "weight": 1, "stream_model": "s"},
                {"model": "b", "weight": 1, "stream_model": "s"},
            ]
        },
    ):
        with pytest.raises(ValidationError):
            CanaryParams.model_validate({"splits": {"m": bad}})


CHAT_ROUTES = [
    {"name": "chat", "match": {"path": "/v1/chat/completions"}, "api": "openai_chat",
     "upstream": "up", "timeout_ms": 20000},
    {"name": "kserve_http", "match": {"prefix": "/v2"}, "upstream": "up"},
]  # fmt: skip


def _chat_harness(targets: list[dict[str, Any]]) -> Harness:
    chat_models = {"sim-llm": {"triton_model": "sim_llm", "stream_model": "sim_llm_stream"}}
    oa = OpenAIFilter(OpenAIParams.model_validate({"chat_models": chat_models}), Deps())
    oa.name = "openai"
    gen = {"sticky": "none", "targets": [{"model": "gen_v2", "weight": 1}]}
    splits = {"sim-llm": {"sticky": "none", "targets": targets}, "sim_llm_stream": gen}
    canary = CanaryFilter(
        CanaryParams.model_validate({"splits": splits}), Deps(rng=random.Random(1))
    )
    canary.name = "canary"
    return Harness.for_filters([oa, canary], default_config(CHAT_ROUTES))


async def _chat_path(h: Harness, stream: bool) -> tuple[str, str | None]:
    body = {"model": "sim-llm", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    final = b'{"TEXT":"x","PROMPT_TOKENS":1,"COMPLETION_TOKENS":1,"FINISH_REASON":"stop"}'
    reply = UpstreamReply(200, {}, b"data: " + final + b"\n\n")
    r = await h.request("POST", "/v1/chat/completions", body=json.dumps(body), upstream=reply)
    assert r.upstream_headers is not None
    return r.upstream_headers[":path"], r.headers.get("x-floodwall-canary")


async def test_a_streamed_chat_goes_to_the_targets_stream_twin() -> None:
    h = _chat_harness([{"model": "sim_llm_v2", "stream_model": "sim_llm_v2_stream", "weight": 1}])
    assert await _chat_path(h, stream=False) == ("/v2/models/sim_llm_v2/infer", "sim_llm_v2")
    assert await _chat_path(h, stream=True) == (
        "/v2/models/sim_llm_v2_stream/generate_stream",
        "sim_llm_v2",
    )


async def test_a_streamed_chat_stays_on_its_twin_when_the_targets_have_none() -> None:
    h = _chat_harness([{"model": "sim_llm_v2", "weight": 1}])
    assert await _chat_path(h, stream=False) == ("/v2/models/sim_llm_v2/infer", "sim_llm_v2")
    assert await _chat_path(h, stream=True) == ("/v2/models/sim_llm_stream/generate_stream", None)
    # A decoupled model the client names itself (KServe HTTP) is split to targets of its kind.
    r = await h.request("POST", "/v2/models/sim_llm_stream/generate_stream", body=b"{}")
    assert r.upstream_headers is not None
    assert r.upstream_headers[":path"] == "/v2/models/gen_v2/generate_stream"


async def test_reload_moves_the_traffic(tmp_path: Path) -> None:
    def cfg(weights: tuple[int, int]) -> dict[str, Any]:
        return {
            "upstreams": {"up": {"endpoints": [{"address": "127.0.0.1", "port": 1}]}},
            "routes": [{"name": "kserve_http", "match": {"prefix": "/v2"}, "upstream": "up"}],
            "filters": [
                {
                    "name": "canary",
                    "type": "canary",
                    "params": {
                        "splits": {
                            "embedder": {
                                "sticky": "none",
                                "targets": [
                                    {"model": "embedder", "weight": weights[0]},
                                    {"model": "embedder_v2", "weight": weights[1]},
                                ],
                            }
                        }
                    },
                }
            ],
        }

    path = tmp_path / "fw.yaml"
    path.write_text(yaml.safe_dump(cfg((100, 0))))
    first = load_config(path)
    chain = build_chain(first, Deps())
    reloader = Reloader(path, first, chain, Deps(), lambda c: None)

    async def served() -> set[str]:
        h = Harness(reloader.cfg, list(reloader.chain.filters))
        out = set()
        for _ in range(20):
            r = await h.request("POST", "/v2/models/embedder/infer", body=b"{}")
            out.add(r.headers["x-floodwall-canary"])
        return out

    assert await served() == {"embedder"}
    path.write_text(yaml.safe_dump(cfg((0, 100))))
    assert await reloader.reload("test")
    assert await served() == {"embedder_v2"}
    await reloader.stop()
