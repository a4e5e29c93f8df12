"""Typed params of the ``canary`` filter."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from proxy.api import FilterParams


class Target(FilterParams):
    # The Triton model (or model version's name) this share of the traffic goes to.
    model: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]
    weight: Annotated[float, Field(ge=0)]


class Split(FilterParams):
    targets: Annotated[list[Target], Field(min_length=1)]
    # "key": one API key always lands on the same target (a user sees one version, and a
    # bad version's errors concentrate on few users); "tenant": per tenant; "none": per call.
    sticky: Literal["key", "tenant", "none"] = "key"

    @model_validator(mode="after")
    def _weights(self) -> Split:
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError("the targets' weights must not all be 0")
        names = [t.model for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"a target is listed twice: {names}")
        return self


class CanaryParams(FilterParams):
    # Model the client asked for (ctx.model) -> how its traffic is split.
    splits: dict[str, Split] = Field(default_factory=dict)
