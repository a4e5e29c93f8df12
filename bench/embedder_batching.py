"""The embedder on Triton, side by side in one server: dynamic batching on vs off, fp32 vs int8.

One Triton serves three copies of the repository's models: ``embedder`` (as shipped, dynamic
batching on), ``embedder_nobatch`` (the same config with the ``dynamic_batching`` block removed,
so every request runs alone) and ``embedder_int8`` (as shipped, if built). wrk drives each at
fixed concurrency with single-sentence KServe v2 requests, straight to Triton's HTTP port.

    .venv/bin/python -m bench.embedder_batching            # ~4 minutes
    .venv/bin/python -m bench.embedder_batching --quick    # ~1 minute

Writes bench/results/embedder_batching.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import HttpRequest, closed_loop
from proxy import models
from proxy.config import REPO_ROOT
from proxy.runtime import http_ok
from proxy.triton import remove_shm_regions, triton_command
from tests.helpers import free_ports

RESULTS = REPO_ROOT / "bench" / "results"
SENTENCE = "A flood of requests arrives at once and the gateway must decide what to serve."


def strip_block(config: str, block: str) -> str:
    """Removes ``block { ... }`` (balanced braces) from a config.pbtxt."""
    start = config.find(block)
    if start < 0:
        return config
    i = config.index("{", start)
    depth = 0
    for j in range(i, len(config)):
        depth += {"{": 1, "}": -1}.get(config[j], 0)
        if depth == 0:
            return config[:start] + config[j + 1 :]
    raise ValueError(f"unbalanced {block}")


def make_repo(root: Path) -> list[str]:
    src = REPO_ROOT / "triton_models"
    names = ["embedder", "embedder_nobatch"]
    shutil.copytree(src / "embedder", root / "embedder", symlinks=True)
    nob = root / "embedder_nobatch"
    shutil.copytree(src / "embedder", nob, symlinks=True)
    cfg = (nob / "config.pbtxt").read_text()
    cfg = strip_block(cfg, "dynamic_batching").replace(
        'name: "embedder"',
        'name: "embedder_nobatch"\n'
        'parameters { key: "onnx_dir" value: { string_value: "embedder" } }',
    )
    (nob / "config.pbtxt").write_text(cfg)
    if (src / "embedder_int8").is_dir() and (models.cache_dir() / "models/embedder_int8").is_dir():
        shutil.copytree(src / "embedder_int8", root / "embedder_int8", symlinks=True)
        names.append("embedder_int8")
    return names


def request_for(model: str) -> HttpRequest:
    body = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [SENTENCE]}]}
    return HttpRequest(
        "POST", f"/v2/models/{model}/infer", {"content-type": "application/json"},
        json.dumps(body).encode(),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "embedder_batching"))
    args = ap.parse_args()
    seconds = 4 if args.quick else args.seconds
    concurrency = [1, 8, 32, 64]

    models.build()
    http, grpc, metrics = free_ports(3)
    prefix = f"fwbench_{os.getpid()}_"
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "params": {"seconds": seconds, "sentence": SENTENCE, "concurrency": concurrency},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as d:
        repo = Path(d) / "models"
        names = make_repo(repo)
        argv, env = triton_command(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                                   shm_prefix=prefix)  # fmt: skip
        log = Path(d) / "triton.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not http_ok(f"http://127.0.0.1:{http}/v2/health/ready"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Triton did not start: " + log.read_text()[-2000:])
                time.sleep(0.2)
            url = f"http://127.0.0.1:{http}"
            # Rounds interleave the models so drift on this noisy machine hits all alike.
            for c in concurrency:
                for name in names:
                    closed_loop(url, request_for(name), connections=c, seconds=1)  # warm
                    r = closed_loop(url, request_for(name), connections=c, seconds=seconds)
                    print(
                        f"{name:<17} c={c:<3} {r['rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms"
                        f"  p99 {r['p99_ms']:7.1f} ms  non-2xx {r['non_2xx']}",
                        flush=True,
                    )
                    results["models"].setdefault(name, []).append(r)
            stats = json.loads(
                subprocess.run(["curl", "-s", f"{url}/v2/models/stats"], capture_output=True,
                               text=True, check=True).stdout
            )  # fmt: skip
            results["triton_stats"] = {
                s["name"]: {"inference_count": s["inference_count"],
                            "execution_count": s["execution_count"]}
                for s in stats["model_stats"]
            }  # fmt: skip
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            remove_shm_regions(prefix)

    results["summary"] = summary(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md)


def _at(results: dict[str, Any], name: str, c: int) -> dict[str, Any]:
    return next(r for r in results["models"][name] if r["connections"] == c)


def summary(results: dict[str, Any]) -> dict[str, Any]:
    on, off = _at(results, "embedder", 32), _at(results, "embedder_nobatch", 32)
    s: dict[str, Any] = {
        "batching_rps_ratio_c32": round(on["rps"] / off["rps"], 2),
        "batching_p99_ratio_c32": round(on["p99_ms"] / off["p99_ms"], 2),
    }
    s["target_met"] = s["batching_rps_ratio_c32"] >= 2 and s["batching_p99_ratio_c32"] <= 1.5
    if "embedder_int8" in results["models"]:
        s["int8_vs_fp32_rps_ratio"] = {
            str(c): round(
                _at(results, "embedder_int8", c)["rps"] / _at(results, "embedder", c)["rps"], 2
            )
            for c in results["params"]["concurrency"]
        }
    return s


def markdown(results: dict[str, Any]) -> str:
    cs = results["params"]["concurrency"]
    head = " | ".join(f"c={c} req/s | p50 | p99" for c in cs)
    lines = [
        f"Embedder on Triton ({results['machine']['cpus']} CPUs, {results['params']['seconds']} s "
        "per point, one sentence per request, wrk straight to Triton HTTP)",
        "",
        f"| model | {head} |",
        "|---|" + "---:|" * (3 * len(cs)),
    ]
    for name, rows in results["models"].items():
        cells = " | ".join(
            f"{r['rps']:.0f} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms" for r in rows
        )
        lines.append(f"| {name} | {cells} |")
    s = results["summary"]
    lines += [
        "",
        f"- dynamic batching at c=32: {s['batching_rps_ratio_c32']:.2f}x the throughput of no "
        f"batching, p99 {s['batching_p99_ratio_c32']:.2f}x (target ≥ 2x with p99 ≤ 1.5x: "
        f"{'met' if s['target_met'] else 'NOT met'})",
    ]
    if "int8_vs_fp32_rps_ratio" in s:
        lines.append(
            "- int8 vs fp32 throughput: "
            + ", ".join(f"{v:.2f}x at c={c}" for c, v in s["int8_vs_fp32_rps_ratio"].items())
        )
    ts = results.get("triton_stats", {})
    if ts:
        lines.append(
            "- Triton executions / inferences: "
            + ", ".join(f"{k} {v['execution_count']}/{v['inference_count']}" for k, v in ts.items())
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
