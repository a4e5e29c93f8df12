"""The error format and the one place that maps faults to statuses.

Every refusal is ``{"error": {"type": ..., "message": ...}}``. gRPC callers get the matching
gRPC status (Envoy turns an immediate response with ``grpc_status`` into a trailers-only reply).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.api import Respond

# A dependency that is slow or gone, whichever client raised it: redis-py's own ConnectionError
# and TimeoutError are not the built-in ones, and a cluster with no node answering raises
# RedisClusterException.
_TIMEOUTS = (TimeoutError, RedisTimeoutError)
_UNREACHABLE = (ConnectionError, RedisConnectionError, RedisClusterException)

# Names the error type on every refusal (the processor's and Envoy's own, see bootstrap).
ERROR_HEADER = "x-floodwall-error"

# gRPC codes of an answer that say the model failed or is congested, as a 5xx or a 429 does
# (UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE, DATA_LOSS); a gRPC
# answer's HTTP status is 200 whatever happened.
GRPC_FAILED = frozenset({"2", "4", "8", "13", "14", "15"})

# gRPC status code -> the HTTP status that means the same (google.rpc.Code's documented
# mapping): how a gRPC answer counts in metrics and traces, where its HTTP status is 200.
HTTP_OF_GRPC: dict[str, int] = {
    "1": 499, "2": 500, "3": 400, "4": 504, "5": 404, "6": 409, "7": 403, "8": 429,
    "9": 400, "10": 409, "11": 400, "12": 501, "13": 500, "14": 503, "15": 500, "16": 401,
}  # fmt: skip

# HTTP status -> gRPC status code (google.rpc.Code), following the gRPC HTTP mapping doc.
GRPC_STATUS: dict[int, int] = {
    400: 3,  # INVALID_ARGUMENT
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 5,  # NOT_FOUND
    405: 12,  # UNIMPLEMENTED
    408: 4,  # DEADLINE_EXCEEDED
    409: 10,  # ABORTED
    412: 9,  # FAILED_PRECONDITION
    413: 8,  # RESOURCE_EXHAUSTED
    415: 3,  # INVALID_ARGUMENT
    422: 3,  # INVALID_ARGUMENT
    429: 8,  # RESOURCE_EXHAUSTED
    431: 8,  # RESOURCE_EXHAUSTED
    500: 13,  # INTERNAL
    501: 12,  # UNIMPLEMENTED
    502: 14,  # UNAVAILABLE
    503: 14,  # UNAVAILABLE
    504: 4,  # DEADLINE_EXCEEDED
}
# Any other status: 2 (UNKNOWN), as the gRPC mapping doc says.

JSON_HEADERS = {"content-type": "application/json"}


def error_body(type_: str, message: str) -> bytes:
    return orjson.dumps({"error": {"type": type_, "message": message}})


def error(
    status: int,
    type_: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    retry_after_s: float | None = None,
) -> Respond:
    """A refusal in the documented format. ``type_`` is a stable machine-readable word."""
    out = dict(JSON_HEADERS)
    out[ERROR_HEADER] = type_
    if retry_after_s is not None:
        out["retry-after"] = str(max(1, math.ceil(retry_after_s)))  # never before it is due
    if headers:
        out.update(headers)
    return Respond(
        status=status,
        body=error_body(type_, message),
        headers=out,
        grpc_status=GRPC_STATUS.get(status, 2),  # 2 = UNKNOWN
        message=message,
    )


class FilterFault(Exception):
    """Raise from a filter to fail with a specific status (the chain still counts it)."""

    status = 500
    type_ = "internal_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DependencyUnavailable(FilterFault):
    """A backing service (Redis, Triton, ...) is down or too slow."""

    status = 503
    type_ = "dependency_unavailable"


def fault_kind(exc: BaseException) -> str:
    """A bounded label for metrics: the exception class name for our faults, else a family."""
    if isinstance(exc, FilterFault):
        return type(exc).__name__
    if isinstance(exc, _TIMEOUTS):
        return "timeout"
    if isinstance(exc, (*_UNREACHABLE, OSError)):
        return "connection"
    return "exception"


def fault_response(exc: BaseException) -> Respond:
    """Maps a fault to the client's answer. Internal detail stays in logs, not in the body."""
    if isinstance(exc, FilterFault):
        return error(exc.status, exc.type_, str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, _TIMEOUTS):
        return error(503, "dependency_timeout", "a dependency timed out", retry_after_s=1)
    if isinstance(exc, _UNREACHABLE):
        return error(503, "dependency_unavailable", "a dependency is unavailable", retry_after_s=1)
    return error(500, "internal_error", "internal error in the gateway")
