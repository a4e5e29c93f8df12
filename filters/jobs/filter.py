"""Filter ``jobs``: long or bulk work answered ``202 Accepted`` at once and run later by
``floodwall worker`` from a Redis Streams queue.

Two ways in:

- ``Prefer: respond-async`` on a model route this filter runs on. Place it after ``auth`` and
  ``rate_limit`` (so identity, limits and token quotas apply at submission) and before
  ``admission`` (a queued job does not load the model now). The job keeps the request exactly
  as the client sent it (``ctx.request_body``) and its priority class (set by admission from
  the headers).
- ``POST /v1/jobs`` with ``{"url": "/v1/embeddings", "body": {...}}`` or
  ``{"requests": [{"url": ..., "body": ...}, ...]}`` (a batch: progress counts its requests).

Then ``GET /v1/jobs/{id}`` (the owning tenant only; anyone else gets 404) and
``DELETE /v1/jobs/{id}`` (cancel). An ``Idempotency-Key`` header makes a retried submission
return the first job instead of queueing a second.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import orjson
from prometheus_client import Counter
from redis.exceptions import TimeoutError as RedisTimeoutError

from filters.jobs.params import PRIORITIES, JobsParams
from filters.jobs.store import JobStore, Submitted, view
from proxy import errors
from proxy.api import (
    CONTINUE,
    REDIS_FAULTS,
    Decision,
    Deps,
    Filter,
    Headers,
    Phase,
    RequestContext,
    Respond,
    prefers_async,
)
from proxy.config import RouteConfig

SUBMITTED = Counter(
    "floodwall_jobs_submitted",
    "Jobs accepted (202), by route and priority class",
    ["route", "priority"],
)
REFUSED = Counter(
    "floodwall_jobs_refused",
    "Job submissions refused: queue_full, tenant_queue_full, bad_request, unauthenticated, "
    "unavailable, unknown (Redis answered too late to tell whether the job was queued), "
    "no_time (the filters before it spent the phase's time; nothing sent)",
    ["reason"],
)
API_CALLS = Counter(
    "floodwall_jobs_api", "GET/DELETE calls of the job API, by outcome", ["method", "outcome"]
)

_IDEMPOTENCY_MAX = 255
_ITEM_FIELDS = frozenset({"url", "body", "method"})
T = TypeVar("T")
# Faults after which Redis may still run the command it was sent (the budget ran out, or the
# socket's read timed out); a refused or reset connection sent nothing that could run later.
_TIMEOUTS = (TimeoutError, RedisTimeoutError)


@dataclass(slots=True)
class _State:
    mode: str = ""  # "prefer" (a model route) or "api" (POST /v1/jobs)
    idempotency: str | None = None
    webhook: str | None = None
    cache_control: str | None = None  # the client's, sent on with the job's model calls


class JobsFilter(Filter):
    Params = JobsParams

    def __init__(self, params: JobsParams, deps: Deps) -> None:
        super().__init__(params, deps)
        self.p = params
        self.store = (
            JobStore(deps.redis, params.prefix, order=params.order, weights=params.tenant_weights)
            if deps.redis is not None
            else None
        )
        self._prefix = params.api_path + "/"

    async def _redis(self, ctx: RequestContext, call: Awaitable[T], share: float = 1.0) -> T:
        # Its own budget, or ``share`` of what the phase has left if less (the filters
        # before it spent the rest): an answer after Envoy's message timeout reaches no one.
        own = self.p.redis_timeout_ms / 1000
        async with asyncio.timeout(min(own, ctx.budget_s(own) * share)):
            return await call

    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        if route.grpc:
            # No job comes over gRPC (a job is an HTTP request to replay), and reading the
            # body would make Envoy buffer the route's streams.
            return frozenset()
        return frozenset({Phase.REQUEST_HEADERS, Phase.REQUEST_BODY})

    # --- request phases ----------------------------------------------------------------------

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        path = ctx.path.split("?", 1)[0]
        st = ctx.state(_State)
        if path == self.p.api_path or path.startswith(self._prefix):
            return await self._api(ctx, headers, path, st)
        if ctx.route is not None and ctx.route.api == "jobs":
            # The API's own route (a prefix match also takes /v1/jobsX): nothing on it is
            # forwarded, with Prefer or without.
            return errors.error(404, "not_found", f"no such path under {self.p.api_path}")
        if not prefers_async(headers):
            return CONTINUE
        if ctx.tenant is None:  # a job nobody could read back: refuse rather than queue it
            REFUSED.labels("unauthenticated").inc()
            return _unauthenticated("async requests need an authenticated caller")
        bad = self._read_options(headers, st)
        if bad is not None:
            REFUSED.labels("bad_request").inc()
            return bad
        st.mode = "prefer"
        ctx.deferred = True
        if not ctx.has_request_body:
            return await self._submit(ctx, st, [(ctx.method, path, b"")])
        return CONTINUE

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        st = ctx.state(_State)
        if st.mode == "prefer":
            # The body as the client sent it, not as the API filter rewrote it for Triton.
            raw = ctx.request_body if ctx.request_body is not None else body
            return await self._submit(ctx, st, [(ctx.method, ctx.path.split("?", 1)[0], raw)])
        if st.mode == "api":
            parsed = self._envelope(ctx.request_body if ctx.request_body is not None else body)
            if isinstance(parsed, Respond):
                REFUSED.labels("bad_request").inc()
                return parsed
            return await self._submit(ctx, st, parsed)
        return CONTINUE

    # --- the job API -------------------------------------------------------------------------

    async def _api(self, ctx: RequestContext, headers: Headers, path: str, st: _State) -> Decision:
        if ctx.tenant is None:
            # Jobs belong to tenants: without auth in front nobody could own one.
            REFUSED.labels("unauthenticated").inc()
            return _unauthenticated("the job API needs an authenticated caller")
        if path == self.p.api_path:
            if ctx.method != "POST":
                return _not_allowed("POST")
            bad = self._read_options(headers, st)
            if bad is not None:
                REFUSED.labels("bad_request").inc()
                return bad
            st.mode = "api"
            if not ctx.has_request_body:
                REFUSED.labels("bad_request").inc()
                return errors.error(400, "invalid_request_error", "POST /v1/jobs needs a JSON body")
            return CONTINUE
        job_id = path[len(self._prefix) :]
        if not _valid_id(job_id):
            return _no_job(job_id)
        if ctx.method == "GET":
            return await self._show(ctx, ctx.tenant, job_id)
        if ctx.method == "DELETE":
            return await self._cancel(ctx, ctx.tenant, job_id)
        return _not_allowed("GET, DELETE")

    async def _show(self, ctx: RequestContext, tenant: str, job_id: str) -> Decision:
        if self.store is None:
            return _unavailable("no Redis configured")
        try:
            fields = await self._redis(ctx, self.store.get(job_id))
        except REDIS_FAULTS as exc:
            API_CALLS.labels("GET", "unavailable").inc()
            return _unavailable(type(exc).__name__)
        if fields.get("tenant") != tenant.encode():
            API_CALLS.labels("GET", "not_found").inc()
            return _no_job(job_id)  # someone else's job does not exist, as far as you know
        API_CALLS.labels("GET", "ok").inc()
        headers = {**errors.JSON_HEADERS, "cache-control": "no-store"}
        if fields.get("status") in (b"queued", b"running"):
            headers["retry-after"] = _seconds(self.p.poll_after_s)
        return Respond(200, view(job_id, fields, self.p.api_path), headers)

    async def _cancel(self, ctx: RequestContext, tenant: str, job_id: str) -> Decision:
        if self.store is None:
            return _unavailable("no Redis configured")
        try:
            outcome, was = await self._redis(
                ctx, self.store.cancel(job_id, tenant, self.p.result_ttl_s)
            )
        except REDIS_FAULTS as exc:
            API_CALLS.labels("DELETE", "unavailable").inc()
            return _unavailable(type(exc).__name__)
        API_CALLS.labels("DELETE", outcome).inc()
        if outcome == "missing":
            return _no_job(job_id)
        if outcome == "conflict":
            return errors.error(409, "job_finished", f"job {job_id} is already {was}")
        shown = await self._show(ctx, tenant, job_id)
        if isinstance(shown, Respond) and shown.status == 200:
            return shown
        # Cancelled, but the read after it failed: a 503 would have the client try again
        # and get 409 for a DELETE that worked. What the cancellation itself knows.
        url = f"{self.p.api_path}/{job_id}"
        body = {"id": job_id, "object": "job", "status": "cancelled", "url": url}
        headers = {**errors.JSON_HEADERS, "cache-control": "no-store"}
        return Respond(200, orjson.dumps(body), headers)

    # --- submission --------------------------------------------------------------------------

    def _read_options(self, headers: Headers, st: _State) -> Respond | None:
        key = headers.get("idempotency-key")
        if key is not None:
            if not key or len(key) > _IDEMPOTENCY_MAX:
                return errors.error(
                    400,
                    "invalid_request_error",
                    f"Idempotency-Key must be 1 to {_IDEMPOTENCY_MAX} characters",
                )
            st.idempotency = key
        cc = headers.get("cache-control")
        if cc:
            st.cache_control = cc[:256]  # no-store, no-cache: the cache honours them later
        hook = headers.get("floodwall-webhook")
        if hook is not None:
            w = self.p.webhook
            if w is None:
                return errors.error(400, "invalid_request_error", "webhooks are not enabled here")
            url = w.allows(hook)
            if url is None:
                return errors.error(
                    400, "invalid_request_error", "webhook URL is not an allowed one"
                )
            st.webhook = str(url)
        return None

    def _envelope(self, body: bytes) -> list[tuple[str, str, bytes]] | Respond:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return errors.error(400, "invalid_request_error", f"request body is not JSON: {exc}")
        if not isinstance(doc, dict):
            return errors.error(400, "invalid_request_error", "the body must be a JSON object")
        items = doc.get("requests")
        if items is not None and len(doc) > 1:
            extra = sorted(k for k in doc if k != "requests")
            return errors.error(400, "invalid_request_error", f"unknown field(s) {extra}")
        if items is None:
            items = [doc]
        elif not isinstance(items, list) or not items:
            return errors.error(400, "invalid_request_error", "'requests' must be a non-empty list")
        if len(items) > self.p.max_requests:
            return errors.error(
                400, "invalid_request_error", f"at most {self.p.max_requests} requests per job"
            )
        out = []
        for i, item in enumerate(items):
            where = f"requests[{i}]" if "requests" in doc else "job"
            if not isinstance(item, dict):
                return errors.error(400, "invalid_request_error", f"{where} must be an object")
            unknown = sorted(k for k in item if k not in _ITEM_FIELDS)
            if unknown:  # a misspelt "method" or "priority" must not be queued as if absent
                return errors.error(
                    400, "invalid_request_error",
                    f"{where} has unknown field(s) {unknown}: one of {sorted(_ITEM_FIELDS)}",
                )  # fmt: skip
            url, inner = item.get("url"), item.get("body")
            if url not in self.p.urls:
                return errors.error(
                    400, "invalid_request_error", f"{where}.url must be one of {self.p.urls}"
                )
            if not isinstance(inner, dict):
                return errors.error(400, "invalid_request_error", f"{where}.body must be an object")
            method = item.get("method", "POST")
            if method != "POST":
                return errors.error(400, "invalid_request_error", f"{where}.method must be POST")
            if inner.get("model") != items[0]["body"].get("model"):
                # As OpenAI's Batch API: limits keyed by model charge a job to its one model
                # (a mixed job had none, and escaped every per-model token limit).
                return errors.error(
                    400, "invalid_request_error",
                    f"{where}.body.model differs from requests[0]'s: one model per job",
                )  # fmt: skip
            try:
                out.append((method, url, orjson.dumps(inner)))
            except orjson.JSONEncodeError:  # read up to 1,024 levels deep, written up to 255
                return errors.error(
                    400, "invalid_request_error", f"{where}.body is nested too deeply"
                )
        return out

    async def _submit(
        self, ctx: RequestContext, st: _State, requests: list[tuple[str, str, bytes]]
    ) -> Decision:
        if self.store is None:
            REFUSED.labels("unavailable").inc()
            return _unavailable("no Redis configured")
        if ctx.budget_s(_MIN_SUBMIT_S) < _MIN_SUBMIT_S:
            # The filters before this one spent the phase (a Redis that stopped answering
            # them): a submission sent now would likely end unsettled (a 503 that may hide a
            # queued job). Refused before anything is sent: safe to submit again.
            REFUSED.labels("no_time").inc()
            ctx.log.warning("job submission refused: the phase's time is spent")
            return _unavailable("no time left to queue the job")
        tenant = ctx.tenant or "-"
        priority = ctx.priority if ctx.priority in PRIORITIES else "standard"
        fields: dict[str, bytes | str | int | float] = {
            "key_id": ctx.key_id or "-",
            "route": ctx.route_name,
            "total": len(requests),
            "request_id": ctx.request_id,
        }
        for i, (method, url, body) in enumerate(requests):
            fields[f"m:{i}"], fields[f"u:{i}"], fields[f"b:{i}"] = method, url, body
        if st.webhook is not None:
            fields["webhook"] = st.webhook
        if st.cache_control is not None:
            fields["cc"] = st.cache_control
        job_id = uuid.uuid4().hex
        try:
            sub = await self._redis(
                ctx,
                self.store.submit(
                    job_id,
                    tenant,
                    priority,
                    fields,
                    max_depth=self.p.max_depth,
                    max_tenant=self.p.max_depth_per_tenant,
                    idempotency=(st.idempotency, self.p.idempotency_ttl_s)
                    if st.idempotency
                    else None,
                ),
                share=0.5,  # the rest for the settlement, should the submission time out
            )
        except REDIS_FAULTS as exc:
            ctx.log.warning("job submission failed: %r", exc)
            if not isinstance(exc, _TIMEOUTS):  # refused, reset: nothing was queued
                REFUSED.labels("unavailable").inc()
                return _unavailable(type(exc).__name__)
            # Redis may still run the submission it was sent: find out, so that neither a 503
            # hides a queued job nor a retry queues it twice.
            queued = await self._settle(ctx, job_id)
            if queued is None:
                REFUSED.labels("unknown").inc()
                return _maybe_accepted(job_id, self.p.api_path)
            if not queued:
                REFUSED.labels("unavailable").inc()
                return _unavailable(type(exc).__name__)
            sub = Submitted("ok", job_id)
        if sub.outcome == "void":  # settled as not queued before it ran: not for a fresh id
            REFUSED.labels("unavailable").inc()
            return _unavailable("submission voided")
        if sub.outcome == "full":
            REFUSED.labels("queue_full").inc()
            return errors.error(
                503,
                "queue_full",
                "the job queue is full; retry later",
                retry_after_s=self.p.retry_after_s,
            )
        if sub.outcome == "tenant_full":
            REFUSED.labels("tenant_queue_full").inc()
            return errors.error(
                429,
                "queue_quota_exceeded",
                f"this tenant has {self.p.max_depth_per_tenant} unfinished jobs; retry later",
                retry_after_s=self.p.retry_after_s,
            )
        if sub.outcome == "ok":
            SUBMITTED.labels(ctx.route_name, priority).inc()
            # The tokens are spent later, by the worker: charge the reservation now (limits
            # settle a forwarded request with ctx.usage; nothing better is known here).
            if ctx.token_estimate is not None:
                ctx.usage = ctx.token_estimate
        body = orjson.dumps(
            {
                "id": sub.job_id,
                "object": "job",
                "status": "queued",
                "url": f"{self.p.api_path}/{sub.job_id}",
            }
        )
        headers = {
            **errors.JSON_HEADERS,
            "location": f"{self.p.api_path}/{sub.job_id}",
            "retry-after": _seconds(self.p.poll_after_s),
        }
        if st.mode == "prefer":
            headers["preference-applied"] = "respond-async"
        if sub.outcome == "dup":
            headers["idempotent-replayed"] = "true"
        return Respond(202, body, headers)

    async def _settle(self, ctx: RequestContext, job_id: str) -> bool | None:
        """Whether a submission that timed out was queued (None: Redis did not say in time)."""
        assert self.store is not None
        try:
            return await self._redis(ctx, self.store.settle(job_id))
        except REDIS_FAULTS as exc:
            ctx.log.warning("job %s: could not tell whether it was queued: %r", job_id, exc)
            return None


# Time a submission needs left in its phase to be sent at all: a few Redis round trips.
_MIN_SUBMIT_S = 0.01


def _maybe_accepted(job_id: str, api_path: str) -> Respond:
    url = f"{api_path}/{job_id}"
    return errors.error(
        503,
        "jobs_unavailable",
        f"the job store answered too late to tell whether job {job_id} was queued: "
        f"GET {url} after Retry-After (200: it was queued, do not submit it again; "
        "404: it was not)",
        headers={"location": url},
        retry_after_s=1,
    )


def _valid_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


def _seconds(s: float) -> str:
    return str(max(1, int(s + 0.999)))


def _no_job(job_id: str) -> Respond:
    return errors.error(404, "job_not_found", f"no job {job_id[:64]!r}")


def _unauthenticated(why: str) -> Respond:
    # As the auth filter's 401: the challenge says how to authenticate (RFC 9110, 15.5.2).
    challenge = {"www-authenticate": 'Bearer realm="floodwall"'}
    return errors.error(401, "unauthenticated", why, headers=challenge)


def _not_allowed(allow: str) -> Respond:
    return errors.error(405, "method_not_allowed", f"use {allow}", headers={"allow": allow})


def _unavailable(why: str) -> Respond:
    return errors.error(
        503, "jobs_unavailable", f"the job store is unavailable ({why})", retry_after_s=1
    )
