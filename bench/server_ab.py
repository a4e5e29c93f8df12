"""The processor's two gRPC servers under overload: the shipped stack (policies on, as in
bench/overload.py) at a fixed offered rate, once with ``processor.server: h2`` (the default)
and once with ``grpcio``, alternating over rounds so that the machine's mood hits both alike.

    .venv/bin/python -m bench.server_ab                 # 4 x 266 req/s, 2 rounds: ~3 minutes
    .venv/bin/python -m bench.server_ab --rate 800 --rounds 3

Writes bench/results/server_ab.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import overload as ov
from bench.loadgen import closed_loop
from tests.helpers import DEMO_KEY, echo_server, start_stack

SERVERS = ("h2", "grpcio")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=4 * 266, help="offered req/s")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--quick", action="store_true", help="5 s points")
    ap.add_argument("--out", default=str(ov.RESULTS / "server_ab"))
    args = ap.parse_args()
    if args.quick:
        args.seconds = 5.0
    points: dict[str, list[dict[str, Any]]] = {s: [] for s in SERVERS}
    with tempfile.TemporaryDirectory(prefix="fw-ab-", dir="/tmp") as d, echo_server() as echo:
        for rnd in range(args.rounds):
            for server in SERVERS if rnd % 2 == 0 else SERVERS[::-1]:
                cfg = ov._config(Path(d) / f"{server}{rnd}" / "run", echo, True)
                cfg["processor"]["server"] = server
                stack = start_stack(cfg, Path(d) / f"{server}{rnd}.yaml")
                try:
                    host, port = stack.cfg.listener.address, stack.cfg.listener.port
                    closed_loop(f"http://{host}:{port}", ov._request(DEMO_KEY), connections=16,
                                seconds=3)  # fmt: skip
                    time.sleep(1)
                    p = ov._point(host, port, args.rate, args.seconds, ov.admin_urls(stack))
                finally:
                    stack.stop()
                c = p["classes"]
                print(f"   {server:6} round {rnd + 1}: goodput {p['goodput_rps']:.0f}/s, critical "
                      f"{c['critical']['success']:.1%}, critical p99 "
                      f"{c['critical']['ok_p99_ms']:.0f} ms, cores {p['cores']}",
                      flush=True)  # fmt: skip
                points[server].append(p)

    def med(server: str, pick: Any) -> float:
        return float(statistics.median(pick(p) for p in points[server]))

    summary = {
        s: {
            "goodput_rps": med(s, lambda p: p["goodput_rps"]),
            "critical_success": med(s, lambda p: p["classes"]["critical"]["success"]),
            "critical_ok_p99_ms": med(s, lambda p: p["classes"]["critical"]["ok_p99_ms"]),
            "processor_cores": med(s, lambda p: p["cores"].get("processor", 0.0)),
            "triton_cores": med(s, lambda p: p["cores"].get("triton", 0.0)),
        }
        for s in SERVERS
    }
    results = {"params": vars(args), "points": points, "summary": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = [
        f"Processor servers under overload ({args.rate:.0f} req/s offered, policies on, "
        f"medians of {args.rounds} alternating rounds of {args.seconds:.0f} s)",
        "",
        "| server | goodput | critical ok | critical p99 | processor cores | Triton cores |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {s} | {v['goodput_rps']:.0f}/s | {v['critical_success']:.1%} | "
            f"{v['critical_ok_p99_ms']:.0f} ms | {v['processor_cores']:.2f} | "
            f"{v['triton_cores']:.2f} |"
            for s, v in summary.items()
        ),
    ]
    md = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
