"""The one mapping from faults to answers (proxy/errors.py)."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy import errors


@pytest.mark.parametrize(
    ("exc", "status", "type_", "kind"),
    [
        (TimeoutError(), 503, "dependency_timeout", "timeout"),
        # redis-py's own exceptions are not the built-in ones: they were 500 internal_error.
        (RedisTimeoutError(), 503, "dependency_timeout", "timeout"),
        (ConnectionRefusedError(), 503, "dependency_unavailable", "connection"),
        (RedisConnectionError(), 503, "dependency_unavailable", "connection"),
        (RedisClusterException("no node"), 503, "dependency_unavailable", "connection"),
        (ResponseError("WRONGTYPE"), 500, "internal_error", "exception"),  # a bug, not an outage
        (FileNotFoundError(), 500, "internal_error", "connection"),
        (ValueError(), 500, "internal_error", "exception"),
    ],
)
def test_faults_map_to_statuses(exc: BaseException, status: int, type_: str, kind: str) -> None:
    r = errors.fault_response(exc)
    assert r.status == status
    assert r.body is not None and type_.encode() in r.body
    assert errors.fault_kind(exc) == kind


def test_answers_the_gateway_gives_are_counted_by_error_type() -> None:
    # By status alone, not_found and job_not_found (or overloaded and rate_limit_unavailable)
    # could not be told apart.
    from prometheus_client import REGISTRY

    from proxy import metrics
    from proxy.api import Respond

    def count(kind: str) -> float:
        labels = {"route": "r", "filter": "f", "status": "404", "type": kind}
        return REGISTRY.get_sample_value("floodwall_responses_total", labels) or 0.0

    before = count("job_not_found"), count("none")
    metrics.count_response("r", "f", errors.error(404, "job_not_found", "no job"))
    metrics.count_response("r", "f", Respond(404, b"{}"))
    assert (count("job_not_found"), count("none")) == (before[0] + 1, before[1] + 1)
