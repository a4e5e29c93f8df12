"""Floodwall's configuration: YAML in, typed and frozen out, or a start-up error naming the field.

One file describes the whole deployment: listener, processor, upstreams, routes and the ordered
filter list. The Envoy bootstrap and the processor's route table both derive from it, so they
cannot disagree.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "local.yaml"

Port = Annotated[int, Field(ge=1, le=65535)]
Millis = Annotated[int, Field(ge=1)]

# Envoy routes CONNECT only with a connect_matcher, which no rendered route has.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"})
# Envoy's router retry conditions (x-envoy-retry-on, x-envoy-retry-grpc-on). Envoy ignores a
# name it does not know, so a typo would turn the route's retries off without a word.
# retriable-status-codes and retriable-headers are left out: they need lists this config
# does not render, and without them retry on nothing.
RETRY_ON = frozenset(
    {
        "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
        "envoy-ratelimited", "retriable-4xx", "refused-stream", "http3-post-connect-failure",
        "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
    }
)  # fmt: skip
# Addresses that bind every address of the host: they clash with any address on their port.
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


class ConfigError(Exception):
    """The config is invalid; the message names the file and the field."""


class Model(BaseModel):
    # No NaN or infinite number anywhere (as FilterParams): it would fail at the first use.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class TlsConfig(Model):
    cert_file: Path
    key_file: Path


# The processor takes gRPC messages up to 64 MiB (proxy/h2server.py MAX_MESSAGE), and Envoy
# buffers response bodies for it up to twice max_request_bytes (proxy/bootstrap.py): 31 MiB
# leaves room for the rest of the message. Above, the processor would reset the stream.
MAX_REQUEST_BYTES = 31 * 1024 * 1024


class ListenerConfig(Model):
    address: str = "127.0.0.1"
    port: Port = 8080
    tls: TlsConfig | None = None
    # Bodies above this are refused with 413 by Envoy before they reach the processor.
    # Responses buffered for the processor may be up to twice this.
    max_request_bytes: Annotated[int, Field(ge=1024, le=MAX_REQUEST_BYTES)] = 1024 * 1024
    access_log: bool = True

    @field_validator("max_request_bytes", mode="before")
    @classmethod
    def _fits_processor_messages(cls, v: Any) -> Any:
        # Before the `le` check, to say why (its own message gives only the number).
        if isinstance(v, int) and v > MAX_REQUEST_BYTES:
            raise ValueError(
                f"at most {MAX_REQUEST_BYTES} (31 MiB): Envoy buffers responses up to twice "
                "this for the processor, which takes messages up to 64 MiB"
            )
        return v


class AdminConfig(Model):
    address: str = "127.0.0.1"
    port: Port = 9901


class TracingConfig(Model):
    # OTLP/gRPC collector (host:port) both Envoy and the processors export spans to.
    otlp_endpoint: str
    # Service names in the traces: "<name>" for the processors, "<name>-envoy" for Envoy.
    service_name: str = "floodwall"
    # Share of new traces recorded (a caller's sampled traceparent is always followed).
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0

    @field_validator("otlp_endpoint")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit() or "@" in v or "/" in v:
            # Not echoed: a URL with credentials in it is the likely mistake.
            raise ValueError("host:port of an OTLP/gRPC collector (say 127.0.0.1:4317)")
        return v


class ProcessorConfig(Model):
    processes: Annotated[int, Field(ge=1, le=64)] = 1
    transport: Literal["uds", "tcp"] = "uds"
    address: str = "127.0.0.1"
    # TCP: process i listens on port + i. UDS: sockets live in the runtime dir.
    port: Port = 9100
    # Process i serves /metrics, /healthz, /readyz on admin_port + i.
    admin_address: str = "127.0.0.1"
    admin_port: Port = 9090
    # What Envoy does when the processor is down or slow: false refuses (500/504), true lets
    # traffic through unchecked. A per-deployment choice: safety versus availability.
    failure_mode_allow: bool = False
    message_timeout_ms: Millis = 500
    # On SIGTERM: stop taking new streams, let in-flight ones finish for up to this long.
    drain_seconds: Annotated[float, Field(ge=0, le=300)] = 5.0
    # Refuse new requests at once (503 overloaded) while the processor's event loop runs
    # later than this (smoothed): CPU starvation would turn them into 504s after spending
    # the CPU anyway. None: off. Keep it well below message_timeout_ms.
    shed_lag_ms: Annotated[float, Field(gt=0)] | None = None
    # Reload the policy config (filters) when the file changes, checked this often; None: on
    # SIGHUP only (`kill -HUP` a processor, or `floodwall up`, which passes it on).
    watch_config_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    # The gRPC server Envoy talks to: "grpcio" (grpc.aio) or "h2" (proxy/h2server.py, a
    # small HTTP/2 server for the two methods Envoy calls, on the event loop itself: a
    # fraction of grpc.aio's CPU per stream; see the README's gateway benchmark).
    server: Literal["grpcio", "h2"] = "h2"


class RedisConfig(Model):
    # "local" starts a private redis-server on a unix socket in the runtime dir; otherwise a URL.
    url: str = "local"
    # Socket timeout of the Redis client: how long before a silent Redis is declared dead
    # and its connection dropped. Keep it well above event-loop lag under load (asyncio
    # timeouts count the time a busy process takes to read a reply); filters have their own,
    # shorter latency budgets for deciding to fall back.
    timeout_ms: Millis = 1000
    # The URL names a node of a Redis Cluster (or several, comma-separated: the client starts
    # from the first that answers); it discovers the others. Filters keep each request's keys
    # in one hash slot (hash tags).
    cluster: bool = False
    # The private local Redis (url: local) only: "aof" keeps an append-only file in the
    # runtime dir (accepted async jobs survive a Redis restart); "none" keeps nothing.
    persistence: Literal["none", "aof"] = "none"

    @model_validator(mode="after")
    def _cluster_needs_url(self) -> RedisConfig:
        if self.cluster and self.url == "local":
            raise ValueError("cluster: true needs the url of a cluster node, not local")
        if self.url != "local":
            from redis.asyncio.connection import parse_url

            for url in self.url.split(",") if self.cluster else [self.url]:
                try:
                    parse_url(url.strip())
                except ValueError:
                    # redis-py's message quotes the piece it could not read: often part of
                    # the password.
                    raise ValueError(
                        "url: not a Redis URL (redis://, rediss:// or unix://); a password "
                        "with any of / ? # @ : in it must be percent-encoded"
                    ) from None
        return self


class TritonLocalConfig(Model):
    enabled: bool = True
    model_repository: Path = Path("triton_models")
    http_port: Port = 8000
    grpc_port: Port = 8001
    metrics_port: Port = 8002


class Endpoint(Model):
    address: str
    port: Port
    weight: Annotated[int, Field(ge=1, le=128)] = 1
    # Failover group: Envoy sends traffic to priority 1 (a spill-over pool, a second region)
    # only as priority 0 loses healthy hosts (failed health checks or ejected as outliers).
    priority: Annotated[int, Field(ge=0, le=5)] = 0


class HealthCheckConfig(Model):
    # HTTP path for http1 upstreams; gRPC upstreams use grpc.health.v1.
    path: str = "/v2/health/ready"
    interval_ms: Millis = 2000
    timeout_ms: Millis = 1000
    unhealthy_threshold: Annotated[int, Field(ge=1)] = 2
    healthy_threshold: Annotated[int, Field(ge=1)] = 1


class OutlierDetectionConfig(Model):
    # Consecutive gateway failures (502, 503, 504, and a refused, reset or timed-out
    # connection) that take a host out of the balance: a dead or overloaded host.
    consecutive_gateway_failure: Annotated[int, Field(ge=1)] = 5
    # Also any 5xx, this many in a row (null: not used). Off by default: a model server may
    # answer a request it cannot parse with 500 (Triton 2.51 does), and one caller's
    # malformed requests would then take healthy hosts out for everyone.
    consecutive_5xx: Annotated[int, Field(ge=1)] | None = None
    interval_ms: Millis = 5000
    base_ejection_time_ms: Millis = 10000
    max_ejection_percent: Annotated[int, Field(ge=0, le=100)] = 50


class CircuitBreakerConfig(Model):
    max_connections: Annotated[int, Field(ge=1)] = 1024
    max_pending_requests: Annotated[int, Field(ge=1)] = 1024
    max_requests: Annotated[int, Field(ge=1)] = 1024
    # Retries in flight at once, instead of the retry budget: Envoy ignores it under a
    # budget, so the two cannot be set together. None (and no budget field set): the budget
    # with its defaults.
    max_retries: Annotated[int, Field(ge=0)] | None = None
    # Retries may add at most this share of active requests (Envoy's retry budget), so a
    # failing upstream is not hit by a retry storm. None: 20.
    retry_budget_percent: Annotated[float, Field(ge=0, le=100)] | None = None
    # Retries always allowed under the budget, whatever the share. None: 3.
    min_retry_concurrency: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _budget_or_max_retries(self) -> CircuitBreakerConfig:
        budget = self.retry_budget_percent is not None or self.min_retry_concurrency is not None
        if self.max_retries is not None and budget:
            raise ValueError(
                "set max_retries or the retry budget (retry_budget_percent, "
                "min_retry_concurrency), not both: Envoy ignores max_retries under a budget"
            )
        return self


class UpstreamConfig(Model):
    protocol: Literal["http1", "http2", "grpc"] = "http1"
    lb_policy: Literal["round_robin", "least_request", "ring_hash"] = "least_request"
    # ring_hash hashes on this request header (e.g. x-floodwall-tenant for tenant affinity).
    hash_header: str | None = None
    endpoints: Annotated[list[Endpoint], Field(min_length=1)]
    connect_timeout_ms: Millis = 1000
    health_check: HealthCheckConfig | None = Field(default_factory=HealthCheckConfig)
    outlier_detection: OutlierDetectionConfig | None = Field(default_factory=OutlierDetectionConfig)
    circuit_breakers: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)

    @model_validator(mode="after")
    def _ring_hash_needs_key(self) -> UpstreamConfig:
        if self.lb_policy == "ring_hash" and not self.hash_header:
            raise ValueError("lb_policy ring_hash needs hash_header")
        levels = sorted({e.priority for e in self.endpoints})
        if levels != list(range(len(levels))):
            raise ValueError(f"endpoint priorities must run 0, 1, ... without gaps (got {levels})")
        return self

    @property
    def base_url(self) -> str:
        ep = self.endpoints[0]
        return f"http://{ep.address}:{ep.port}"


def is_grpc(content_type: str) -> bool:
    """Whether Envoy takes a request with this content-type for gRPC (a route's ``grpc: {}``
    match): ``application/grpc`` or ``application/grpc+<codec>``, not ``application/grpc-web``."""
    return content_type == "application/grpc" or content_type.startswith("application/grpc+")


class RetryConfig(Model):
    # Comma-separated Envoy retry conditions: 5xx, gateway-error, reset, reset-before-request,
    # connect-failure, envoy-ratelimited, retriable-4xx, refused-stream,
    # http3-post-connect-failure; for gRPC cancelled, deadline-exceeded, internal,
    # resource-exhausted, unavailable.
    retry_on: str = "connect-failure,refused-stream,reset"
    num_retries: Annotated[int, Field(ge=0, le=10)] = 2
    per_try_timeout_ms: Millis | None = None

    @field_validator("retry_on")
    @classmethod
    def _known_conditions(cls, v: str) -> str:
        names = [n.strip() for n in v.split(",")]
        unknown = [n for n in names if n not in RETRY_ON]
        if unknown:
            raise ValueError(
                f"unknown retry condition(s) {unknown} (known: {', '.join(sorted(RETRY_ON))}); "
                "to retry on nothing, set retries: null"
            )
        return ",".join(names)


class RouteMatch(Model):
    # The exact request path, compared as Envoy does: without the query string, case-sensitive.
    # It starts with / and holds no ? or #; so does prefix.
    path: str | None = None
    # A prefix of the request path (without the query string), case-sensitive.
    prefix: str | None = None

    @field_validator("path", "prefix")
    @classmethod
    def _request_path(cls, v: str | None) -> str | None:
        # A request path always starts with /, and Envoy matches it without query or
        # fragment: any other value matches nothing, a dead route.
        if v is not None and (not v.startswith("/") or "?" in v or "#" in v):
            raise ValueError(f"{v!r} can match no request: start with / and leave out ? and #")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> RouteMatch:
        if (self.path is None) == (self.prefix is None):
            raise ValueError("give exactly one of path or prefix")
        return self

    def matches(self, bare_path: str) -> bool:
        """``bare_path``: the request path without its query string."""
        if self.path is not None:
            return bare_path == self.path
        assert self.prefix is not None
        return bare_path.startswith(self.prefix)

    def covers(self, other: RouteMatch) -> bool:
        """Every path ``other`` matches, this matches too."""
        if self.prefix is None:
            return other.path == self.path
        value = other.path if other.path is not None else other.prefix
        assert value is not None
        return value.startswith(self.prefix)


class RouteConfig(Model):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    # Envoy takes the first route in the list that matches. A kserve_grpc route matches gRPC
    # requests only (content-type application/grpc or application/grpc+...); others go on to
    # later routes. A route an earlier one matches all requests of is refused (never chosen).
    match: RouteMatch
    upstream: str
    # Which API the route speaks; filters decide from it whether they apply.
    # "jobs": the async-job API, answered by the jobs filter (never forwarded).
    api: Literal["openai_embeddings", "openai_chat", "kserve_http", "kserve_grpc", "jobs"] = (
        "kserve_http"
    )
    # HTTP methods allowed (others get 405), upper-cased on load; None: any.
    methods: Annotated[list[str], Field(min_length=1)] | None = None
    timeout_ms: Millis = 30000
    retries: RetryConfig | None = Field(default_factory=RetryConfig)
    # KServe routes only: pass Triton's admin APIs (log and trace settings, the model
    # repository, shared-memory registration; every /v2/... path or GRPCInferenceService
    # method that is not health, metadata, config, statistics or inference). Off, Envoy
    # answers them 404 (gRPC: UNIMPLEMENTED) before anything else runs: any tenant key could
    # otherwise change Triton's settings for everyone, or point it at shared memory.
    admin_apis: bool = False

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str] | None) -> list[str] | None:
        # The chain compares the method as sent, and clients send it upper-case: `post`
        # would refuse every request with 405.
        if v is None:
            return v
        upper = [m.upper() for m in v]
        unknown = [m for m in v if m.upper() not in HTTP_METHODS]
        if unknown:
            raise ValueError(
                f"unknown HTTP method(s) {unknown} (known: {', '.join(sorted(HTTP_METHODS))})"
            )
        return upper

    @model_validator(mode="after")
    def _admin_apis_on_kserve(self) -> RouteConfig:
        if self.admin_apis and self.api not in ("kserve_http", "kserve_grpc"):
            raise ValueError(f"admin_apis applies to KServe routes only, not to {self.api}")
        return self

    @property
    def grpc(self) -> bool:
        return self.api == "kserve_grpc"

    def matches(self, bare_path: str, grpc: bool) -> bool:
        """As Envoy matches the rendered route (proxy/bootstrap.py): a gRPC route has a
        ``grpc: {}`` match, so it takes gRPC requests only (``grpc``: ``is_grpc``)."""
        return (grpc or not self.grpc) and self.match.matches(bare_path)

    def shadows(self, later: RouteConfig) -> bool:
        """Every request ``later`` matches, this route matches too: Envoy takes the first
        route that matches, so ``later`` placed after this one is never chosen."""
        return (later.grpc or not self.grpc) and self.match.covers(later.match)

    @property
    def model_in_body(self) -> bool:
        """The model is named in the body: filters that need it wait for the body phase.
        OpenAI APIs: the API filter parses the JSON; KServe gRPC: the chain reads the protobuf
        message of a unary call (proxy/kserve_grpc.py). KServe HTTP names it in the path."""
        return self.api in ("openai_embeddings", "openai_chat", "kserve_grpc")


class FilterConfig(Model):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    type: str
    on_error: Literal["open", "closed"] = "closed"
    # Route names the filter runs on; None means every route.
    routes: list[str] | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class FloodwallConfig(Model):
    listener: ListenerConfig = Field(default_factory=ListenerConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    processor: ProcessorConfig = Field(default_factory=ProcessorConfig)
    redis: RedisConfig | None = None
    triton: TritonLocalConfig | None = None
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    filters: list[FilterConfig] = Field(default_factory=list)
    # Where sockets, logs and rendered files go for `floodwall up`; None: a fresh temp dir.
    runtime_dir: Path | None = None
    # OpenTelemetry tracing (Envoy and the processors); None: off.
    tracing: TracingConfig | None = None

    @model_validator(mode="after")
    def _cross_refs(self) -> FloodwallConfig:
        route_names = [r.name for r in self.routes]
        _no_duplicates("routes", route_names)
        _no_duplicates("filters", [f.name for f in self.filters])
        for i, r in enumerate(self.routes):
            if r.upstream not in self.upstreams:
                raise ValueError(
                    f"routes[{i}] ({r.name}): upstream {r.upstream!r} is not in upstreams "
                    f"(known: {sorted(self.upstreams)})"
                )
            up = self.upstreams[r.upstream]
            if r.grpc and up.protocol == "http1":
                raise ValueError(f"routes[{i}] ({r.name}): gRPC route needs an http2/grpc upstream")
            for j, first in enumerate(self.routes[:i]):
                if first.shadows(r):
                    how = "the same match" if first.match == r.match else "a match covering it"
                    raise ValueError(
                        f"routes[{i}] ({r.name}) is never chosen: routes[{j}] ({first.name}) "
                        f"has {how} and comes first (Envoy takes the first route that "
                        "matches; put the narrower route first)"
                    )
        for i, f in enumerate(self.filters):
            for rn in f.routes or []:
                if rn not in route_names:
                    raise ValueError(f"filters[{i}] ({f.name}): unknown route {rn!r}")
        return self

    @model_validator(mode="after")
    def _ports_apart(self) -> FloodwallConfig:
        # Two servers on one port pass every other check, then one of them dies binding.
        seen: list[tuple[str, int, str]] = []
        for address, port, key in self.bound_ports():
            if port > 65535:
                raise ValueError(f"{key} is {port}, past 65535 (process i binds port + i)")
            for a, p, k in seen:
                if p == port and (a == address or a in _WILDCARDS or address in _WILDCARDS):
                    where = f"{a}:{p}" if a == address else f"port {p} ({a} and {address})"
                    raise ValueError(f"{key} and {k} are both {where}: give each its own port")
            seen.append((address, port, key))
        return self

    def bound_ports(self) -> list[tuple[str, int, str]]:
        """(address, port, config key) of every TCP port the stack listens on."""
        p = self.processor
        ports = [
            (self.listener.address, self.listener.port, "listener.port"),
            (self.admin.address, self.admin.port, "admin.port"),
        ]
        for i in range(p.processes):
            n = f" + {i}" if i else ""
            ports.append((p.admin_address, p.admin_port + i, f"processor.admin_port{n}"))
            if p.transport == "tcp":
                ports.append((p.address, p.port + i, f"processor.port{n}"))
        t = self.triton
        if t is not None and t.enabled:  # proxy/triton.py binds it to the loopback address
            ports += [
                ("127.0.0.1", t.http_port, "triton.http_port"),
                ("127.0.0.1", t.grpc_port, "triton.grpc_port"),
                ("127.0.0.1", t.metrics_port, "triton.metrics_port"),
            ]
        return ports

    def route_for(self, path: str, *, grpc: bool = False) -> RouteConfig | None:
        """The route Envoy chooses: the first that matches, gRPC routes for gRPC requests
        only (``grpc``: ``is_grpc`` of the request's content-type)."""
        bare = path.partition("?")[0]  # the query string never takes part, as in Envoy
        for r in self.routes:
            if r.matches(bare, grpc):
                return r
        return None


def _no_duplicates(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"duplicate name in {what}: {n!r}")
        seen.add(n)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _key(x: Any) -> str:
    # A key as typed in YAML may be anything (a newline, 10 kB): quoted and cut, the error
    # stays one readable line.
    if isinstance(x, int):
        return f"[{x}]"
    text = str(x)
    return text if _PLAIN_KEY.fullmatch(text) else repr(text[:64])


def _format_validation(err: ValidationError, prefix: str = "") -> str:
    """Each error as ``prefix.path.to.field: message``, joined on one line."""
    parts = []
    for e in err.errors():
        loc = ".".join(_key(x) for x in ((prefix,) if prefix else ()) + tuple(e["loc"]))
        loc = loc.replace(".[", "[")
        parts.append(f"{loc or '<root>'}: {e['msg']}")
    return "; ".join(parts).replace("\n", " ")


def parse_config(data: Any, source: str = "<config>") -> FloodwallConfig:
    try:
        return FloodwallConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_validation(e)}") from None


def load_config(path: Path | str | None = None) -> FloodwallConfig:
    """Loads and validates a config file (the shipped local example when ``path`` is None).

    ``${VAR}`` and ``${VAR:-default}`` in the file are expanded from the environment, so
    secrets and ports can come from the deployment.
    """
    p = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror})") from None
    expanded = _expand_env(text)
    try:
        data = yaml.safe_load(expanded)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(e, expanded != text)}") from None
    if data is None:
        data = {}
    cfg = parse_config(data, str(p))
    # Relative paths in the file are relative to the file, not to the caller's cwd.
    if cfg.triton is not None and not cfg.triton.model_repository.is_absolute():
        repo = (p.parent / cfg.triton.model_repository).resolve()
        shipped = (REPO_ROOT / cfg.triton.model_repository).resolve()
        if not repo.exists() and shipped.exists():  # a copy of a shipped example elsewhere
            repo = shipped
        cfg = cfg.model_copy(
            update={"triton": cfg.triton.model_copy(update={"model_repository": repo})}
        )
    return cfg


def _yaml_problem(e: yaml.YAMLError, expanded: bool) -> str:
    """What the parser found and where, without the line it quotes: that line may hold a
    ``${VAR}`` expanded from the environment (a secret whose characters broke the YAML)."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return type(e).__name__
    mark = e.problem_mark or e.context_mark
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = " ".join(x for x in (e.context, e.problem) if x) or "unreadable"
    hint = " (a ${VAR} whose value holds YAML syntax needs quotes around it)" if expanded else ""
    return what + at + hint


def _expand_env(text: str) -> str:
    import re

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3)
        value = os.environ.get(name)
        if value is None:
            if default is None:
                raise ConfigError(f"environment variable {name} is not set (used in config)")
            return default
        return value

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, text)
