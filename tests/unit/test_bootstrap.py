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


def test_the_size_limit_holds_on_every_http_route_and_grpc_streams_are_not_buffered() -> None:
    routes = _routes(_render(load_config(DEFAULT_CONFIG)))
    per_filter = {n: r["typed_per_filter_config"] for n, r in routes.items() if n != "not_found"}
    buffer = "envoy.filters.http.buffer"
    # The buffer filter answers 413 past listener.max_request_bytes: on for passthrough routes
    # too, where no filter reads the body (tests/e2e/test_envoy_edges.py sends the bodies).
    assert "kserve_http" in per_filter
    assert [n for n, f in per_filter.items() if buffer in f] == ["kserve_grpc"]
    assert per_filter["kserve_grpc"][buffer]["disabled"] is True


def test_kserve_grpc_routes_count_statuses_and_make_parse_errors_invalid_argument() -> None:
    hcm = _hcm(_render(load_config(DEFAULT_CONFIG)))
    lua = "envoy.filters.http.lua"
    routes = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    # Triton's "Unable to parse request" (INTERNAL) becomes INVALID_ARGUMENT on gRPC routes
    # (tests/e2e/test_gateway.py sends the garbage); KServe HTTP keeps its own Lua.
    grpc_lua = routes["kserve_grpc"]["typed_per_filter_config"][lua]["source_code"]
    assert '"grpc-status", "3"' in grpc_lua["inline_string"]
    assert lua not in routes["kserve_http"]["typed_per_filter_config"]
    # gRPC statuses counted per KServe method, Envoy's own refusals included: first in line.
    names = [f["name"] for f in hcm["http_filters"]]
    assert names[0] == "envoy.filters.http.grpc_stats"
    allowed = hcm["http_filters"][0]["typed_config"]["individual_method_stats_allowlist"]
    assert {"ModelInfer", "ModelStreamInfer"} <= set(allowed["services"][0]["method_names"])
    # Without a gRPC route, nothing to count.
    plain = [f["name"] for f in _hcm(_render(_variant()))["http_filters"]]
    assert "envoy.filters.http.grpc_stats" not in plain


def test_envoys_own_refusals_carry_the_error_header_and_type() -> None:
    b = _render(_variant())
    mappers = _hcm(b)["local_reply_config"]["mappers"]
    for m in mappers:
        type_ = m["body_format_override"]["json_format"]["error"]["type"]
        error = {"key": "x-floodwall-error", "value": type_}
        overwrite = "OVERWRITE_IF_EXISTS_OR_ADD"
        assert m["headers_to_add"][0] == {"header": error, "append_action": overwrite}
        # gRPC callers of a dead or late processor: UNAVAILABLE, not Envoy's UNKNOWN for 500;
        # of a call over Envoy's buffer: RESOURCE_EXHAUSTED, not UNKNOWN for 413.
        grpc = [h["header"] for h in m["headers_to_add"][1:]]
        if grpc:
            status = "8" if type_ == "request_too_large" else "14"
            assert grpc == [{"key": "grpc-status", "value": status}], m
            assert (
                "application/grpc" in m["filter"]["extension_filter"]["typed_config"]["expression"]
            )
    assert sum(len(m["headers_to_add"]) > 1 for m in mappers) == 3
    # Codec refusals keep Envoy's status; the last mappers take any refusal not yet mapped,
    # never the processor's own answers (details floodwall_*).
    kept = {m["body_format_override"]["json_format"]["error"]["type"] for m in mappers
            if "status_code" not in m}  # fmt: skip
    assert {"bad_request", "request_headers_too_large", "upgrade_required",
            "not_implemented", "not_found", "gateway_error"} <= kept  # fmt: skip
    assert "!response.code_details.startsWith('floodwall_')" in str(mappers[-1]["filter"])
    headers = _routes(b)["not_found"]["response_headers_to_add"]
    assert {"key": "x-floodwall-error", "value": "not_found"} in [h["header"] for h in headers]


def test_a_grpc_route_timeout_bounds_calls_without_a_deadline() -> None:
    routes = [{"name": "g", "match": {"prefix": "/"}, "api": "kserve_grpc", "upstream": "a",
               "timeout_ms": 2000}]  # fmt: skip
    ups = {"a": {"protocol": "grpc", "endpoints": [{"address": "127.0.0.1", "port": 9}]}}
    action = _routes(_render(_variant(upstreams=ups, routes=routes)))["g"]["route"]
    assert action["timeout"] == "0s"
    assert action["max_stream_duration"] == {
        "max_stream_duration": "2.000s",  # no grpc-timeout from the client
        "grpc_timeout_header_max": "2.000s",  # the client's, capped
    }


def test_max_retries_is_not_overridden_by_a_retry_budget() -> None:
    def thresholds(cb: dict[str, Any]) -> dict[str, Any]:
        ups = {"a": {"endpoints": [{"address": "127.0.0.1", "port": 9}], "circuit_breakers": cb}}
        t: dict[str, Any] = _render(_variant(upstreams=ups))["static_resources"]["clusters"][1][
            "circuit_breakers"
        ]["thresholds"][0]
        return t

    # Envoy ignores max_retries wherever a retry budget is set (the e2e proof:
    # tests/e2e/test_envoy_edges.py::test_circuit_breakers_max_retries_holds).
    named = thresholds({"max_retries": 0})
    assert named["max_retries"] == 0 and "retry_budget" not in named
    assert thresholds({})["retry_budget"]["budget_percent"] == {"value": 20.0}
    assert thresholds({"retry_budget_percent": 50})["retry_budget"]["budget_percent"] == {
        "value": 50
    }
    with pytest.raises(ConfigError, match="max_retries or the retry budget"):
        thresholds({"max_retries": 1, "retry_budget_percent": 50})  # one would be ignored


def test_kserve_routes_refuse_tritons_admin_apis_unless_the_route_allows_them() -> None:
    rbac = "envoy.filters.http.rbac"
    per_filter = {
        n: r["typed_per_filter_config"]
        for n, r in _routes(_render(load_config(DEFAULT_CONFIG))).items()
    }
    # Every KServe route of the shipped config refuses them (tests/e2e/test_envoy_edges.py
    # sends the calls); the OpenAI and jobs routes speak no Triton API.
    assert sorted(n for n, f in per_filter.items() if rbac in f) == [
        "kserve_grpc", "kserve_health", "kserve_http", "kserve_server",
    ]  # fmt: skip
    shipped = load_config(DEFAULT_CONFIG)
    routes = [
        r.model_copy(update={"admin_apis": r.api in ("kserve_http", "kserve_grpc")})
        for r in shipped.routes
    ]
    cfg = shipped.model_copy(update={"routes": routes})
    assert not any(rbac in r["typed_per_filter_config"] for r in _routes(_render(cfg)).values())
    assert validate_envoy(cfg) is None


def test_outlier_detection_ejects_on_gateway_failures_not_on_any_5xx() -> None:
    # A model server may answer a request it cannot parse with 500 (Triton 2.51 does): one
    # caller's malformed requests must not take healthy hosts out for everyone.
    def od(**outlier: Any) -> dict[str, Any]:
        up = {"endpoints": [{"address": "127.0.0.1", "port": 8000}], "outlier_detection": outlier}
        route = {"name": "r", "match": {"prefix": "/"}, "upstream": "up"}
        cfg = parse_config({"upstreams": {"up": up}, "routes": [route]})
        (c,) = [c for c in _render(cfg)["static_resources"]["clusters"] if c["name"] == "up"]
        out: dict[str, Any] = c["outlier_detection"]
        return out

    default = od()
    assert default["consecutive_gateway_failure"] == 5
    assert default["enforcing_consecutive_gateway_failure"] == 100
    assert default["enforcing_consecutive_5xx"] == 0  # Envoy's own default would be 100
    asked = od(consecutive_5xx=3)
    assert (asked["consecutive_5xx"], asked["enforcing_consecutive_5xx"]) == (3, 100)


def test_a_grpc_route_that_reads_messages_buffers_calls_and_leaves_streams_unheld() -> None:
    # Its unary calls are held by the buffer filter (max_request_bytes: Envoy's 413, as on
    # HTTP routes; ext_proc alone held up to the connection's 8 MiB buffer per call); its
    # streams get a route of their own before it, unbuffered, where the processor refuses them.
    ups = {"a": {"protocol": "grpc", "endpoints": [{"address": "127.0.0.1", "port": 9}]}}
    routes = [
        {"name": "g", "match": {"prefix": "/inference.GRPCInferenceService/"},
         "api": "kserve_grpc", "upstream": "a"},
        {"name": "plain", "match": {"prefix": "/inference."}, "api": "kserve_grpc",
         "upstream": "a"},
    ]  # fmt: skip
    filters = [{"name": "b", "type": "breaker", "routes": ["g"], "params": {"models": ["m"]}}]
    cfg = _variant(upstreams=ups, routes=routes, filters=filters)
    b = _render(cfg)
    listed = [r["name"] for r in _hcm(b)["route_config"]["virtual_hosts"][0]["routes"]]
    assert listed.index("g.ModelStreamInfer") == listed.index("g") - 1
    rs = _routes(b)
    streams, unary, plain = rs["g.ModelStreamInfer"], rs["g"], rs["plain"]
    assert streams["match"] == {"path": "/inference.GRPCInferenceService/ModelStreamInfer",
                                "grpc": {}}  # fmt: skip
    buffer, ext_proc = "envoy.filters.http.buffer", "envoy.filters.http.ext_proc"

    def body_mode(r: dict[str, Any]) -> str:
        mode = r["typed_per_filter_config"][ext_proc]["overrides"]["processing_mode"]
        return str(mode["request_body_mode"])

    assert streams["typed_per_filter_config"][buffer].get("disabled") is True
    assert body_mode(streams) == "NONE"
    assert buffer not in unary["typed_per_filter_config"] and body_mode(unary) == "BUFFERED"
    # A gRPC route no filter reads messages on: streams pass, nothing held.
    assert plain["typed_per_filter_config"][buffer].get("disabled") is True
    assert body_mode(plain) == "NONE" and "plain.ModelStreamInfer" not in rs
    assert validate_envoy(cfg) is None
