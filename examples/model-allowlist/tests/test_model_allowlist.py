"""The example policy, tested the way the docs tell filter authors to: with the shipped
harness, in process, no Envoy, no Triton."""

from __future__ import annotations

import hashlib

import pytest
from floodwall_model_allowlist import AllowlistParams, ModelAllowlist
from pydantic import ValidationError

from filters.auth.filter import AuthFilter
from filters.openai.filter import OpenAIFilter
from proxy.api import Deps
from proxy.config import FilterConfig
from proxy.registry import available, build_filters
from proxy.testing import Harness, UpstreamReply


def _chain(**params: object) -> Harness:
    keys = [{"id": t, "tenant": t, "sha256": hashlib.sha256(f"{t}-key".encode()).hexdigest()}
            for t in ("acme", "other")]  # fmt: skip
    auth = AuthFilter(AuthFilter.Params.model_validate({"keys": keys}), Deps())
    auth.name = "auth"
    api = OpenAIFilter(
        OpenAIFilter.Params.model_validate(
            {"embedding_models": {m: {"triton_model": m} for m in ("small", "large")}}
        ),
        Deps(),
    )
    api.name = "openai"
    allow = ModelAllowlist(AllowlistParams.model_validate(params), Deps())
    allow.name = "model_allowlist"
    return Harness.for_filters([auth, api, allow])


async def _embed(h: Harness, tenant: str, model: str) -> int:
    r = await h.request(
        "POST", "/v1/embeddings",
        headers={"authorization": f"Bearer {tenant}-key", "content-type": "application/json"},
        body=f'{{"model": "{model}", "input": "hi"}}',
        upstream=UpstreamReply(body=b'{"outputs": []}'),
    )  # fmt: skip
    return r.status


async def test_tenants_get_their_models_and_others_the_default() -> None:
    h = _chain(tenants={"acme": ["small", "large"]}, default=["small"])
    assert await _embed(h, "acme", "large") != 403
    assert await _embed(h, "other", "small") != 403
    r = await h.request(
        "POST", "/v1/embeddings",
        headers={"authorization": "Bearer other-key"}, body='{"model": "large", "input": "hi"}',
    )  # fmt: skip
    assert r.status == 403 and r.json()["error"]["type"] == "model_not_allowed"
    assert not r.upstream_called


async def test_kserve_paths_are_checked_from_the_headers() -> None:
    h = _chain(default=["small"])
    r = await h.request("POST", "/v2/models/large/infer",
                        headers={"authorization": "Bearer acme-key"}, body=b"{}")  # fmt: skip
    assert r.status == 403
    # The KServe route stays headers-only: no body phase was asked for.
    plan = h.chain.plan(h.chain.config.route_for("/v2/models/large/infer"))
    assert {p.value for p in plan.phases} == {"request_headers"}


def test_bad_params_fail_at_start() -> None:
    with pytest.raises(ValidationError, match="allow no model"):
        AllowlistParams.model_validate({"tenants": {"acme": []}})
    with pytest.raises(ValidationError):
        AllowlistParams.model_validate({"tenant": {}})  # a typo is an error, not ignored


def test_registered_through_the_entry_point() -> None:
    # Installed (scripts/setup.sh does `pip install -e examples/model-allowlist`), the type
    # is found like a built-in one.
    assert available()["model_allowlist"] == "floodwall_model_allowlist:ModelAllowlist"
    (f,) = build_filters(
        [FilterConfig(name="allow", type="model_allowlist", params={"default": ["m"]})], Deps()
    )
    assert isinstance(f, ModelAllowlist) and f.name == "allow"
