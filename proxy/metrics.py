"""Prometheus metrics of the processor. Label values are bounded: route, filter and phase names
come from the config, kinds and statuses from small fixed sets; never a key, tenant secret or path.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from proxy.api import Respond

# Filter work is microseconds to a few milliseconds; the buckets resolve that range.
_FAST_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

REQUESTS = Counter(
    "floodwall_requests",
    "Requests seen by the processor, by route and final status class",
    ["route", "status"],
)
RESPONSES = Counter(
    "floodwall_responses",
    "Answers given by the gateway itself (refusals, cache hits, job receipts), by route, "
    "filter, status and error type (the x-floodwall-error value; none for answers that are not "
    "errors)",
    ["route", "filter", "status", "type"],
)
FILTER_SECONDS = Histogram(
    "floodwall_filter_duration_seconds",
    "Time spent in one filter phase",
    ["filter", "phase"],
    buckets=_FAST_BUCKETS,
)
FILTER_FAULTS = Counter(
    "floodwall_filter_faults",
    "Exceptions raised by filters, by filter and kind",
    ["filter", "kind"],
)
STREAM_FAULTS = Counter(
    "floodwall_stream_faults",
    "Faults at the ext_proc stream boundary (protocol errors, unexpected messages), by kind",
    ["kind"],
)
STREAMS_ACTIVE = Gauge("floodwall_streams_active", "ext_proc streams in progress")
ABORTED = Counter(
    "floodwall_requests_aborted", "Requests whose stream ended early (client went away)", ["route"]
)
SPOOFED_HEADERS = Counter(
    "floodwall_spoofed_headers_stripped",
    "Client-sent x-floodwall-* headers removed before any policy ran (those that reached "
    "the processor: an Envoy bootstrapped by floodwall drops them first)",
)
UPSTREAM_ERRORS = Counter(
    "floodwall_upstream_errors",
    "Error answers from an upstream (or from Envoy on its behalf), by route and status "
    "(stream_model_error, stream_unreadable_event, stream_ended_early: a streamed answer that "
    "failed after its 200)",
    ["route", "status"],
)
DRAINING = Gauge("floodwall_draining", "1 while the processor drains before shutdown")


def count_response(route: str, filter_name: str, r: Respond) -> None:
    """Counts an answer the gateway gave itself, with its error type (bounded: the types
    are the filters' constants; cut to 40 characters should a filter invent long ones)."""
    kind = r.headers.get("x-floodwall-error", "none")[:40]
    RESPONSES.labels(route, filter_name, str(r.status), kind).inc()
