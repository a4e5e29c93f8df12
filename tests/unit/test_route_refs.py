"""Route names inside filter params must be configured routes: a typo would silently leave
the route without its limit or its cache (the params validate on their own)."""

from __future__ import annotations

import pytest

from proxy.api import Deps
from proxy.config import ConfigError, parse_config
from proxy.process import build_chain
from proxy.testing import default_config


def _with(filters: list[dict[str, object]]) -> dict[str, object]:
    return {**default_config().model_dump(mode="json"), "filters": filters}


@pytest.mark.parametrize(
    "fc",
    [
        {"name": "rl", "type": "rate_limit",
         "params": {"limits": [{"name": "l", "key": [], "rate": 1,
                                "when": {"routes": ["embedding"]}}]}},
        {"name": "cache", "type": "cache", "params": {"routes": {"embedding": {}}}},
    ],
)  # fmt: skip
def test_a_route_name_in_params_must_be_a_configured_route(fc: dict[str, object]) -> None:
    cfg = parse_config(_with([fc]))
    with pytest.raises(ConfigError, match=r"unknown route.*embedding"):
        build_chain(cfg, Deps())
    fixed = parse_config(_with([{**fc, "params": _rename(fc["params"])}]))
    build_chain(fixed, Deps())  # the configured name is fine


def _rename(params: object) -> object:
    """The params with the typo'd route name replaced by a configured one."""
    import json

    return json.loads(json.dumps(params).replace('"embedding"', '"embeddings"'))
