"""OpenTelemetry tracing end to end: a client's trace goes on through Envoy (its spans), the
processor (a span per request and per filter phase) and on to the upstream, all in one trace,
exported over OTLP/gRPC to a collector (here a real OTLP gRPC server in the test)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as svc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as svc_grpc

from proxy.runtime import Stack
from tests.helpers import AUTH, free_ports, stack_config, start_stack

pytestmark = pytest.mark.e2e

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Collector(svc_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []  # (service.name, span)
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            for rs in request.resource_spans:
                service = next(a.value.string_value for a in rs.resource.attributes
                               if a.key == "service.name")  # fmt: skip
                for ss in rs.scope_spans:
                    self.spans += [(service, s) for s in ss.spans]
        return svc.ExportTraceServiceResponse()


@pytest.fixture
def traced(tmp_path: Path, echo_port: int) -> Iterator[tuple[Stack, Collector]]:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    svc_grpc.add_TraceServiceServicer_to_server(collector, server)
    (port,) = free_ports(1)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    cfg = stack_config(tmp_path / "run", echo_port, triton=False)
    cfg["tracing"] = {"otlp_endpoint": f"127.0.0.1:{port}", "service_name": "fw-test"}
    stack = start_stack(cfg, tmp_path / "fw.yaml")
    try:
        yield stack, collector
    finally:
        stack.stop()
        server.stop(0)


def test_one_trace_from_the_client_through_the_processor_to_the_upstream(
    traced: tuple[Stack, Collector],
) -> None:
    stack, collector = traced
    url = f"http://{stack.cfg.listener.address}:{stack.cfg.listener.port}/echo/traced"
    r = httpx.get(url, headers={**AUTH, "traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"})
    assert r.status_code == 200
    # The upstream was called inside the same trace (Triton would continue it from here).
    upstream_tp = r.json()["headers"]["traceparent"]
    assert upstream_tp.split("-")[1] == TRACE

    def ours() -> list[tuple[str, Any]]:
        with collector.lock:
            return [(svc_, s) for svc_, s in collector.spans if s.trace_id.hex() == TRACE]

    deadline = time.monotonic() + 15  # Envoy flushes every 5 s, the processor every 1 s
    while time.monotonic() < deadline:
        services = {svc_ for svc_, _ in ours()}
        if {"fw-test", "fw-test-envoy"} <= services:
            break
        time.sleep(0.2)
    spans = ours()
    by_id = {s.span_id.hex(): (svc_, s) for svc_, s in spans}
    proc = [s for svc_, s in spans if svc_ == "fw-test"]
    request = next(s for s in proc if s.name == "floodwall echo")
    attrs = {a.key: a.value for a in request.attributes}
    assert attrs["http.response.status_code"].int_value == 200
    assert attrs["floodwall.tenant"].string_value == "demo"
    # Its parent is one of Envoy's spans (the ext_proc call), which leads up to the client's.
    parent = by_id.get(request.parent_span_id.hex())
    assert parent is not None and parent[0] == "fw-test-envoy", "not continued from Envoy"
    assert any(
        s.parent_span_id.hex() == CLIENT_SPAN for svc_, s in spans if svc_ == "fw-test-envoy"
    )
    # A span per filter phase, under the request's.
    steps = {s.name for s in proc if s.parent_span_id == request.span_id}
    assert "auth request_headers" in steps
