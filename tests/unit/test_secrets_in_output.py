"""Secrets in the config stay out of what ``floodwall up`` prints, out of its children's
command lines (which any local user can read with ``ps``) and out of config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import runtime
from proxy.config import ConfigError, load_config, parse_config
from proxy.runtime import Child, Stack
from tests.helpers import local_config_dict

PASSWORD = "Sup3rSecretPw"


def _started(tmp_path: Path, redis_url: str) -> tuple[Stack, list[list[str]]]:
    """A stack whose processors and worker were 'started': their command lines, unrun."""
    data = local_config_dict()
    data["redis"] = {"url": redis_url}
    stack = Stack(parse_config(data), tmp_path / "fw.yaml", tmp_path, say=lambda _: None)
    argvs: list[list[str]] = []

    def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        argvs.append(argv)
        return Child(name, None, tmp_path / f"{name}.log")  # type: ignore[arg-type]

    stack._spawn = spawn  # type: ignore[method-assign]
    stack._wait = lambda *a, **k: None  # type: ignore[method-assign]
    if redis_url == "local":
        stack.redis_url = f"unix://{tmp_path}/redis.sock"  # what start_redis leaves
    else:
        stack.start_redis()
    stack.start_processors()
    stack.start_worker()
    return stack, argvs


def test_a_configured_redis_password_is_neither_printed_nor_on_a_command_line(
    tmp_path: Path,
) -> None:
    stack, argvs = _started(tmp_path, f"redis://default:{PASSWORD}@redis.internal:6379/0")
    assert [a[3] for a in argvs] == ["serve", "worker"]
    # The children read redis.url from the config file themselves.
    assert not [a for a in argvs if PASSWORD in " ".join(a) or "--redis-url" in a]
    assert ("Redis", "redis://default:***@redis.internal:6379/0") in stack.endpoints()
    assert PASSWORD not in repr(stack.endpoints())


def test_the_private_redis_socket_is_still_passed_to_the_children(tmp_path: Path) -> None:
    _, argvs = _started(tmp_path, "local")
    sock = f"unix://{tmp_path}/redis.sock"
    assert [a[-2:] for a in argvs] == [["--redis-url", sock], ["--redis-url", sock]]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://default:pw@h:6379/0", "redis://default:***@h:6379/0"),
        ("rediss://:pw@h", "rediss://:***@h"),
        ("redis://u:p@ss@h", "redis://u:***@h"),  # an unquoted "@" in the password
        ("redis://h/0?db=1&password=pw", "redis://h/0?db=1&password=***"),
        ("unix:///run/r.sock?password=pw", "unix:///run/r.sock?password=***"),
        ("unix:///run/r.sock", "unix:///run/r.sock"),
        ("redis://user@[::1]:6379", "redis://user@[::1]:6379"),
        ("redis://:pw@n1:7000,redis://:pw2@n2:7001", "redis://:***@n1:7000,redis://:***@n2:7001"),
    ],
)
def test_redacted_url_hides_the_password_wherever_redis_reads_it(url: str, shown: str) -> None:
    assert runtime.redacted_url(url) == shown


# --- config errors ----------------------------------------------------------------------------


def _error(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FW_TEST_SECRET", 'Hun"ter2: x')
    path = tmp_path / "fw.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


def test_a_secret_that_breaks_the_yaml_is_not_quoted_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # yaml's own message quotes the offending line, the expanded secret in it.
    message = _error(tmp_path, 'redis: {url: "redis://:${FW_TEST_SECRET}@h"}\n', monkeypatch)
    assert "Hun" not in message and "ter2" not in message
    assert "line 1" in message and "needs quotes" in message


@pytest.mark.parametrize(
    "text",
    [
        # redis-py's own error quotes the piece of the URL it could not read.
        "redis: {url: 'redis://:Hunter2#x@redis.internal:6379'}\n",
        "redis: {url: 'redis://:a@n1:7000,redis://:Hunter2/x@n2:7001', cluster: true}\n",
        "tracing: {otlp_endpoint: 'user:Hunter2@collector:4317'}\n",
    ],
    ids=["redis-url", "cluster-urls", "otlp"],
)
def test_config_errors_do_not_repeat_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    message = _error(tmp_path, text, monkeypatch)
    assert "Hunter2" not in message, message


def test_a_webhook_prefix_with_credentials_is_refused_without_them() -> None:
    from proxy.api import Deps
    from proxy.config import FilterConfig
    from proxy.registry import build_filters

    prefix = "https://svc:Hunter2@hooks.example.com/"
    params = {"webhook": {"allowed_prefixes": [prefix]}}
    with pytest.raises(ConfigError, match="no user") as err:
        build_filters([FilterConfig(name="jobs", type="jobs", params=params)], Deps())
    assert "Hunter2" not in str(err.value)


def test_a_worker_key_with_a_newline_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from filters.jobs.worker import jobs_params, make_caller
    from proxy.config import load_config as load

    cfg = load()  # the shipped config: its worker calls through Envoy with FLOODWALL_WORKER_KEY
    p = jobs_params(cfg)
    assert p is not None
    monkeypatch.setenv(p.worker.key_env, "fw-demo-worker\n")  # as read from a file
    with pytest.raises(ConfigError, match="trailing newline") as err:
        make_caller(cfg, p.model_copy(update={"worker": p.worker.model_copy(update={"key": None})}))
    assert "fw-demo-worker" not in str(err.value)


# --- API keys through the shipped chain ------------------------------------------------------

API_KEY = "sk-live-SECRETKEY-0123456789"


async def test_an_api_key_stays_out_of_answers_logs_metrics_and_spans(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The shipped chain, its Redis unreachable (every fallback and error path logs), a key
    sent right, wrong and misformatted on each API: the key is nowhere but where it came in."""
    import asyncio
    import hashlib
    import logging

    from prometheus_client import REGISTRY, generate_latest

    from proxy import logs
    from proxy.api import Deps
    from proxy.process import make_redis
    from proxy.registry import build_filters
    from proxy.testing import Harness, UpstreamReply
    from proxy.tracing import Span, Tracer

    data = local_config_dict()
    data["redis"] = {"url": "redis://127.0.0.1:1"}
    for f in data["filters"]:
        if f["type"] == "auth":
            digest = hashlib.sha256(API_KEY.encode()).hexdigest()
            f["params"]["keys"].append({"id": "live", "sha256": digest, "tenant": "acme"})
        if f["type"] == "jobs":
            f["params"]["webhook"] = {"allowed_prefixes": ["https://hooks.example.com/"]}
    cfg = parse_config(data)
    redis = make_redis("redis://127.0.0.1:1", 200)
    deps = Deps(redis=redis, upstreams={n: u.base_url for n, u in cfg.upstreams.items()})
    filters = build_filters(cfg.filters, deps)
    h = Harness(cfg, filters)
    spans: list[Span] = []

    class Spans(Tracer):
        def end(self, span: Span) -> None:
            spans.append(span)

    h.chain.tracer = Spans("127.0.0.1:1", "fw")

    async def upstream(headers: dict[str, str], body: bytes) -> UpstreamReply:
        # Not an answer the translation reads: its 502 is one more error path to look at.
        return UpstreamReply(200, {"content-type": "application/json"}, b'{"outputs": []}')

    embed = b'{"model": "embedder", "input": "hi"}'
    bearer = {"authorization": f"Bearer {API_KEY}"}
    cases = [
        ("POST", "/v1/embeddings", bearer, embed),
        ("POST", "/v1/embeddings", {"authorization": f"Bearer {API_KEY}x"}, embed),
        ("POST", "/v1/embeddings", {"authorization": f"Basic {API_KEY}"}, b"{}"),
        ("POST", "/v1/embeddings", {**bearer, "prefer": "respond-async"}, embed),
        ("POST", "/v1/jobs", bearer, b'{"url": "/v1/embeddings", "body": {"input": "x"}}'),
        ("GET", "/v1/jobs/" + "a" * 32, bearer, None),
        ("POST", "/v1/chat/completions", bearer,
         b'{"model": "sim-llm", "messages": [{"role": "user", "content": "x"}], "stream": true}'),
        ("POST", "/v2/models/embedder/infer", bearer, b"{}"),
        ("POST", "/v1/jobs", {**bearer, "floodwall-webhook": "https://xn--a.com/"}, b"{}"),
        ("POST", "/v1/embeddings", {**bearer, "x-floodwall-tenant": "evil"}, embed),
    ]  # fmt: skip
    caplog.set_level(logging.DEBUG)
    formatter = logs.JsonFormatter()
    try:
        for method, path, headers, body in cases:
            r = await h.request(method, path, headers=headers, body=body, upstream=upstream)
            assert API_KEY not in r.body.decode("utf-8", "replace"), path
            assert not [v for v in r.headers.values() if API_KEY in v], path
            sent = (r.upstream_headers or {}).values()
            assert not [v for v in sent if API_KEY in v], path  # stripped before the model
        await asyncio.sleep(0.3)  # background work (fallback logs, Redis retries)
    finally:
        for f in filters:
            await f.stop()
        await redis.aclose()
    logged = "\n".join(formatter.format(rec) for rec in caplog.records)
    assert caplog.records and API_KEY not in logged
    assert API_KEY not in generate_latest(REGISTRY).decode()
    assert spans and not [s for s in spans if API_KEY in repr(s)]
