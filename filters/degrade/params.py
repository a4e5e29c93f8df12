from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from proxy.api import FilterParams
from proxy.triton_load import SaturationParams


class DegradeParams(FilterParams):
    # Model (ctx.model: the OpenAI name on translated routes, the Triton name on KServe paths)
    # -> the Triton model of its lighter stand-in, e.g. embedder -> embedder_int8.
    lighter: dict[str, str] = Field(min_length=1)
    # Requests of these priority classes (ctx.priority; none set counts as "standard") or
    # tenant tiers always get the model they asked for.
    exempt_priorities: list[str] = Field(default_factory=lambda: ["critical"])
    exempt_tiers: list[str] = Field(default_factory=list)
    # Also degrade while Triton reports the model saturated (None: not watched).
    saturation: SaturationParams | None = None
    # Also degrade while `admission` (before this filter) has to make calls for the model
    # (or the route) wait or refuse them, and this long after the last one (None: not
    # used). The lighter model's faster calls free admission's permits sooner: more of the
    # load is served, lighter, instead of refused.
    pressure_hold_s: Annotated[float, Field(gt=0, le=60)] | None = 1.0

    @model_validator(mode="after")
    def _no_self_or_chain(self) -> DegradeParams:
        for model, to in self.lighter.items():
            if model == to:
                raise ValueError(f"lighter.{model}: a model cannot stand in for itself")
        return self
