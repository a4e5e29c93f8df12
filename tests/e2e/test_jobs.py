"""Async jobs through the whole stack: Envoy, the processor's jobs filter, Redis, the worker
that `floodwall up` starts, and Triton behind the gateway again."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import Gateway
from tests.helpers import AUTH

pytestmark = pytest.mark.e2e

BATCH = {"authorization": "Bearer fw-demo-batch"}
FINAL = ("succeeded", "failed", "cancelled")


def _wait(
    g: Gateway,
    location: str,
    until: tuple[str, ...],
    headers: dict[str, str] = AUTH,
    timeout: float = 60,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(g.url + location, headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        if job["status"] in (*until, *FINAL) or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_prefer_respond_async_runs_the_request_later(gateway: Gateway) -> None:
    body = {"model": "embedder", "input": "an asynchronous hello"}
    r = httpx.post(
        gateway.url + "/v1/embeddings", json=body, headers={**AUTH, "prefer": "respond-async"}
    )
    assert r.status_code == 202, r.text
    assert r.headers["preference-applied"] == "respond-async"
    location = r.headers["location"]
    job = _wait(gateway, location, ("succeeded", "failed"))
    assert job["status"] == "succeeded" and job["priority"] == "standard", job
    sync = httpx.post(gateway.url + "/v1/embeddings", json=body, headers=AUTH).json()
    got = np.array(job["result"]["body"]["data"][0]["embedding"])
    assert float(got @ np.array(sync["data"][0]["embedding"])) > 0.999
    # Only the owner sees it.
    other = httpx.get(gateway.url + location, headers=BATCH)
    assert other.status_code == 404 and other.json()["error"]["type"] == "job_not_found"


def test_batch_tenant_jobs_are_sheddable_and_bad_payloads_fail(gateway: Gateway) -> None:
    r = httpx.post(
        gateway.url + "/v1/jobs",
        headers=BATCH,
        json={
            "requests": [
                {"url": "/v1/embeddings", "body": {"model": "embedder", "input": ["a", "b"]}},
                {"url": "/v1/embeddings", "body": {"model": "embedder", "input": 42}},
                {"url": "/v1/embeddings", "body": {"model": "embedder", "input": "x",
                                                    "dimensions": 7}},
            ]
        },
    )  # fmt: skip
    assert r.status_code == 202, r.text
    job = _wait(gateway, r.headers["location"], ("succeeded", "failed"), headers=BATCH)
    assert job["priority"] == "sheddable"
    assert job["status"] == "failed" and job["progress"] == {"completed": 3, "total": 3}
    assert [x["status"] for x in job["results"]] == [200, 400, 400]
    assert len(job["results"][0]["body"]["data"]) == 2
    # One model per job (as OpenAI's Batch API): a mixed one is refused at submission.
    mixed = {"requests": [{"url": "/v1/embeddings", "body": {"model": m, "input": "x"}}
                          for m in ("embedder", "no-such-model")]}  # fmt: skip
    refused = httpx.post(gateway.url + "/v1/jobs", headers=BATCH, json=mixed)
    assert refused.status_code == 400 and "one model per job" in refused.text


def test_cancel_a_running_job(gateway: Gateway) -> None:
    slow = {
        "model": "sim-llm",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "write at length"}],
    }
    r = httpx.post(
        gateway.url + "/v1/jobs",
        headers=AUTH,
        json={"requests": [{"url": "/v1/chat/completions", "body": slow}] * 3},
    )
    location = r.headers["location"]
    job = _wait(gateway, location, ("running",))
    assert job["status"] == "running", (job.get("error"), str(job.get("results"))[:300])
    d = httpx.delete(gateway.url + location, headers=AUTH)
    assert d.status_code == 200 and d.json()["status"] == "cancelled"
    time.sleep(1)
    assert _wait(gateway, location, ())["status"] == "cancelled"  # the worker kept out of it


def test_worker_killed_mid_job_the_job_still_completes_once(gateway: Gateway) -> None:
    slow = {
        "model": "sim-llm",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "a long answer please"}],
    }
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=slow,
        headers={**AUTH, "prefer": "respond-async", "idempotency-key": "kill-9"},
    )
    location = r.headers["location"]
    assert _wait(gateway, location, ("running",))["status"] == "running"
    stack = gateway.stack
    worker = next(c for c in stack.children if c.name == "worker")
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(timeout=10)
    stack.children.remove(worker)
    stack.start_worker()  # a new worker takes the job over after the visibility timeout
    job = _wait(gateway, location, ("succeeded", "failed"), timeout=90)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert job["result"]["body"]["usage"]["completion_tokens"] > 0
    # The same Idempotency-Key names the same job, finished.
    again = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=slow,
        headers={**AUTH, "prefer": "respond-async", "idempotency-key": "kill-9"},
    )
    assert again.status_code == 202 and again.headers["location"] == location
