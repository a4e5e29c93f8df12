"""The CLI's check / envoy-config commands, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FLOODWALL = [sys.executable, "-m", "proxy.cli"]


def test_check_accepts_the_shipped_config() -> None:
    r = subprocess.run([*FLOODWALL, "check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_check_rejects_a_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listener: {port: 0}\n")
    r = subprocess.run([*FLOODWALL, "check", "-c", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "listener.port" in r.stderr


def test_envoy_config_prints_a_bootstrap() -> None:
    r = subprocess.run([*FLOODWALL, "envoy-config"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    boot = json.loads(r.stdout)
    assert boot["admin"]["address"]["socket_address"]["port_value"] == 9901
    listener = boot["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert (listener["address"], listener["port_value"]) == ("127.0.0.1", 8080)


def test_check_refuses_a_model_repository_up_would_not_find(tmp_path: Path) -> None:
    cfg = tmp_path / "fw.yaml"
    cfg.write_text("triton: {model_repository: ../no_such_models}\n")
    r = subprocess.run([*FLOODWALL, "check", "-c", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2, r.stdout
    assert "triton.model_repository: no Triton models" in r.stderr
    # Named where the file says, not where the shipped examples' fallback would be.
    assert f"under {tmp_path.parent / 'no_such_models'}" in r.stderr
    cfg.write_text("triton: {model_repository: ../no_such_models, enabled: false}\n")
    r = subprocess.run([*FLOODWALL, "check", "-c", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_jobs_webhook_secret_prints_the_tenants_key(tmp_path: Path) -> None:
    import os

    import yaml

    from filters.jobs.worker import tenant_secret

    cfg = yaml.safe_load((Path(__file__).parents[2] / "examples" / "local.yaml").read_text())
    (jobs,) = [f for f in cfg["filters"] if f["type"] == "jobs"]
    jobs.setdefault("params", {})["webhook"] = {"allowed_prefixes": ["https://hooks.example.com/"]}
    path = tmp_path / "fw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [*FLOODWALL, "jobs", "webhook-secret", "-c", str(path), "--tenant", "acme"]
    env = {**os.environ, "FLOODWALL_WEBHOOK_SECRET": "s3cret"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == tenant_secret(b"s3cret", "acme").decode()
    env.pop("FLOODWALL_WEBHOOK_SECRET")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "FLOODWALL_WEBHOOK_SECRET is unset" in r.stderr


def test_jobs_status_says_why_it_cannot_read_the_queue() -> None:
    local = str(Path(__file__).parents[2] / "examples" / "local.yaml")
    cmd = [*FLOODWALL, "jobs", "status", "-c", local]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--redis-url" in r.stderr  # redis.url: local (up's own)
    password = "hunter2-not-shown"
    url = f"redis://:{password}@127.0.0.1:1"  # nothing listens on port 1
    r = subprocess.run([*cmd, "--redis-url", url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot read the queue from Redis" in r.stderr, r.stderr
    assert password not in r.stderr + r.stdout
