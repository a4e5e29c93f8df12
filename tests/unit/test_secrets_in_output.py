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
