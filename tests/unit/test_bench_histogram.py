"""The benchmarks' reading of the processor's Prometheus histograms: the observations made
between two scrapes, as bucket-bound quantiles and a share within a bound."""

from __future__ import annotations

import pytest

from bench.loadgen import parse_histogram, quantiles

NAME = "floodwall_filter_duration_seconds"


def _page(counts: dict[str, list[int]]) -> str:
    """A page with one series per filter, cumulative counts over four buckets."""
    lines = [f"# TYPE {NAME} histogram"]
    for f, cum in counts.items():
        for le, n in zip(("0.00025", "0.0005", "0.001", "+Inf"), cum, strict=True):
            lines.append(f'{NAME}_bucket{{filter="{f}",le="{le}",phase="request_headers"}} {n}.0')
        lines.append(f'{NAME}_count{{filter="{f}",phase="request_headers"}} {cum[-1]}.0')
    lines.append('other_metric_bucket{filter="rate_limit",le="+Inf"} 99.0')
    return "\n".join(lines) + "\n"


def test_only_the_observations_between_the_scrapes_count() -> None:
    before = parse_histogram(_page({"rate_limit": [50, 90, 100, 100]}), NAME, ("filter", "phase"))
    # Since then: 890 at <= 0.25 ms, 100 more at <= 0.5 ms, 10 more at <= 1 ms.
    after = parse_histogram(
        _page({"rate_limit": [940, 1080, 1100, 1100], "auth": [7, 7, 7, 7]}),
        NAME,
        ("filter", "phase"),
    )
    assert set(after) == {"rate_limit/request_headers", "auth/request_headers"}
    q = quantiles(before, after, within_ms=0.5)["rate_limit/request_headers"]
    assert q["count"] == 1000
    assert q["p50_le_ms"] == 0.25
    assert q["p99_le_ms"] == 0.5  # 990 of the 1000 within 0.5 ms: 99% exactly
    assert q["share_within_0.5_ms"] == pytest.approx(0.99)
    # The earlier observations would have put p99 past 0.5 ms (10 of 100 over it).
    assert quantiles({}, before)["rate_limit/request_headers"]["p99_le_ms"] == 1.0


def test_no_new_observations_leave_the_series_out() -> None:
    page = parse_histogram(_page({"rate_limit": [5, 5, 5, 5]}), NAME, ("filter",))
    assert quantiles(page, page) == {}
