"""Secrets in the config stay out of what ``floodwall up`` prints and out of its children's
command lines (which any local user can read with ``ps``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import runtime
from proxy.config import parse_config
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
    ],
)
def test_redacted_url_hides_the_password_wherever_redis_reads_it(url: str, shown: str) -> None:
    assert runtime.redacted_url(url) == shown
