"""Hot reload under load, end to end: a new key starts working after SIGHUP without a single
request failing meanwhile; an invalid config (found by the file watcher) and a change Envoy
would need a restart for are both rejected, and the config in force stays."""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.runtime import Stack
from tests.helpers import AUTH, stack_config, start_stack

pytestmark = pytest.mark.e2e

NEW = {"authorization": "Bearer fw-reloaded-key"}


@pytest.fixture
def stack(tmp_path: Path, echo_port: int) -> Iterator[tuple[Stack, dict[str, Any], Path]]:
    cfg = stack_config(tmp_path / "run", echo_port, triton=False, watch_config_s=0.2)
    path = tmp_path / "fw.yaml"
    s = start_stack(cfg, path)
    try:
        yield s, cfg, path
    finally:
        s.stop()


def _metric(s: Stack, name: str) -> float:
    p = s.cfg.processor
    text = httpx.get(f"http://{p.admin_address}:{p.admin_port}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _until(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_reload_under_load(stack: tuple[Stack, dict[str, Any], Path]) -> None:
    s, cfg, path = stack
    url = f"http://{s.cfg.listener.address}:{s.cfg.listener.port}/echo/load"
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                statuses.append(c.get(url, headers=AUTH).status_code)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # the load is running before the first reload
        assert httpx.get(url, headers=NEW).status_code == 401
        # 1. A new key, applied on SIGHUP (floodwall up passes it on to the processors).
        good = copy.deepcopy(cfg)
        auth = next(f for f in good["filters"] if f["type"] == "auth")
        auth["params"]["keys"].append({"id": "reloaded", "tenant": "reloaded",
            "sha256": hashlib.sha256(b"fw-reloaded-key").hexdigest()})  # fmt: skip
        path.write_text(yaml.safe_dump(good))
        s.reload()
        assert _until(lambda: httpx.get(url, headers=NEW).status_code == 200)
        applied = _metric(s, 'floodwall_config_reloads_total{result="applied"}')
        assert applied >= 1
        # 2. An invalid config, seen by the file watcher: rejected, the new key still works.
        bad = copy.deepcopy(good)
        next(f for f in bad["filters"] if f["type"] == "auth")["params"]["keys"][0]["sha256"] = "x"
        path.write_text(yaml.safe_dump(bad))
        assert _until(lambda: _metric(s, 'floodwall_config_reloads_total{result="rejected"}') >= 1)
        # 3. A change only a restart can apply (Envoy's listener): rejected as well.
        moved = copy.deepcopy(good)
        moved["listener"]["port"] += 1
        path.write_text(yaml.safe_dump(moved))
        s.reload()
        assert _until(lambda: _metric(s, 'floodwall_config_reloads_total{result="rejected"}') >= 2)
        assert httpx.get(url, headers=NEW).status_code == 200
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(statuses) > 20
    assert set(statuses) == {200}, {c: statuses.count(c) for c in set(statuses)}
    log = (s.runtime_dir / "processor-0.log").read_text()
    assert '"message": "config_reload applied"' in log and "only `filters` reload" in log
