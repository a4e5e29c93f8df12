"""Overload: the gateway in front of the real embedder at 0.5x, 1x, 2x and 4x its measured
capacity, with a priority mix (20% critical, 50% standard, 30% sheddable), policies on (the
shipped chain: auth, openai, rate_limit, admission, degrade, breaker, plus the processor's
lag guard) and off (auth and the OpenAI translation only), in the same run.

Triton gets a core of its own by default, as the accelerator it stands in for would be
(``bench/placement.py``); ``--shared`` runs everything on every core.

Capacity is what the embedder serves through the gateway with the policies off (wrk, 32
connections, one sentence per request). The same closed loop at fewer connections traces the
backend's latency/throughput frontier: the most any admission policy could serve within a
latency bound, since it can only choose how many requests are in flight (see `frontier`).
Each load point is an open loop (latency from the scheduled send time). Reported per class:
success rate, p50/p99 of the successful calls; per point: goodput (successful calls/s), shed
(503 overloaded) and degraded counts, other errors.

    .venv/bin/python -m bench.overload              # ~6 minutes
    .venv/bin/python -m bench.overload --quick      # ~3 minutes
    .venv/bin/python -m bench.overload --shared     # Triton on the gateway's cores too

Writes bench/results/overload.{json,md,png} (the plot needs the `bench` extra: matplotlib).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import placement
from bench.loadgen import HttpRequest, Steal, closed_loop, cpu_by_component, open_loop_mix
from proxy.config import REPO_ROOT
from tests.helpers import DEMO_KEY, echo_server, stack_config, start_stack

RESULTS = REPO_ROOT / "bench" / "results"
PREMIUM_KEY = "fw-bench-premium"
MIX = (("critical", 0.2), ("standard", 0.5), ("sheddable", 0.3))
KEYS = {"critical": PREMIUM_KEY, "standard": DEMO_KEY, "sheddable": "fw-demo-batch"}
# The processor's lag guard (processor.shed_lag_ms) is part of "policies on".
SHED_LAG_MS = 100
BODY = json.dumps({"model": "embedder", "input": "How do I keep a model server standing?"})
# Requests in flight for the frontier (closed loop, policies off); 32 is the capacity point.
FRONTIER_CONNECTIONS = (1, 2, 4, 6, 8, 12, 16)


def _request(key: str) -> HttpRequest:
    return HttpRequest(
        "POST", "/v1/embeddings",
        # no-store: this benchmark measures admission in front of the model, not the cache.
        {"content-type": "application/json", "authorization": f"Bearer {key}",
         "cache-control": "no-store"},
        BODY.encode(),
    )  # fmt: skip


def _config(
    run: Path,
    echo_port: int,
    policies: bool,
    admission: dict[str, Any] | None = None,
    degrade: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cfg = stack_config(run, echo_port)
    for kind, over in (("admission", admission), ("degrade", degrade)):
        if over:
            f = next(f for f in cfg["filters"] if f["type"] == kind)
            f["params"] = _merged(f["params"], over)
    cfg["listener"]["access_log"] = False
    auth = next(f for f in cfg["filters"] if f["type"] == "auth")
    auth["params"]["keys"].append({
        "id": "premium", "sha256": hashlib.sha256(PREMIUM_KEY.encode()).hexdigest(),
        "tenant": "bench-premium", "tier": "premium",
    })  # fmt: skip
    if not policies:
        cfg["filters"] = [f for f in cfg["filters"] if f["type"] in ("auth", "openai")]
    else:
        cfg["processor"]["shed_lag_ms"] = SHED_LAG_MS
    for r in cfg["routes"]:
        r["timeout_ms"] = min(r.get("timeout_ms", 30000), 10000)
    return cfg


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``, into nested sections (``{"saturation": {"queue_ms_above": 5}}``
    keeps the section's metrics URL)."""
    out = dict(base)
    for k, v in over.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = _merged(out[k], v) if both else v
    return out


# The processor's refusals, by who refused and why: admission's decisions per class, the
# requests it shed at their headers, and the lag guard's (before any filter, so classless).
_SERIES = re.compile(r"^(floodwall_\w+_total)(?:\{([^}]*)\})? ([0-9.e+]+)$", re.M)


def _refusals(admins: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for admin in admins:
        for name, labels, value in _SERIES.findall(httpx.get(f"{admin}/metrics", timeout=5).text):
            lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if name == "floodwall_admission_decisions_total" and lab["decision"].startswith("shed"):
                key = f"{lab['class']}:{lab['decision']}"
            elif name == "floodwall_admission_shed_at_headers_total":
                key = f"{lab['class']}:shed_at_headers"
            elif name == "floodwall_guard_refused_total":
                key = "any:lag_guard"
            else:
                continue
            out[key] = out.get(key, 0.0) + float(value)
    return out


def admin_urls(stack: Any) -> list[str]:
    """The admin base URL of each processor process of a started stack."""
    pc = stack.cfg.processor
    return [f"http://{pc.admin_address}:{pc.admin_port + i}" for i in range(pc.processes)]


def _point(
    url_host: str, port: int, rate: float, seconds: float, admins: list[str]
) -> dict[str, Any]:
    mix = [(cls, _request(KEYS[cls]), share) for cls, share in MIX]
    refused0 = _refusals(admins)
    cpu0, t0, steal = cpu_by_component(), time.perf_counter(), Steal()
    per = open_loop_mix(url_host, port, mix, rate=rate, seconds=seconds,
                        mark=b"x-floodwall-degraded")  # fmt: skip
    cpu1, took = cpu_by_component(), time.perf_counter() - t0
    refused1 = _refusals(admins)
    total_ok = sum(r["ok"] for r in per.values())
    # Until the last answer: a backlog drained after the sending stopped is not extra goodput.
    elapsed = max(r["elapsed_s"] for r in per.values())
    statuses: dict[str, int] = {}
    for r in per.values():
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "offered_rps": rate,
        "goodput_rps": total_ok / elapsed,
        "elapsed_s": elapsed,
        "steal_share": steal.share(),
        "statuses": statuses,
        "failures": sum(r["failures"] for r in per.values()),
        "degraded": sum(r["marked"] for r in per.values()),
        # Cores each component kept busy during the point: where the 2 CPUs went.
        "cores": {k: round((cpu1[k] - cpu0.get(k, 0.0)) / took, 3) for k in sorted(cpu1)},
        # "class:reason" -> refusals during the point (the lag guard's carry no class).
        "refusals": {
            k: int(v - refused0.get(k, 0.0))
            for k, v in sorted(refused1.items())
            if v > refused0.get(k, 0.0)
        },
        "classes": {
            cls: {
                "requests": r["requests"],
                "success": r["ok"] / max(1, r["requests"]),
                "ok_p50_ms": r["ok_p50_ms"],
                "ok_p99_ms": r["ok_p99_ms"],
                "statuses": r["statuses"],
            }
            for cls, r in per.items()
        },
    }


def _measure_mode(stack: Any, mode: str, seconds: float, results: dict[str, Any]) -> None:
    """The capacity (policies off, first) and the four load points of one mode; stops the
    stack."""
    try:
        host, port = stack.cfg.listener.address, stack.cfg.listener.port
        url = f"http://{host}:{port}"
        admins = admin_urls(stack)
        closed_loop(url, _request(DEMO_KEY), connections=16, seconds=3)  # warm up
        if mode == "off":
            cap = closed_loop(url, _request(DEMO_KEY), connections=32, seconds=8)
            capacity = cap["rps"]
            results["capacity_rps"] = capacity
            print(f"== capacity (policies off, wrk c=32): {capacity:.0f} req/s", flush=True)
            unloaded = _point(host, port, 0.1 * capacity, seconds, admins)
            results["unloaded_p99_ms"] = unloaded["classes"]["standard"]["ok_p99_ms"]
            results["frontier"] = [
                closed_loop(url, _request(DEMO_KEY), connections=c, seconds=seconds * 0.6)
                for c in FRONTIER_CONNECTIONS
            ] + [cap]
            for f in results["frontier"]:
                print(f"   frontier c={f['connections']:2}: {f['rps']:5.0f} req/s, "
                      f"p99 {f['p99_ms']:.0f} ms", flush=True)  # fmt: skip
        points = []
        for mult in (0.5, 1.0, 2.0, 4.0):
            time.sleep(2)  # let the previous point's backlog drain
            p = _point(host, port, mult * results["capacity_rps"], seconds, admins)
            p["multiple"] = mult
            c = p["classes"]
            print(f"   {mode:3} {mult:3.1f}x {p['offered_rps']:5.0f}/s goodput "
                  f"{p['goodput_rps']:5.0f}/s  success crit/std/shed "
                  f"{c['critical']['success']:.1%}/{c['standard']['success']:.1%}/"
                  f"{c['sheddable']['success']:.1%}  p99 ok crit "
                  f"{c['critical']['ok_p99_ms']:.0f} ms  statuses {p['statuses']}  "
                  f"degraded {p['degraded']}  refusals {p['refusals']}",
                  flush=True)  # fmt: skip
            points.append(p)
        results["runs"][mode] = points
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--shared",
        action="store_true",
        help="Triton on every core, with the gateway (default: cores of its own)",
    )
    ap.add_argument(
        "--admission", type=json.loads, default=None, metavar="JSON",
        help="admission params over the shipped ones, e.g. '{\"min_limit\": 4}'",
    )  # fmt: skip
    ap.add_argument(
        "--degrade", type=json.loads, default=None, metavar="JSON",
        help="degrade params over the shipped ones (nested sections merged), e.g. "
        "'{\"saturation\": {\"queue_ms_above\": 5}}'",
    )  # fmt: skip
    ap.add_argument("--out", help="default: bench/results/overload (--shared: overload_shared)")
    args = ap.parse_args()
    args.out = args.out or str(RESULTS / ("overload_shared" if args.shared else "overload"))
    seconds = 6.0 if args.quick else 10.0
    from proxy import models

    models.build()
    split = placement.Split.choose(args.shared)
    steal = Steal()
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "placement": split.describe() if split is not None else "shared",
        "params": {
            "seconds_per_point": seconds,
            "mix": dict(MIX),
            "request": BODY,
            "admission_overrides": args.admission or {},
            "degrade_overrides": args.degrade or {},
        },
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="fw-overload-", dir="/tmp") as d, echo_server() as echo:
        for mode in ("off", "on"):
            policies = mode == "on"
            cfg = _config(Path(d) / mode / "run", echo, policies, args.admission, args.degrade)
            start = functools.partial(start_stack, cfg, Path(d) / f"{mode}.yaml")
            with placement.apart(split, start) as stack:
                _measure_mode(stack, mode, seconds, results)
    results["machine"]["steal_share"] = steal.share()
    results["summary"] = _summary(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    md = _markdown(results)
    out.with_suffix(".md").write_text(md)
    _plot(results, out.with_suffix(".png"))
    print(md)


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    at4 = next(p for p in results["runs"]["on"] if p["multiple"] == 4.0)
    off4 = next(p for p in results["runs"]["off"] if p["multiple"] == 4.0)
    # The capacity measured before the points (wrk, c=32) sets the offered rates; a point
    # with the policies off may still serve more (a deep queue gives Triton bigger batches),
    # and then that goodput is the capacity the targets are judged against: what the model
    # asked for serves. Points with the policies on are left out, as degradation serves
    # part of their load with the lighter model, past that capacity.
    cap = max(results["capacity_rps"], max(p["goodput_rps"] for p in results["runs"]["off"]))
    p99 = max(c["ok_p99_ms"] for c in at4["classes"].values())
    other_5xx = sum(v for k, v in at4["statuses"].items() if k.startswith("5") and k != "503")
    return {
        "capacity_judged_rps": cap,
        # The critical class's offered rate at 4x (a multiple of the capacity measured first).
        "frontier": frontier(
            results.get("frontier", []),
            cap,
            results["unloaded_p99_ms"],
            4 * dict(MIX)["critical"] * results["capacity_rps"] / cap,
        ),
        "on_4x": {
            "goodput_share_of_capacity": at4["goodput_rps"] / cap,
            "critical_success": at4["classes"]["critical"]["success"],
            "admitted_p99_ms": p99,
            "admitted_p99_vs_unloaded": p99 / results["unloaded_p99_ms"],
            "other_5xx": other_5xx,
        },
        "off_4x": {
            "goodput_share_of_capacity": off4["goodput_rps"] / cap,
            "critical_success": off4["classes"]["critical"]["success"],
            "p99_ms": max(c["ok_p99_ms"] for c in off4["classes"].values()),
        },
        "targets_on_4x": {
            "goodput_ge_90pct": at4["goodput_rps"] / cap >= 0.9,
            "critical_success_ge_99_9pct": at4["classes"]["critical"]["success"] >= 0.999,
            "admitted_p99_le_3x_unloaded": p99 <= 3 * results["unloaded_p99_ms"],
            "no_other_5xx": other_5xx == 0,
        },
    }


def frontier(
    points: list[dict[str, Any]], capacity: float, unloaded_p99_ms: float, critical_load: float
) -> dict[str, Any]:
    """What the closed-loop points (policies off, ``connections`` in flight) say the targets
    allow: an admission policy only chooses how many requests are in flight, so none serves
    more within a latency bound than the best point under it (closed loop: an open loop at
    the same rate queues more, so this bound is optimistic). ``critical_load``: the critical
    class's offered load at 4x, as a share of ``capacity``, all of which must be served; None
    where no point reaches a share."""
    bound = 3 * unloaded_p99_ms
    within = [p for p in points if p["p99_ms"] <= bound]
    best = max(within, key=lambda p: p["rps"], default=None)

    def p99_at(share: float) -> dict[str, Any] | None:
        reach = [p for p in points if p["rps"] >= share * capacity]
        first = min(reach, key=lambda p: p["connections"], default=None)
        if first is None:
            return None
        return {"connections": first["connections"], "p99_ms": first["p99_ms"],
                "p99_vs_unloaded": first["p99_ms"] / unloaded_p99_ms}  # fmt: skip

    return {
        "p99_bound_ms": bound,
        "best_within_bound": None
        if best is None
        else {
            "connections": best["connections"],
            "rps": best["rps"],
            "share_of_capacity": best["rps"] / capacity,
        },
        "at_90pct": p99_at(0.9),
        "critical_at_4x": {"share_of_capacity": critical_load, "at": p99_at(critical_load)},
    }


def _overrides(results: dict[str, Any]) -> str:
    return "".join(
        f"; {kind} params over the shipped ones: {json.dumps(o)}"
        for kind in ("admission", "degrade")
        if (o := results["params"].get(f"{kind}_overrides"))
    )


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Overload ({results['machine']['cpus']} CPUs, "
        f"{placement.words(results.get('placement'))}; embedder through the gateway"
        f"{_overrides(results)}; capacity "
        f"{results['capacity_rps']:.0f} req/s; unloaded p99 {results['unloaded_p99_ms']:.0f} ms;"
        f" {results['params']['seconds_per_point']:.0f} s per point; mix 20/50/30; CPU taken by"
        f" the VM's host (steal) during the run: "
        f"{results['machine'].get('steal_share', float('nan')):.0%})",
        "",
        "| policies | offered | goodput | critical ok | standard ok | sheddable ok | p99 ok "
        "critical | p99 ok standard | shed (503) | degraded | other errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in ("off", "on"):
        for p in results["runs"][mode]:
            c = p["classes"]
            other = sum(v for k, v in p["statuses"].items() if k not in ("200", "503"))
            lines.append(
                f"| {mode} | {p['multiple']:.1f}x ({p['offered_rps']:.0f}/s) | "
                f"{p['goodput_rps']:.0f}/s | {c['critical']['success']:.1%} | "
                f"{c['standard']['success']:.1%} | {c['sheddable']['success']:.1%} | "
                f"{c['critical']['ok_p99_ms']:.0f} ms | {c['standard']['ok_p99_ms']:.0f} ms | "
                f"{p['statuses'].get('503', 0)} | {p['degraded']} | "
                f"{other + p['failures']} |"
            )
    s = results["summary"]
    on, off, t = s["on_4x"], s["off_4x"], s["targets_on_4x"]
    lines += [
        "",
        f"- capacity for the targets: {s['capacity_judged_rps']:.0f} req/s (the most served at "
        f"any point of this run with the policies off, or the capacity measured first if "
        f"higher; degraded answers let the policies serve more)",
        f"- at 4x with policies on: goodput {on['goodput_share_of_capacity']:.0%} of capacity "
        f"(target >= 90%: {_met(t['goodput_ge_90pct'])}), critical success "
        f"{on['critical_success']:.2%} (>= 99.9%: {_met(t['critical_success_ge_99_9pct'])}), "
        f"admitted p99 {on['admitted_p99_ms']:.0f} ms = {on['admitted_p99_vs_unloaded']:.1f}x "
        f"unloaded (<= 3x: {_met(t['admitted_p99_le_3x_unloaded'])}), other 5xx "
        f"{on['other_5xx']} (none: {_met(t['no_other_5xx'])})",
        f"- at 4x with policies off: goodput {off['goodput_share_of_capacity']:.0%} of capacity,"
        f" critical success {off['critical_success']:.1%}, p99 {off['p99_ms']:.0f} ms",
    ]
    lines += _frontier_lines(results)
    if all("cores" in p for mode in ("off", "on") for p in results["runs"][mode]):
        names = ["triton", "processor", "envoy", "loadgen", "redis"]
        lines += [
            "",
            "Where the CPUs went (cores busy during each point):",
            "",
            "| policies | offered | " + " | ".join(names) + " | processor CPU per request "
            "| steal |",
            "|---|---:|" + "---:|" * len(names) + "---:|---:|",
        ]
        for mode in ("off", "on"):
            for p in results["runs"][mode]:
                c = p["cores"]
                per_req = c.get("processor", 0.0) / p["offered_rps"] * 1e6
                lines.append(
                    f"| {mode} | {p['multiple']:.1f}x | "
                    + " | ".join(f"{c.get(n, 0.0):.2f}" for n in names)
                    + f" | {per_req:.0f} µs | {p.get('steal_share', float('nan')):.0%} |"
                )
    on = results["runs"]["on"]
    if all("refusals" in p for p in on):
        lines += ["", "Who refused, policies on (processor metrics over each point): admission "
                  "by class and reason (`shed_at_headers`: before the body was read; "
                  "`shed_timeout`: the predicted wait was longer than the request could "
                  "wait; `shed_full`, `shed_preempted`), and the lag guard (before any "
                  "filter, so without a class):", "",
                  "| offered | refusals |", "|---:|---|"]  # fmt: skip
        for p in on:
            shown = ", ".join(f"{k} {v}" for k, v in p["refusals"].items()) or "none"
            lines.append(f"| {p['multiple']:.1f}x | {shown} |")
    return "\n".join(lines) + "\n"


def _frontier_lines(results: dict[str, Any]) -> list[str]:
    if not results.get("frontier"):
        return []
    f = results["summary"]["frontier"]
    lines = [
        "",
        "What any admission could do here: the backend's frontier, a closed loop through the "
        "gateway with the policies off at each number of requests in flight (an admission "
        "policy only chooses that number):",
        "",
        "| in flight | served | share of capacity | p50 | p99 | p99 / unloaded |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    cap, unloaded = results["summary"]["capacity_judged_rps"], results["unloaded_p99_ms"]
    for p in results["frontier"]:
        lines.append(
            f"| {p['connections']} | {p['rps']:.0f}/s | {p['rps'] / cap:.0%} | "
            f"{p['p50_ms']:.0f} ms | {p['p99_ms']:.0f} ms | {p['p99_ms'] / unloaded:.1f}x |"
        )
    best, at90 = f["best_within_bound"], f["at_90pct"]
    crit = f["critical_at_4x"]
    lines += [
        "",
        "- most served with p99 <= 3x unloaded ("
        f"{f['p99_bound_ms']:.0f} ms): "
        + (
            f"{best['rps']:.0f}/s = {best['share_of_capacity']:.0%} of capacity "
            f"({best['connections']} in flight)"
            if best
            else "no point"
        ),
        "- p99 where 90% of capacity is first served: "
        + (
            f"{at90['p99_ms']:.0f} ms = {at90['p99_vs_unloaded']:.1f}x unloaded "
            f"({at90['connections']} in flight)"
            if at90
            else "no point reaches it"
        ),
        f"- the critical class alone at 4x offers {crit['share_of_capacity']:.0%} of capacity, "
        "all of which must be served; p99 where that much is first served: "
        + (
            f"{crit['at']['p99_ms']:.0f} ms = {crit['at']['p99_vs_unloaded']:.1f}x unloaded"
            if crit["at"]
            else "no point reaches it"
        ),
    ]
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install -e '.[bench]' for matplotlib")
        return
    front = results.get("frontier") or []
    fig, axes = plt.subplots(1, 3 if front else 2, figsize=(16 if front else 11, 4))
    a, b = axes[0], axes[1]
    for mode, style in (("off", "--"), ("on", "-")):
        pts = results["runs"][mode]
        x = [p["multiple"] for p in pts]
        a.plot(x, [p["goodput_rps"] for p in pts], style + "o", label=f"policies {mode}")
        for cls in ("critical", "standard"):
            b.plot(x, [p["classes"][cls]["ok_p99_ms"] for p in pts], style + "o",
                   label=f"{cls}, policies {mode}")  # fmt: skip
    a.axhline(results["capacity_rps"], color="grey", lw=0.8)
    a.set(xlabel="offered load (x capacity)", ylabel="goodput (req/s)", title="Goodput")
    b.set(xlabel="offered load (x capacity)", ylabel="p99 of successful calls (ms)",
          yscale="log", title="Latency")  # fmt: skip
    a.legend()
    b.legend(fontsize=7)
    if front:
        c = axes[2]
        c.plot([p["rps"] for p in front], [p["p99_ms"] for p in front], "k-o")
        for p in front:
            c.annotate(str(p["connections"]), (p["rps"], p["p99_ms"]), fontsize=7,
                       textcoords="offset points", xytext=(4, -8))  # fmt: skip
        c.axhline(3 * results["unloaded_p99_ms"], color="red", lw=0.8, label="3x unloaded p99")
        c.axvline(0.9 * results["summary"]["capacity_judged_rps"], color="green", lw=0.8,
                  label="90% of capacity")  # fmt: skip
        c.set(xlabel="served (req/s)", ylabel="p99 (ms)", yscale="log",
              title="Frontier: closed loop, policies off (labels: in flight)")  # fmt: skip
        c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
