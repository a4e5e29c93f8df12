"""The Grafana dashboard queries only what exists: after traffic through the whole stack,
every metric a panel queries is exposed by the processor, the job worker, Envoy or Triton,
and the ones the traffic produces have samples."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from proxy.config import REPO_ROOT
from tests.e2e.conftest import Gateway
from tests.helpers import AUTH

DEMO_SHA256 = "4faac7e9147a184d6a3e359b0468bfdfd4279a190835f81da514ac041ec212f2"

pytestmark = pytest.mark.e2e

NAME = re.compile(r"\b((?:floodwall|envoy|nv|gen_ai|process)_[a-z0-9_]+)\b")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")
# Produced only by events this run does not provoke (a degrade, an open breaker, Redis
# errors, a rejected reload, finished-but-failed jobs): exposed, maybe without samples yet.
EVENT_DRIVEN = {
    "floodwall_degraded_total",
    "floodwall_breaker_rejected_total",
    "floodwall_ratelimit_redis_errors_total",
    "floodwall_config_reloads_total",
    "floodwall_admission_decisions_total",
    "floodwall_admission_shed_at_headers_total",
}


def _metrics_in(expr: str) -> list[str]:
    """Metric names in a PromQL expression (label matchers and groupings removed first)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|ignoring|on|group_left|group_right)\s*\([^)]*\)", "", expr)
    return NAME.findall(expr)


def _family(name: str) -> str:
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def _scrape(g: Gateway) -> tuple[set[str], set[str]]:
    """(families exposed, families with at least one sample) over all four targets."""
    from filters.jobs.worker import jobs_params

    cfg = g.stack.cfg
    p, t, a = cfg.processor, cfg.triton, cfg.admin
    jobs = jobs_params(cfg)
    assert t is not None and jobs is not None
    urls = [
        f"http://{p.admin_address}:{p.admin_port}/metrics",
        f"http://{jobs.worker.admin_address}:{jobs.worker.admin_port}/metrics",
        f"http://{a.address}:{a.port}/stats/prometheus",
        f"http://127.0.0.1:{t.metrics_port}/metrics",
    ]
    exposed: set[str] = set()
    sampled: set[str] = set()
    for url in urls:
        text = httpx.get(url, timeout=10).text
        # No API key, nor its digest, in any label of any target.
        for secret in ("fw-demo-key", "fw-demo-limited", "fw-demo-worker", DEMO_SHA256):
            assert secret not in text, f"{secret} exposed by {url}"
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                exposed.add(_family(line.split()[2]))
            elif line and not line.startswith("#"):
                name = re.split(r"[{ ]", line, maxsplit=1)[0]
                exposed.add(_family(name))
                sampled.add(_family(name))
    return exposed, sampled


def _traffic(g: Gateway) -> None:
    url = g.url
    for _ in range(2):  # the second is a cache hit
        httpx.post(
            f"{url}/v1/embeddings", headers=AUTH, json={"model": "embedder", "input": "dashboards"}
        ).raise_for_status()
    chat = {
        "model": "sim-llm",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": "hello"}],
    }
    httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=chat).raise_for_status()
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", headers=AUTH, json={**chat, "stream": True}
    ) as r:
        assert r.status_code == 200
        r.read()
    limited = {"authorization": "Bearer fw-demo-limited"}
    with httpx.Client(base_url=url) as c, ThreadPoolExecutor(20) as pool:
        codes = set(pool.map(lambda _: c.get("/echo/dash", headers=limited).status_code, range(20)))
    assert 429 in codes  # burst 10: some of the 20 at once are refused
    job = httpx.post(
        f"{url}/v1/embeddings",
        headers={**AUTH, "prefer": "respond-async"},
        json={"model": "embedder", "input": "a job for the dashboard"},
    )
    assert job.status_code == 202
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(url + job.headers["location"], headers=AUTH).json()["status"] == "succeeded":
            break
        time.sleep(0.1)
    time.sleep(1.2)  # the worker's gauges refresh every second


def test_every_dashboard_series_exists(gateway: Gateway) -> None:
    from deploy.grafana.build_dashboard import GPU_ONLY, dashboard

    shipped = json.loads((REPO_ROOT / "deploy" / "grafana" / "floodwall.json").read_text())
    assert shipped == dashboard(), "floodwall.json is stale: run deploy/grafana/build_dashboard.py"
    _traffic(gateway)
    exposed, sampled = _scrape(gateway)
    queried = {
        m for panel in shipped["panels"] for t in panel["targets"] for m in _metrics_in(t["expr"])
    }
    assert len(queried) > 20
    gpu = any(n.startswith("nv_gpu_") for n in exposed)
    missing = sorted(m for m in queried if _family(m) not in exposed and (gpu or m not in GPU_ONLY))
    assert not missing, f"the dashboard queries series nobody exposes: {missing}"
    silent = sorted(m for m in queried - EVENT_DRIVEN - set(GPU_ONLY) if _family(m) not in sampled)
    assert not silent, f"exposed but without samples after the traffic: {silent}"
