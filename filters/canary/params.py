"""Typed params of the ``canary`` filter."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from proxy.api import FilterParams

_MODEL = r"^[A-Za-z0-9_.-]{1,128}$"


class Target(FilterParams):
    # The Triton model (or model version's name) this share of the traffic goes to.
    model: Annotated[str, Field(pattern=_MODEL)]
    weight: Annotated[float, Field(ge=0)]
    # Its decoupled (streaming) twin, for calls on Triton's generate_stream (OpenAI chat with
    # "stream": true): a decoupled model cannot serve infer, nor a plain one generate_stream.
    # Every target of a split has one, or none: then OpenAI streamed calls (which the openai
    # filter sends to the model's own twin) are not split.
    stream_model: Annotated[str, Field(pattern=_MODEL)] | None = None


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
        twins = [t.stream_model for t in self.targets if t.stream_model is not None]
        if twins and len(twins) != len(self.targets):
            # Some streamed calls would go to a model that cannot stream.
            raise ValueError("either every target has a stream_model or none has")
        if len(set(twins)) != len(twins) or set(twins) & set(names):
            raise ValueError(f"each stream_model must be its own model: {twins}")
        return self

    @property
    def streams(self) -> bool:
        """Streamed calls are split too (the targets have stream twins)."""
        return self.targets[0].stream_model is not None


class CanaryParams(FilterParams):
    # Model the client asked for (ctx.model) -> how its traffic is split.
    splits: dict[str, Split] = Field(default_factory=dict)
