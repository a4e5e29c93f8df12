"""The jobs filter's pure parts: Prefer parsing, params that fail loudly, the webhook MAC, the
job view, and the filter with no Redis configured."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from filters.jobs.filter import JobsFilter
from filters.jobs.params import JobsParams
from filters.jobs.store import requests_of, view
from filters.jobs.worker import _retry_after, sign, tenant_secret, verify
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
        {"webhook": {"allowed_prefixes": ["http://", "https://"]}},  # no host: any host
        {"webhook": {"allowed_prefixes": ["https://user@hooks.example.com/"]}},
        {"webhook": {"allowed_prefixes": ["http://127.0.0.1:8080/"]}},  # not public
        {"webhook": {"allowed_prefixes": ["http://169.254.169.254/"]}},
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


def test_tenant_webhook_keys_are_stable_and_apart() -> None:
    alice = tenant_secret(b"s3cret", "alice")
    assert alice == tenant_secret(b"s3cret", "alice") and len(alice) == 64
    assert alice not in {tenant_secret(b"s3cret", "bob"), tenant_secret(b"other", "alice")}
    assert b"s3cret" not in alice


def test_a_damaged_request_count_does_not_make_readers_loop() -> None:
    # A job record whose total was overwritten (by hand, a bug, another program): the view
    # and the worker read no more requests than the record has fields.
    fields = {"status": b"queued", "total": b"99999999999", "m:0": b"POST", "u:0": b"/v1/x",
              "b:0": b"{}"}  # fmt: skip
    job = orjson.loads(view("ab" * 16, fields, "/v1/jobs"))
    assert job["progress"]["total"] == len(fields) and job["results"] == [None] * len(fields)
    with pytest.raises(KeyError):  # m:1 is missing: the worker fails this job, quickly
        requests_of(fields)


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


async def test_nothing_on_the_job_apis_route_is_forwarded() -> None:
    f = JobsFilter(JobsParams(), Deps())
    f.name = "jobs"
    cfg = default_config(
        [{"name": "jobs", "match": {"prefix": "/v1/jobs"}, "api": "jobs", "upstream": "up"}]
    )
    h = Harness(cfg, [f])
    for headers in ({}, {"prefer": "respond-async"}):
        r = await h.request("GET", "/v1/jobsANYTHING", headers=headers, body="{}")
        assert r.status == 404 and not r.upstream_called, r.body


def test_a_job_names_one_model() -> None:
    # A job mixing models had no model for the limits keyed by one: it escaped them all.
    f = JobsFilter(JobsParams(), Deps())
    chat = {"url": "/v1/chat/completions", "body": {"model": "sim-llm", "messages": []}}
    embed = {"url": "/v1/embeddings", "body": {"model": "embedder", "input": "x"}}
    assert isinstance(f._envelope(orjson.dumps({"requests": [chat, chat]})), list)
    refused = f._envelope(orjson.dumps({"requests": [chat, chat, embed]}))
    assert not isinstance(refused, list) and refused.status == 400
    assert b"requests[2].body.model differs" in refused.body


def test_a_job_body_nested_past_what_orjson_writes_is_a_400() -> None:
    f = JobsFilter(JobsParams(), Deps())
    deep = b"[" * 300 + b'"x"' + b"]" * 300  # orjson reads 1,024 levels, writes 255
    body = b'{"url": "/v1/embeddings", "body": {"model": "m", "input": ' + deep + b"}}"
    refused = f._envelope(body)
    assert not isinstance(refused, list) and refused.status == 400
    assert b"nested too deeply" in refused.body


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://hooks.example.com/t/x", True),
        ("https://HOOKS.example.com:443/t/x?a=1", True),
        ("https://hooks.example.com/t/../admin", False),  # outside the prefix once resolved
        ("https://hooks.example.com/t/%2e%2e/admin", False),
        ("https://hooks.example.com/t/x%2F..%2F..%2Fadmin", False),  # the receiver may decode it
        ("https://hooks.example.com/tx", False),
        ("https://hooks.example.com.evil.net/t/x", False),
        ("https://hooks.example.com:8443/t/x", False),
        ("http://hooks.example.com/t/x", False),
        ("https://user:pw@hooks.example.com/t/x", False),
        ("https://127.0.0.1/t/x", False),
        (42, False),
    ],
)
def test_webhook_urls_must_stay_under_an_allowed_prefix(url: object, allowed: bool) -> None:
    p = JobsParams.model_validate(
        {"webhook": {"allowed_prefixes": ["https://hooks.example.com/t/"]}}
    )
    assert p.webhook is not None
    assert (p.webhook.allows(url) is not None) is allowed


_HOOKS = JobsParams.model_validate(
    {"webhook": {"allowed_prefixes": ["https://hooks.example.com/t/"]}}
).webhook


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(
            "{}://{}{}/{}".format,
            st.sampled_from(["https", "http", "HTTPS", "ftp", ""]),
            st.one_of(
                st.just("hooks.example.com"),
                st.text(max_size=20),
                # Punycode labels: many are not valid IDNA (yarl raises UnicodeError).
                st.text("abcxyz019-", min_size=1, max_size=8).map("xn--{}.com".format),
            ),
            st.sampled_from(["", ":443", ":8443", ":x"]),
            st.text(max_size=40),
        ),
    )
)
def test_any_webhook_url_is_allowed_under_the_prefix_or_refused_never_an_error(
    url: str,
) -> None:
    # The caller names the URL: whatever it is (an IDNA host, odd ports, percent escapes),
    # the answer is a URL under the prefix or None, never an exception (a 500).
    assert _HOOKS is not None
    u = _HOOKS.allows(url)
    assert u is None or (u.host == "hooks.example.com" and u.path.startswith("/t/"))


def test_a_webhook_host_idna_cannot_encode_is_refused_not_an_error() -> None:
    p = JobsParams.model_validate({"webhook": {"allowed_prefixes": ["https://hooks.example.com/"]}})
    assert p.webhook is not None
    assert p.webhook.allows("https://xn--a.com/hook") is None


async def test_webhook_host_names_resolving_to_private_addresses_are_not_called() -> None:
    from filters.jobs.worker import _PublicOnlyResolver

    class Inner:
        def __init__(self, *addresses: str) -> None:
            self.addresses = addresses

        async def resolve(self, host: str, port: int, family: int) -> list[dict[str, Any]]:
            return [{"host": a, "port": port} for a in self.addresses]

    resolver = _PublicOnlyResolver()
    resolver._inner = Inner("127.0.0.1", "169.254.169.254", "10.1.2.3", "::1")  # type: ignore[assignment]
    with pytest.raises(OSError, match="no public address"):
        await resolver.resolve("rebound.example.com", 443)
    resolver._inner = Inner("10.1.2.3", "93.184.216.34")  # type: ignore[assignment]
    assert [a["host"] for a in await resolver.resolve("mixed.example.com", 443)] == [
        "93.184.216.34"
    ]


async def test_a_webhook_receiver_cannot_redirect_the_signed_job_elsewhere() -> None:
    """A receiver under an allowed prefix answers 307 to an internal address (Envoy's admin
    /quitquitquit, say): the worker does not follow it, and the delivery failed."""
    from aiohttp import web

    from filters.jobs.worker import Worker

    internal: list[str] = []

    async def inside(req: web.Request) -> web.Response:
        internal.append(req.path)
        return web.Response(text="ok")

    async def receiver(req: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": f"{inside_url}/quitquitquit"})

    runners = []
    urls = []
    for handler in (inside, receiver):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    inside_url, receiver_url = urls

    class Store:
        async def get(self, job_id: str) -> dict[str, bytes]:
            return {"status": b"succeeded", "total": b"1"}

        def job_key(self, job_id: str) -> str:
            return "k"

    class R:
        recorded: tuple[Any, ...] = ()

        async def hset(self, *args: Any) -> None:
            R.recorded = args

    store = Store()
    store.r = R()  # type: ignore[attr-defined]
    p = JobsParams.model_validate(
        {"webhook": {"allowed_prefixes": [receiver_url + "/"], "allow_private_addresses": True,
                     "attempts": 1}}
    )  # fmt: skip
    worker = Worker(p, store, caller=None, webhook_secret=b"s")  # type: ignore[arg-type]
    try:
        await worker._webhook("0" * 32, receiver_url + "/hook")
    finally:
        if worker._webhook_session is not None:
            await worker._webhook_session.close()
        for runner in runners:
            await runner.cleanup()
    assert internal == []
    assert R.recorded[1:] == ("webhook_status", "failed")


def test_the_workers_retry_after_is_finite_and_bounded() -> None:
    # 'inf' became an OverflowError in the retry (int(inf * 1000)) and killed the job's task.
    assert _retry_after("inf") == 0.0 and _retry_after("nan") == 0.0
    assert _retry_after("1e12") == 86_400.0 and _retry_after("-5") == 0.0
    assert _retry_after("2.5") == 2.5 and _retry_after(None) == 0.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # the gateway sends seconds


def test_ttls_below_a_millisecond_are_one_not_zero() -> None:
    from filters.jobs.store import _ms

    # int(0.0005 * 1000) == 0: idempotency silently off, a finished job deleted at once.
    assert _ms(0.0005) == 1 and _ms(0.0004) == 1 and _ms(1.0) == 1000 and _ms(1.0001) == 1001
