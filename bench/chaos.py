"""A chaos soak: good and bad traffic through a real `floodwall up` while its parts fail.

Starts ``floodwall up`` (the shipped local config on free ports, so it can run beside another
stack), drives a mix of requests at it from a few clients (valid embeddings, chat, KServe
and async jobs; a rate-limited key, a sheddable key; malformed and invalid-UTF-8 JSON, too
deeply nested JSON, a 2 MB body, no key, an unknown key, spoofed ``x-floodwall-*`` headers,
an unknown model) and meanwhile freezes Redis (SIGSTOP) and kills Redis, Triton, the
processor and the job worker (SIGKILL; ``up`` starts each again). Every answer is checked
against the contract:

- every error is JSON ``{"error": {"type", "message"}}`` and never holds a key;
- every status is the one the request's kind calls for, or an honest refusal (429, 503);
  a dead processor's documented 500 ``gateway_unavailable`` (``failure_mode_allow: false``)
  is counted apart;
- nothing takes longer than 35 s (no hang), nothing resets the connection;
- every accepted job ends ``succeeded`` (none stuck, none failed because a part restarted);
- the stack answers normally at the end.

    .venv/bin/python -m bench.chaos            # ~3 minutes
    .venv/bin/python -m bench.chaos --quick    # ~1.5 minutes

Writes bench/results/chaos.{json,md}; exits 1 when the contract was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.run import write_results
from proxy.config import REPO_ROOT
from tests.helpers import DEMO_KEY, free_ports, stack_config

RESULTS = REPO_ROOT / "bench" / "results"
WORDS = ("reset", "password", "account", "billing", "invoice", "refund", "cancel", "upgrade",
         "plan", "team", "member", "export", "data")  # fmt: skip
QUESTIONS = (
    "How do I reset my password?",
    "how can I reset my password",
    "What is the refund policy?",
    "How do I export my data?",
)
SLOW_S = 35.0


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


def _headers(key: str | None = DEMO_KEY, **extra: str) -> dict[str, str]:
    h = {"content-type": "application/json", **extra}
    if key:
        h["authorization"] = f"Bearer {key}"
    return h


# kind -> (method, path, headers, body, statuses that kind calls for)
Kind = tuple[str, str, dict[str, str], bytes, frozenset[int]]


def kinds(rng: random.Random) -> dict[str, Kind]:
    def emb(text: str) -> bytes:
        return json.dumps({"model": "embedder", "input": text}).encode()

    chat = {"model": "sim-llm", "temperature": 0,
            "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}  # fmt: skip
    kserve = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES",
                          "data": [_sentence(rng)]}]}  # fmt: skip
    spoofed = _headers(**{"x-floodwall-tenant": "other", "x-floodwall-priority": "critical",
                          "x-floodwall-key-id": "admin"})  # fmt: skip
    ok = frozenset({200})
    return {
        "embeddings": ("POST", "/v1/embeddings", _headers(), emb(_sentence(rng)), ok),
        "chat": ("POST", "/v1/chat/completions", _headers(), json.dumps(chat).encode(), ok),
        "limited_key": ("POST", "/v1/embeddings", _headers("fw-demo-limited"),
                        emb(_sentence(rng)), frozenset({200, 429})),
        "sheddable_key": ("POST", "/v1/embeddings", _headers("fw-demo-batch"),
                          emb(_sentence(rng)), ok),
        "kserve": ("POST", "/v2/models/embedder/infer", _headers(),
                   json.dumps(kserve).encode(), ok),
        "async_job": ("POST", "/v1/embeddings", _headers(prefer="respond-async"),
                      emb(_sentence(rng)), frozenset({202, 200})),  # 200: a cache hit
        "spoofed_headers": ("POST", "/v1/embeddings", spoofed, emb(_sentence(rng)), ok),
        "malformed_json": ("POST", "/v1/embeddings", _headers(), b'{"model": "embedder", "in',
                           frozenset({400})),
        "invalid_utf8": ("POST", "/v1/embeddings", _headers(),
                         b'{"model": "embedder", "input": "\xff\xfe"}', frozenset({400})),
        "too_deep": ("POST", "/v1/chat/completions", _headers(), b"[" * 3000 + b"]" * 3000,
                     frozenset({400})),
        "huge_body": ("POST", "/v1/embeddings", _headers(),
                      b'{"model":"embedder","input":"' + b"a" * (2 << 20) + b'"}',
                      frozenset({413})),
        "no_key": ("POST", "/v1/embeddings", _headers(None), emb("x"), frozenset({401})),
        "unknown_key": ("POST", "/v1/embeddings", _headers("sk-not-a-key"), emb("x"),
                        frozenset({401})),
        "unknown_model": ("POST", "/v1/embeddings", _headers(),
                          json.dumps({"model": "nope", "input": "x"}).encode(),
                          frozenset({404})),
    }  # fmt: skip


class Soak:
    def __init__(self, base: str, seed: int) -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.phase = "warm"
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.broken: list[dict[str, Any]] = []
        self.processor_500 = 0
        self.jobs: list[str] = []
        self.latency: dict[str, list[float]] = collections.defaultdict(list)

    def _break(self, kind: str, status: int, why: str) -> None:
        self.broken.append({"phase": self.phase, "kind": kind, "status": status, "why": why})

    async def one(self, s: aiohttp.ClientSession) -> None:
        name, (method, path, headers, body, want) = self.rng.choice(list(kinds(self.rng).items()))
        t0 = time.monotonic()
        try:
            async with s.request(method, self.base + path, headers=headers, data=body) as r:
                raw = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.counts[self.phase][f"{name}:{type(exc).__name__}"] += 1
            self._break(name, -1, f"no answer: {exc!r}"[:200])
            return
        took = time.monotonic() - t0
        self.counts[self.phase][f"{name}:{status}"] += 1
        if name == "embeddings":
            self.latency[self.phase].append(took)
        if took > SLOW_S:
            self._break(name, status, f"took {took:.1f}s")
        text = raw.decode(errors="replace")
        if DEMO_KEY in text or "sk-not-a-key" in text:
            self._break(name, status, "a key in the answer")
        if status >= 400:
            try:
                err = json.loads(raw)["error"]
                kind = err["type"]
                assert isinstance(kind, str) and isinstance(err["message"], str)
            except (ValueError, KeyError, TypeError, AssertionError):
                self._break(name, status, "not a JSON error: " + text[:120])
                return
            if status == 500 and kind == "gateway_unavailable" and self.phase == "processor":
                self.processor_500 += 1
                return
        if status not in want and status not in (429, 503):
            self._break(name, status, text[:160])
        if name == "async_job" and status == 202:
            self.jobs.append(json.loads(raw)["id"])

    async def clients(self, stop: asyncio.Event, n: int, rate: float) -> None:
        timeout = aiohttp.ClientTimeout(total=70)
        async with aiohttp.ClientSession(timeout=timeout) as s:

            async def client() -> None:
                while not stop.is_set():
                    await self.one(s)
                    await asyncio.sleep(self.rng.expovariate(rate / n))

            await asyncio.gather(*(client() for _ in range(n)))

    async def answers(self, within_s: float) -> float | None:
        """Seconds until an embedding of a text never asked before answers 200."""
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as s:
            while time.monotonic() - t0 < within_s:
                body = json.dumps({"model": "embedder", "input": f"ready {self.rng.random()}"})
                try:
                    async with s.post(self.base + "/v1/embeddings", headers=_headers(),
                                      data=body) as r:  # fmt: skip
                        await r.read()
                        if r.status == 200:
                            return round(time.monotonic() - t0, 2)
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.25)
        return None

    async def job_outcomes(self, within_s: float) -> dict[str, int]:
        left, out = set(self.jobs), collections.Counter[str]()
        deadline = time.monotonic() + within_s
        async with aiohttp.ClientSession() as s:
            while left and time.monotonic() < deadline:
                for j in list(left):
                    async with s.get(f"{self.base}/v1/jobs/{j}", headers=_headers()) as r:
                        st = (await r.json(content_type=None)).get("status")
                    if st in ("succeeded", "failed", "cancelled"):
                        out[st] += 1
                        left.discard(j)
                await asyncio.sleep(1)
        out["unfinished"] = len(left)
        return dict(out)


def _children(up: subprocess.Popen[bytes]) -> dict[str, list[int]]:
    """The stack's processes by role, from `up`'s children's command lines."""
    roles = {"redis": "redis-server", "triton": "tritonserver", "processor": "proxy.cli serve",
             "worker": "proxy.cli worker", "envoy": "envoy"}  # fmt: skip
    out: dict[str, list[int]] = {r: [] for r in roles}
    kids = subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True)
    for pid in map(int, kids.stdout.split()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        for role, needle in roles.items():
            if needle in cmd:
                out[role].append(pid)
    return out


def _signal(up: subprocess.Popen[bytes], role: str, sig: signal.Signals) -> Callable[[], None]:
    def act() -> None:
        for pid in _children(up)[role]:
            os.kill(pid, sig)
        print(f"  {sig.name} {role}", flush=True)

    return act


async def soak(up: subprocess.Popen[bytes], base: str, quick: bool) -> dict[str, Any]:
    k = 0.5 if quick else 1.0
    s = Soak(base, seed=21)
    stop = asyncio.Event()
    load = asyncio.create_task(s.clients(stop, 6, 40.0))
    phases: list[tuple[str, Callable[[], None] | None, float]] = [
        ("warm", None, 10 * k),
        ("redis_frozen", _signal(up, "redis", signal.SIGSTOP), 4),
        ("redis_thawed", _signal(up, "redis", signal.SIGCONT), 8 * k),
        ("redis_killed", _signal(up, "redis", signal.SIGKILL), 15 * k),
        ("triton_killed", _signal(up, "triton", signal.SIGKILL), -1),
        ("processor", _signal(up, "processor", signal.SIGKILL), 10 * k),
        ("worker_killed", _signal(up, "worker", signal.SIGKILL), 10 * k),
        ("after", None, 20 * k),
    ]
    back: dict[str, float | None] = {}
    for name, act, seconds in phases:
        s.phase = name
        print(f"{time.strftime('%X')} {name}", flush=True)
        if act is not None:
            act()
        if seconds < 0:  # until a text never asked before is embedded again
            await asyncio.sleep(1)
            back[name] = await s.answers(120)
            print(f"  answering again after {back[name]} s", flush=True)
        else:
            await asyncio.sleep(seconds)
    stop.set()
    await load
    jobs = await s.job_outcomes(120)
    if jobs.get("failed") or jobs.get("unfinished") or jobs.get("cancelled"):
        s.broken.append({"phase": "jobs", "kind": "async_job", "status": 0, "why": str(jobs)})
    final = await s.answers(30)
    if final is None:
        s.broken.append({"phase": "end", "kind": "embeddings", "status": 0, "why": "no answer"})

    def pct(xs: list[float], q: float) -> float | None:
        xs = sorted(xs)
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None

    return {
        "counts": {ph: dict(sorted(c.items())) for ph, c in s.counts.items()},
        "broken": s.broken,
        "processor_down_500s": s.processor_500,
        "jobs": jobs,
        "triton_back_after_s": back.get("triton_killed"),
        "embeddings_ms": {
            ph: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "n": len(v)}
            for ph, v in s.latency.items()
        },
    }


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Per phase: embeddings' p50 and the 5xx answers (each a group of `floodwall bench`'s
    summary plot); and the contract's figures."""
    fives = {
        ph: sum(n for k, n in c.items() if k.rsplit(":", 1)[1].startswith("5"))
        for ph, c in res["counts"].items()
    }
    return {
        "embeddings_p50_ms": {ph: v["p50"] for ph, v in res["embeddings_ms"].items()},
        "answers_5xx": fives,
        "contract": {
            "broken": len(res["broken"]),
            "jobs_succeeded": res["jobs"].get("succeeded", 0),
            "triton_back_after_s": res["triton_back_after_s"],
        },
    }


def markdown(res: dict[str, Any]) -> str:
    kinds_seen = sorted({k.split(":")[0] for c in res["counts"].values() for k in c})
    lines = [
        f"Chaos soak ({res['machine']['cpus']} CPUs): `floodwall up`, 6 clients at ~40 "
        "requests/s of mixed good and bad requests while its parts fail; statuses per phase",
        "",
        "| phase | " + " | ".join(kinds_seen) + " |",
        "|---|" + "---|" * len(kinds_seen),
    ]
    for phase, c in res["counts"].items():
        cells = []
        for kind in kinds_seen:
            got = {k.split(":", 1)[1]: n for k, n in c.items() if k.split(":")[0] == kind}
            cells.append(" ".join(f"{st} x{n}" for st, n in sorted(got.items())) or "")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"- contract broken: **{len(res['broken'])}** times"
        + "".join(f"\n  - {b}" for b in res["broken"][:20]),
        f"- processor down: {res['processor_down_500s']} answers were its documented 500 "
        "`gateway_unavailable` (one processor; `failure_mode_allow: false`)",
        f"- async jobs accepted during the soak: {res['jobs']}",
        f"- Triton killed: new texts embedded again after {res['triton_back_after_s']} s",
        f"- embeddings p50/p99 (ms): {res['embeddings_ms']}",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter phases")
    ap.add_argument("--out", default=str(RESULTS / "chaos"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fw-chaos-") as d:
        (dead_echo,) = free_ports(1)  # stack_config's echo route; nothing listens there
        cfg = stack_config(Path(d) / "run", dead_echo)
        path = Path(d) / "floodwall.yaml"
        path.write_text(yaml.safe_dump(cfg))
        base = f"http://127.0.0.1:{cfg['listener']['port']}"
        log = (Path(d) / "up.log").open("wb")
        up = subprocess.Popen([sys.executable, "-m", "proxy.cli", "up", "-c", str(path)],
                              cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while b"ready;" not in (Path(d) / "up.log").read_bytes():
                if up.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((Path(d) / "up.log").read_text()[-3000:])
                time.sleep(0.5)
            res = asyncio.run(soak(up, base, args.quick))
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
            log.close()
    res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    res["params"] = {"quick": args.quick}
    res["summary"] = summarize(res)
    write_results(Path(args.out), res, markdown(res))
    return 1 if res["broken"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
