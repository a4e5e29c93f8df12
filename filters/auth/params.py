from __future__ import annotations

from collections import Counter
from typing import Annotated

from pydantic import Field, model_validator

from proxy.api import FilterParams


class ApiKey(FilterParams):
    # Public id of the key: appears in logs and metrics instead of the key itself.
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    # SHA-256 of the key, lower-case hex. The key itself is never stored.
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    tenant: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    tier: str = "standard"


class AuthParams(FilterParams):
    keys: Annotated[list[ApiKey], Field(min_length=1)]
    # Header read for the key. "authorization" expects "Bearer <key>"; any other header
    # carries the bare key (e.g. "x-api-key").
    header: str = "authorization"
    # Remove the credential before the request goes upstream: model servers don't need it.
    strip_credentials: bool = True

    @model_validator(mode="after")
    def _unique_ids(self) -> AuthParams:
        # Logs and metrics name a key by its id: two keys under one id could not be told apart.
        twice = sorted(i for i, n in Counter(k.id for k in self.keys).items() if n > 1)
        if twice:
            raise ValueError(f"key ids must be unique; listed more than once: {twice}")
        return self
