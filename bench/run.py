"""``floodwall bench``: runs the benchmark suites one after another with a progress bar, then
writes one summary: each suite's JSON, Markdown and plots stay in the output folder, and
``summary.md`` gathers their tables (with the machine and the time taken per suite).

    .venv/bin/floodwall bench                       # every suite, full length (~1 hour)
    .venv/bin/floodwall bench --quick               # shorter runs (~10 minutes)
    .venv/bin/floodwall bench --suites jobs cache   # some of them
    .venv/bin/floodwall bench --summary-only        # rebuild summary.md from existing results

Each suite is ``python -m bench.<suite> [--quick] --out <out>/<suite>`` in its own process
(so one suite's stack or crash cannot skew the next); its output goes to ``<out>/<suite>.log``.
Run it from a checkout (the suites live in ``bench/``, not in the installed package) on an
otherwise idle machine: the suites measure ratios side by side, but CPU contention from
outside still shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from proxy.config import REPO_ROOT

RESULTS = REPO_ROOT / "bench" / "results"
# In the order they run; the name is the module in bench/ and the stem of its results.
SUITES = (
    "gateway_overhead",
    "grpc_passthrough",
    "grpc_policies",
    "embedder_batching",
    "long_inputs",
    "rate_limit",
    "cache",
    "overload",
    "server_ab",
    "jobs",
    "chaos",
)


def write_results(out: Path, res: dict[str, Any], md: str) -> None:
    """A suite's results: ``<out>.json`` and ``<out>.md`` (printed too)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(md)
    print(md)


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the plain fallback: one line per suite
        return None
    return tqdm(total=total, unit="suite", bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}]")


def run(suites: list[str], out: Path, quick: bool) -> dict[str, dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    bar = _progress(len(suites))
    ran: dict[str, dict[str, Any]] = {}
    for suite in suites:
        if bar is not None:
            bar.set_description(suite)
        else:
            print(f"== {suite}", flush=True)
        argv = [sys.executable, "-m", f"bench.{suite}", "--out", str(out / suite)]
        if quick:
            argv.append("--quick")
        t0 = time.monotonic()
        with (out / f"{suite}.log").open("wb") as log:
            code = subprocess.run(
                argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
            ).returncode
        ran[suite] = {"exit": code, "seconds": round(time.monotonic() - t0, 1)}
        if bar is not None:
            bar.update(1)
        elif code:
            print(f"   {suite} failed (exit {code}); see {out / suite}.log", flush=True)
    if bar is not None:
        bar.close()
    return ran


def plot_summary(suite: str, res: dict[str, Any], path: Path) -> bool:
    """For a suite without a plot of its own: bar charts of its ``summary`` numbers, one
    panel per group (a group's key names its unit: ``..._ms``, ``..._rps``, ``..._ratio``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = []
    for key, value in (res.get("summary") or {}).items():
        if not isinstance(value, dict):
            continue
        bars: dict[str, dict[str, float]] = {}
        for name, v in value.items():
            if isinstance(v, dict):  # grouped: series name -> {x: y}
                bars[name] = {str(x): float(y) for x, y in v.items() if _number(y)}
            elif _number(v):
                bars.setdefault("", {})[name] = float(v)
        if any(bars.values()):
            groups.append((key, bars))
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (key, bars) in zip(axes[0], groups, strict=True):
        xs = list(dict.fromkeys(x for series in bars.values() for x in series))
        width = 0.8 / len(bars)
        for i, (series, ys) in enumerate(bars.items()):
            pos = [j + i * width - 0.4 + width / 2 for j in range(len(xs))]
            ax.bar(pos, [ys.get(x, 0.0) for x in xs], width, label=series or None)
        ax.set_xticks(range(len(xs)), xs, rotation=20, fontsize=8)
        ax.set_title(key, fontsize=9)
        if any(bars):
            ax.legend(fontsize=7)
    fig.suptitle(f"{suite}: summary", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def summary(out: Path, ran: dict[str, dict[str, Any]] | None = None) -> str:
    lines = [
        "# Floodwall benchmarks",
        "",
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every suite runs the "
        "gateway, its upstreams and the load generator on this one machine; compare ratios "
        "measured within one suite, not absolute numbers across machines.",
        "",
        "| suite | result | time | plot |",
        "|---|---|---|---|",
    ]
    bodies = []
    for suite in SUITES:
        md, js = out / f"{suite}.md", out / f"{suite}.json"
        if not md.exists():
            if ran and suite in ran:
                lines.append(
                    f"| {suite} | failed (exit {ran[suite]['exit']}; see {suite}.log) | "
                    f"{ran[suite]['seconds']} s | |"
                )
            continue
        png = out / f"{suite}.png"
        if not png.exists() and js.exists():
            plot_summary(suite, json.loads(js.read_text()), png)
        took = f"{ran[suite]['seconds']} s" if ran and suite in ran else "earlier run"
        status = "ok" if not ran or ran.get(suite, {}).get("exit", 0) == 0 else "failed"
        lines.append(
            f"| {suite} | {status}: {js.name}, {md.name} | {took} | "
            f"{png.name if png.exists() else '-'} |"
        )
        body = md.read_text().strip()
        # Demote the suite's own headings one level under this summary's.
        body = "\n".join("#" + ln if ln.startswith("#") else ln for ln in body.splitlines())
        bodies.append(body + ("\n\n![" + suite + "](" + png.name + ")" if png.exists() else ""))
    text = "\n".join(lines) + "\n\n" + "\n\n".join(bodies) + "\n"
    (out / "summary.md").write_text(text)
    if ran is not None:
        (out / "summary.json").write_text(json.dumps(ran, indent=2))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="floodwall bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--out", default=str(RESULTS), help=f"default: {RESULTS}")
    ap.add_argument(
        "--summary-only",
        action="store_true",
        help="only rebuild summary.md from the results in --out",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    ran = None if args.summary_only else run(args.suites, out, args.quick)
    summary(out, ran)
    print(f"summary: {out / 'summary.md'}")
    return 1 if ran and any(r["exit"] for r in ran.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
