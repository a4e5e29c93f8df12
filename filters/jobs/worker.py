"""``floodwall worker``: takes jobs from the Redis streams in priority order, runs them against
the model (through Envoy or straight to Triton), stores the answers and acknowledges.

Delivery: at least once. A job's stream entry stays pending until its worker acknowledges it;
a worker that dies (or stalls past ``visibility_timeout_s`` without heartbeating) loses its
jobs to the others (XAUTOCLAIM) and they run again, resuming after the requests already
answered. Whoever finishes first writes the result; a later finisher finds the job finished
and only acknowledges, so the client sees one result. Retryable failures (429, 5xx, timeouts,
connection errors) wait in a delayed set with exponential backoff (or the upstream's
Retry-After, whichever is longer); after ``max_attempts`` the job fails into the dead-letter
stream. SIGTERM stops taking jobs, lets in-flight ones finish for ``drain_s`` and hands the
rest back without spending an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import aiohttp.abc
import orjson
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from filters.jobs.params import PRIORITIES, JobsParams, public_host
from filters.jobs.store import GROUP, JobStore, as_text, requests_of, view
from proxy.api import REDIS_FAULTS, cancel_and_wait
from proxy.config import ConfigError, FloodwallConfig, _format_validation

log = logging.getLogger("floodwall.worker")

FINISHED = Counter("floodwall_jobs_finished", "Jobs finished, by final status", ["status"])
ATTEMPTS = Counter(
    "floodwall_jobs_attempts",
    "Job runs by outcome: finished, retry, unavailable (retried for capacity, no attempt spent), "
    "handed_back, skipped (already finished or gone)",
    ["outcome"],
)
RECLAIMED = Counter("floodwall_jobs_reclaimed", "Jobs taken over from a lost worker")
DEAD = Counter("floodwall_jobs_dead_lettered", "Jobs that failed for good (dead-letter stream)")
CALLS = Counter(
    "floodwall_jobs_model_calls", "Model calls of the workers, by status class", ["status"]
)
WEBHOOKS = Counter(
    "floodwall_jobs_webhooks",
    "Completion webhooks, by outcome (delivered, failed, refused: no longer allowed)",
    ["outcome"],
)
REDIS_ERRORS = Counter("floodwall_jobs_worker_redis_errors", "Worker loop Redis failures")
DEPTH = Gauge("floodwall_jobs_depth", "Unfinished jobs (queued, waiting to retry or running)")
QUEUED = Gauge("floodwall_jobs_queued", "Jobs of each class waiting for a worker", ["priority"])
INFLIGHT = Gauge("floodwall_jobs_inflight", "Jobs this worker is running")
RUN_SECONDS = Histogram(
    "floodwall_job_run_seconds",
    "One run of a job (all its model calls)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})
# Refusals for capacity (and an unreachable gateway, seen as 503): retried without spending
# attempts for up to unavailable_retry_s. A 500/502/504 may be the job's own doing (an input
# that crashes or stalls the model), so those spend attempts, unless the gateway says its
# policy processor is down or late (Envoy's 500/504, which no input causes).
UNAVAILABLE = frozenset({429, 503})
GATEWAY_DOWN = frozenset({"gateway_unavailable", "gateway_timeout"})


def _unavailable(reply: Reply) -> bool:
    if reply.status in UNAVAILABLE:
        return True
    if reply.status not in (500, 504) or len(reply.body) > 512:
        return False
    try:
        kind = orjson.loads(reply.body)["error"]["type"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return False
    return isinstance(kind, str) and kind in GATEWAY_DOWN  # (a list or dict: unhashable)


@dataclass(slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    retry_after_s: float = 0.0


class Caller(Protocol):
    async def call(
        self,
        method: str,
        url: str,
        body: bytes,
        priority: str,
        tag: str,
        tenant: str = "",
        cache_control: str = "",
    ) -> Reply: ...

    async def close(self) -> None: ...


# The header naming the job's tenant on the worker's calls: the cache's on_behalf.header
# when the config has one (see caller()), else this.
TENANT_HEADER = "x-job-tenant"


def _retry_after(v: str | None) -> float:
    """Delay-seconds (the gateway sends no dates); anything else, or not finite: none. At
    most a day: a job is not parked longer on one answer's word."""
    try:
        s = float(v) if v else 0.0
    except ValueError:
        return 0.0
    return min(max(0.0, s), 86_400.0) if math.isfinite(s) else 0.0


class EnvoyCaller:
    """Through the gateway, as the worker key: admission, breakers and degradation apply; the
    job's class rides along in the priority header admission trusts from this key."""

    def __init__(
        self,
        base_url: str,
        key: str,
        priority_header: str,
        timeout_s: float,
        tenant_header: str = TENANT_HEADER,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.tenant_header = tenant_header
        self.headers = {
            "authorization": f"Bearer {key}",
            "content-type": "application/json",
            "x-request-type": "batch",
        }
        self.priority_header = priority_header
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def call(
        self,
        method: str,
        url: str,
        body: bytes,
        priority: str,
        tag: str,
        tenant: str = "",
        cache_control: str = "",
    ) -> Reply:
        headers = {**self.headers, self.priority_header: priority, "x-request-id": tag}
        if tenant:
            # Whose job this is: the cache keeps each tenant's job answers in that tenant's
            # scope (cache.on_behalf, trusted from this key only).
            headers[self.tenant_header] = tenant
        if cache_control:  # the submitting client's: a no-store job is not cached either
            headers["cache-control"] = cache_control
        async with self.session.request(
            method, self.base_url + url, data=body, headers=headers
        ) as r:
            return Reply(
                r.status,
                r.headers.get("content-type", ""),
                await r.read(),
                _retry_after(r.headers.get("retry-after")),
            )

    async def close(self) -> None:
        await self.session.close()


class TritonCaller:
    """Straight to Triton: the route's API filter (openai) translates in process, played
    through the shipped harness (``proxy.testing.Harness`` does Envoy's part); no policies."""

    def __init__(self, cfg: FloodwallConfig, timeout_s: float) -> None:
        from proxy.api import Deps
        from proxy.registry import build_filters
        from proxy.testing import Harness

        self.cfg = cfg
        api = [fc for fc in cfg.filters if fc.type == "openai"]
        deps = Deps(upstreams={n: u.base_url for n, u in cfg.upstreams.items()})
        self.harness = Harness(cfg, build_filters(api, deps))
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def call(
        self,
        method: str,
        url: str,
        body: bytes,
        priority: str,
        tag: str,
        tenant: str = "",
        cache_control: str = "",
    ) -> Reply:
        from proxy.testing import UpstreamReply

        route = self.cfg.route_for(url)
        if route is None:
            body = b'{"error":{"type":"not_found","message":"no route serves this url"}}'
            return Reply(404, "application/json", body)
        base = self.cfg.upstreams[route.upstream].base_url.rstrip("/")

        async def upstream(h: Mapping[str, str], b: bytes) -> UpstreamReply:
            headers = {"content-type": h.get("content-type", "application/json")}
            if "inference-header-content-length" in h:
                headers["inference-header-content-length"] = h["inference-header-content-length"]
            async with self.session.request(
                h[":method"], base + h[":path"], data=b, headers=headers
            ) as r:
                return UpstreamReply(
                    r.status, {"content-type": r.headers.get("content-type", "")}, await r.read()
                )

        res = await self.harness.request(
            method,
            url,
            headers={"content-type": "application/json", "x-request-id": tag},
            body=body,
            upstream=upstream,
        )
        return Reply(res.status, res.headers.get("content-type", ""), res.body)

    async def close(self) -> None:
        await self.session.close()


def sign(secret: bytes, body: bytes, ts: int) -> str:
    """``Floodwall-Signature`` value: ``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "t." + body)>``
    (the timestamp inside the MAC lets receivers refuse replays of old deliveries)."""
    mac = hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def tenant_secret(secret: bytes, tenant: str) -> bytes:
    """The key that signs ``tenant``'s webhooks (``webhook.signing: per_tenant``): 64 hex
    characters, HMAC-SHA256 of the tenant under the worker's secret. Whoever holds one
    tenant's key learns neither the secret nor another tenant's key."""
    return (
        hmac.new(secret, b"floodwall webhook v1\0" + tenant.encode(), hashlib.sha256)
        .hexdigest()
        .encode()
    )


def verify(
    secret: bytes, body: bytes, header: str, *, now: float, tolerance_s: float = 300
) -> bool:
    """What a webhook receiver runs: the MAC matches and the timestamp is recent."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, ts), header)


class Worker:
    def __init__(
        self,
        params: JobsParams,
        store: JobStore,
        caller: Caller,
        *,
        consumer: str | None = None,
        concurrency: int | None = None,
        webhook_secret: bytes | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.p = params
        self.w = params.worker
        self.store = store
        self.r = store.r
        self.caller = caller
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.concurrency = concurrency or self.w.concurrency
        self.webhook_secret = webhook_secret
        self.rng = rng or random.Random()
        self.ready = False
        self.tasks: dict[asyncio.Task[None], tuple[str, str, str]] = {}
        self._hooks: set[asyncio.Task[None]] = set()
        self._claim_from: dict[str, str] = {}
        self._webhook_session: aiohttp.ClientSession | None = None

    # --- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while True:  # Redis may be down or still loading when the worker starts: wait for it
            try:
                await self.store.ensure_groups()
                break
            except REDIS_FAULTS as exc:
                REDIS_ERRORS.inc()
                log.warning("cannot reach Redis to start (%r); again in %.1fs", exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                if stop.is_set():
                    return
                backoff = min(backoff * 2, 5.0)
        self.ready = True
        vis = self.w.visibility_timeout_s
        last_promote = last_reclaim = last_gauge = 0.0
        while not stop.is_set():
            now = time.monotonic()
            try:
                if now - last_promote >= 0.25:
                    await self.store.promote_due()
                    last_promote = now
                if now - last_gauge >= 1.0:
                    await self._gauges()
                    last_gauge = now
                if self._free() and now - last_reclaim >= min(vis / 4, 5.0):
                    await self._reclaim()
                    last_reclaim = now
                if not self._free():
                    await asyncio.wait(
                        list(self.tasks), timeout=0.25, return_when=asyncio.FIRST_COMPLETED
                    )
                    continue
                await self._take()
            except REDIS_FAULTS as exc:
                REDIS_ERRORS.inc()
                if "NOGROUP" in str(exc) and await self._regroup():
                    continue
                log.warning("worker loop: Redis failed (%r); retrying in 1s", exc)
                await asyncio.sleep(1.0)
        self.ready = False
        await self._drain()

    async def _regroup(self) -> bool:
        """Redis lost the streams' consumer group (restarted without persistence, flushed, a
        failover to an empty replica): without it every read fails and accepted jobs never run.
        The group is made again at id 0, so the entries submitted since are delivered."""
        log.warning("worker loop: the consumer group is gone (Redis lost its data); recreating")
        try:
            await self.store.ensure_groups()
        except REDIS_FAULTS as exc:
            log.warning("worker loop: could not recreate the consumer group (%r)", exc)
            return False
        self._claim_from.clear()
        return True

    def _free(self) -> int:
        return self.concurrency - len(self.tasks)

    async def _take(self) -> None:
        """Highest class first, each class in fair order; when none is queued, wait briefly
        for a submission's wake-up."""
        got = await self.store.take(self.consumer, self._free())
        for cls, entry, job_id in got:
            self._spawn(cls, entry, job_id)
        if not got:
            await self.store.wait_for_work(0.25)

    def _spawn(self, cls: str, entry: str, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._job(cls, entry, job_id))
        self.tasks[task] = (cls, entry, job_id)
        INFLIGHT.set(len(self.tasks))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task, None)
        INFLIGHT.set(len(self.tasks))
        if not task.cancelled() and task.exception() is not None:
            log.error("job task failed: %r", task.exception())

    async def _reclaim(self) -> None:
        min_idle = int(self.w.visibility_timeout_s * 1000)
        for cls in PRIORITIES:
            free = self._free()
            if free <= 0:
                return
            # Page through the pending list across calls (each call scans a bounded part of it),
            # so idle entries behind many running ones are found too.
            out = await self.r.xautoclaim(
                self.store.queues[cls], GROUP, self.consumer, min_idle,
                start_id=self._claim_from.get(cls, "0-0"), count=free,
            )  # fmt: skip
            nxt = out[0]
            self._claim_from[cls] = as_text(nxt)
            for entry_id, fields in out[1]:
                RECLAIMED.inc()
                raw = (fields or {}).get(b"id")
                self._spawn(cls, as_text(entry_id), raw.decode() if raw else "")

    async def _gauges(self) -> None:
        DEPTH.set(await self.store.depth())
        for cls in PRIORITIES:
            QUEUED.labels(cls).set(await self.store.queued(cls))

    async def _drain(self) -> None:
        if self.tasks:
            log.info("worker draining %d job(s) for up to %.0fs", len(self.tasks), self.w.drain_s)
            await asyncio.wait(list(self.tasks), timeout=self.w.drain_s)
        for task, (cls, entry, job_id) in list(self.tasks.items()):
            await cancel_and_wait([task])
            try:  # hand it back at once, without spending one of its attempts
                # unavailable_s=0: a hand-back keeps the job's run of capacity refusals (a
                # rolling restart must not give it a fresh budget and a short backoff).
                await self.store.retry(
                    job_id, cls, entry, 0.0, b"", refund_attempt=True, unavailable_s=0.0
                )
                ATTEMPTS.labels("handed_back").inc()
            except REDIS_FAULTS as exc:
                log.warning("could not hand back job %s (%r): it is reclaimed later", job_id, exc)
        if self._hooks:
            await asyncio.wait(list(self._hooks), timeout=self.w.drain_s)
        await self.caller.close()
        if self._webhook_session is not None:
            await self._webhook_session.close()

    # --- one job -----------------------------------------------------------------------------

    async def _job(self, cls: str, entry: str, job_id: str) -> None:
        # An entry we did not write, or a job finished, cancelled or expired meanwhile: drop
        # the entry rather than loop on it.
        outcome, attempts = await self.store.start(job_id, self.consumer) if job_id else ("", 0)
        if outcome != "run":
            await self.store.ack(cls, entry)
            ATTEMPTS.labels("skipped").inc()
            return
        if attempts > self.w.max_attempts:
            await self._fail(
                job_id,
                cls,
                entry,
                "attempts_exhausted",
                f"gave up after {attempts - 1} attempts",
                dead=True,
            )
            return
        fields = await self.store.get(job_id)
        try:
            requests = requests_of(fields)
        except (KeyError, ValueError, UnicodeDecodeError):
            await self._fail(job_id, cls, entry, "malformed_job", "the stored job is malformed")
            return
        beat = asyncio.get_running_loop().create_task(self._heartbeat(cls, entry))
        t0 = time.monotonic()
        try:
            await self._run(cls, entry, job_id, attempts, fields, requests)
        finally:
            beat.cancel()
            RUN_SECONDS.observe(time.monotonic() - t0)

    async def _run(
        self,
        cls: str,
        entry: str,
        job_id: str,
        attempts: int,
        fields: Mapping[str, bytes],
        requests: list[tuple[str, str, bytes]],
    ) -> None:
        statuses: list[int] = []
        kept = sum(len(v) for k, v in fields.items() if k.startswith("rb:"))
        for i, (method, url, body) in enumerate(requests):
            done = fields.get(f"rs:{i}")
            if done is not None:  # answered in an earlier attempt
                statuses.append(int(done))
                continue
            if i and await self.r.hget(self.store.job_key(job_id), "status") == b"cancelled":
                await self.store.ack(cls, entry)  # cancelled between two of its requests
                ATTEMPTS.labels("skipped").inc()
                return
            try:
                reply = await self.caller.call(
                    method, url, body, cls, f"job-{job_id}-{i}-{attempts}",
                    fields.get("tenant", b"").decode(), fields.get("cc", b"").decode(),
                )  # fmt: skip
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                # ValueError: a header value aiohttp refuses to send. A failed call, with its
                # reason kept: not a task that dies and leaves the job to time out unexplained.
                CALLS.labels("error").inc()
                reply = Reply(503, "", b"", 0.0)
                why = f"the model call failed ({type(exc).__name__})"
            else:
                CALLS.labels(f"{reply.status // 100}xx").inc()
                why = f"the model answered {reply.status}"
            if reply.status in RETRYABLE:
                n = int(fields.get("unavailable_n", b"0"))
                await self._retry_or_fail(job_id, cls, entry, attempts, reply, why, n)
                return
            if len(reply.body) > self.p.max_result_bytes:
                message = f"the answer exceeds {self.p.max_result_bytes} bytes"
                error = {"error": {"type": "result_too_large", "message": message}}
                reply = Reply(502, "application/json", orjson.dumps(error))
            elif kept + len(reply.body) > self.p.max_job_result_bytes:
                # Over the job's budget: fail it now, its other requests unrun.
                await self._fail(
                    job_id, cls, entry, "result_too_large",
                    f"the job's answers exceed {self.p.max_job_result_bytes} bytes "
                    f"(at requests[{i}])",
                )  # fmt: skip
                return
            await self.store.save(job_id, i, reply.status, reply.body, _is_json(reply))
            kept += len(reply.body)
            statuses.append(reply.status)
        bad = [s for s in statuses if not 200 <= s < 300]
        if bad:
            await self._fail(
                job_id,
                cls,
                entry,
                "request_failed",
                f"{len(bad)} of {len(statuses)} request(s) failed (first: {bad[0]})",
            )
        else:
            await self._finished(job_id, cls, entry, "succeeded")

    async def _retry_or_fail(
        self,
        job_id: str,
        cls: str,
        entry: str,
        attempts: int,
        reply: Reply,
        why: str,
        refused_before: int = 0,
    ) -> None:
        """``refused_before``: capacity refusals in a row before this one (none spent an
        attempt); they set the backoff of another, so a long outage is polled ever less."""
        if _unavailable(reply) and self.w.unavailable_retry_s > 0:
            delay = self._delay(refused_before + 1, reply)
            err = _error("retrying", f"{why}; next try in {delay:.1f}s")
            out = await self.store.retry(
                job_id, cls, entry, delay, err, unavailable_s=self.w.unavailable_retry_s
            )
            if out != "expired":
                ATTEMPTS.labels("unavailable").inc()
                return
            why += f" (refused for over {self.w.unavailable_retry_s:g}s)"
            past_budget: float | None = 0.0  # keeps the run of refusals: no new budget
        else:
            past_budget = None
        if attempts >= self.w.max_attempts:
            await self._fail(
                job_id,
                cls,
                entry,
                "attempts_exhausted",
                f"gave up after {attempts} attempts: {why}",
                dead=True,
            )
            return
        delay = self._delay(attempts, reply)
        err = _error("retrying", f"attempt {attempts}: {why}; next in {delay:.1f}s")
        await self.store.retry(job_id, cls, entry, delay, err, unavailable_s=past_budget)
        ATTEMPTS.labels("retry").inc()

    def _delay(self, nth: int, reply: Reply) -> float:
        """Before the ``nth`` retry: exponential backoff with jitter, or the Retry-After."""
        backoff = min(self.w.backoff_max_s, self.w.backoff_s * 2.0 ** min(nth - 1, 62))
        return max(backoff * (0.5 + self.rng.random() / 2), reply.retry_after_s)

    async def _fail(
        self, job_id: str, cls: str, entry: str, kind: str, message: str, *, dead: bool = False
    ) -> None:
        await self._finished(job_id, cls, entry, "failed", error=_error(kind, message), dead=dead)

    async def _finished(
        self,
        job_id: str,
        cls: str,
        entry: str,
        status: str,
        *,
        error: bytes | None = None,
        dead: bool = False,
    ) -> None:
        fields = {"error": error} if error is not None else None
        out = await self.store.finish(
            job_id, cls, entry, status, self.p.result_ttl_s, dead=dead, fields=fields
        )
        ATTEMPTS.labels("finished" if out == "ok" else "skipped").inc()
        if out != "ok":
            return  # someone else finished it (or the client cancelled): theirs is the result
        FINISHED.labels(status).inc()
        if dead:
            DEAD.inc()
        hook = await self.r.hget(self.store.job_key(job_id), "webhook")
        if hook:
            t = asyncio.get_running_loop().create_task(self._webhook(job_id, hook.decode()))
            self._hooks.add(t)
            t.add_done_callback(self._hooks.discard)

    async def _heartbeat(self, cls: str, entry: str) -> None:
        """Keeps the entry's idle time low while the job runs, so nobody takes it over."""
        period = self.w.visibility_timeout_s / 3
        while True:
            await asyncio.sleep(period)
            try:
                await self.r.xclaim(
                    self.store.queues[cls], GROUP, self.consumer, 0, [entry], justid=True
                )
            except REDIS_FAULTS as exc:
                log.warning("heartbeat failed (%r)", exc)

    async def _webhook(self, job_id: str, hook: str) -> None:
        wp = self.p.webhook
        if wp is None or self.webhook_secret is None:
            WEBHOOKS.labels("not_configured").inc()
            return
        url = wp.allows(hook)  # again: the config may have changed since the job came in
        if url is None:
            log.warning("job %s: its webhook is not under webhook.allowed_prefixes now", job_id)
            WEBHOOKS.labels("refused").inc()
            return
        if self._webhook_session is None:
            timeout = aiohttp.ClientTimeout(total=wp.timeout_s)
            resolver = None if wp.allow_private_addresses else _PublicOnlyResolver()
            self._webhook_session = aiohttp.ClientSession(
                timeout=timeout, connector=aiohttp.TCPConnector(resolver=resolver)
            )
        try:
            fields = await self.store.get(job_id)
        except REDIS_FAULTS as exc:  # the job stays readable with GET; count the loss
            log.warning("job %s: webhook not sent, the job could not be read (%r)", job_id, exc)
            WEBHOOKS.labels("failed").inc()
            return
        body = view(job_id, fields, self.p.api_path)
        key = self.webhook_secret
        if wp.signing == "per_tenant":
            key = tenant_secret(key, fields.get("tenant", b"").decode("utf-8", "replace"))
        outcome = "failed"
        for attempt in range(wp.attempts):
            headers = {
                "content-type": "application/json",
                "floodwall-job-id": job_id,
                "floodwall-signature": sign(key, body, int(time.time())),
            }
            try:
                # Redirects are not followed: the receiver could send the signed job (and a
                # re-POST) anywhere, past every check above.
                async with self._webhook_session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as r:
                    if 200 <= r.status < 300:
                        outcome = "delivered"
                        break
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            await asyncio.sleep(0.5 * 2**attempt)
        WEBHOOKS.labels(outcome).inc()
        with contextlib.suppress(*REDIS_FAULTS):  # a record only; the delivery happened
            await self.r.hset(self.store.job_key(job_id), "webhook_status", outcome)


class _PublicOnlyResolver(aiohttp.abc.AbstractResolver):
    """Resolves as aiohttp does, then keeps public addresses only (params.public_host): a
    receiver's name that resolves to 127.0.0.1 or 169.254.169.254 reaches neither. aiohttp
    asks no resolver for an IP address in the URL; WebhookParams.allows refuses those."""

    def __init__(self) -> None:
        self._inner = aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        public = [a for a in found if public_host(a["host"])]
        if not public:
            raise OSError(f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


def _is_json(reply: Reply) -> bool:
    if "json" not in reply.content_type:
        return False
    try:
        orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        return False
    return True


def _error(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": kind, "message": message})


# --- the command -------------------------------------------------------------------------------


def jobs_params(cfg: FloodwallConfig) -> JobsParams | None:
    """The params of the config's ``jobs`` filter (None: the config has no job queue)."""
    found = [(i, fc) for i, fc in enumerate(cfg.filters) if fc.type == "jobs"]
    if not found:
        return None
    if len(found) > 1:
        raise ConfigError("more than one filter of type jobs: the worker cannot tell which")
    i, fc = found[0]
    try:
        return JobsParams.model_validate(fc.params)
    except ValidationError as e:  # worded as the processor's registry words it
        raise ConfigError(f"filters[{i}] ({fc.name}): params.{_format_validation(e)}") from None


def make_caller(cfg: FloodwallConfig, p: JobsParams) -> Caller:
    w = p.worker
    if w.via == "triton":
        return TritonCaller(cfg, w.request_timeout_s)
    key = w.key or os.environ.get(w.key_env)
    if not key:
        raise ConfigError(f"the worker needs its API key: set {w.key_env} (jobs.worker.key_env)")
    if not key.isprintable() or key != key.strip():
        # A key read from a file keeps its newline (kubectl create secret --from-file), and
        # no HTTP client sends it: every job's call would fail. Named, never shown.
        raise ConfigError(
            f"the worker's API key ({w.key_env} or jobs.worker.key) has spaces or control "
            "characters around or in it (a trailing newline?)"
        )
    scheme = "https" if cfg.listener.tls else "http"
    base = w.gateway_url or f"{scheme}://{cfg.listener.address}:{cfg.listener.port}"
    tenant_header = next(
        (
            str(f.params["on_behalf"].get("header", TENANT_HEADER))
            for f in cfg.filters
            if f.type == "cache" and isinstance(f.params.get("on_behalf"), dict)
        ),
        TENANT_HEADER,
    )
    return EnvoyCaller(base, key, w.priority_header, w.request_timeout_s, tenant_header)


def worker_redis(url: str, concurrency: int, cluster: bool = False) -> Any:
    """A client with room for every job's calls and heartbeat plus the loop's own; a job
    waits for a connection rather than failing when they are all busy. ``cluster``: the URL
    names one node of a Redis Cluster (``redis.cluster``); the job keys' hash tag puts them
    all on the node that owns its slot, which the cluster client finds."""
    import redis.asyncio as aioredis

    # Blocking reads wait up to 250 ms: the socket timeout must be well above that.
    if cluster:
        from proxy.rediscluster import Cluster

        return Cluster.from_urls(
            url, max_connections=2 * concurrency + 4, socket_timeout=10, socket_connect_timeout=5
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=2 * concurrency + 4,
        timeout=10,
        socket_timeout=10,
        socket_connect_timeout=5,
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


async def serve(
    cfg: FloodwallConfig,
    *,
    redis_url: str,
    concurrency: int | None = None,
    consumer: str | None = None,
    admin_port: int | None = None,
    on_ready: Callable[[Worker], Awaitable[None]] | None = None,
) -> None:
    import signal

    from proxy.admin import AdminServer

    p = jobs_params(cfg)
    if p is None:
        raise ConfigError("the config has no filter of type jobs: nothing to work on")
    cluster = cfg.redis is not None and cfg.redis.cluster
    r = worker_redis(redis_url, concurrency or p.worker.concurrency, cluster)
    secret = None
    if p.webhook is not None:
        raw = os.environ.get(p.webhook.secret_env)
        secret = raw.encode() if raw else None
        if secret is None:
            log.warning("webhooks enabled but %s is unset: none will be sent", p.webhook.secret_env)
    worker = Worker(
        p,
        JobStore(r, p.prefix),
        make_caller(cfg, p),
        consumer=consumer,
        concurrency=concurrency,
        webhook_secret=secret,
    )
    port = p.worker.admin_port if admin_port is None else admin_port
    admin = AdminServer(p.worker.admin_address, port, lambda: worker.ready)
    await admin.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker %s: %d slot(s), via %s", worker.consumer, worker.concurrency, p.worker.via)
    if on_ready is not None:
        await on_ready(worker)
    try:
        await worker.run(stop)
    finally:
        await admin.stop()
        await r.aclose()
