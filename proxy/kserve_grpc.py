"""The model a KServe gRPC call names, read from its request message as Triton reads it.

KServe gRPC names the model inside the protobuf message, not in the path. On a gRPC route
where a filter reads request bodies (a per-model rate limit, admission or breaker), Envoy
buffers each call's request and the chain reads the model here, before the filters' body
phase; elsewhere gRPC requests stream to Triton unread.

The message is parsed with Triton's own definitions (tritonclient's ``service_pb2``) by
protobuf's parser, under the rules Triton's server applies: the last ``model_name`` wins, a
field 1 of another wire type is an unknown field and skipped, a string must be UTF-8, and a
message either parses whole or not at all. So the model the policies count is the model
Triton runs; no message reads one way here and another way there (Envoy's own
grpc_field_extraction filter, tried in session 26, matched field 1 whatever its wire type).
A 512 KiB ModelInferRequest parses in ~15 µs (upb).

Only unary calls: ``ModelStreamInfer`` is a bidirectional stream whose requests cannot be
held until it ends, and each of its messages may name another model; the chain refuses it on
routes that read bodies (UNIMPLEMENTED), so streams need a route of their own.

``degrade`` and ``canary`` (proxy/steering.py) send a call to another model with
``with_model``: the message re-serialized naming it, so filters never see the protobufs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as kserve

from proxy import errors
from proxy.api import RequestContext, Respond

SERVICE = "/inference.GRPCInferenceService/"
STREAM_METHODS = frozenset({SERVICE + "ModelStreamInfer"})

# Unary methods that name a model, and the field that holds it (1 in each message).
_MODEL_FIELD: dict[str, tuple[Any, str]] = {
    SERVICE + "ModelInfer": (kserve.ModelInferRequest, "model_name"),
    SERVICE + "ModelReady": (kserve.ModelReadyRequest, "name"),
    SERVICE + "ModelMetadata": (kserve.ModelMetadataRequest, "name"),
    SERVICE + "ModelConfig": (kserve.ModelConfigRequest, "name"),
    SERVICE + "ModelStatistics": (kserve.ModelStatisticsRequest, "name"),
}

# What Triton's gRPC server decompresses (grpc core: "deflate" is the zlib format).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
ACCEPT_ENCODING = "identity,deflate,gzip"


@dataclass(slots=True)
class GrpcCall:
    """A call on a gRPC route that reads bodies (``ctx.state(GrpcCall)``, kept by the chain)."""

    encoding: str | None = None  # its grpc-encoding header: how its message is compressed
    message: Any = None  # its request message, parsed; None for a method naming no model
    field: str = ""  # the message's field that names the model


def call_model(call: GrpcCall, path: str, body: bytes, max_bytes: int) -> str | Respond | None:
    """The model a unary call's request ``body`` (gRPC framed: one message) names; None when
    the method names none (server health and metadata, a statistics call for all models);
    a Respond when the call cannot be what Triton would serve. Keeps the parsed message in
    ``call``.

    ``call.encoding`` is the call's grpc-encoding header; ``max_bytes`` bounds the message as
    sent and as decompressed (listener.max_request_bytes, the limit of an HTTP body)."""
    if len(body) > max_bytes:
        return errors.error(
            413, "request_too_large", f"the request message exceeds {max_bytes} bytes"
        )
    if len(body) < 5 or body[0] > 1:
        return _bad("the request is not one gRPC message")
    size = int.from_bytes(body[1:5], "big")
    if size != len(body) - 5:
        return _bad("a unary call carries exactly one message" if size < len(body) - 5
                    else "the request message is cut short")  # fmt: skip
    message: bytes | memoryview = memoryview(body)[5:]  # a view: the message may be MiBs
    if body[0] == 1:
        # As Triton's gRPC server (grpc core) reads it: exact names, no case folding.
        name = (call.encoding or "").strip()
        if name in ("", "identity"):
            return _bad("the message is flagged compressed, but the call names no grpc-encoding")
        wbits = _WBITS.get(name)
        if wbits is None:
            # The gRPC protocol's answer to a compression the server does not support.
            return errors.error(
                501, "unsupported_encoding",
                f"messages compressed with {name[:32]!r} are not accepted; use one of "
                f"{ACCEPT_ENCODING}",
                headers={"grpc-accept-encoding": ACCEPT_ENCODING},
            )  # fmt: skip
        inflate = zlib.decompressobj(wbits)
        try:
            message = inflate.decompress(message, max_bytes + 1)
        except zlib.error:
            return _bad(f"the request message is not valid {name}")
        if len(message) > max_bytes:
            return errors.error(
                413, "request_too_large",
                f"the request message exceeds {max_bytes} bytes once decompressed",
            )  # fmt: skip
        if not inflate.eof or inflate.unused_data:
            return _bad(f"the request message is not valid {name}")
    found = _MODEL_FIELD.get(path.split("?", 1)[0])
    if found is None:
        return None
    cls, field = found
    try:
        parsed = cls.FromString(message)
    except DecodeError:
        return _bad(f"the request message is not a valid {cls.DESCRIPTOR.name}")
    call.message, call.field = parsed, field
    model: str = getattr(parsed, field)
    return model or None


def on_grpc_route(ctx: RequestContext) -> bool:
    """Whether the request is on a KServe gRPC route. Not ``ctx.grpc`` (the content-type): a
    gRPC content-type on a KServe HTTP path is served by the HTTP route, whose model is in the
    path, and must meet that route's policies."""
    return ctx.route is not None and ctx.route.grpc


def upstream_model(ctx: RequestContext) -> str | None:
    """The model the call goes upstream to: the one its message names (or now names, after
    ``with_model``); None before the body phase or for a method naming no model."""
    message = ctx.state(GrpcCall).message if on_grpc_route(ctx) else None
    if message is None:
        return None
    return getattr(message, ctx.state(GrpcCall).field) or None


def with_model(ctx: RequestContext, model: str) -> bytes:
    """The call's request body naming ``model`` instead: the parsed message re-serialized
    (unknown fields kept), uncompressed (a gRPC message's flag says so, whatever the call's
    grpc-encoding). The call must name a model (``upstream_model`` is not None)."""
    call = ctx.state(GrpcCall)
    setattr(call.message, call.field, model)
    data: bytes = call.message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


def _bad(message: str) -> Respond:
    return errors.error(400, "invalid_request_error", message)
