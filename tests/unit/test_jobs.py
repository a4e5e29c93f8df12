"""The jobs filter's pure parts: Prefer parsing, params that fail loudly, the webhook MAC, the
job view, and the filter with no Redis configured."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from filters.jobs.filter import JobsFilter
from filters.jobs.params import JobsParams
from filters.jobs.store import view
from filters.jobs.worker import sign, verify
from proxy.api import Deps, prefers_async
from proxy.testing import Harness, default_config


@pytest.mark.parametrize(
    ("header", "wanted"),
    [
        ("respond-async", True),
        ("Respond-Async, wait=10", True),
        ("return=minimal; foo=bar, respond-async; x=1", True),
        ("wait=10", False),
        ("respond-asyncish", False),
        ("", False),
    ],
)
def test_prefer_header(header: str, wanted: bool) -> None:
    assert prefers_async({"prefer": header} if header else {}) is wanted


@pytest.mark.parametrize(
    "bad",
    [
        {"max_depth": 0},
        {"api_path": "jobs"},
        {"api_path": "/v1/jobs/"},
        {"result_ttl_s": "forever"},
        {"worker": {"via": "carrier-pigeon"}},
        {"worker": {"backoff_s": 10, "backoff_max_s": 1}},
        {"webhook": {"allowed_prefixes": []}},
        {"webhook": {"allowed_prefixes": ["https://hooks.example.com"]}},  # no trailing /
        {"webhook": {"allowed_prefixes": ["ftp://hooks.example.com/"]}},
        {"unknown": 1},
    ],
)
def test_bad_params_fail_loudly(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        JobsParams.model_validate(bad)


def test_durations_parse() -> None:
    p = JobsParams.model_validate({"result_ttl_s": "2h", "idempotency_ttl_s": 60})
    assert (p.result_ttl_s, p.idempotency_ttl_s) == (7200.0, 60.0)


def test_webhook_signature() -> None:
    body = b'{"id":"x"}'
    header = sign(b"s3cret", body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify(b"s3cret", body, header, now=1_700_000_100)
    assert not verify(b"s3cret", body, header, now=1_700_001_000)  # too old
    assert not verify(b"s3cret", body + b"x", header, now=1_700_000_100)
    assert not verify(b"s3cret", body, "v1=abc", now=1_700_000_100)


def test_view_splices_answers_and_keeps_bad_json_out() -> None:
    fields = {
        "status": b"succeeded", "priority": b"critical", "created": b"1000", "updated": b"2500",
        "finished": b"2500", "attempts": b"1", "total": b"2", "done": b"2",
        "rs:0": b"200", "rb:0": b'{"a": [1, 2]}', "rj:0": b"1",
        "rs:1": b"502", "rb:1": b"<html>bad gateway", "rj:1": b"0",
    }  # fmt: skip
    job = orjson.loads(view("ab" * 16, fields, "/v1/jobs"))
    assert job["results"][0] == {"status": 200, "body": {"a": [1, 2]}}
    assert job["results"][1] == {"status": 502, "body": "<html>bad gateway"}
    assert job["created_at"] == 1.0 and job["finished_at"] == 2.5
    assert job["url"] == "/v1/jobs/" + "ab" * 16


async def test_the_job_api_needs_an_authenticated_caller() -> None:
    f = JobsFilter(JobsParams(), Deps())
    f.name = "jobs"
    cfg = default_config(
        [
            {"name": "jobs", "match": {"prefix": "/v1/jobs"}, "api": "jobs", "upstream": "up"},
            {"name": "kserve_http", "match": {"prefix": "/v2"}, "upstream": "up"},
        ]
    )
    h = Harness(cfg, [f])
    # No auth in front: nobody could own a job.
    r = await h.request("GET", "/v1/jobs/" + "0" * 32)
    assert r.status == 401 and r.json()["error"]["type"] == "unauthenticated"
    # Nor can anyone queue a job through Prefer without a tenant to own it.
    r = await h.request(
        "POST", "/v2/models/m/infer", headers={"prefer": "respond-async"}, body="{}"
    )
    assert r.status == 401
