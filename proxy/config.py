"""Floodwall's configuration: YAML in, typed and frozen out, or a start-up error naming the field.

One file describes the whole deployment: listener, processor, upstreams, routes and the ordered
filter list. The Envoy bootstrap and the processor's route table both derive from it, so they
cannot disagree.
"""

from __future__ import annotations

import os
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


class ConfigError(Exception):
    """The config is invalid; the message names the file and the field."""


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
        if not host or not port.isdigit():
            raise ValueError(f"{v!r}: host:port of an OTLP/gRPC collector (say 127.0.0.1:4317)")
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
    # The URL names one node of a Redis Cluster; the client discovers the others. Filters keep
    # each request's keys in one hash slot (hash tags).
    cluster: bool = False
    # The private local Redis (url: local) only: "aof" keeps an append-only file in the
    # runtime dir (accepted async jobs survive a Redis restart); "none" keeps nothing.
    persistence: Literal["none", "aof"] = "none"

    @model_validator(mode="after")
    def _cluster_needs_url(self) -> RedisConfig:
        if self.cluster and self.url == "local":
            raise ValueError("cluster: true needs the url of a cluster node, not local")
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
    consecutive_5xx: Annotated[int, Field(ge=1)] = 5
    interval_ms: Millis = 5000
    base_ejection_time_ms: Millis = 10000
    max_ejection_percent: Annotated[int, Field(ge=0, le=100)] = 50


class CircuitBreakerConfig(Model):
    max_connections: Annotated[int, Field(ge=1)] = 1024
    max_pending_requests: Annotated[int, Field(ge=1)] = 1024
    max_requests: Annotated[int, Field(ge=1)] = 1024
    max_retries: Annotated[int, Field(ge=0)] = 3
    # Retries may add at most this share of active requests (Envoy's retry budget), so a
    # failing upstream is not hit by a retry storm.
    retry_budget_percent: Annotated[float, Field(ge=0, le=100)] = 20.0
    min_retry_concurrency: Annotated[int, Field(ge=0)] = 3


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


class RetryConfig(Model):
    retry_on: str = "connect-failure,refused-stream,reset"
    num_retries: Annotated[int, Field(ge=0, le=10)] = 2
    per_try_timeout_ms: Millis | None = None


class RouteMatch(Model):
    path: str | None = None
    prefix: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> RouteMatch:
        if (self.path is None) == (self.prefix is None):
            raise ValueError("give exactly one of path or prefix")
        return self

    def matches(self, path: str) -> bool:
        # The query string never takes part in matching, as in Envoy.
        bare = path.split("?", 1)[0]
        if self.path is not None:
            return bare == self.path
        assert self.prefix is not None
        return bare.startswith(self.prefix)


class RouteConfig(Model):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    match: RouteMatch
    upstream: str
    # Which API the route speaks; filters decide from it whether they apply.
    # "jobs": the async-job API, answered by the jobs filter (never forwarded).
    api: Literal["openai_embeddings", "openai_chat", "kserve_http", "kserve_grpc", "jobs"] = (
        "kserve_http"
    )
    methods: list[str] | None = None
    timeout_ms: Millis = 30000
    retries: RetryConfig | None = Field(default_factory=RetryConfig)

    @property
    def grpc(self) -> bool:
        return self.api == "kserve_grpc"

    @property
    def model_in_body(self) -> bool:
        """The model is named in the body (OpenAI APIs): filters that need it wait for the
        body phase, after the API filter parsed it; KServe HTTP names it in the path."""
        return self.api in ("openai_embeddings", "openai_chat")


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
        for i, f in enumerate(self.filters):
            for rn in f.routes or []:
                if rn not in route_names:
                    raise ValueError(f"filters[{i}] ({f.name}): unknown route {rn!r}")
        return self

    def route_for(self, path: str) -> RouteConfig | None:
        for r in self.routes:
            if r.match.matches(path):
                return r
        return None


def _no_duplicates(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"duplicate name in {what}: {n!r}")
        seen.add(n)


def _format_validation(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in e["loc"])
        loc = loc.replace(".[", "[")
        parts.append(f"{loc or '<root>'}: {e['msg']}")
    return "; ".join(parts)


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
    try:
        data = yaml.safe_load(_expand_env(text))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    cfg = parse_config(data, str(p))
    # Relative paths in the file are relative to the file, not to the caller's cwd.
    if cfg.triton is not None and not cfg.triton.model_repository.is_absolute():
        repo = (p.parent / cfg.triton.model_repository).resolve()
        if not repo.exists():
            repo = (REPO_ROOT / cfg.triton.model_repository).resolve()
        cfg = cfg.model_copy(
            update={"triton": cfg.triton.model_copy(update={"model_repository": repo})}
        )
    return cfg


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
