from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from proxy.api import FilterParams


class BreakerParams(FilterParams):
    # One breaker per model named here (ctx.model: the OpenAI name on translated routes, the
    # Triton name on KServe paths); requests for other models pass unwatched. Empty: one
    # breaker per route. A fixed list keeps state and metric labels bounded whatever
    # model names callers put in paths.
    models: list[str] = Field(default_factory=list)
    # Rolling window the rates are computed over, in one-second buckets.
    window_s: Annotated[int, Field(ge=1, le=600)] = 10
    # No verdict on fewer calls than this in the window (a single failure is not a trend).
    min_calls: Annotated[int, Field(ge=1)] = 20
    # Open when this share of the window's calls failed (5xx, timeouts, resets) ...
    failure_rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    # ... or when this share took longer than slow_call_ms to their response headers (first
    # byte; a long streamed answer is not slow).
    slow_call_ms: Annotated[float, Field(gt=0)] = 5000.0
    slow_call_rate: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Open this long, then half-open: let `half_open_calls` trial calls through at once; all
    # succeed -> closed, any fails (or slow_call_rate of them are slow) -> open again.
    open_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    half_open_calls: Annotated[int, Field(ge=1, le=1000)] = 3

    @model_validator(mode="after")
    def _unique(self) -> BreakerParams:
        if len(set(self.models)) != len(self.models):
            raise ValueError("models lists a model twice")
        return self
