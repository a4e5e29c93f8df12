"""Async jobs: submission latency through Envoy and drain throughput with 1, 2 and 4 workers.

On the shipped local stack (Envoy, processor, Redis, Triton; the stack's own worker stopped so
this benchmark decides how many run), in one run:

1. Submission, open loop at a fixed rate, three kinds interleaved (latency from the scheduled
   send time):
   - ``submit``: ``POST /v1/embeddings`` with ``Prefer: respond-async`` (auth, limits, the
     jobs filter's Lua script; answered 202 by the processor);
   - ``sync``: the same request answered by the embedder now (the gateway plus one model call);
   - ``gateway``: ``GET /v1/jobs/<unknown id>`` (auth and one Redis read, answered 404): the
     gateway's own floor for an answer from the processor.
   No worker runs meanwhile, so the queue does not compete with the submissions for the CPU.
2. Drain: N embedding jobs with distinct texts (the cache cannot answer them) are queued first,
   then 1, 2 or 4 ``floodwall worker`` processes (4 slots each, through Envoy) empty the
   queue. Throughput = N / (last finish - first start), from the jobs' own Redis timestamps,
   so process start-up is not counted. Beside it, the same N requests sent synchronously at
   the concurrency of one worker (4), as the no-queue reference.
3. Fairness: one worker runs; tenant ``big`` queues a backlog of B embedding jobs (faster than
   the worker drains them), then tenant ``small`` queues S; in FIFO order, then in fair
   order (the queue's default). Per tenant: the time from each job's submission to its
   finish (p50, max) and when its last job finished (from the first job's start). The jobs
   are queued through the filter's own Lua script, not through Envoy (the submission is
   measured above).

    .venv/bin/python -m bench.jobs            # ~3 minutes
    .venv/bin/python -m bench.jobs --quick

Writes bench/results/jobs.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import redis
import redis.asyncio as aioredis

from bench.loadgen import HttpRequest, open_loop_mix
from filters.jobs.store import JobStore, as_text
from filters.jobs.worker import jobs_params
from proxy.config import REPO_ROOT
from proxy.runtime import Stack
from tests.helpers import DEMO_KEY, echo_server, free_ports, stack_config, start_stack

RESULTS = REPO_ROOT / "bench" / "results"
AUTH = {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"}
TEXT = "Floodwall queues long work and answers 202 at once."


def _embed(**headers: str) -> HttpRequest:
    body = json.dumps({"model": "embedder", "input": TEXT}).encode()
    return HttpRequest("POST", "/v1/embeddings", {**AUTH, **headers}, body)


def submission(stack: Stack, rate: float, seconds: float) -> dict[str, Any]:
    host, port = stack.cfg.listener.address, stack.cfg.listener.port
    mix = [
        # no-cache: the look-up is skipped, so every submission is a new job (not a cache hit).
        ("submit", _embed(prefer="respond-async", **{"cache-control": "no-cache"}), 1.0),
        ("sync", _embed(**{"cache-control": "no-cache, no-store"}), 1.0),
        ("gateway", HttpRequest("GET", "/v1/jobs/" + "0" * 32, AUTH), 1.0),
    ]
    return open_loop_mix(host, port, mix, rate=rate, seconds=seconds)


def _clear_jobs(r: redis.Redis, prefix: str) -> None:
    keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i : i + 500])


async def _send(base: str, n: int, concurrency: int, tag: str, *, job: bool) -> list[int]:
    statuses: list[int] = []
    sem = asyncio.Semaphore(concurrency)
    headers = {**AUTH, "cache-control": "no-cache, no-store"}
    if job:
        headers["prefer"] = "respond-async"
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> None:
            body = {"model": "embedder", "input": f"{tag} job number {i}: {TEXT}"}
            async with sem, s.post(base + "/v1/embeddings", json=body, headers=headers) as r:
                await r.read()
                statuses.append(r.status)

        await asyncio.gather(*(one(i) for i in range(n)))
    return statuses


class _Workers:
    """``floodwall worker`` processes on the stack's Redis, stopped (SIGTERM) on exit."""

    def __init__(self, stack: Stack, config: Path, n: int, tag: str) -> None:
        self.argvs = []
        self.admin_ports: list[int] = []
        for i in range(n):
            (admin,) = free_ports(1)
            self.admin_ports.append(admin)
            self.argvs.append([
                sys.executable, "-m", "proxy.cli", "worker", "-c", str(config),
                "--redis-url", str(stack.redis_url), "--consumer", f"bench-{tag}-{i}",
                "--admin-port", str(admin), "--log-level", "warning",
            ])  # fmt: skip
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> _Workers:
        self.procs = [subprocess.Popen(a, start_new_session=True) for a in self.argvs]
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every worker's /readyz answers 200 (it reached Redis and takes jobs)."""
        deadline = time.monotonic() + timeout_s
        for port in self.admin_ports:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            proc.wait(timeout=30)


def _wait_drained(r: redis.Redis, prefix: str) -> None:
    deadline = time.monotonic() + 600
    while int(r.get(f"{prefix}:depth") or 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)


def _jobs(r: redis.Redis, prefix: str) -> list[dict[str, str]]:
    fields = ["status", "tenant", "created", "started", "finished"]
    out = []
    for key in r.scan_iter(match=f"{prefix}:job:*", count=1000):
        vals = r.hmget(key, fields)
        out.append({f: as_text(v) if v else "0" for f, v in zip(fields, vals, strict=True)})
    return out


def drain(stack: Stack, config: Path, n: int, workers: int) -> dict[str, Any]:
    p = jobs_params(stack.cfg)
    assert p is not None and stack.redis_url
    r = redis.Redis.from_url(stack.redis_url)
    _clear_jobs(r, p.prefix)
    base = f"http://{stack.cfg.listener.address}:{stack.cfg.listener.port}"
    sub = asyncio.run(_send(base, n, 16, f"w{workers}", job=True))
    assert sub.count(202) == n, {s: sub.count(s) for s in set(sub)}
    with _Workers(stack, config, workers, str(workers)):
        _wait_drained(r, p.prefix)
    jobs = _jobs(r, p.prefix)
    states: dict[str, int] = {}
    for j in jobs:
        states[j["status"]] = states.get(j["status"], 0) + 1
    span = (max(int(j["finished"]) for j in jobs) - min(int(j["started"]) for j in jobs)) / 1000
    return {
        "workers": workers,
        "slots": workers * p.worker.concurrency,
        "jobs": n,
        "statuses": states,
        "span_s": span,
        "jobs_per_s": n / span,
    }


async def _queue_tenants(url: str, prefix: str, order: str, counts: dict[str, int]) -> None:
    """Queues ``counts[tenant]`` embedding jobs per tenant, tenant after tenant, as the
    filter does (its Lua script), in ``order``."""
    r = aioredis.Redis.from_url(url)
    store = JobStore(r, prefix, order=order)
    try:
        for tenant, n in counts.items():
            for i in range(n):
                body = json.dumps({"model": "embedder", "input": f"{tenant} {order} {i}: {TEXT}"})
                fields: dict[str, str | int] = {
                    "total": 1, "m:0": "POST", "u:0": "/v1/embeddings", "b:0": body,
                    "cc": "no-cache, no-store", "key_id": "-", "route": "embeddings",
                }  # fmt: skip
                sub = await store.submit(
                    uuid.uuid4().hex, tenant, "standard", fields,
                    max_depth=1 << 30, max_tenant=0, idempotency=None,
                )  # fmt: skip
                assert sub.outcome == "ok", sub.outcome
    finally:
        await r.aclose()


def fairness(stack: Stack, config: Path, backlog: int, small: int) -> list[dict[str, Any]]:
    p = jobs_params(stack.cfg)
    assert p is not None and stack.redis_url
    r = redis.Redis.from_url(stack.redis_url)
    rows = []
    for order in ("fifo", "fair"):
        _clear_jobs(r, p.prefix)
        counts = {"big": backlog, "small": small}
        with _Workers(stack, config, 1, order) as workers:
            # The worker runs first: the small tenant's jobs arrive while the big one's
            # backlog is being drained, and their waits count from their own submission.
            workers.wait_ready()
            asyncio.run(_queue_tenants(stack.redis_url, p.prefix, order, counts))
            _wait_drained(r, p.prefix)
        jobs = _jobs(r, p.prefix)
        t0 = min(int(j["started"]) for j in jobs)
        row: dict[str, Any] = {"order": order, "workers": 1, "slots": p.worker.concurrency}
        for tenant in counts:
            mine = [j for j in jobs if j["tenant"] == tenant]
            waits = sorted((int(j["finished"]) - int(j["created"])) / 1000 for j in mine)
            row[tenant] = {
                "jobs": len(mine),
                "succeeded": sum(j["status"] == "succeeded" for j in mine),
                "wait_p50_s": waits[len(waits) // 2],
                "wait_max_s": waits[-1],
                "last_done_s": (max(int(j["finished"]) for j in mine) - t0) / 1000,
            }
        rows.append(row)
    return rows


def sync_reference(stack: Stack, n: int, concurrency: int) -> dict[str, Any]:
    base = f"http://{stack.cfg.listener.address}:{stack.cfg.listener.port}"
    t0 = time.perf_counter()
    statuses = asyncio.run(_send(base, n, concurrency, "sync", job=False))
    span = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": n,
        "ok": statuses.count(200),
        "span_s": span,
        "requests_per_s": n / span,
    }


def run(quick: bool) -> dict[str, Any]:
    from proxy import models

    models.build()
    n = 200 if quick else 600
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fw-jobs-", dir="/tmp") as d, echo_server() as echo:
        cfg = stack_config(Path(d) / "run", echo)
        cfg["listener"]["access_log"] = False
        config = Path(d) / "floodwall.yaml"
        stack = start_stack(cfg, config)
        try:
            own = next(c for c in stack.children if c.name == "worker")
            own.proc.send_signal(signal.SIGTERM)
            own.proc.wait(timeout=30)
            stack.children.remove(own)
            print("== submission (open loop)", flush=True)
            out["submission"] = submission(stack, 60.0 if quick else 90.0, 5.0 if quick else 20.0)
            print("== drain", flush=True)
            out["drain"] = [drain(stack, config, n, k) for k in (1, 2, 4)]
            out["sync_reference"] = sync_reference(stack, n, 4)
            print("== fairness", flush=True)
            out["fairness"] = fairness(stack, config, n // 2, 10)
        finally:
            stack.stop()
    return out


def markdown(res: dict[str, Any]) -> str:
    s = res["submission"]
    lines = [
        "# Async jobs",
        "",
        f"Machine: {res['machine']['cpus']} CPUs; everything (Envoy, processor, Redis, Triton, "
        "workers, load generator) on the same box. `python -m bench.jobs`.",
        "",
        "## Submission through Envoy (open loop, kinds interleaved)",
        "",
        "| kind | rate/s | p50 ms | p99 ms | statuses |",
        "|---|---|---|---|---|",
    ]
    for kind in ("submit", "sync", "gateway"):
        k = s[kind]
        lines.append(
            f"| {kind} | {k['target_rps']:.0f} | {k['p50_ms']:.2f} | {k['p99_ms']:.2f} | "
            f"{k['statuses']} |"
        )
    lines += [
        "",
        f"Submission p50 is {s['submit']['p50_ms'] / s['gateway']['p50_ms']:.2f}x the gateway's "
        f"floor and {s['submit']['p50_ms'] / s['sync']['p50_ms']:.2f}x a synchronous embedding.",
        "",
        "## Drain: N embedding jobs, queued first",
        "",
        "| workers | slots | jobs | jobs/s | span s | final statuses |",
        "|---|---|---|---|---|---|",
    ]
    for row in res["drain"]:
        lines.append(
            f"| {row['workers']} | {row['slots']} | {row['jobs']} | "
            f"{row['jobs_per_s']:.1f} | {row['span_s']:.2f} | {row['statuses']} |"
        )
    ref = res["sync_reference"]
    one = res["drain"][0]["jobs_per_s"]
    lines += [
        "",
        f"Reference: the same requests sent synchronously at concurrency {ref['concurrency']}: "
        f"{ref['requests_per_s']:.1f} req/s ({ref['ok']}/{ref['requests']} ok); one worker "
        f"drains at {one / ref['requests_per_s']:.2f}x that.",
        "",
    ]
    if "fairness" in res:
        lines += [
            "## Fairness: a small tenant behind a big one's backlog (one worker, one class)",
            "",
            "| order | tenant | jobs | succeeded | wait p50 s | wait max s | last done at s |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in res["fairness"]:
            for tenant in ("big", "small"):
                t = row[tenant]
                lines.append(
                    f"| {row['order']} | {tenant} | {t['jobs']} | {t['succeeded']} | "
                    f"{t['wait_p50_s']:.2f} | {t['wait_max_s']:.2f} | {t['last_done_s']:.2f} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install -e '.[bench]' for matplotlib")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = ["submit", "sync", "gateway"]
    s = res["submission"]
    x = range(len(kinds))
    a.bar([i - 0.2 for i in x], [s[k]["p50_ms"] for k in kinds], 0.4, label="p50")
    a.bar([i + 0.2 for i in x], [s[k]["p99_ms"] for k in kinds], 0.4, label="p99")
    a.set_xticks(list(x), kinds)
    a.set_ylabel("ms")
    a.set_title("Through Envoy, interleaved")
    a.legend()
    rows = res["drain"]
    b.bar([str(r["workers"]) for r in rows], [r["jobs_per_s"] for r in rows])
    b.axhline(
        res["sync_reference"]["requests_per_s"],
        color="k",
        ls="--",
        label="synchronous, concurrency 4",
    )
    b.set_xlabel("workers (4 slots each)")
    b.set_ylabel("jobs/s")
    b.set_title(f"Drain of {rows[0]['jobs']} embedding jobs")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "jobs"))
    args = ap.parse_args()
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    res.update(run(args.quick))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    plot(res, out.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
