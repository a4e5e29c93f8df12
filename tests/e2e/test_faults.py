"""Components failing under the gateway: the processor killed or hung (with both
failure_mode_allow settings), Triton going down and coming back. Each case must give the
documented JSON error (or pass-through), never a hang."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from proxy.runtime import Child, Stack
from tests.helpers import AUTH, NO_CACHE, echo_server, self_signed_cert, stack_config, start_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    with echo_server() as port:
        yield port


def _stack(tmp_path: Path, echo_port: int, *, triton: bool, **processor: object) -> Stack:
    return start_stack(
        stack_config(tmp_path / "run", echo_port, triton=triton, message_timeout_ms=300,
                     **processor),
        tmp_path / "fw.yaml",
    )  # fmt: skip


def _url(s: Stack) -> str:
    return f"http://{s.cfg.listener.address}:{s.cfg.listener.port}"


def _child(s: Stack, name: str) -> Child:
    return next(c for c in s.children if c.name == name)


@pytest.mark.parametrize("allow", [False, True])
def test_processor_killed(tmp_path: Path, echo_port: int, allow: bool) -> None:
    s = _stack(tmp_path, echo_port, triton=False, failure_mode_allow=allow)
    try:
        assert httpx.get(f"{_url(s)}/echo/a", headers=AUTH).status_code == 200
        proc = _child(s, "processor-0").proc
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        t0 = time.monotonic()
        # A forged tenant and priority: with no processor to strip them, Envoy must.
        forged = {**AUTH, "x-floodwall-tenant": "other", "X-Floodwall-Priority": "critical"}
        r = httpx.get(f"{_url(s)}/echo/a", headers=forged, timeout=10)
        assert time.monotonic() - t0 < 5
        if allow:
            # Traffic passes unchecked: availability over policy, by configuration.
            assert r.status_code == 200
            seen = r.json()["headers"]
            assert not [k for k in seen if k.lower().startswith("x-floodwall-")], seen
        else:
            assert r.status_code == 500
            assert r.json()["error"]["type"] == "gateway_unavailable"
            # A gRPC caller: UNAVAILABLE, which clients retry (Envoy's own mapping of a 500
            # gave UNKNOWN).
            assert _grpc_live_status(s) == "StatusCode.UNAVAILABLE"
    finally:
        s.stop()


def _grpc_live_status(s: Stack) -> str:
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    client = tg.InferenceServerClient(f"{s.cfg.listener.address}:{s.cfg.listener.port}")
    try:
        client.is_server_live(headers=AUTH, client_timeout=10)
    except InferenceServerException as e:
        return str(e.status())
    finally:
        client.close()
    return "OK"


@pytest.mark.parametrize("allow", [False, True])
def test_processor_hung(tmp_path: Path, echo_port: int, allow: bool) -> None:
    s = _stack(tmp_path, echo_port, triton=False, failure_mode_allow=allow)
    proc = _child(s, "processor-0").proc
    try:
        assert httpx.get(f"{_url(s)}/echo/a", headers=AUTH).status_code == 200
        os.killpg(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        r = httpx.get(f"{_url(s)}/echo/a", headers=AUTH, timeout=10)
        elapsed = time.monotonic() - t0
        assert elapsed < 3, "a hung processor must cost message_timeout, not forever"
        if allow:
            assert r.status_code == 200
        else:
            assert r.status_code == 504
            assert r.json()["error"]["type"] == "gateway_timeout"
            assert _grpc_live_status(s) == "StatusCode.UNAVAILABLE"
        os.killpg(proc.pid, signal.SIGCONT)
        # It recovers once the processor runs again.
        for _ in range(50):
            r = httpx.get(f"{_url(s)}/echo/a", headers=AUTH, timeout=10)
            if r.status_code == 200 and "x-floodwall-tenant" in r.json()["headers"]:
                break
            time.sleep(0.1)
        assert r.json()["headers"].get("x-floodwall-tenant") == "demo"
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
        s.stop()


def test_triton_down_and_back(tmp_path: Path, echo_port: int) -> None:
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    from proxy import models

    models.build()
    cfg = stack_config(tmp_path / "run", echo_port, triton=True, message_timeout_ms=300)
    cache = next(f for f in cfg["filters"] if f["type"] == "cache")
    cache["params"]["routes"]["embeddings"].update(ttl_s=1, stale_if_error_s=3600)
    s = start_stack(cfg, tmp_path / "fw.yaml")
    body = {"model": "embedder", "input": "still there?"}
    kept = {"model": "embedder", "input": "an answer worth keeping"}
    try:
        assert (
            httpx.post(f"{_url(s)}/v1/embeddings", json=body, headers=NO_CACHE).status_code == 200
        )
        good = httpx.post(f"{_url(s)}/v1/embeddings", json=kept, headers=AUTH)
        assert good.status_code == 200
        time.sleep(1.2)  # past its 1 s TTL, inside its stale-if-error window
        triton = _child(s, "triton")
        os.killpg(triton.proc.pid, signal.SIGKILL)
        triton.proc.wait(10)
        s.children.remove(triton)

        t0 = time.monotonic()
        r = httpx.post(f"{_url(s)}/v1/embeddings", json=body, headers=NO_CACHE, timeout=30)
        assert time.monotonic() - t0 < 5
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "upstream_unavailable"
        assert int(r.headers["retry-after"]) >= 1

        # The cache's stale-if-error: an answer it kept beats the error.
        r = httpx.post(f"{_url(s)}/v1/embeddings", json=kept, headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.headers["x-floodwall-cache"] == "stale", r.text
        assert r.json() == good.json()

        r = httpx.get(f"{_url(s)}/v2/models/embedder", headers=AUTH, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "upstream_unavailable"
        assert int(r.headers["retry-after"]) >= 1

        client = tg.InferenceServerClient(f"{s.cfg.listener.address}:{s.cfg.listener.port}")
        inp = tg.InferInput("TEXT", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"x"]], dtype=object))
        with pytest.raises(InferenceServerException) as e:
            client.infer("embedder", [inp], headers=AUTH, client_timeout=10)
        assert "UNAVAILABLE" in str(e.value.status())

        s.start_triton()  # restart: the gateway recovers without a restart of its own
        # Meanwhile the embedder's breaker may have opened (503 circuit_open): it lets trial
        # calls through every open_s and closes once they succeed.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = httpx.post(f"{_url(s)}/v1/embeddings", json=body, headers=NO_CACHE, timeout=30)
            if r.status_code == 200:
                break
            assert r.json()["error"]["type"] in ("upstream_unavailable", "circuit_open")
            time.sleep(0.1)
        assert r.status_code == 200, r.text
    finally:
        s.stop()


def _requests_on(s: Stack, index: int) -> float:
    p = s.cfg.processor
    text = httpx.get(f"http://{p.admin_address}:{p.admin_port + index}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("floodwall_requests_total{")
    )


def test_several_processors_over_tcp_share_the_traffic(tmp_path: Path, echo_port: int) -> None:
    from tests.helpers import free_port_block

    s = _stack(tmp_path, echo_port, triton=False, processes=2, transport="tcp",
               port=free_port_block(2))  # fmt: skip
    try:
        with httpx.Client(headers=AUTH) as c:
            for _ in range(60):
                r = c.get(f"{_url(s)}/echo/a")
                assert r.status_code == 200 and r.json()["headers"]["x-floodwall-tenant"] == "demo"
        assert _requests_on(s, 0) > 0 and _requests_on(s, 1) > 0
    finally:
        s.stop()


def test_tls_listener(tmp_path: Path, echo_port: int) -> None:
    crt, key = self_signed_cert(tmp_path)
    cfg = stack_config(tmp_path / "run", echo_port, triton=False)
    cfg["listener"]["tls"] = {"cert_file": str(crt), "key_file": str(key)}
    s = start_stack(cfg, tmp_path / "fw.yaml")
    try:
        import ssl

        tls = ssl.create_default_context(cafile=str(crt))
        url = f"https://localhost:{s.cfg.listener.port}/echo/tls"
        r = httpx.get(url, headers=AUTH, verify=tls)
        assert r.status_code == 200 and r.json()["headers"]["x-floodwall-tenant"] == "demo"
        r = httpx.get(url, verify=tls)
        assert r.status_code == 401
    finally:
        s.stop()


def test_breaker_opens_on_a_failing_upstream_and_stops_calling_it(
    tmp_path: Path, echo_port: int
) -> None:
    cfg = stack_config(tmp_path / "run", echo_port, triton=False)
    cfg["filters"] = [f for f in cfg["filters"] if f["type"] != "breaker"] + [
        {"name": "breaker", "type": "breaker", "routes": ["echo"],
         "params": {"min_calls": 5, "failure_rate": 0.5, "open_s": 30}},
    ]  # fmt: skip
    s = start_stack(cfg, tmp_path / "fw.yaml")
    try:
        with httpx.Client(base_url=_url(s), headers=AUTH, timeout=10) as c:
            # The upstream answers 503 (what Triton says when its queue is full).
            codes = [c.get("/echo/triton-queue-full").status_code for _ in range(5)]
            assert codes == [503] * 5
            r = c.get("/echo/fine")  # a healthy path, but the route's breaker is open
            assert r.status_code == 503 and r.json()["error"]["type"] == "circuit_open"
            assert int(r.headers["retry-after"]) >= 1
            metrics = httpx.get(f"http://127.0.0.1:{s.cfg.processor.admin_port}/metrics").text
            assert 'floodwall_breaker_state{breaker="echo"} 1.0' in metrics
    finally:
        s.stop()
