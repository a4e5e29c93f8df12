"""Trace context handling: any traceparent a client sends is parsed or ignored, never a
crash; unsampled traces are not recorded; the chain's spans nest under the request's."""

from __future__ import annotations

import hashlib

import pytest

from proxy.api import Deps
from proxy.testing import Harness
from proxy.tracing import Tracer, parse_traceparent

KEY = {"authorization": "Bearer k"}
GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "value",
    ["", "garbage", "00-xyz-00f067aa0ba902b7-01", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f0-01",
     "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-" + "g" * 32 + "-" + "1" * 16
     + "-01", "\x00\x01", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"],
)  # fmt: skip
def test_malformed_traceparent_is_ignored(value: str) -> None:
    assert parse_traceparent(value) is None


def test_parse_and_sampling() -> None:
    tid, sid, sampled = parse_traceparent(GOOD) or (b"", b"", False)
    assert tid.hex() == GOOD[3:35] and sid.hex() == GOOD[36:52] and sampled
    t = Tracer("127.0.0.1:1", "x", sample_ratio=0.0)
    assert t.start_request("r", GOOD[:-2] + "00") is None  # the caller did not sample it
    assert t.start_request("r", None) is None  # ratio 0: no new traces
    span = t.start_request("r", GOOD)
    assert span is not None and span.trace_id.hex() == GOOD[3:35]
    assert span.parent_id is not None and span.parent_id.hex() == GOOD[36:52]


async def test_chain_spans_nest_and_go_upstream() -> None:
    from filters.auth.filter import AuthFilter

    auth = AuthFilter(
        AuthFilter.Params.model_validate(
            {"keys": [{"id": "a", "tenant": "t", "sha256": hashlib.sha256(b"k").hexdigest()}]}
        ),
        Deps(),
    )
    auth.name = "auth"
    h = Harness.for_filters([auth])
    tracer = Tracer("127.0.0.1:1", "x")
    h.chain.tracer = tracer
    r = await h.request("GET", "/v2/models/m", headers={"traceparent": GOOD})
    assert r.status == 401
    request = next(s for s in tracer._queue if s.name == "floodwall kserve_http")
    step = next(s for s in tracer._queue if s.name == "auth request_headers")
    assert step.parent_id == request.span_id and request.trace_id.hex() == GOOD[3:35]
    assert request.attrs["http.response.status_code"] == 401
    # An admitted request carries the processor's span upstream, in the same trace.
    r = await h.request("GET", "/v2/models/m", headers={"traceparent": GOOD, **KEY})
    assert r.status == 200 and r.upstream_headers is not None
    tp = r.upstream_headers["traceparent"]
    assert tp.split("-")[1] == GOOD[3:35] and tp.split("-")[2] != GOOD[36:52]
