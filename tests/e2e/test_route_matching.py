"""The processor chooses the route Envoy chooses, through the real Envoy and processor: a
gRPC route's ``grpc: {}`` match takes gRPC requests only, so anything else on its path goes on
to a later route in Envoy, and must meet that route's filters (auth) in the processor."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from tests.helpers import echo_server, free_port_block, free_ports, start_stack

pytestmark = pytest.mark.e2e

KEY = "fw-route-key"
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Envoy and one processor (no Triton, no Redis): a gRPC route without auth to a real
    gRPC server, then a catch-all route with auth to the echo upstream."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {"ModelInfer": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"grpc-ok")},
            )
        ]
    )
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    d = tmp_path_factory.mktemp("routes")
    listener, admin = free_ports(2)
    cfg: dict[str, Any] = {
        "listener": {"port": listener, "access_log": False},
        "admin": {"port": admin},
        "processor": {"admin_port": free_port_block(1)},
        "runtime_dir": str(d / "run"),
        "upstreams": {
            "g": {"protocol": "grpc", "health_check": None,
                  "endpoints": [{"address": "127.0.0.1", "port": grpc_port}]},
        },
        "routes": [
            {"name": "kgrpc", "match": {"prefix": "/inference.GRPCInferenceService/"},
             "api": "kserve_grpc", "upstream": "g", "retries": None},
            {"name": "other", "match": {"prefix": "/"}, "upstream": "echo", "retries": None},
        ],
        "filters": [
            {"name": "auth", "type": "auth", "routes": ["other"], "params": {"keys": [
                {"id": "a", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenant": "t"}]}},
        ],
    }  # fmt: skip
    with echo_server() as echo_port:
        cfg["upstreams"]["echo"] = {
            "endpoints": [{"address": "127.0.0.1", "port": echo_port}],
            "health_check": None,
        }
        stack = start_stack(cfg, Path(d / "floodwall.yaml"))
        try:
            yield f"127.0.0.1:{listener}"
        finally:
            stack.stop()
            server.stop(0)


@pytest.mark.parametrize("content_type", ["application/json", "application/grpc-web"])
def test_non_grpc_request_on_a_grpc_path_meets_the_next_routes_filters(
    gateway: str, content_type: str
) -> None:
    # Envoy forwards it on `other`; the processor used to run `kgrpc`'s filters (none) on it,
    # so it reached the upstream without an API key.
    url = f"http://{gateway}{GRPC_PATH}"
    r = httpx.post(url, content=b"{}", headers={"content-type": content_type}, timeout=10)
    assert r.status_code == 401, r.text
    r = httpx.post(
        url,
        content=b"{}",
        headers={"content-type": content_type, "authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["path"] == GRPC_PATH  # the echo upstream: Envoy's route `other`


def test_grpc_request_takes_the_grpc_route(gateway: str) -> None:
    with grpc.insecure_channel(gateway) as channel:
        call = channel.unary_unary(GRPC_PATH)
        assert call(b"x", timeout=10) == b"grpc-ok"  # no key: auth is not on this route
