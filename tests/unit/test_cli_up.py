"""``floodwall up`` (and the other commands) failing or interrupted during start-up: one line
on stderr, exit code 2, and no child left running (they run in their own sessions, so nothing
else would stop them). Each case is ``main()`` in a subprocess, with the fault patched in, so
that the signal handlers ``up`` installs stay out of pytest's process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import REPO_ROOT
from tests.helpers import alive_mentioning, free_ports

_RUN = """
import sys
import proxy.models, proxy.runtime, proxy.triton
{patch}
from proxy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _config(tmp_path: Path, *, triton: bool = True, **extra: Any) -> Path:
    listener, admin, padmin, th, tg, tm = free_ports(6)
    cfg = {
        "listener": {"address": "127.0.0.1", "port": listener},
        "admin": {"address": "127.0.0.1", "port": admin},
        "processor": {"admin_port": padmin},
        "redis": {"url": "local"},
        "triton": {"enabled": triton, "model_repository": str(REPO_ROOT / "triton_models"),
                   "http_port": th, "grpc_port": tg, "metrics_port": tm},
        "runtime_dir": str(tmp_path / "run"),
        "upstreams": {"t": {"endpoints": [{"address": "127.0.0.1", "port": th}]}},
        "routes": [{"name": "kserve_http", "match": {"prefix": "/v2"}, "upstream": "t"}],
        **extra,
    }  # fmt: skip
    path = tmp_path / "fw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _popen(patch: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-u", "-c", _RUN.format(patch=patch), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _run(patch: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    with _popen(patch, *args, env=env) as proc:
        _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _one_line_error(err: str) -> str:
    err = err.strip()
    assert err.count("\n") == 0, f"not one line: {err!r}"
    assert err.startswith("floodwall: error:"), err
    return err


@pytest.fixture(autouse=True)
def _reap(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing case left running (its own grandchildren) does not outlive it."""
    yield
    for pid in alive_mentioning(str(tmp_path / "run")):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _no_children_left(tmp_path: Path) -> None:
    assert alive_mentioning(str(tmp_path / "run")) == [], "children left running"


def test_up_without_triton_is_one_line_and_stops_redis(tmp_path: Path) -> None:
    patch = (
        "proxy.models.is_built = lambda *a, **k: True\n"
        "def missing():\n"
        "    raise proxy.triton.TritonNotFoundError(\n"
        "        'tritonserver binary not found at X: pip install nvidia-pytriton==0.7.0')\n"
        "proxy.triton.find_tritonserver = missing\n"
    )
    code, err = _run(patch, "up", "-c", str(_config(tmp_path)))
    assert code == 2
    assert "pip install nvidia-pytriton" in _one_line_error(err)
    _no_children_left(tmp_path)


def test_an_unexpected_fault_during_up_is_one_line_and_stops_what_started(
    tmp_path: Path,
) -> None:
    patch = (
        "def broken(self):\n"
        "    raise RuntimeError('a fault\\nnobody foresaw')\n"
        "proxy.runtime.Stack.start_processors = broken\n"
    )
    code, err = _run(patch, "up", "-c", str(_config(tmp_path, triton=False)))
    assert code == 2
    assert "RuntimeError: a fault nobody foresaw" in _one_line_error(err)
    _no_children_left(tmp_path)


def test_ctrl_c_during_up_stops_at_once(tmp_path: Path) -> None:
    # A Triton that takes its time (the real wait allows 180 s); its command line names the
    # runtime dir so that the check below finds it.
    patch = (
        "import sys as _sys\n"
        "def slow_triton(self):\n"
        "    child = self._spawn('triton', [_sys.executable, '-c', 'import time; "
        "time.sleep(100)', str(self.runtime_dir)])\n"
        "    self._wait(child, lambda: False, 60, 'GET /v2/health/ready')\n"
        "proxy.runtime.Stack.start_triton = slow_triton\n"
    )
    with _popen(patch, "up", "-c", str(_config(tmp_path))) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip().startswith("redis"):
                break
        time.sleep(0.5)  # the triton step has begun waiting
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
        took = time.monotonic() - t0
    assert proc.returncode == 2 and took < 3, (proc.returncode, took)
    assert "interrupted" in _one_line_error(err)
    _no_children_left(tmp_path)


_BAD_JOBS = [{"name": "jobs", "type": "jobs", "params": {"max_depht": 10}}]


def test_bad_jobs_params_are_one_line_for_up_and_worker(tmp_path: Path) -> None:
    path = _config(tmp_path, triton=False, filters=_BAD_JOBS)
    for args in (["up", "-c", str(path)], ["worker", "-c", str(path), "--redis-url",
                                           "redis://127.0.0.1:1"]):  # fmt: skip
        code, err = _run("", *args)
        assert code == 2, err
        assert "filters[0] (jobs): params.max_depht: Extra inputs" in _one_line_error(err), args
    _no_children_left(tmp_path)


def test_check_without_envoy_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    # Neither next to the interpreter (the venv's bin) nor on PATH.
    patch = f"sys.executable = {str(tmp_path / 'python')!r}\n"
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    code, err = _run(patch, "check", env=env)
    assert code == 2
    assert "envoy not found: install it" in _one_line_error(err)


def test_stop_goes_by_role_whatever_order_restarts_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A restarted child goes to the end of the list: a Redis started again was stopped first,
    # before the worker handed its jobs back and the processors settled.
    from proxy import runtime
    from proxy.config import parse_config

    stack = runtime.Stack(parse_config({}), tmp_path / "fw.yaml", tmp_path, say=lambda _: None)
    # Start order, then Redis restarted (restart_dead appends it).
    for name in ["triton", "processor-0", "processor-1", "envoy", "worker", "redis"]:
        proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
        stack.children.append(runtime.Child(name, proc, tmp_path / f"{name}.log"))
    termed: list[str] = []
    real = runtime._signal_group

    def record(proc: subprocess.Popen[bytes], sig: int) -> None:
        if sig == signal.SIGTERM:
            termed.append(next(c.name for c in stack.children if c.proc is proc))
        real(proc, sig)

    monkeypatch.setattr(runtime, "_signal_group", record)
    stack.stop(timeout=5)
    assert termed == ["worker", "envoy", "processor-0", "processor-1", "triton", "redis"]
