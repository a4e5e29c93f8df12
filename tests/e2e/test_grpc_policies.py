"""Per-model policies on KServe gRPC, end to end (real Envoy, processor, Redis and Triton):
on a gRPC route whose filters need the model, the chain reads each unary call's model from
its protobuf message as Triton does, so a per-model rate limit counts the model Triton runs,
however the message is crafted or compressed; the canary sends a call to its target by
rewriting the message; streams are refused there; oversized and unparseable messages are
refused by the gateway."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2

from proxy.runtime import Stack
from tests.helpers import (
    AUTH,
    echo_server,
    infer_request,
    metric_total,
    raw_model_infer,
    stack_config,
    start_stack,
)

pytestmark = pytest.mark.e2e

TEXT = b"a sentence"
RAW = len(TEXT).to_bytes(4, "little") + TEXT
LIMITED, FREE, ALIAS = "embedder_int8", "embedder", "embedder_next"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d: Path = tmp_path_factory.mktemp("grpc_policies")
    with echo_server() as echo_port:
        cfg = stack_config(d / "run", echo_port)
        limit = {"name": "int8_calls", "key": ["key_id", "model"], "rate": 3, "burst": 3,
                 "period": 3600, "when": {"models": [LIMITED]}}  # fmt: skip
        cfg["filters"] += [
            {"name": "grpc_limits", "type": "rate_limit", "routes": ["kserve_grpc"],
             "params": {"limits": [limit]}},
            {"name": "grpc_admission", "type": "admission", "routes": ["kserve_grpc"],
             "params": {"models": [FREE]}},
            {"name": "grpc_breaker", "type": "breaker", "routes": ["kserve_grpc"],
             "params": {"models": [FREE]}},
            # A name clients call that the canary sends, all of it, to a model Triton has.
            {"name": "grpc_canary", "type": "canary", "routes": ["kserve_grpc"],
             "params": {"splits": {ALIAS: {"sticky": "none",
                                           "targets": [{"model": FREE, "weight": 1}]}}}},
        ]  # fmt: skip
        s = start_stack(cfg, d / "fw.yaml")
        try:
            yield s
        finally:
            s.stop()


def _target(s: Stack) -> str:
    return f"{s.cfg.listener.address}:{s.cfg.listener.port}"


def _served_by(s: Stack, message: bytes, **kw: Any) -> str:
    out = raw_model_infer(_target(s), message, **kw)
    assert isinstance(out, bytes), out
    return str(service_pb2.ModelInferResponse.FromString(out).model_name)


def _refused(s: Stack, message: bytes, **kw: Any) -> tuple[Any, str]:
    out = raw_model_infer(_target(s), message, **kw)
    assert isinstance(out, grpc.RpcError), "served"
    return out.code(), dict(out.trailing_metadata() or ())["x-floodwall-error"]


def _field1(model: str) -> bytes:
    return b"\x0a" + bytes([len(model)]) + model.encode()


def test_a_per_model_limit_counts_the_model_triton_runs(stack: Stack) -> None:
    # Before: a limit keyed by model was refused at start on gRPC routes (the model unread).
    for _ in range(3):
        assert _served_by(stack, infer_request(LIMITED, RAW)) == LIMITED
    over = (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited")
    assert _refused(stack, infer_request(LIMITED, RAW)) == over
    assert _served_by(stack, infer_request(FREE, RAW)) == FREE  # another model: not counted
    # Crafted messages: whatever a message shows first, the model Triton runs is the one
    # counted. Triton takes the last model_name, and a field 1 that is not a string is no
    # model_name to it (Envoy's grpc_field_extraction read the first, of any wire type).
    assert _refused(stack, _field1(FREE) + infer_request(LIMITED, RAW)) == over
    assert _refused(stack, b"\x08\x05" + infer_request(LIMITED, RAW)) == over
    assert _served_by(stack, infer_request(LIMITED, RAW) + _field1(FREE)) == FREE
    # Compressed, the message is read once inflated.
    gzip = {"compression": grpc.Compression.Gzip}
    long = TEXT * 20
    raw = len(long).to_bytes(4, "little") + long
    assert _refused(stack, infer_request(LIMITED, raw), **gzip) == over
    assert _served_by(stack, infer_request(FREE, raw), **gzip) == FREE


def test_admission_per_model_sees_grpc_calls(stack: Stack) -> None:
    metrics = f"http://127.0.0.1:{stack.cfg.processor.admin_port}/metrics"
    name = "floodwall_admission_decisions_total"
    before = metric_total(metrics, name, model=FREE)
    for _ in range(3):
        assert _served_by(stack, infer_request(FREE, RAW)) == FREE
    assert metric_total(metrics, name, model=FREE) == before + 3
    assert metric_total(metrics, name, model=LIMITED) == 0  # not a model it watches


def test_streams_are_refused_on_a_route_that_reads_messages(stack: Stack) -> None:
    # Held like a unary call, a ModelStreamInfer stream would wait for its client to close its
    # side, and its client waits for answers first; each message may also name a model. The
    # client here keeps its side open: the refusal must come at once, not at the timeout.
    done = threading.Event()

    def messages() -> Iterator[bytes]:
        yield infer_request(FREE, RAW)
        done.wait(30)  # the side stays open until the test ends

    t0 = time.monotonic()
    try:
        with grpc.insecure_channel(_target(stack)) as channel:
            call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
            responses = call(messages(), timeout=20,
                             metadata=[("authorization", AUTH["authorization"])])  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                list(responses)
    finally:
        done.set()
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert dict(refused.value.trailing_metadata())["x-floodwall-error"] == "not_implemented"
    assert time.monotonic() - t0 < 10


def test_oversized_and_unparseable_messages_are_refused_by_the_gateway(stack: Stack) -> None:
    limit = stack.cfg.listener.max_request_bytes
    too_large = (grpc.StatusCode.RESOURCE_EXHAUSTED, "request_too_large")
    metrics = f"http://127.0.0.1:{stack.cfg.processor.admin_port}/metrics"
    seen = metric_total(metrics, "floodwall_requests_total", route="kserve_grpc")
    # Over max_request_bytes as sent: Envoy's buffer filter refuses it before the processor
    # (RESOURCE_EXHAUSTED by its local reply mapper; Envoy's own mapping says UNKNOWN).
    # Without the buffer filter, ext_proc held up to 8-16 MiB of a call for the processor.
    for size in (limit + 1, 32 << 20):
        assert _refused(stack, infer_request(FREE, b"x" * size)) == too_large, size
    assert metric_total(metrics, "floodwall_requests_total", route="kserve_grpc") == seen
    # Small as sent, over the limit inflated: the processor's refusal.
    bomb = infer_request(FREE, bytes(4 * limit))
    assert _refused(stack, bomb, compression=grpc.Compression.Gzip) == too_large
    out = raw_model_infer(_target(stack), bomb, compression=grpc.Compression.Gzip)
    assert "once decompressed" in out.details()
    bad = (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error")
    assert _refused(stack, b"\xff" * 16) == bad
    assert _refused(stack, infer_request(FREE, RAW)[:-3]) == bad


def test_the_canary_sends_a_call_to_its_target_by_rewriting_the_message(stack: Stack) -> None:
    with grpc.insecure_channel(_target(stack)) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for kw in ({}, {"compression": grpc.Compression.Gzip}):
            out, info = call.with_call(infer_request(ALIAS, RAW), timeout=30,
                                       metadata=[("authorization", AUTH["authorization"])],
                                       **kw)  # fmt: skip
            response = service_pb2.ModelInferResponse.FromString(out)
            assert response.model_name == FREE and len(response.raw_output_contents[0]) == 384 * 4
            assert dict(info.initial_metadata())["x-floodwall-canary"] == FREE
