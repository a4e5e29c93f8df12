"""The only module that touches ext_proc protobufs: protos in, plain values out, and back.

Hot path: every request crosses here at least twice, so constant answers are prebuilt and
nothing is allocated that a ``Continue`` does not need.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3.http_status_pb2 import HttpStatus

from proxy.api import Continue, Decision, Headers, Mutate, Phase, Respond

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse
# Generated protobuf classes carry no type information; name what they are at least.
Message: TypeAlias = Any

_OVERWRITE = HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD

# Prebuilt "go on unchanged" answers, one per phase (protobuf serialises them fresh each time,
# so sharing the instance is safe).
_CONTINUE = {
    Phase.REQUEST_HEADERS: ProcessingResponse(request_headers=pb.HeadersResponse()),
    Phase.RESPONSE_HEADERS: ProcessingResponse(response_headers=pb.HeadersResponse()),
    Phase.REQUEST_BODY: ProcessingResponse(request_body=pb.BodyResponse()),
    Phase.RESPONSE_BODY: ProcessingResponse(response_body=pb.BodyResponse()),
}

_STREAM_RESPONSE = ProcessingMode(
    request_header_mode=ProcessingMode.SEND,
    response_header_mode=ProcessingMode.SEND,
    request_body_mode=ProcessingMode.NONE,
    response_body_mode=ProcessingMode.STREAMED,
    # A gRPC stream ends with its trailers, never with a last body chunk: without them the
    # processor could not tell a stream that ended from one the client left.
    response_trailer_mode=ProcessingMode.SEND,
)

TRAILERS = {
    "request_trailers": ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": ProcessingResponse(response_trailers=pb.TrailersResponse()),
}

PHASE_OF_FIELD = {
    "request_headers": Phase.REQUEST_HEADERS,
    "request_body": Phase.REQUEST_BODY,
    "response_headers": Phase.RESPONSE_HEADERS,
    "response_body": Phase.RESPONSE_BODY,
}


def headers_to_dict(msg: Message) -> Headers:
    """Envoy sends header values in ``raw_value`` (bytes); repeated names are joined with ','."""
    out: Headers = {}
    for h in msg.headers.headers:
        raw = h.raw_value
        v = raw.decode("utf-8", "replace") if raw else h.value
        k = h.key
        if k in out:
            out[k] = out[k] + "," + v
        else:
            out[k] = v
    return out


def _header_mutation(
    set_headers: Mapping[str, str], remove: tuple[str, ...] | list[str]
) -> Message:
    return pb.HeaderMutation(
        set_headers=[
            HeaderValueOption(
                header=HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE
            )
            for k, v in set_headers.items()
        ],
        remove_headers=list(remove),
    )


def response_for(phase: Phase, decision: Decision, *, grpc: bool = False) -> Message:
    if decision.__class__ is Continue:
        return _CONTINUE[phase]
    if isinstance(decision, Respond):
        return immediate(decision, grpc=grpc)
    assert isinstance(decision, Mutate)
    common = pb.CommonResponse()
    if decision.set_headers or decision.remove_headers:
        common.header_mutation.CopyFrom(
            _header_mutation(decision.set_headers, decision.remove_headers)
        )
    if decision.body is not None:
        common.body_mutation.body = decision.body
        if phase in (Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS):
            # Replacing the body from a headers phase needs CONTINUE_AND_REPLACE.
            common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
    if phase is Phase.REQUEST_HEADERS:
        return ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
    if phase is Phase.RESPONSE_HEADERS:
        out = ProcessingResponse(response_headers=pb.HeadersResponse(response=common))
        if decision.stream_response:
            # Only honoured in answer to a headers message (and with allow_mode_override).
            out.mode_override.CopyFrom(_STREAM_RESPONSE)
        return out
    if phase is Phase.REQUEST_BODY:
        return ProcessingResponse(request_body=pb.BodyResponse(response=common))
    return ProcessingResponse(response_body=pb.BodyResponse(response=common))


def immediate(r: Respond, *, grpc: bool) -> Message:
    """An Envoy immediate response. For gRPC callers Envoy sends a trailers-only reply whose
    grpc-status comes from ``grpc_status`` (else a gRPC client sees UNAVAILABLE for any 4xx)."""
    ir = pb.ImmediateResponse(
        status=HttpStatus(code=r.status),
        body=r.body,
        details=_details(r),
    )
    if r.headers:
        ir.headers.CopyFrom(_header_mutation(r.headers, ()))
    if grpc and r.grpc_status is not None:
        ir.grpc_status.status = r.grpc_status
    return ProcessingResponse(immediate_response=ir)


def _details(r: Respond) -> str:
    # Becomes %RESPONSE_CODE_DETAILS% in the access log: one token, no spaces (Envoy's rule).
    kind = r.headers.get("x-floodwall-error") or str(r.status)
    return "floodwall_" + "".join(c if c.isalnum() or c in "_-" else "_" for c in kind)
