"""`floodwall up` as a user runs it: a subprocess, real children, signals, one-line errors."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.runtime import port_free
from tests.helpers import AUTH, alive_mentioning, stack_config

pytestmark = pytest.mark.e2e

FLOODWALL = [sys.executable, "-m", "proxy.cli"]


def _write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    p = tmp_path / "fw.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_up_serves_a_sample_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    from proxy import models

    models.build()
    cfg = stack_config(tmp_path / "run", echo_port=9)
    path = _write(tmp_path, cfg)
    with subprocess.Popen(
        [*FLOODWALL, "up", "-c", str(path), "--sample"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        _run_up(proc, cfg, tmp_path)


def _run_up(proc: subprocess.Popen[str], cfg: dict[str, Any], tmp_path: Path) -> None:
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("ready"):
            break
    out = "".join(lines)
    assert "ready" in out, out
    assert "sample: POST /v1/embeddings" in out and "384 floats" in out, out
    assert f"http://127.0.0.1:{cfg['listener']['port']}" in out
    url = f"http://127.0.0.1:{cfg['listener']['port']}/v1/embeddings"
    r = httpx.post(url, json={"model": "embedder", "input": "hi"}, headers=AUTH, timeout=30)
    assert r.status_code == 200

    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    run_dir = str(tmp_path / "run")
    assert alive_mentioning(run_dir) == [], "children left behind"
    for key in ("http_port", "grpc_port", "metrics_port"):
        assert port_free("127.0.0.1", cfg["triton"][key])
    assert port_free("127.0.0.1", cfg["listener"]["port"])


def _up_error(tmp_path: Path, cfg: dict[str, Any], env: dict[str, str] | None = None) -> str:
    path = _write(tmp_path, cfg)
    r = subprocess.run(
        [*FLOODWALL, "up", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert r.returncode != 0
    err = r.stderr.strip()
    assert err.count("\n") == 0, f"not one line: {err!r}"
    assert err.startswith("floodwall: error:")
    assert alive_mentioning(str(tmp_path / "run")) == []
    return err


def test_taken_port_is_a_one_line_error(tmp_path: Path) -> None:
    cfg = stack_config(tmp_path / "run", echo_port=9, triton=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", cfg["listener"]["port"]))
        s.listen()
        err = _up_error(tmp_path, cfg)
    assert f"port {cfg['listener']['port']} (listener.port)" in err


def test_bad_config_is_a_one_line_error_naming_the_field(tmp_path: Path) -> None:
    cfg = stack_config(tmp_path / "run", echo_port=9, triton=False)
    cfg["processor"]["processes"] = 0
    err = _up_error(tmp_path, cfg)
    assert "processor.processes" in err


def test_missing_binary_is_a_one_line_error_naming_the_fix(tmp_path: Path) -> None:
    cfg = stack_config(tmp_path / "run", echo_port=9, triton=False)
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    err = _up_error(tmp_path, cfg, env)
    assert "redis-server not found" in err and "apt-get install" in err


def test_model_that_fails_to_load_is_a_one_line_error(tmp_path: Path) -> None:
    from proxy.config import REPO_ROOT

    repo = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "triton_models" / "embedder", repo / "embedder")
    (repo / "embedder" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('broken on purpose')\n"
    )
    cfg = stack_config(tmp_path / "run", echo_port=9)
    cfg["triton"]["model_repository"] = str(repo)
    err = _up_error(tmp_path, cfg)
    assert "Triton could not load a model" in err and "embedder" in err
