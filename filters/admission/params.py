from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from proxy.api import FilterParams
from proxy.triton_load import SaturationParams

Class = Literal["critical", "standard", "sheddable"]


class Priority(FilterParams):
    """score = weight of the tenant's tier + weight of the request type; the class is the
    first whose threshold the score reaches (critical, then standard), else sheddable."""

    tier_weights: dict[str, float] = Field(
        default_factory=lambda: {"premium": 2.0, "standard": 1.0, "free": 0.0}
    )
    # Request type from `type_header` ("batch" or anything else: interactive).
    type_weights: dict[str, float] = Field(
        default_factory=lambda: {"interactive": 1.0, "batch": 0.0}
    )
    type_header: str = "x-request-type"
    critical_at: float = 3.0
    standard_at: float = 1.0
    # Callers allowed to set their class outright with `priority_header` (key ids, tenants);
    # anyone else's header is ignored.
    priority_header: str = "x-priority"
    trusted_key_ids: list[str] = Field(default_factory=list)
    trusted_tenants: list[str] = Field(default_factory=list)


class AdmissionParams(FilterParams):
    # One concurrency limit per model named here (ctx.model); others pass. Empty: per route.
    models: list[str] = Field(default_factory=list)
    initial_limit: Annotated[int, Field(ge=1)] = 16
    min_limit: Annotated[int, Field(ge=1)] = 2
    max_limit: Annotated[int, Field(ge=1)] = 512
    # Vegas: estimated requests queued upstream = limit x (1 - no-load RTT / RTT). Below
    # `grow_below` the limit grows by one, above `shrink_above` it shrinks by one.
    grow_below: Annotated[float, Field(ge=0)] = 3.0
    shrink_above: Annotated[float, Field(gt=0)] = 6.0
    # The no-load RTT is the minimum over this window, and only from calls made while at most
    # half the limit was in use: RTTs measured under queueing can never raise it, so it cannot
    # ratchet up with the load; it follows a real change of the model's speed within a window.
    rtt_window_s: Annotated[float, Field(gt=0)] = 30.0
    # Share of the limit kept free for the classes above: sheddable can use 1 - both,
    # standard 1 - critical's, critical all of it.
    reserve_critical: Annotated[float, Field(ge=0, lt=1)] = 0.2
    reserve_standard: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # In-gateway queue: a request that finds its share full waits at most this long (and
    # never past its deadline), up to `max_queue` waiting per model; fair across tenants.
    max_queue: Annotated[int, Field(ge=0)] = 64
    max_queue_ms: Annotated[float, Field(ge=0)] = 100.0
    # On routes where the model is in the body: shed at the request headers when every model
    # seen on the route would refuse the class at once (queue full, or its predicted wait
    # longer than max_queue_ms), so a refusal costs neither the body nor later filters' work.
    # Such a request never reaches the cache: turn off where cache hits under overload matter
    # more than the CPU a refusal costs.
    shed_at_headers: bool = True
    priority: Priority = Field(default_factory=Priority)
    # gRPC methods whose answer is a stream of messages (KServe's decoupled models answer on
    # ModelStreamInfer): the permit is held until the stream ends, as for SSE. A unary answer
    # gives it back at its headers. Listing a unary method costs a processor round trip per
    # answer message, nothing else.
    grpc_stream_methods: list[str] = Field(
        default_factory=lambda: ["/inference.GRPCInferenceService/ModelStreamInfer"]
    )
    # Triton's own load for the model: while saturated, the limit shrinks (once per poll).
    saturation: SaturationParams | None = None

    @model_validator(mode="after")
    def _consistent(self) -> AdmissionParams:
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("need min_limit <= initial_limit <= max_limit")
        if self.reserve_critical + self.reserve_standard >= 1:
            raise ValueError("reserve_critical + reserve_standard must stay below 1")
        if self.grow_below >= self.shrink_above:
            raise ValueError("grow_below must be below shrink_above")
        return self
