"""API-key authentication: Bearer key -> tenant, tier and key id, or a 401."""

from __future__ import annotations

import hashlib

from filters.auth.params import ApiKey, AuthParams
from proxy import errors
from proxy.api import Decision, Deps, Filter, Headers, Mutate, RequestContext, bearer_token

_CHALLENGE = {"www-authenticate": 'Bearer realm="floodwall"'}


class AuthFilter(Filter):
    Params = AuthParams

    def __init__(self, params: AuthParams, deps: Deps) -> None:
        super().__init__(params, deps)
        self.p = params
        self.header = params.header.lower()
        self.by_digest: dict[str, ApiKey] = {}
        for k in params.keys:
            if k.sha256 in self.by_digest:
                raise ValueError(f"two keys share one digest (ids {k.id})")
            self.by_digest[k.sha256] = k

    def _extract(self, headers: Headers) -> str | None:
        raw = headers.get(self.header)
        if raw is None:
            return None
        if self.header == "authorization":
            return bearer_token(raw)
        return raw.strip() or None

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        key = self._extract(headers)
        if key is None:
            return errors.error(
                401, "unauthorized", "missing API key (Authorization: Bearer <key>)",
                headers=_CHALLENGE,
            )  # fmt: skip
        entry = self.by_digest.get(hashlib.sha256(key.encode()).hexdigest())
        if entry is None:
            return errors.error(401, "unauthorized", "unknown API key", headers=_CHALLENGE)
        ctx.tenant, ctx.tier, ctx.key_id = entry.tenant, entry.tier, entry.id
        return Mutate(
            set_headers={
                "x-floodwall-tenant": entry.tenant,
                "x-floodwall-key-id": entry.id,
                "x-floodwall-tier": entry.tier,
            },
            remove_headers=(self.header,) if self.p.strip_credentials else (),
        )
