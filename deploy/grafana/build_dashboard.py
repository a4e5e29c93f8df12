"""Writes deploy/grafana/floodwall.json, the Grafana dashboard (kept as code: panels are
listed once here, and tests/e2e/test_dashboard.py checks every series they query exists).

    .venv/bin/python deploy/grafana/build_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GW = 'envoy_http_conn_manager_prefix="floodwall"'

# (title, unit, [(legend, PromQL)]). Rows of two panels, in this order.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "Requests per second by route",
        "reqps",
        [
            ("{{route}}", "sum by (route) (rate(floodwall_requests_total[1m]))"),
        ],
    ),
    (
        "Gateway latency p95 / p99 (Envoy, end to end)",
        "ms",
        [
            (
                "p95",
                f"histogram_quantile(0.95, sum by (le) (rate(envoy_http_downstream_rq_time_bucket{{{GW}}}[1m])))",
            ),
            (
                "p99",
                f"histogram_quantile(0.99, sum by (le) (rate(envoy_http_downstream_rq_time_bucket{{{GW}}}[1m])))",
            ),
        ],
    ),
    (
        "Error rate (5xx share)",
        "percentunit",
        [
            (
                "5xx",
                'sum(rate(floodwall_requests_total{status="5xx"}[1m])) / sum(rate(floodwall_requests_total[1m]))',
            ),
            (
                "Envoy 5xx",
                f'sum(rate(envoy_http_downstream_rq_xx{{{GW},envoy_response_code_class="5"}}[1m])) / sum(rate(envoy_http_downstream_rq_total{{{GW}}}[1m]))',
            ),
        ],
    ),
    (
        "Shed, degraded, rate limited per second",
        "reqps",
        [
            (
                "shed {{class}}",
                'sum by (class) (rate(floodwall_admission_decisions_total{decision=~"shed.*"}[1m]))',
            ),
            (
                "shed at the headers {{class}}",
                "sum by (class) (rate(floodwall_admission_shed_at_headers_total[1m]))",
            ),
            ("degraded", "sum(rate(floodwall_degraded_total[1m]))"),
            (
                "rate limited",
                'sum(rate(floodwall_ratelimit_decisions_total{decision=~"denied.*"}[1m]))',
            ),
            ("breaker refused", "sum(rate(floodwall_breaker_rejected_total[1m]))"),
        ],
    ),
    (
        "Cache hit rate",
        "percentunit",
        [
            (
                "{{result}}",
                'sum by (result) (rate(floodwall_cache_lookups_total{result=~"hit.*|stale"}[5m])) / ignoring(result) group_left sum(rate(floodwall_cache_lookups_total[5m]))',
            ),
        ],
    ),
    (
        "Token use per tenant (per second)",
        "short",
        [
            ("{{tenant}} {{type}}", "sum by (tenant, type) (rate(floodwall_tokens_total[5m]))"),
        ],
    ),
    (
        "Concurrency: limit and in flight per model",
        "short",
        [
            ("limit {{model}}", "floodwall_admission_limit"),
            ("in flight {{model}}", "floodwall_admission_inflight"),
        ],
    ),
    (
        "Queues: Triton pending, async jobs",
        "short",
        [
            ("Triton {{model}}", "sum by (model) (nv_inference_pending_request_count)"),
            ("jobs unfinished", "max(floodwall_jobs_depth)"),
        ],
    ),
    (
        "Triton queue time per request",
        "µs",
        [
            (
                "{{model}}",
                "sum by (model) (rate(nv_inference_queue_duration_us[1m])) / sum by (model) (rate(nv_inference_request_success[1m]))",
            ),
        ],
    ),
    (
        "Breaker state (0 closed, 1 half-open, 2 open)",
        "short",
        [
            ("{{model}}", "max by (model) (floodwall_breaker_state)"),
        ],
    ),
    (
        "Filter time p99 by filter",
        "s",
        [
            (
                "{{filter}}",
                "histogram_quantile(0.99, sum by (le, filter) (rate(floodwall_filter_duration_seconds_bucket[1m])))",
            ),
        ],
    ),
    (
        "Redis: rate-limit call p99 and errors",
        "s",
        [
            (
                "p99",
                "histogram_quantile(0.99, sum by (le) (rate(floodwall_ratelimit_redis_duration_seconds_bucket[1m])))",
            ),
            ("errors/s", "sum(rate(floodwall_ratelimit_redis_errors_total[1m]))"),
        ],
    ),
    (
        "Time to first token p95 (streamed chat)",
        "s",
        [
            (
                "{{gen_ai_request_model}}",
                "histogram_quantile(0.95, sum by (le, gen_ai_request_model) (rate(gen_ai_server_time_to_first_token_seconds_bucket[5m])))",
            ),
        ],
    ),
    (
        "CPU: processor, Triton, GPU",
        "percentunit",
        [
            ("processor {{instance}}", "rate(process_cpu_seconds_total[1m])"),
            ("Triton CPU", "max(nv_cpu_utilization)"),
            ("GPU {{gpu_uuid}}", "nv_gpu_utilization"),  # GPU machines only
        ],
    ),
    (
        "Async jobs finished per second",
        "short",
        [
            ("{{status}}", "sum by (status) (rate(floodwall_jobs_finished_total[5m]))"),
        ],
    ),
    (
        "Config reloads",
        "short",
        [
            ("{{result}}", "sum by (result) (increase(floodwall_config_reloads_total[1h]))"),
        ],
    ),
]

# Series that exist only on some machines (checked by the test where they can exist).
GPU_ONLY = ("nv_gpu_utilization",)


def dashboard() -> dict[str, Any]:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
                    for j, (legend, expr) in enumerate(targets)
                ],
            }
        )
    return {
        "title": "Floodwall",
        "uid": "floodwall",
        "schemaVersion": 39,
        "tags": ["floodwall", "envoy", "triton"],
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                }
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    (HERE / "floodwall.json").write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {HERE / 'floodwall.json'} ({len(PANELS)} panels)")
