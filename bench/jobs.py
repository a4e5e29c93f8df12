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
from pathlib import Path
from typing import Any

import aiohttp
import redis

from bench.loadgen import HttpRequest, open_loop_mix
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


def drain(stack: Stack, config: Path, n: int, workers: int) -> dict[str, Any]:
    p = jobs_params(stack.cfg)
    assert p is not None and stack.redis_url
    r = redis.Redis.from_url(stack.redis_url)
    _clear_jobs(r, p.prefix)
    base = f"http://{stack.cfg.listener.address}:{stack.cfg.listener.port}"
    sub = asyncio.run(_send(base, n, 16, f"w{workers}", job=True))
    assert sub.count(202) == n, {s: sub.count(s) for s in set(sub)}
    procs = []
    for i in range(workers):
        (admin,) = free_ports(1)
        argv = [
            sys.executable,
            "-m",
            "proxy.cli",
            "worker",
            "-c",
            str(config),
            "--redis-url",
            stack.redis_url,
            "--consumer",
            f"bench-{workers}-{i}",
            "--admin-port",
            str(admin),
            "--log-level",
            "warning",
        ]
        procs.append(subprocess.Popen(argv, start_new_session=True))
    try:
        deadline = time.monotonic() + 600
        while int(r.get(f"{p.prefix}:depth") or 0) > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)
    started: list[int] = []
    finished: list[int] = []
    states: dict[str, int] = {}
    for key in r.scan_iter(match=f"{p.prefix}:job:*", count=1000):
        st, s0, f1 = r.hmget(key, ["status", "started", "finished"])
        status = st.decode() if isinstance(st, bytes) else str(st)
        states[status] = states.get(status, 0) + 1
        started.append(int(s0 or 0))
        finished.append(int(f1 or 0))
    span = (max(finished) - min(started)) / 1000
    return {
        "workers": workers,
        "slots": workers * p.worker.concurrency,
        "jobs": n,
        "statuses": states,
        "span_s": span,
        "jobs_per_s": n / span,
    }


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
