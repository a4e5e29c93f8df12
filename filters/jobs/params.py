"""Typed params of the ``jobs`` filter and of ``floodwall worker`` (one config for both, so the
processor and the workers agree on the queue)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from yarl import URL

from filters.rate_limit.params import parse_duration
from proxy.api import FilterParams

Priority = Literal["critical", "standard", "sheddable"]
PRIORITIES: tuple[Priority, ...] = ("critical", "standard", "sheddable")


class WebhookParams(FilterParams):
    # Completion callbacks go only to URLs under one of these: the same scheme, host and port,
    # and a path under the prefix's once dot segments are resolved (no SSRF into the network
    # the workers sit in). Required: no list, no webhooks.
    allowed_prefixes: Annotated[list[str], Field(min_length=1)]
    # false: a webhook never connects to a loopback, link-local (cloud metadata at
    # 169.254.169.254), private, shared, reserved or multicast address, whatever its host name
    # resolves to when it is sent. true: receivers inside your network (the gateway's own
    # ports then become reachable to anyone allowed to name such a URL).
    allow_private_addresses: bool = False
    # Name of the environment variable holding the HMAC-SHA256 signing secret (of the worker).
    secret_env: str = "FLOODWALL_WEBHOOK_SECRET"
    # per_tenant: each tenant's webhooks are signed with a key derived from the secret and the
    # tenant (`floodwall jobs webhook-secret --tenant T` prints it), so a tenant can verify its
    # own deliveries but cannot sign one that another tenant's receiver accepts. shared: the
    # secret itself signs every tenant's webhooks (one receiver that you run for all tenants).
    signing: Literal["per_tenant", "shared"] = "per_tenant"
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    attempts: Annotated[int, Field(ge=1, le=10)] = 3

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        for p in v:
            # "https://hooks.example.com" would also admit "https://hooks.example.com.evil.net".
            if not p.startswith(("http://", "https://")) or not p.endswith("/"):
                raise ValueError(f"{_shown(p)!r}: an http(s) URL prefix ending with '/'")
            u = URL(p)
            if not u.host or u.user is not None or u.query_string or u.fragment:
                raise ValueError(f"{_shown(p)!r}: a host is needed, and no user, query or fragment")
        return v

    @model_validator(mode="after")
    def _public_hosts(self) -> WebhookParams:
        for p in self.allowed_prefixes:
            if not self.allow_private_addresses and not public_host(URL(p).host or ""):
                raise ValueError(
                    f"{p!r} is a non-public address: set allow_private_addresses: true for "
                    "receivers inside your network"
                )
        return self

    def allows(self, url: object) -> URL | None:
        """The URL to call for a webhook the caller named, or None if it is not allowed. The
        check is on the URL as it will be requested (dot segments resolved, as yarl does);
        the worker checks the address it connects to as well."""
        if not isinstance(url, str):
            return None
        try:
            return self._allows(URL(url))
        except ValueError:  # UnicodeError too: a host IDNA cannot encode ("xn--a.com")
            return None

    def _allows(self, u: URL) -> URL | None:
        # An encoded / or \ could make the receiver's server see another path than checked.
        raw = u.raw_path.lower()
        if u.user is not None or u.fragment or "%2f" in raw or "%5c" in raw or "\\" in raw:
            return None
        if not self.allow_private_addresses and not public_host(u.host or ""):
            return None
        for p in map(URL, self.allowed_prefixes):
            if (
                (u.scheme, u.host, u.port) == (p.scheme, p.host, p.port)
                and u.path.startswith(p.path)
                and ".." not in u.path.split("/")
            ):
                return u
        return None


def public_host(host: str) -> bool:
    """False for an IP address that is not globally routable (loopback, link-local, private,
    shared, reserved, unspecified, multicast); True for any name (checked once resolved)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return True
    return ip.is_global and not ip.is_multicast


class WorkerParams(FilterParams):
    # envoy: call the model through the gateway (auth as the worker key, admission, breakers,
    # degradation all apply; the job's class goes along as the trusted priority header).
    # triton: call Triton straight, translating OpenAI requests in process (no policies).
    via: Literal["envoy", "triton"] = "envoy"
    # Base URL of the gateway; default: the config's listener.
    gateway_url: str | None = None
    # The worker's own API key (via: envoy): read from this environment variable ...
    key_env: str = "FLOODWALL_WORKER_KEY"
    # ... or given here (local demos only: a key in a file is a key in git).
    key: str | None = None
    # Header the gateway's admission filter trusts from the worker key (see its params).
    priority_header: str = "x-priority"
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 4
    # A job whose worker stopped heartbeating this long is taken over by another worker.
    visibility_timeout_s: Annotated[float, Field(ge=1, le=86_400)] = 30.0
    # Attempts per job (a lost worker counts); then the job fails into the dead-letter stream.
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    backoff_s: Annotated[float, Field(gt=0)] = 1.0
    backoff_max_s: Annotated[float, Field(gt=0)] = 60.0
    # A model call refused for capacity (429, 503: shed, overloaded, breaker open, no healthy
    # Triton) or a gateway that cannot be reached is not the job's fault: it waits and tries
    # again (backoff doubling from backoff_s to backoff_max_s, or the Retry-After) without
    # spending an attempt, for up to this long after the first of such refusals in a row;
    # then they count as attempts. Peaks and model restarts pass; 0: they count at once.
    unavailable_retry_s: Annotated[float, Field(ge=0, le=86_400)] = 600.0
    request_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    # On SIGTERM: finish in-flight jobs for up to this long, then hand the rest back.
    drain_s: Annotated[float, Field(ge=0, le=600)] = 10.0
    # /metrics, /healthz, /readyz of the worker.
    admin_address: str = "127.0.0.1"
    admin_port: Annotated[int, Field(ge=0, le=65535)] = 9190

    @model_validator(mode="after")
    def _backoff(self) -> WorkerParams:
        if self.backoff_max_s < self.backoff_s:
            raise ValueError("backoff_max_s must be >= backoff_s")
        return self


class JobsParams(FilterParams):
    # Key prefix in Redis. The {hash tag} (required) keeps every job key in one Redis Cluster
    # slot (the Lua scripts touch a job, its queue and the counters atomically).
    prefix: str = "fw:{jobs}"
    # Path of the job API (POST to submit, GET/DELETE {api_path}/{id}).
    api_path: str = "/v1/jobs"
    # Paths a POST /v1/jobs envelope may name as its "url".
    urls: Annotated[list[str], Field(min_length=1)] = Field(
        default_factory=lambda: ["/v1/embeddings", "/v1/chat/completions"]
    )
    # Unfinished jobs (queued, waiting to retry or running) at most: beyond, 503 + Retry-After.
    max_depth: Annotated[int, Field(ge=1)] = 10_000
    # ... and per tenant (0: no per-tenant cap): beyond, 429 + Retry-After.
    max_depth_per_tenant: Annotated[int, Field(ge=0)] = 1_000
    # Order of the jobs within a priority class: fair (tenants take turns: one tenant's
    # backlog does not delay another's jobs by more than one of its own per turn) or fifo.
    order: Literal["fair", "fifo"] = "fair"
    # In fair order, a tenant's turns to another's 1 (tenants not named: 1); between 0.001 and
    # 1000. Read by the processors (a job carries its place), not by the workers.
    tenant_weights: dict[str, Annotated[float, Field(ge=0.001, le=1000)]] = Field(
        default_factory=dict
    )
    # Requests in one POST /v1/jobs envelope.
    max_requests: Annotated[int, Field(ge=1, le=10_000)] = 100
    # A finished job (its result) is kept this long, then forgotten.
    result_ttl_s: Annotated[float, Field(gt=0)] = 86_400.0
    # A model answer bigger than this ends its job as failed (result_too_large).
    max_result_bytes: Annotated[int, Field(ge=1024)] = 16 << 20
    # All the answers of one job together: past this, the job fails (result_too_large) and
    # its remaining requests are not run. With max_requests answers of max_result_bytes each
    # one small envelope could otherwise keep gigabytes in Redis for result_ttl_s.
    max_job_result_bytes: Annotated[int, Field(ge=1024)] = 64 << 20
    # An Idempotency-Key maps to its job for this long.
    idempotency_ttl_s: Annotated[float, Field(gt=0)] = 86_400.0
    # Retry-After of a refusal for a full queue.
    retry_after_s: Annotated[float, Field(gt=0)] = 5.0
    # Retry-After of a 202 and of a job not finished yet: when to poll its Location again.
    poll_after_s: Annotated[float, Field(gt=0)] = 1.0
    # Budget of one Redis call of the filter; past it the submission is refused (503), unless
    # a second budget finds it queued after all (202). Each is cut at run time to what the
    # phase has left of processor.message_timeout_ms.
    redis_timeout_ms: Annotated[float, Field(gt=0, le=10_000)] = 200.0
    worker: WorkerParams = Field(default_factory=WorkerParams)
    webhook: WebhookParams | None = None

    @field_validator("result_ttl_s", "idempotency_ttl_s", mode="before")
    @classmethod
    def _duration(cls, v: str | float) -> float:
        return parse_duration(v)

    @field_validator("prefix")
    @classmethod
    def _hash_tag(cls, v: str) -> str:
        # Redis Cluster hashes the text between the first "{" and the next "}" when it is not
        # empty: without such a tag the scripts' keys fall in different slots (CROSSSLOT).
        # Required on a standalone Redis too, so moving to a cluster needs no new prefix (and
        # no orphaned queue under the old one).
        start = v.find("{")
        end = v.find("}", start + 1) if start >= 0 else -1
        if end <= start + 1:
            raise ValueError(f"{v!r}: needs a Redis Cluster hash tag, such as 'fw:{{jobs}}'")
        return v

    @field_validator("api_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or v.endswith("/"):
            raise ValueError(f"{v!r}: a path starting with '/' and not ending with one")
        return v


def _shown(url: str) -> str:
    """``url`` fit for an error message: a user and password in it as ``***``."""
    return re.sub(r"//[^/@]*@", "//***@", url)
