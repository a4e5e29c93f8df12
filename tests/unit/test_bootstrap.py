"""The rendered Envoy bootstrap: derived processing modes, clusters, and `envoy --mode validate`
on each variant (a real Envoy binary; ~0.3 s per check)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.bootstrap import render
from proxy.cli import validate_envoy
from proxy.config import DEFAULT_CONFIG, ConfigError, FloodwallConfig, load_config, parse_config
from proxy.process import build_chain


def _render(cfg: FloodwallConfig, d: Path = Path("/tmp/fw")) -> dict[str, Any]:
    return render(cfg, build_chain(cfg), d)


def _hcm(b: dict[str, Any]) -> dict[str, Any]:
    tc: dict[str, Any] = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    return tc


def _routes(b: dict[str, Any]) -> dict[str, Any]:
    return {r["name"]: r for r in _hcm(b)["route_config"]["virtual_hosts"][0]["routes"]}


def test_local_config_processing_modes_follow_the_filters() -> None:
    b = _render(load_config(DEFAULT_CONFIG))
    routes = _routes(b)
    mode = lambda r: routes[r]["typed_per_filter_config"][  # noqa: E731
        "envoy.filters.http.ext_proc"
    ]["overrides"]["processing_mode"]
    # embeddings: the openai filter rewrites bodies both ways
    assert mode("embeddings")["request_body_mode"] == "BUFFERED"
    assert mode("embeddings")["response_body_mode"] == "BUFFERED"
    # passthrough: headers only (auth and rate_limit; rate_limit adds RateLimit headers to
    # responses); bodies never cross to Python
    assert mode("kserve_http") == {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "NONE",
        "response_body_mode": "NONE",
    }
    assert routes["kserve_grpc"]["match"]["grpc"] == {}
    assert routes["not_found"]["direct_response"]["status"] == 404


def test_validate_local_config_with_envoy() -> None:
    assert validate_envoy(load_config(DEFAULT_CONFIG)) is None


def _variant(**over: Any) -> FloodwallConfig:
    base: dict[str, Any] = {
        "upstreams": {
            "a": {"endpoints": [{"address": "127.0.0.1", "port": 9, "weight": 3},
                                {"address": "localhost", "port": 10}]},
        },
        "routes": [{"name": "r", "match": {"prefix": "/"}, "upstream": "a"}],
    }  # fmt: skip
    base.update(over)
    return parse_config(base)


@pytest.mark.parametrize("lb", ["round_robin", "least_request", "ring_hash"])
def test_lb_policies_and_weights_validate(lb: str) -> None:
    cfg = _variant(
        upstreams={
            "a": {
                "lb_policy": lb,
                "hash_header": "x-floodwall-tenant" if lb == "ring_hash" else None,
                "endpoints": [
                    {"address": "127.0.0.1", "port": 9, "weight": 3},
                    {"address": "127.0.0.2", "port": 9, "weight": 1},
                ],
            }
        }
    )
    b = _render(cfg)
    cluster = b["static_resources"]["clusters"][1]
    assert cluster["lb_policy"] == lb.upper()
    weights = [e["load_balancing_weight"] for e in cluster["load_assignment"]["endpoints"][0][
        "lb_endpoints"]]  # fmt: skip
    assert weights == [3, 1]
    assert validate_envoy(cfg) is None


def test_endpoint_priorities_are_failover_groups() -> None:
    cfg = _variant(
        upstreams={
            "a": {"endpoints": [
                {"address": "127.0.0.1", "port": 9},
                {"address": "127.0.0.2", "port": 9},
                {"address": "127.0.0.3", "port": 9, "priority": 1},  # the spill-over pool
            ]}
        }
    )  # fmt: skip
    groups = _render(cfg)["static_resources"]["clusters"][1]["load_assignment"]["endpoints"]
    assert [(g["priority"], len(g["lb_endpoints"])) for g in groups] == [(0, 2), (1, 1)]
    assert validate_envoy(cfg) is None
    with pytest.raises(ConfigError, match="without gaps"):
        _variant(upstreams={"a": {"endpoints": [{"address": "127.0.0.1", "port": 9,
                                                 "priority": 2}]}})  # fmt: skip


def test_several_processors_over_tcp_are_endpoints() -> None:
    cfg = _variant(processor={"processes": 3, "transport": "tcp", "port": 9300})
    b = _render(cfg)
    proc = b["static_resources"]["clusters"][0]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in proc["load_assignment"]["endpoints"][0]["lb_endpoints"]]  # fmt: skip
    assert ports == [9300, 9301, 9302]
    assert validate_envoy(cfg) is None


def test_uds_processors_and_failure_mode() -> None:
    cfg = _variant(processor={"processes": 2, "failure_mode_allow": True})
    b = _render(cfg, Path("/run/fw"))
    proc = b["static_resources"]["clusters"][0]
    paths = [e["endpoint"]["address"]["pipe"]["path"]
             for e in proc["load_assignment"]["endpoints"][0]["lb_endpoints"]]  # fmt: skip
    assert paths == ["/run/fw/processor-0.sock", "/run/fw/processor-1.sock"]
    filters = _hcm(b)["http_filters"]
    names = [f["name"] for f in filters]
    ext = filters[names.index("envoy.filters.http.ext_proc")]["typed_config"]
    assert ext["failure_mode_allow"] is True
    # Traffic that passes a down processor unchecked must not carry forged internal headers:
    # Envoy drops them first (the e2e proofs: tests/e2e/test_faults.py::test_processor_killed,
    # tests/e2e/test_gateway.py::test_the_access_log_never_takes_a_forged_tenant).
    guard = names.index("envoy.filters.http.header_mutation")
    assert guard < names.index("envoy.filters.http.ext_proc")
    rule = filters[guard]["typed_config"]["mutations"]["request_mutations"]
    assert rule == [{"remove_on_match": {"key_matcher": {"prefix": "x-floodwall-"}}}]
    assert validate_envoy(cfg) is None
    # And where the processor refuses (fail-closed): its own answers (401, 429, hits) leave
    # the request headers as they came, and the access log reads the tenant from them.
    fail_closed = [f["name"] for f in _hcm(_render(_variant()))["http_filters"]]
    assert fail_closed.index("envoy.filters.http.header_mutation") == 0


def test_tls_listener_validates(tmp_path: Path) -> None:
    from tests.helpers import self_signed_cert

    crt, key = self_signed_cert(tmp_path)
    cfg = _variant(listener={"tls": {"cert_file": str(crt), "key_file": str(key)}})
    b = _render(cfg)
    ts = b["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
    assert ts["name"] == "envoy.transport_sockets.tls"
    assert validate_envoy(cfg) is None


def test_invalid_bootstrap_is_reported() -> None:
    cfg = _variant(listener={"address": "not-an-ip"})
    err = validate_envoy(cfg)
    assert err is not None and "not-an-ip" in err


def test_docker_example_config_validates() -> None:
    from proxy.config import REPO_ROOT

    cfg = load_config(REPO_ROOT / "examples" / "docker.yaml")
    assert cfg.triton is None and cfg.listener.address == "0.0.0.0"
    assert cfg.processor.processes == 2
    clusters = {c["name"]: c for c in _render(cfg)["static_resources"]["clusters"]}
    assert clusters["triton_http"]["type"] == "STRICT_DNS"  # hostnames resolve by DNS
    assert validate_envoy(cfg) is None


def test_a_route_timeout_past_the_stream_idle_timeout_sets_the_routes_idle_timeout() -> None:
    routes = [
        {"name": "slow", "match": {"prefix": "/slow"}, "upstream": "a", "timeout_ms": 120_000},
        {"name": "r", "match": {"prefix": "/"}, "upstream": "a"},
    ]
    action = {n: r["route"] for n, r in _routes(_render(_variant(routes=routes))).items()
              if n != "not_found"}  # fmt: skip
    # Envoy resets a stream idle for the listener's stream_idle_timeout (60 s) unless the route
    # has its own: a 120 s route would get 60 s (504 SI).
    assert action["slow"]["timeout"] == "120.000s"
    assert float(action["slow"]["idle_timeout"].rstrip("s")) >= 120
    assert action["r"]["idle_timeout"] == "60.000s"  # never shorter than the listener's
