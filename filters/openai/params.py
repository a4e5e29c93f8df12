from __future__ import annotations

from typing import Annotated

from pydantic import Field

from proxy.api import FilterParams


class EmbeddingModel(FilterParams):
    # Model name in Triton (the OpenAI-facing name is the key of `embedding_models`).
    triton_model: str
    input_name: str = "TEXT"
    output_name: str = "EMBEDDING"
    # Per-input token counts for `usage`; None when the model has no such output.
    tokens_output: str | None = "TOKENS"
    dimensions: Annotated[int, Field(ge=1)] = 384
    # Must not exceed the Triton model's max_batch_size: one request is one Triton batch.
    max_inputs: Annotated[int, Field(ge=1, le=2048)] = 64
    max_input_chars: Annotated[int, Field(ge=1)] = 8192


class OpenAIParams(FilterParams):
    # OpenAI model name -> Triton model serving it.
    embedding_models: Annotated[dict[str, EmbeddingModel], Field(min_length=1)]
