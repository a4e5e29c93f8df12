from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

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
    # Characters per input. At most 16,384: the shipped embedders refuse texts past 64 KiB
    # (triton_models/embedder, MAX_INPUT_BYTES; 4 UTF-8 bytes a character at most).
    max_input_chars: Annotated[int, Field(ge=1, le=16_384)] = 8192


class ChatModel(FilterParams):
    # Triton model with the sim_llm contract (PROMPT, MAX_TOKENS, TEMPERATURE -> TEXT, ...).
    triton_model: str
    # The same model in Triton's decoupled (streaming) form, for "stream": true through
    # Triton's generate_stream endpoint; None: streaming is refused for this model.
    stream_model: str | None = None
    default_max_tokens: Annotated[int, Field(ge=1)] = 64
    max_tokens_limit: Annotated[int, Field(ge=1)] = 1024
    max_prompt_chars: Annotated[int, Field(ge=1)] = 32768

    @model_validator(mode="after")
    def _default_within_limit(self) -> ChatModel:
        # Else every call without max_tokens would get a 400 for a value it never sent.
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                f"({self.max_tokens_limit})"
            )
        return self


class OpenAIParams(FilterParams):
    # OpenAI model name -> Triton model serving it.
    embedding_models: dict[str, EmbeddingModel] = Field(default_factory=dict)
    chat_models: dict[str, ChatModel] = Field(default_factory=dict)
    # Token counts before the model answers are estimates: ceil(characters / this) per text
    # (OpenAI's rule of thumb for English). The model's own counts replace them afterwards.
    chars_per_token: Annotated[float, Field(gt=0, le=100)] = 4.0
    # Label floodwall_tokens_total with the tenant id (token use per tenant). Off: "all", for
    # deployments with more tenants than a metrics backend should hold series for.
    tenant_metrics: bool = False
    # Request priority class (ctx.priority) -> Triton priority level (1 is served first).
    # Unset classes use the model's default level.
    triton_priority: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: {"critical": 1}
    )
