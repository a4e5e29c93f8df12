"""Load generators for the benchmarks.

- ``closed_loop``: wrk at a fixed concurrency (throughput); a C tool, so the generator costs
  little of the 2 cores the gateway also needs.
- ``open_loop`` / ``open_loop_mix``: requests (one kind, or a weighted mix of kinds) sent on
  a fixed schedule whatever the latency (no coordinated omission): latency is measured from
  the *scheduled* send time, so a stall shows up in p99 the way users would feel it. Sent by
  ``openloop.c`` (C, epoll; built on first use with the machine's C compiler).
  ``open_loop_mix_python`` is the Python + uvloop generator it replaced, kept only as the
  reference ``bench/generators.py`` compares it with.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""

    def wire(self, host: str, port: int) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"host: {host}:{port}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        lines.append(f"content-length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body

    def wrk_lua(self) -> str:
        hdrs = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in self.headers.items())
        body = self.body.decode().replace("\\", "\\\\").replace('"', '\\"')
        return f'wrk.method = "{self.method}"\nwrk.body = "{body}"\n{hdrs}'


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def closed_loop(
    url: str, req: HttpRequest, *, connections: int, seconds: float, threads: int = 1
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(req.wrk_lua())
        script = f.name
    try:
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--latency",
             "-s", script, url + req.path],
            capture_output=True, text=True, check=True, timeout=seconds + 30,
        ).stdout  # fmt: skip
    finally:
        Path(script).unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "connections": connections,
        "rps": rps,
        "p50_ms": _ms(lat["50"]),
        "p99_ms": _ms(lat["99"]),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else None,
    }


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if m:
        await reader.readexactly(int(m.group(1)))
    return status, head


def _summary(latencies: list[float], statuses: dict[int, int], failures: int, n: int,
             rate: float, elapsed: float, marked: int) -> dict[str, Any]:  # fmt: skip
    lat = np.array(latencies or [0.0]) * 1000
    return {
        "target_rps": rate,
        "achieved_rps": len(latencies) / elapsed,
        "requests": n,
        "failures": failures,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "marked": marked,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "p999_ms": float(np.percentile(lat, 99.9)),
        "max_ms": float(lat.max()),
        "elapsed_s": elapsed,
    }


async def _open_loop(
    host: str,
    port: int,
    mix: list[tuple[str, HttpRequest, float]],
    rate: float,
    seconds: float,
    mark: bytes | dict[str, bytes] | None,
) -> dict[str, dict[str, Any]]:
    """Sends at ``rate`` for ``seconds``, each slot's request drawn from ``mix`` (label,
    request, share) in a fixed interleaving. Per label: latency of every answer counted from
    its scheduled time, statuses, and how many answers carried the header ``mark`` (one for
    all labels, or one per label)."""
    wires = {label: req.wire(host, port) for label, req, _ in mix}
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    lat: dict[str, list[float]] = {label: [] for label in wires}
    ok_lat: dict[str, list[float]] = {label: [] for label in wires}
    statuses: dict[str, dict[int, int]] = {label: {} for label in wires}
    failures = dict.fromkeys(wires, 0)
    sent = dict.fromkeys(wires, 0)
    marked = dict.fromkeys(wires, 0)
    # A mark is a header name ("x-floodwall-degraded") or a name and value prefix
    # ("x-floodwall-cache: hit").
    marks = mark if isinstance(mark, dict) else dict.fromkeys(wires, mark)
    needles = {
        label: b"\r\n" + m.lower() + (b"" if b":" in m else b":") for label, m in marks.items() if m
    }

    async def one(label: str, scheduled: float) -> None:
        conn = idle.pop() if idle else await asyncio.open_connection(host, port)
        try:
            conn[1].write(wires[label])
            status, head = await _read_response(conn[0])
        except (OSError, asyncio.IncompleteReadError, ValueError):
            failures[label] += 1
            conn[1].close()
            return
        took = time.perf_counter() - scheduled
        lat[label].append(took)
        if status == 200:
            ok_lat[label].append(took)
        statuses[label][status] = statuses[label].get(status, 0) + 1
        needle = needles.get(label)
        if needle is not None and needle in head.lower():
            marked[label] += 1
        idle.append(conn)

    # Deterministic interleaving: each slot goes to the label furthest behind its share.
    total = sum(share for *_, share in mix)
    n = int(rate * seconds)
    tasks = []
    start = time.perf_counter() + 0.05
    for i in range(n):
        label = max(mix, key=lambda m: m[2] / total * (i + 1) - sent[m[0]])[0]
        sent[label] += 1
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(label, scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for _, w in idle:
        w.close()
    out = {}
    for label, _, share in mix:
        r = _summary(lat[label], statuses[label], failures[label], sent[label],
                     rate * share / total, elapsed, marked[label])  # fmt: skip
        ok = np.array(ok_lat[label] or [0.0]) * 1000
        r["ok"] = len(ok_lat[label])
        r["ok_p50_ms"] = float(np.percentile(ok, 50))
        r["ok_p99_ms"] = float(np.percentile(ok, 99))
        out[label] = r
    return out


def open_loop_mix_python(
    host: str,
    port: int,
    mix: list[tuple[str, HttpRequest, float]],
    *,
    rate: float,
    seconds: float,
    mark: bytes | dict[str, bytes] | None = None,
) -> dict[str, dict[str, Any]]:
    """The Python + uvloop generator (see the module's docstring): the same schedule,
    interleaving and results as ``open_loop_mix``."""
    import uvloop

    return uvloop.run(_open_loop(host, port, mix, rate, seconds, mark))


def openloop_binary() -> Path:
    """``bench/openloop.c`` compiled into the build cache (once per version of the source)."""
    import hashlib

    from proxy.models import cache_dir

    src = Path(__file__).with_name("openloop.c")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    exe = cache_dir() / "bench" / f"openloop-{digest}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["cc", "-O2", "-o", str(tmp), str(src)], check=True, capture_output=True)
        tmp.replace(exe)
    return exe


def open_loop_mix(
    host: str,
    port: int,
    mix: list[tuple[str, HttpRequest, float]],
    *,
    rate: float,
    seconds: float,
    mark: bytes | dict[str, bytes] | None = None,
    grace_s: float = 60.0,
) -> dict[str, dict[str, Any]]:
    """Sends at ``rate`` for ``seconds``, each slot's request drawn from ``mix`` (label,
    request, share) in a fixed interleaving, with ``openloop.c``. Per label: latency of every
    answer counted from its scheduled time, statuses, failures (no answer, or none within
    ``grace_s`` of the last slot), and how many answers carried the header ``mark`` (one for
    all labels, or one per label: a name, "x-floodwall-degraded", or a name and value prefix,
    "x-floodwall-cache: hit")."""
    marks = mark if isinstance(mark, dict) else {label: mark for label, *_ in mix}
    with tempfile.TemporaryDirectory(prefix="fw-openloop-") as d:
        argv = [str(openloop_binary()), host, str(port), str(rate), str(seconds), str(grace_s)]
        for i, (label, req, share) in enumerate(mix):
            wire = Path(d) / f"{i}.http"
            wire.write_bytes(req.wire(host, port))
            m = marks.get(label)
            argv += [str(share), m.decode() if m else "-", str(wire)]
        out = subprocess.run(
            argv, capture_output=True, text=True, check=True, timeout=seconds + grace_s + 30
        ).stdout
    *rows, elapsed_line = out.splitlines()
    elapsed = int(elapsed_line.split()[1]) / 1e9
    total = sum(share for *_, share in mix)
    n = int(rate * seconds)
    # The same interleaving as openloop.c: how many slots each kind got.
    sent = [0] * len(mix)
    for i in range(n):
        k = max(range(len(mix)), key=lambda j: mix[j][2] / total * (i + 1) - sent[j])
        sent[k] += 1
    cols = np.array([[int(x) for x in r.split()] for r in rows], dtype=np.int64).reshape(-1, 4)
    result = {}
    for k, (label, _, share) in enumerate(mix):
        mine = cols[cols[:, 0] == k]
        statuses: dict[int, int] = {}
        for code in mine[:, 2]:
            statuses[int(code)] = statuses.get(int(code), 0) + 1
        r = _summary(list(mine[:, 1] / 1e9), statuses, sent[k] - len(mine), sent[k],
                     rate * share / total, elapsed, int(mine[:, 3].sum()))  # fmt: skip
        ok = mine[mine[:, 2] == 200][:, 1] / 1e6
        r["ok"] = len(ok)
        r["ok_p50_ms"] = float(np.percentile(ok, 50)) if len(ok) else 0.0
        r["ok_p99_ms"] = float(np.percentile(ok, 99)) if len(ok) else 0.0
        result[label] = r
    return result


def open_loop(
    host: str, port: int, req: HttpRequest, *, rate: float, seconds: float
) -> dict[str, Any]:
    """One kind of request at a fixed rate (see ``open_loop_mix``)."""
    r = open_loop_mix(host, port, [("all", req, 1.0)], rate=rate, seconds=seconds)["all"]
    for k in ("marked", "ok", "ok_p50_ms", "ok_p99_ms", "elapsed_s"):
        del r[k]
    return r


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Steal:
    """The share of this VM's CPU time its hypervisor gave to other guests (``steal`` in
    /proc/stat) since construction. Shared hosts make a run's latencies swing by several
    times; a benchmark records this so a reader can tell a slow run from a slow gateway."""

    def __init__(self) -> None:
        self._start = _cpu_ticks()

    def share(self) -> float:
        steal0, total0 = self._start
        steal1, total1 = _cpu_ticks()
        return (steal1 - steal0) / max(1, total1 - total0)


def _cpu_ticks() -> tuple[int, int]:
    """(steal, all) ticks of all CPUs so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


# What each process of a stack is, from its command line (first match wins).
_COMPONENTS = (
    ("proxy.cli serve", "processor"),
    ("proxy.cli worker", "worker"),
    ("envoy", "envoy"),
    ("triton", "triton"),
    ("redis-server", "redis"),
)


def cpu_by_component() -> dict[str, float]:
    """CPU seconds so far of this process and the load generators it ran ("loadgen"), and of
    every process it started that still runs, summed per component (envoy, processor, triton,
    redis, worker, other)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    me = os.getpid()
    # The generator runs as a child (openloop.c) and has exited by the time this is read:
    # its CPU is in this process' waited-for children's time (the stack's processes are
    # still running, so theirs is not).
    t = os.times()
    out = {"loadgen": t.user + t.system + t.children_user + t.children_system}
    family, frontier = set(), [me]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in family]
        family.update(kids)
        frontier = kids
    for pid in family:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            used = cpu_seconds(pid)
        except OSError:
            continue
        name = next((n for needle, n in _COMPONENTS if needle in cmd), "other")
        out[name] = out.get(name, 0.0) + used
    return out


def histogram(url: str, name: str, by: tuple[str, ...]) -> dict[str, list[tuple[float, float]]]:
    """Histogram ``name``'s cumulative buckets on the Prometheus page at ``url``
    (``parse_histogram``)."""
    import urllib.request

    return parse_histogram(urllib.request.urlopen(url, timeout=5).read().decode(), name, by)


def parse_histogram(
    text: str, name: str, by: tuple[str, ...]
) -> dict[str, list[tuple[float, float]]]:
    """Histogram ``name``'s cumulative buckets in a Prometheus page, per series: the values of
    the labels ``by`` joined with "/" -> [(le, cumulative count)], in the page's order."""
    out: dict[str, list[tuple[float, float]]] = {}
    for labels, value in re.findall(rf"^{name}_bucket\{{([^}}]*)\}} (\S+)$", text, re.M):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = "/".join(lab.get(b, "") for b in by)
        out.setdefault(key, []).append((float(lab["le"]), float(value)))
    return out


def quantiles(
    before: dict[str, list[tuple[float, float]]],
    after: dict[str, list[tuple[float, float]]],
    within_ms: float | None = None,
) -> dict[str, Any]:
    """Per series, of the observations made between two scrapes (``histogram``): their
    count, p50 and p99 as bucket upper bounds in ms (the true quantile is at most that), and
    with ``within_ms`` (a bucket bound) the share observed at or under it."""
    out: dict[str, Any] = {}
    for key, rows in after.items():
        prev = dict(before.get(key, []))
        counts = [(le, n - prev.get(le, 0.0)) for le, n in rows]
        total = counts[-1][1]
        if total <= 0:
            continue
        out[key] = {"count": int(total)}
        for q in (0.5, 0.99):
            le = next(le for le, n in counts if n >= q * total)
            out[key][f"p{int(q * 100)}_le_ms"] = le * 1000
        if within_ms is not None:
            at = next(n for le, n in counts if math.isclose(le, within_ms / 1000))
            out[key][f"share_within_{within_ms:g}_ms"] = at / total
    return out
