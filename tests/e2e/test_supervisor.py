"""``floodwall up`` as a supervisor: a child that dies (a crashed Triton, a killed processor
or Envoy) is started again and the gateway serves again, while a child that keeps dying
stops the stack with its log named."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from proxy.runtime import MAX_RESTARTS, Child, Stack, StartupError
from tests.helpers import AUTH, echo_server, stack_config, start_stack

pytestmark = pytest.mark.e2e


def _child(s: Stack, name: str) -> Child:
    return next(c for c in s.children if c.name == name)


def _kill(s: Stack, name: str) -> None:
    proc = _child(s, name).proc
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _url(s: Stack) -> str:
    return f"http://{s.cfg.listener.address}:{s.cfg.listener.port}"


def _serves(s: Stack, path: str, body: object | None = None) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            r = (httpx.post(_url(s) + path, json=body, headers=AUTH, timeout=10) if body
                 else httpx.get(_url(s) + path, headers=AUTH, timeout=10))  # fmt: skip
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass  # Envoy itself was the one restarted
        assert time.monotonic() < deadline, f"{path} never served again"
        time.sleep(0.2)


def test_a_dead_child_is_started_again_and_a_crash_loop_stops(tmp_path: Path) -> None:
    with echo_server() as echo:
        s = start_stack(stack_config(tmp_path / "run", echo), tmp_path / "fw.yaml")
        try:
            embed = {"model": "embedder", "input": "still standing?"}
            _serves(s, "/v1/embeddings", embed)
            assert s.restart_dead() is None  # nothing died
            for name in ("triton", "processor-0", "envoy"):
                _kill(s, name)
                said = s.restart_dead()
                assert said is not None and said.startswith(f"{name} exited (-9)"), said
                assert said.endswith("started again")
                _serves(s, "/echo/a")
                _serves(s, "/v1/embeddings", {**embed, "input": f"after {name}"})
            for _ in range(MAX_RESTARTS - 1):  # processor-0 died once already
                _kill(s, "processor-0")
                assert s.restart_dead() is not None
            _kill(s, "processor-0")
            with pytest.raises(
                StartupError, match=rf"processor-0 exited .* {MAX_RESTARTS + 1} times"
            ):
                s.restart_dead()
        finally:
            s.stop()
