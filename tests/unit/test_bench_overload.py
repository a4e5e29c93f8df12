"""bench/overload's reading of the backend's frontier: what any admission could serve within
the latency target, and the latency at the goodput targets."""

from __future__ import annotations

from typing import Any

from bench.overload import frontier


def _point(connections: int, rps: float, p99_ms: float) -> dict[str, Any]:
    return {"connections": connections, "rps": rps, "p50_ms": p99_ms / 2, "p99_ms": p99_ms}


# Shaped like session 14's run on the split cores: throughput grows with requests in flight,
# and so does p99.
POINTS = [
    _point(1, 107, 13),
    _point(2, 158, 16),
    _point(4, 218, 24),
    _point(6, 242, 33),
    _point(8, 254, 40),
    _point(12, 283, 52),
    _point(16, 305, 69),
    _point(32, 323, 110),
]


def test_the_best_point_within_three_times_unloaded() -> None:
    f = frontier(POINTS, capacity=323, unloaded_p99_ms=11, critical_load=0.8)
    assert f["p99_bound_ms"] == 33
    assert f["best_within_bound"]["connections"] == 6  # 33 ms is within, 40 is not
    assert f["best_within_bound"]["share_of_capacity"] == 242 / 323


def test_the_latency_where_a_share_of_capacity_is_first_served() -> None:
    f = frontier(POINTS, capacity=323, unloaded_p99_ms=11, critical_load=0.8)
    # 90% of 323 is 290.7: 16 in flight is the first point that serves it.
    assert f["at_90pct"] == {"connections": 16, "p99_ms": 69, "p99_vs_unloaded": 69 / 11}
    # 80% is 258.4: 12 in flight (254 at 8 falls short).
    assert f["critical_at_4x"]["at"]["connections"] == 12


def test_no_point_within_the_bound_or_at_the_share() -> None:
    f = frontier(POINTS[4:], capacity=400, unloaded_p99_ms=5, critical_load=0.8)
    assert f["best_within_bound"] is None  # every p99 over 15 ms
    assert f["at_90pct"] is None  # 360/s never served
    assert f["critical_at_4x"]["at"]["connections"] == 32  # 320/s: only 32 in flight serve it
