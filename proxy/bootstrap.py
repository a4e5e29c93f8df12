"""Renders the Envoy bootstrap from the Floodwall config.

Envoy owns connections, HTTP/2, TLS, retries, health checking and load balancing; this module
only writes that down. Processing modes per route are derived from the filters on the route
(a filter that does not override a body phase never makes Envoy buffer a body).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from proxy.api import Phase
from proxy.chain import INTERNAL_PREFIX, Chain
from proxy.config import (
    CircuitBreakerConfig,
    FloodwallConfig,
    RouteConfig,
    TracingConfig,
    UpstreamConfig,
)
from proxy.errors import ERROR_HEADER, GRPC_STATUS
from proxy.kserve_grpc import SERVICE, STREAM_METHODS
from proxy.process import processor_address

PROCESSOR_CLUSTER = "floodwall_processor"
LUA = "envoy.filters.http.lua"

# On KServe passthrough routes nothing of ours reads the response body, yet Triton's refusals
# must reach callers like every other refusal, in the JSON error format. Triton answers
# {"error": "<text>"}:
# - 503: its queue refusals read "Exceeds maximum queue size" or "Request timeout expired";
#   sent on as 503 with Retry-After;
# - 500 for a request it could not parse (Triton 2.51: malformed JSON, "inputs" missing or
#   of the wrong type, "parameters" not an object, BYTES data that are not strings): the
#   caller's error, so 400. Left a 500, one tenant's malformed requests opened the model's
#   breaker for every tenant (the processor reads the status after this filter) and
#   counted as the host failing.
# LuaJIT in Envoy costs far less than a processor round trip.
KSERVE_ERRORS_LUA = """
local BAD_REQUEST = {"failed to parse the request JSON", "Unable to parse ",
                     "failed to get request params"}

local function starts(text, prefix)
  return string.sub(text, 1, string.len(prefix)) == prefix
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = headers:get(":status")
  if status ~= "503" and status ~= "500" then return end
  if status == "503" and headers:get("retry-after") == nil then
    headers:add("retry-after", "1")
  end
  local body = handle:body()
  if body == nil then return end
  -- The headers object read before body() is out of scope once the body is buffered:
  -- changing it then failed ("object used outside of proper scope") and the 503 kept
  -- Triton's content-type and had no x-floodwall-error.
  headers = handle:headers()
  local raw = body:getBytes(0, body:length())
  local msg = string.match(raw, '^%s*{%s*"error"%s*:%s*"(.*)"%s*}%s*$')
  if msg == nil then return end
  local kind = "upstream_unavailable"
  if status == "500" then
    kind = nil
    for _, prefix in ipairs(BAD_REQUEST) do
      if starts(msg, prefix) then kind = "invalid_request_error" end
    end
    if kind == nil then return end
    headers:replace(":status", "400")
  elseif string.find(msg, "Exceeds maximum queue size", 1, true)
      or string.find(msg, "Request timeout expired", 1, true) then
    kind = "model_overloaded"
  end
  body:setBytes('{"error":{"type":"' .. kind .. '","message":"' .. msg .. '"}}')
  headers:replace("content-type", "application/json")
  headers:replace("x-floodwall-error", kind)
end
"""

# KServe gRPC: Triton answers a message it cannot parse (cut short, not a ModelInferRequest)
# with INTERNAL "Unable to parse request", in a trailers-only reply (grpc-status among the
# headers): the caller's error, so INVALID_ARGUMENT, which no breaker counts (left INTERNAL,
# one caller's garbage could open a breaker on the route for everyone, and read as the model
# failing in metrics). Headers only: a stream's messages pass untouched.
KSERVE_GRPC_ERRORS_LUA = """
function envoy_on_response(handle)
  local headers = handle:headers()
  if headers:get("grpc-status") ~= "13" then return end
  local msg = headers:get("grpc-message")
  if msg == nil or string.sub(msg, 1, 15) ~= "Unable to parse" then return end
  headers:replace("grpc-status", "3")
  headers:replace("x-floodwall-error", "invalid_request_error")
end
"""
EXT_PROC = "envoy.filters.http.ext_proc"
BUFFER = "envoy.filters.http.buffer"
HEADER_MUTATION = "envoy.filters.http.header_mutation"
RBAC = "envoy.filters.http.rbac"
T = "type.googleapis.com/"
# A stream with no bytes either way this long is reset (slow or stalled clients). Each route
# sets its own, at least its timeout (see _route).
STREAM_IDLE_TIMEOUT_MS = 60_000

_LB = {"round_robin": "ROUND_ROBIN", "least_request": "LEAST_REQUEST", "ring_hash": "RING_HASH"}

# Local replies Envoy makes itself (no route, upstream down, overflow, timeouts) are rewritten to
# the gateway's JSON error format. Those carry a response flag; answers from the processor and
# from the upstream carry none, so they pass untouched.
_LOCAL_REPLY_KINDS = [
    (["UH", "UF", "URX", "NC", "DF", "UO"], 503, "upstream_unavailable"),
    (["UT", "SI"], 504, "upstream_timeout"),
    (["UC", "UR"], 502, "upstream_reset"),
]
NOT_FOUND = ("not_found", "no such route")
# Envoy's other refusals (most from its HTTP codec, before any filter ran: response flag DPE)
# keep Envoy's status; the type names what was wrong, the message Envoy's reason (e.g.
# "http1.content_length_and_chunked_not_allowed").
_WHY = "%RESPONSE_CODE_DETAILS%"
_LOCAL_REPLY_STATUSES = {
    400: ("bad_request", f"malformed HTTP request: {_WHY}"),
    404: NOT_FOUND,
    408: ("request_timeout", f"the request did not arrive in time: {_WHY}"),
    413: ("request_too_large", "request body exceeds the size limit"),
    414: ("uri_too_long", f"the request URI is too long: {_WHY}"),
    426: ("upgrade_required", "HTTP/1.0 is not served: use HTTP/1.1 or HTTP/2"),
    431: ("request_headers_too_large", f"too many or too large request headers: {_WHY}"),
    501: ("not_implemented", f"the request uses an HTTP feature not served: {_WHY}"),
}


def _ms(ms: float) -> str:
    return f"{ms / 1000:.3f}s"


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _http2_options() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 1024}},
        }
    }


OTEL_CLUSTER = "floodwall_otel_collector"


def _tracing(t: TracingConfig) -> dict[str, Any]:
    """Envoy's own spans (the request, the ext_proc call, the upstream call) to the collector;
    Envoy passes the trace on to the processor (ext_proc gRPC metadata) and upstream."""
    return {
        "random_sampling": {"value": t.sample_ratio * 100},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": T + "envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTEL_CLUSTER}, "timeout": "1s"},
                "service_name": f"{t.service_name}-envoy",
            },
        },
    }


def _collector_cluster(t: TracingConfig) -> dict[str, Any]:
    host, _, port = t.otlp_endpoint.rpartition(":")
    return {
        "name": OTEL_CLUSTER,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2_options(),
        "load_assignment": {
            "cluster_name": OTEL_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host, int(port))}}]}],
        },
    }


def _set_header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _json_error_format(type_: str, message: str, status: int | None = None) -> dict[str, Any]:
    """A local-reply mapper's rewrite to the error format; ``status`` None keeps Envoy's."""
    m: dict[str, Any] = {
        "headers_to_add": [_set_header(ERROR_HEADER, type_)],
        "body_format_override": {
            "json_format": {"error": {"type": type_, "message": message}},
            "content_type": "application/json",
        },
    }
    if status is not None:
        m["status_code"] = status
    return m


_PER_ROUTE = {
    EXT_PROC: "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
    BUFFER: "envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
    LUA: "envoy.extensions.filters.http.lua.v3.LuaPerRoute",
    RBAC: "envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
}

# Triton's data-plane APIs, by the prefix its API lives under: health, server and model
# metadata, model config, statistics and inference (Triton's own categories, as in its
# --http-restricted-api flag, less shared-memory, model-repository, trace and logging). On
# a KServe route without admin_apis, anything else under the prefix is refused: an allow
# list, so an admin API a later Triton adds, or a path spelled to slip past a deny list
# (%2F, a version segment), is refused too. Matched against the whole path without the
# query, after Envoy normalised it; several small RE2 programs, as Envoy caps each one's size.
_MODEL = r"/v2/models/[^/]+(/versions/[^/]+)?"
_GRPC_SERVICE = SERVICE
_GRPC_SERVED = (
    *("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata"),
    *("ModelConfig", "ModelStatistics", "ModelInfer", "ModelStreamInfer"),
)
_TRITON_SERVED: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "kserve_http": (
        "/v2/",
        [
            {"exact": "/v2/health/live"},
            {"exact": "/v2/health/ready"},
            {"safe_regex": {"regex": _MODEL}},
            {"safe_regex": {"regex": _MODEL + "/(ready|infer|config|stats)"}},
            {"safe_regex": {"regex": _MODEL + "/generate(_stream)?"}},
        ],
    ),
    "kserve_grpc": (_GRPC_SERVICE, [{"exact": _GRPC_SERVICE + m} for m in _GRPC_SERVED]),
}
_ADMIN_DENIED = "rbac_access_denied"  # Envoy's response code details begin so


def _grpc_stats() -> dict[str, Any]:
    """Counts gRPC calls by method and grpc-status, Envoy's own refusals included (first in
    the chain, it sees every reply): `cluster.<upstream>.grpc.inference.GRPCInferenceService.
    <method>.<status>`. A gRPC answer is HTTP 200 whatever happened, so HTTP counters cannot
    tell. KServe's served methods only: a caller's invented names add no series."""
    service = {"name": _GRPC_SERVICE.strip("/"), "method_names": list(_GRPC_SERVED)}
    return {
        "name": "envoy.filters.http.grpc_stats",
        "typed_config": {
            "@type": T + "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
            "emit_filter_state": False,
            "individual_method_stats_allowlist": {"services": [service]},
        },
    }


def _off(filter_name: str) -> dict[str, Any]:
    """Per-route config that switches an HTTP filter off on that route."""
    return {"@type": T + _PER_ROUTE[filter_name], "disabled": True}


def _triton_admin_denied(api: str) -> dict[str, Any]:
    """Per-route RBAC that refuses Triton's admin APIs (see _TRITON_SERVED) before the
    processor runs, so also with failure_mode_allow; the local reply makes it a 404."""
    prefix, served = _TRITON_SERVED[api]
    unserved = {
        "and_rules": {
            "rules": [
                {"url_path": {"path": {"prefix": prefix, "ignore_case": True}}},
                {"not_rule": {"or_rules": {"rules": [{"url_path": {"path": m}} for m in served]}}},
            ]
        }
    }
    policy = {"permissions": [unserved], "principals": [{"any": True}]}
    return {
        "@type": T + _PER_ROUTE[RBAC],
        "rbac": {"rules": {"action": "DENY", "policies": {"triton_admin": policy}}},
    }


def processing_mode(phases: frozenset[Phase]) -> dict[str, str]:
    return {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND" if Phase.RESPONSE_HEADERS in phases else "SKIP",
        "request_body_mode": "BUFFERED" if Phase.REQUEST_BODY in phases else "NONE",
        "response_body_mode": "BUFFERED" if Phase.RESPONSE_BODY in phases else "NONE",
    }


def _route(cfg: FloodwallConfig, r: RouteConfig, phases: frozenset[Phase]) -> dict[str, Any]:
    match: dict[str, Any] = {"path": r.match.path} if r.match.path else {"prefix": r.match.prefix}
    if r.grpc:
        match["grpc"] = {}
    up = cfg.upstreams[r.upstream]
    action: dict[str, Any] = {
        "cluster": r.upstream,
        "timeout": _ms(r.timeout_ms),
        # A route's idle timeout replaces the listener's stream_idle_timeout: a model that
        # thinks longer than that before its first byte must still get the route's timeout.
        "idle_timeout": _ms(max(r.timeout_ms, STREAM_IDLE_TIMEOUT_MS)),
    }
    if r.grpc:
        # gRPC deadlines come from the client's grpc-timeout, capped by the route timeout; a
        # call without one gets the route timeout (max_stream_duration), else it could wait
        # forever. It bounds the whole stream: a ModelStreamInfer stream (bidirectional, many
        # requests) ends after timeout_ms as well, so give streaming routes a long timeout.
        action["timeout"] = "0s"
        action["max_stream_duration"] = {
            "max_stream_duration": _ms(r.timeout_ms),
            "grpc_timeout_header_max": _ms(r.timeout_ms),
        }
    if r.retries is not None and r.retries.num_retries > 0:
        rp: dict[str, Any] = {
            "retry_on": r.retries.retry_on,
            "num_retries": r.retries.num_retries,
            # Retry on another host: the failed one is likely to fail again.
            "retry_host_predicate": [
                {
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": T
                        + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    },
                }
            ],
            "host_selection_retry_max_attempts": 3,
        }
        if r.retries.per_try_timeout_ms:
            rp["per_try_timeout"] = _ms(r.retries.per_try_timeout_ms)
        action["retry_policy"] = rp
    if up.lb_policy == "ring_hash" and up.hash_header:
        action["hash_policy"] = [{"header": {"header_name": up.hash_header}}]
    per_filter: dict[str, Any] = {
        EXT_PROC: {
            "@type": T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            "overrides": {"processing_mode": processing_mode(phases)},
        }
    }
    if r.api == "kserve_grpc":
        per_filter[LUA] = {
            "@type": T + _PER_ROUTE[LUA],
            "source_code": {"inline_string": KSERVE_GRPC_ERRORS_LUA},
        }
    elif r.api != "kserve_http":
        per_filter[LUA] = _off(LUA)
    if r.api in _TRITON_SERVED and not r.admin_apis:
        per_filter[RBAC] = _triton_admin_denied(r.api)
    if r.grpc and Phase.REQUEST_BODY not in phases:
        # The buffer filter is what enforces listener.max_request_bytes (413), so it stays on
        # for every HTTP route, also where no filter reads the body: it holds a body only up to
        # the limit. Not on gRPC routes whose calls stream to Triton unread: it would hold a
        # call's headers until its stream ends, and ModelStreamInfer is a bidirectional
        # stream; their bodies are not size-limited here. Where a filter reads gRPC messages,
        # it stays on for the unary calls (streams get a route of their own: _routes).
        per_filter[BUFFER] = _off(BUFFER)
    return {
        "name": r.name,
        "match": match,
        "route": action,
        "typed_per_filter_config": per_filter,
    }


def _routes(cfg: FloodwallConfig, chain: Chain) -> list[dict[str, Any]]:
    """The routes in Envoy's order. A gRPC route whose filters read messages holds each call
    in the buffer filter (max_request_bytes, as on HTTP routes); its streaming calls get a
    route of their own before it, unbuffered (held, a stream whose client waits for answers
    before closing its side would hang), where the processor refuses them at their headers
    (UNIMPLEMENTED: their messages cannot be read)."""
    out = []
    for r in cfg.routes:
        phases = chain.phases_for(r)
        if r.grpc and Phase.REQUEST_BODY in phases:
            for method in sorted(STREAM_METHODS):
                if r.match.matches(method):
                    streams = _route(cfg, r, phases - {Phase.REQUEST_BODY})
                    streams["name"] = f"{r.name}.{method.rsplit('/', 1)[1]}"
                    streams["match"] = {"path": method, "grpc": {}}
                    out.append(streams)
        out.append(_route(cfg, r, phases))
    return out


def _spoof_guard() -> dict[str, Any]:
    """Envoy itself drops client-sent `x-floodwall-*` request headers, before the processor:
    a request answered by the processor (a 401, a 429, a cache hit) never has its request
    headers rewritten, and Envoy's access log reads the tenant and key id from them; a
    request that passes a down processor (failure_mode_allow) must not carry a forged tenant
    or priority to the upstream. The processor strips them too, for an Envoy configured by
    hand, and counts those (floodwall_spoofed_headers_stripped_total)."""
    rule = {"remove_on_match": {"key_matcher": {"prefix": INTERNAL_PREFIX}}}
    return {
        "name": HEADER_MUTATION,
        "typed_config": {
            "@type": T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [rule]},
        },
    }


def _not_found_route() -> dict[str, Any]:
    # The local-reply 404 mapper rewrites this answer too; the route says it for itself all the
    # same, so the 404 holds for a bootstrap rendered without the mappers.
    type_, message = NOT_FOUND
    body = json.dumps({"error": {"type": type_, "message": message}})
    return {
        "name": "not_found",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": body}},
        "response_headers_to_add": [
            _set_header("content-type", "application/json"),
            _set_header(ERROR_HEADER, type_),
        ],
        "typed_per_filter_config": {name: _off(name) for name in (EXT_PROC, BUFFER, LUA)},
    }


def _access_log() -> list[dict[str, Any]]:
    fields = {
        "time": "%START_TIME%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "method": "%REQ(:METHOD)%",
        # Path without the query (NQ; WQ is with it): queries may carry tokens.
        "path": "%PATH(NQ:ORIG_OR_PATH)%",
        "protocol": "%PROTOCOL%",
        "status": "%RESPONSE_CODE%",
        "grpc_status": "%GRPC_STATUS_NUMBER%",
        "flags": "%RESPONSE_FLAGS%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "duration_ms": "%DURATION%",
        "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
        "upstream_host": "%UPSTREAM_HOST%",
        "route": "%ROUTE_NAME%",
        "bytes_in": "%BYTES_RECEIVED%",
        "bytes_out": "%BYTES_SENT%",
        "tenant": "%REQ(X-FLOODWALL-TENANT)%",
        "key_id": "%REQ(X-FLOODWALL-KEY-ID)%",
    }
    return [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                "log_format": {"json_format": fields},
            },
        }
    ]


def _cel(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _local_reply_config() -> dict[str, Any]:
    """Rewrites Envoy's own plain-text local replies to the JSON error format, with
    ``x-floodwall-error`` as on the processor's refusals.

    Envoy applies the first mapper whose filter matches. Answers from the processor are local
    replies too (Envoy sends them with sendLocalReply), so every mapper that could match one
    skips replies whose details start with ``floodwall_`` (``translate._details``); the flag
    mappers cannot (the processor's answers carry no response flag). No top-level body_format:
    it would rewrite the processor's answers too.
    """
    not_ours = "!response.code_details.startsWith('floodwall_')"
    mappers = []
    for flags, status, type_ in _LOCAL_REPLY_KINDS:
        m = _json_error_format(type_, "%LOCAL_REPLY_BODY%", status)
        m["filter"] = {"response_flag_filter": {"flags": flags}}
        mappers.append(m)
    # A gRPC call past the route's max_stream_duration or its grpc-timeout (details
    # max_duration_timeout, no response flag): the model was too slow, so "upstream_timeout"
    # as for HTTP callers (it fell to the catch-all gateway_error). Envoy's status and
    # DEADLINE_EXCEEDED stay.
    m = _json_error_format("upstream_timeout", "the model did not answer in time")
    m["filter"] = _cel("response.code_details == 'max_duration_timeout'")
    mappers.append(m)
    # Triton's admin APIs on a KServe route (_triton_admin_denied): not served, as a path no
    # route takes (gRPC clients read 404 as UNIMPLEMENTED).
    m = _json_error_format(
        NOT_FOUND[0], "not served: Triton's admin APIs are off on this route", 404
    )
    m["filter"] = _cel(f"response.code_details.startsWith('{_ADMIN_DENIED}')")
    mappers.append(m)
    # The processor failed or timed out (failure_mode_allow: false). A gRPC caller gets
    # UNAVAILABLE (retryable): from Envoy's own mapping of these statuses it got UNKNOWN (500,
    # which clients do not retry) or UNAVAILABLE (504). Envoy keeps a grpc-status a mapper set.
    grpc_request = (
        "'content-type' in request.headers"
        " && request.headers['content-type'].startsWith('application/grpc')"
    )
    for status, type_, message in (
        (500, "gateway_unavailable", "the policy processor is unavailable"),
        (504, "gateway_timeout", "the policy processor did not answer in time"),
    ):
        processor = f"response.code == {status} && response.code_details.startsWith('ext_proc')"
        m = _json_error_format(type_, message, status)
        m["headers_to_add"].append(_set_header("grpc-status", str(GRPC_STATUS[503])))
        m["filter"] = _cel(f"{processor} && {grpc_request}")
        mappers.append(m)
        m = _json_error_format(type_, message, status)
        m["filter"] = _cel(processor)
        mappers.append(m)
    # Envoy's own 413 (body over listener.max_request_bytes) comes from the buffer filter; a
    # codec error (400, 431, 426, 501) from the HTTP codec; 404 from the not_found route.
    # On a gRPC route whose filters read messages the buffer filter answers a call over the
    # limit 413 too, which Envoy's own mapping makes UNKNOWN: RESOURCE_EXHAUSTED, as gRPC's
    # servers answer a message over their limit.
    m = _json_error_format(*_LOCAL_REPLY_STATUSES[413])
    m["headers_to_add"].append(_set_header("grpc-status", str(GRPC_STATUS[413])))
    m["filter"] = _cel(f"response.code == 413 && {not_ours} && {grpc_request}")
    mappers.append(m)
    for status, (type_, message) in _LOCAL_REPLY_STATUSES.items():
        m = _json_error_format(type_, message)
        m["filter"] = _cel(f"response.code == {status} && {not_ours}")
        mappers.append(m)
    # Any other refusal of Envoy's, with its status.
    for type_, codes in (("bad_request", "< 500"), ("gateway_error", ">= 500")):
        m = _json_error_format(type_, f"%LOCAL_REPLY_BODY%: {_WHY}")
        m["filter"] = _cel(f"response.code >= 400 && response.code {codes} && {not_ours}")
        mappers.append(m)
    return {"mappers": mappers}


def _processor_cluster(cfg: FloodwallConfig, runtime_dir: Path) -> dict[str, Any]:
    endpoints = []
    for i in range(cfg.processor.processes):
        addr = processor_address(cfg, i, runtime_dir)
        if addr.startswith("unix:"):
            ep = {"pipe": {"path": addr[len("unix:") :]}}
        else:
            host, _, port = addr.rpartition(":")
            ep = _socket(host, int(port))
        endpoints.append({"endpoint": {"address": ep}})
    return {
        "name": PROCESSOR_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        # Requests spread per stream across processor processes, not per connection.
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": _http2_options(),
        "load_assignment": {
            "cluster_name": PROCESSOR_CLUSTER,
            "endpoints": [{"lb_endpoints": endpoints}],
        },
        # A draining processor turns NOT_SERVING; Envoy stops sending it streams.
        "health_checks": [
            {
                "timeout": "0.5s",
                "interval": "1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {},
                "no_traffic_interval": "1s",
            }
        ],
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 100000,
                    "max_pending_requests": 100000,
                    "max_requests": 100000,
                }
            ]
        },
    }


def _thresholds(cb: CircuitBreakerConfig) -> dict[str, Any]:
    t: dict[str, Any] = {
        "max_connections": cb.max_connections,
        "max_pending_requests": cb.max_pending_requests,
        "max_requests": cb.max_requests,
    }
    # Envoy ignores max_retries wherever a retry budget is set: one or the other (config.py).
    if cb.max_retries is not None:
        t["max_retries"] = cb.max_retries
    else:
        t["retry_budget"] = {
            "budget_percent": {"value": 20.0 if cb.retry_budget_percent is None
                               else cb.retry_budget_percent},
            "min_retry_concurrency": 3 if cb.min_retry_concurrency is None
                                     else cb.min_retry_concurrency,
        }  # fmt: skip
    return t


def _upstream_cluster(name: str, up: UpstreamConfig) -> dict[str, Any]:
    all_ips = all(_is_ip(e.address) for e in up.endpoints)
    c: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if all_ips else "STRICT_DNS",
        "connect_timeout": _ms(up.connect_timeout_ms),
        "lb_policy": _LB[up.lb_policy],
        "load_assignment": {
            "cluster_name": name,
            # One group per priority: Envoy fails over (and spills) to the next level as the
            # one before loses healthy hosts.
            "endpoints": [
                {
                    "priority": level,
                    "lb_endpoints": [
                        {
                            "endpoint": {"address": _socket(e.address, e.port)},
                            "load_balancing_weight": e.weight,
                        }
                        for e in up.endpoints
                        if e.priority == level
                    ],
                }
                for level in sorted({e.priority for e in up.endpoints})
            ],
        },
        "circuit_breakers": {"thresholds": [_thresholds(up.circuit_breakers)]},
    }
    if up.protocol in ("http2", "grpc"):
        c["typed_extension_protocol_options"] = _http2_options()
    hc = up.health_check
    if hc is not None:
        check: dict[str, Any] = {
            "timeout": _ms(hc.timeout_ms),
            "interval": _ms(hc.interval_ms),
            "unhealthy_threshold": hc.unhealthy_threshold,
            "healthy_threshold": hc.healthy_threshold,
            "no_traffic_interval": _ms(hc.interval_ms),
        }
        if up.protocol == "grpc":
            check["grpc_health_check"] = {}
        else:
            check["http_health_check"] = {"path": hc.path}
        c["health_checks"] = [check]
    od = up.outlier_detection
    if od is not None:
        c["outlier_detection"] = {
            "consecutive_gateway_failure": od.consecutive_gateway_failure,
            "enforcing_consecutive_gateway_failure": 100,
            # Envoy's default ejects on any 5 consecutive 5xx; not unless asked (see config).
            "consecutive_5xx": od.consecutive_5xx or 5,
            "enforcing_consecutive_5xx": 100 if od.consecutive_5xx else 0,
            "interval": _ms(od.interval_ms),
            "base_ejection_time": _ms(od.base_ejection_time_ms),
            "max_ejection_percent": od.max_ejection_percent,
        }
    return c


def render(cfg: FloodwallConfig, chain: Chain, runtime_dir: Path) -> dict[str, Any]:
    """The Envoy bootstrap as a dict (serialise with json.dumps; Envoy reads JSON or YAML)."""
    routes = _routes(cfg, chain)
    routes.append(_not_found_route())
    p = cfg.processor
    hcm: dict[str, Any] = {
        "@type": T
        + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "floodwall",
        "codec_type": "AUTO",
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "generate_request_id": True,
        # Slow clients must not hold connections forever.
        "request_headers_timeout": "10s",
        "stream_idle_timeout": _ms(STREAM_IDLE_TIMEOUT_MS),
        "common_http_protocol_options": {
            "idle_timeout": "300s",
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "route_config": {
            "name": "floodwall",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
        },
        "local_reply_config": _local_reply_config(),
        "http_filters": [
            *([_grpc_stats()] if any(r.grpc for r in cfg.routes) else []),
            _spoof_guard(),
            # No rules here: it acts only on routes that give it some (_triton_admin_denied).
            {
                "name": RBAC,
                "typed_config": {"@type": T + "envoy.extensions.filters.http.rbac.v3.RBAC"},
            },
            {
                "name": BUFFER,
                "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": cfg.listener.max_request_bytes,
                },
            },
            {
                "name": EXT_PROC,
                "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": PROCESSOR_CLUSTER},
                        "timeout": _ms(p.message_timeout_ms * 4),
                    },
                    "failure_mode_allow": p.failure_mode_allow,
                    # A filter that holds a phase on purpose (rate_limit's max_wait) extends it.
                    "message_timeout": _ms(p.message_timeout_ms + chain.max_hold_ms()),
                    "processing_mode": processing_mode(frozenset({Phase.REQUEST_HEADERS})),
                    # The route was chosen on the client's path; a rewritten :path (OpenAI ->
                    # KServe) must not re-route the request.
                    "route_cache_action": "RETAIN",
                    "allow_mode_override": True,
                },
            },
            {
                "name": LUA,
                "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": KSERVE_ERRORS_LUA},
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    if cfg.listener.access_log:
        hcm["access_log"] = _access_log()
    if cfg.tracing is not None:
        hcm["tracing"] = _tracing(cfg.tracing)
    chain_cfg: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    tls = cfg.listener.tls
    if tls is not None:
        chain_cfg["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(tls.cert_file)},
                            "private_key": {"filename": str(tls.key_file)},
                        }
                    ],
                },
            },
        }
    clusters = [_processor_cluster(cfg, runtime_dir)]
    clusters += [_upstream_cluster(n, u) for n, u in cfg.upstreams.items()]
    if cfg.tracing is not None:
        clusters.append(_collector_cluster(cfg.tracing))
    return {
        "admin": {"address": _socket(cfg.admin.address, cfg.admin.port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "floodwall",
                    "address": _socket(cfg.listener.address, cfg.listener.port),
                    # Bodies the processor must see are buffered; responses up to this size too.
                    "per_connection_buffer_limit_bytes": max(
                        8 * 1024 * 1024, cfg.listener.max_request_bytes * 2
                    ),
                    "filter_chains": [chain_cfg],
                }
            ],
            "clusters": clusters,
        },
        # Envoy's default is unlimited downstream connections; cap them.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": T + "envoy.extensions.resource_monitors.downstream_connections"
                        ".v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 50000,
                    },
                }
            ]
        },
    }
