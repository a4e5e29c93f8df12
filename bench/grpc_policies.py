"""What per-model policies cost on KServe gRPC: two stacks side by side, each its own
processor, Envoy, Redis and Triton, with the same three filters on the gRPC route (a rate limit
that never refuses, admission, a breaker), per model on one (the processor reads each unary
call's message for its model: Envoy buffers it and sends it to Python, proxy/kserve_grpc.py)
and per route on the other (headers only, the message streams to Triton unread). Unary calls
one at a time, the two stacks alternating round by round; the calls are
bench/grpc_passthrough.py's (one sentence on ``embedder_int8``; a 512 KiB message Triton
refuses after parsing it; ModelMetadata).

    .venv/bin/python -m bench.grpc_policies      # 6 rounds of 200 calls a kind: ~3 minutes
    .venv/bin/python -m bench.grpc_policies --quick

Writes bench/results/grpc_policies.json and .md.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.grpc_passthrough import alternate, parse_args, write_report
from proxy.runtime import Stack
from tests.helpers import echo_server, stack_config, start_stack

SETUPS = ("per_model", "per_route")
MODELS = ["embedder_int8", "embedder"]


def _filters(per_model: bool) -> list[dict[str, Any]]:
    # Far above the bench's rate: every call is checked in Redis, none refused.
    limit: dict[str, Any] = {"name": "grpc_calls", "key": ["key_id"], "rate": 100_000}
    if per_model:
        limit["key"] = ["key_id", "model"]
        limit["when"] = {"models": MODELS}
    models = {"models": MODELS} if per_model else {}
    return [
        {"name": "grpc_limits", "type": "rate_limit", "routes": ["kserve_grpc"],
         "params": {"limits": [limit]}},
        {"name": "grpc_admission", "type": "admission", "routes": ["kserve_grpc"],
         "params": models},
        {"name": "grpc_breaker", "type": "breaker", "routes": ["kserve_grpc"], "params": models},
    ]  # fmt: skip


def main() -> None:
    args = parse_args(__doc__, "grpc_policies")
    stacks: dict[str, Stack] = {}
    with tempfile.TemporaryDirectory(prefix="fw-grpcpol-", dir="/tmp") as d, echo_server() as echo:
        try:
            for setup in SETUPS:
                cfg = stack_config(Path(d) / setup, echo)
                cfg["filters"] += _filters(setup == "per_model")
                stacks[setup] = start_stack(cfg, Path(d) / f"{setup}.yaml")
            targets = {s: f"127.0.0.1:{st.cfg.listener.port}" for s, st in stacks.items()}
            ms, p50_by_round = alternate(SETUPS, targets, args.rounds, args.calls)
        finally:
            for st in stacks.values():
                st.stop()
    write_report(
        args, SETUPS, ms, p50_by_round,
        f"Per-model policies on KServe gRPC (2 CPUs; two stacks, unary calls one at a time "
        f"through Envoy, the processor and Triton; {args.rounds} alternating rounds of "
        f"{args.calls} calls a kind; the same rate limit, admission and breaker on the gRPC "
        f"route, `per_model`: by the model read from each message, `per_route`: per route, "
        f"the message unread)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
