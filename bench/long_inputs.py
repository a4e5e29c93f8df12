"""What one long text costs Triton's embedder, before and after its input bounds, side by side.

Tokenising takes time in proportion to the whole text, though only the first 256 tokens are
kept (triton_models/embedder/1/model.py: MAX_INPUT_BYTES, head()). One Triton serves two
copies of ``embedder_int8``: as shipped, and with ``model.py`` taken from ``--before`` (a git
revision; default: the one before the bounds). Each text shape (~64 KB: English sentences,
words joined by no-break spaces, CJK text, one long word; and a sentence) is sent one request
at a time, the two models interleaved, straight to Triton's HTTP port; plus a 1 MB text
(within the gateway's body limit on the KServe routes), which the bounded model refuses.

    .venv/bin/python -m bench.long_inputs      # ~1 minute

Writes bench/results/long_inputs.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from proxy import models
from proxy.config import REPO_ROOT
from proxy.runtime import http_ok
from proxy.triton import remove_shm_regions, triton_command
from tests.helpers import free_ports

RESULTS = REPO_ROOT / "bench" / "results"
BEFORE = "f48652c"  # the embedder before its input bounds (session 20)
K = 64_000
SHAPES = {
    "english_64k": ("The quick brown fox jumps over the lazy dog near the riverbank. " * 2000)[:K],
    "nbsp_64k": ("word\u00a0" * 20_000)[: K // 2],  # 2 UTF-8 bytes per no-break space
    "cjk_64k": ("\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002" * 3000)[
        : K // 3
    ],
    "one_word_64k": "y" * K,
    "sentence": "How do I rotate my API keys?",
    "english_1mb": ("The quick brown fox jumps over the lazy dog near the riverbank. " * 16_000)[
        :1_000_000
    ],
}


def make_repo(root: Path, before: str) -> dict[str, str]:
    src = REPO_ROOT / "triton_models" / "embedder_int8"
    old = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "show", f"{before}:triton_models/embedder/1/model.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names = {"after": "embedder_int8", "before": "embedder_int8_before"}
    for which, name in names.items():
        d = root / name
        (d / "1").mkdir(parents=True)
        shutil.copytree(src / "warmup", d / "warmup")  # follows the symlinks
        cfg = (src / "config.pbtxt").read_text().replace('name: "embedder_int8"', f'name: "{name}"')
        (d / "config.pbtxt").write_text(cfg)
        code = (src / "1" / "model.py").read_text() if which == "after" else old
        (d / "1" / "model.py").write_text(code)
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", default=BEFORE, help="git revision of the model to compare")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    ap.add_argument("--out", default=str(RESULTS / "long_inputs"))
    args = ap.parse_args()
    if args.quick:
        args.repeats = 3

    models.build()
    http, grpc, metrics = free_ports(3)
    prefix = f"fwbench_{os.getpid()}_"
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "params": {"before": args.before, "repeats": args.repeats,
                   "bytes": {k: len(v.encode()) for k, v in SHAPES.items()}},
        "p50_ms": {},
        "status": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as d:
        names = make_repo(Path(d) / "models", args.before)
        argv, env = triton_command(Path(d) / "models", http_port=http, grpc_port=grpc,
                                   metrics_port=metrics, shm_prefix=prefix)  # fmt: skip
        log = Path(d) / "triton.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while not http_ok(f"http://127.0.0.1:{http}/v2/health/ready"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Triton did not start: " + log.read_text()[-2000:])
                time.sleep(0.2)
            with httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=60) as client:
                for shape, text in SHAPES.items():
                    body = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES",
                                        "data": [text]}]}  # fmt: skip
                    times: dict[str, list[float]] = {w: [] for w in names}
                    repeats = 3 if shape == "english_1mb" else args.repeats
                    for i in range(repeats):  # interleaved, each first in turn
                        order = list(names.items())
                        for which, name in order if i % 2 else order[::-1]:
                            t0 = time.perf_counter()
                            r = client.post(f"/v2/models/{name}/infer", json=body)
                            times[which].append((time.perf_counter() - t0) * 1000)
                            results["status"].setdefault(shape, {})[which] = r.status_code
                    p50 = {w: round(statistics.median(v), 2) for w, v in times.items()}
                    results["p50_ms"][shape] = p50
                    print(f"{shape:<14} {p50} {results['status'][shape]}", flush=True)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            remove_shm_regions(prefix)

    results["summary"] = {
        "p50_ms": {w: {s: p[w] for s, p in results["p50_ms"].items()} for w in ("before", "after")}
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = [
        f"Long inputs ({results['machine']['cpus']} CPUs; one request at a time, straight to "
        f"Triton; `embedder_int8` as shipped vs its model.py at {args.before}, interleaved)",
        "",
        "| text | bytes | before: p50 (status) | after: p50 (status) |",
        "|---|---:|---:|---:|",
    ]
    for shape, p50 in results["p50_ms"].items():
        st = results["status"][shape]
        size = results["params"]["bytes"][shape]
        before, after = f"{p50['before']} ms ({st['before']})", f"{p50['after']} ms ({st['after']})"
        lines.append(f"| {shape} | {size:,} | {before} | {after} |")
    md = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
