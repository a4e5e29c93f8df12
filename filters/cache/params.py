from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from filters.cache.guards import GUARDS, Guard
from filters.cache.judge import DEFAULT_CUT, TRITON_MODEL
from filters.cache.verifier import SHIPPED, Verifier
from filters.cache.words import WORDS_MARGIN, WORDS_MIN_OVERLAP, WordsFirst
from filters.rate_limit.params import parse_duration
from proxy.api import FilterParams

# Derived from the shipped evaluation set (`floodwall cache eval`, README "Choosing a
# threshold"): the lowest cosine at which the guarded cache kept wrong answers under 2%.
RECOMMENDED_THRESHOLD = 0.75
# With the judge deciding, the threshold only says which candidates are worth asking it about
# (each question costs a Triton call). On the judge's sixteen training sets (one index each,
# `cache eval --judge --threshold T`) 0.4 served 0-6 points more paraphrases than 0.5 and
# a wrong answer or two more per set; 0.6 served up to 9 points fewer.
JUDGE_THRESHOLD = 0.5


class RouteCache(FilterParams):
    """How one route is cached. Routes not listed are never cached."""

    ttl_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 3600.0
    # Semantic matching on top of exact matching (chat: the last user message; other APIs:
    # the text at `text_pointer`). Embeddings routes are exact-only.
    # Off unless asked for: it serves a wrong answer to some look-alikes (4-14% of traps per
    # held-out set with the guards alone, at most 1.25% with the judge; README "Semantic
    # cache"); measure your traffic with `floodwall cache eval` first.
    semantic: bool = False
    # A JSON pointer (RFC 6901) to the text to match semantically on non-OpenAI routes.
    text_pointer: str | None = None
    # Entries are shared by all tenants only on public routes.
    public: bool = False
    # Keep entries this long past their TTL to answer when the model fails (5xx, Triton down)
    # or its breaker is open (RFC 5861 stale-if-error): exact matches only, marked "stale".
    stale_if_error_s: Annotated[float, Field(ge=0, le=30 * 86400)] = 0.0
    # Chat answers are cached only when sampling is deterministic: temperature at most this
    # (OpenAI's default temperature is 1, so a request must ask for 0 explicitly).
    max_temperature: Annotated[float, Field(ge=0, le=2)] = 0.0

    @field_validator("ttl_s", "stale_if_error_s", mode="before")
    @classmethod
    def _ttl(cls, v: str | float) -> float:
        return parse_duration(v)

    @field_validator("text_pointer")
    @classmethod
    def _pointer(cls, v: str | None) -> str | None:
        if v is not None and v != "" and not v.startswith("/"):
            raise ValueError(f"{v!r} is not a JSON pointer (it must start with '/')")
        return v


class SpeculateParams(FilterParams):
    """When the words find no clear candidate, judge the cached prompt sharing the most of
    them while the new one is embedded (filters/cache/words.py): if the embedding's nearest
    is that prompt, the judge's answer is ready and the hit costs the slower of the two
    Triton calls instead of both. The same verdicts as without; a wrong guess costs one judge
    call, and the cap keeps those off a busy Triton."""

    # Jaccard overlap of content words a guess needs. On the six held-out sets with each
    # set's questions stored together, 0.1 made a guess for 488 of the 494 paraphrases
    # that went on to the embedding, and the right one for 331 (bench/results/cache.md).
    min_overlap: Annotated[float, Field(gt=0, le=1)] = 0.1
    # Speculative judge calls this process may have in flight; past it, a look-up embeds
    # first and then judges, as without speculation.
    max_in_flight: Annotated[int, Field(ge=1, le=1024)] = 2


class WordsFirstParams(FilterParams):
    """Judge the cached prompt that clearly shares the most words with the new one before
    embedding it (filters/cache/words.py): a hit found this way costs one Triton call, the
    judge's, instead of two. Defaults chosen on the judge's validation sets (no more wrong
    answers than without; README "Semantic cache")."""

    # Jaccard overlap of the two prompts' content words the candidate needs.
    min_overlap: Annotated[float, Field(gt=0, le=1)] = WORDS_MIN_OVERLAP
    # How much more overlap it needs than the runner-up: smaller serves more hits this way,
    # and asks the judge about more topical neighbours.
    margin: Annotated[float, Field(ge=0, le=1)] = WORDS_MARGIN
    # With no clear candidate, judge the best guess by words while the prompt is embedded
    # (speculation; its fields say how). None: embed, then judge.
    speculate: SpeculateParams | None = None


class JudgeParams(FilterParams):
    """The cross-encoder that decides each semantic match (filters/cache/judge.py), served by
    Triton on ``semantic.upstream``."""

    # The Triton model serving it (triton_models/pair_judge, or your own with its inputs).
    model: str = TRITON_MODEL
    # Probability of "same answer" the nearest candidate needs to be served.
    cut: Annotated[float, Field(gt=0, lt=1)] = DEFAULT_CUT
    # Budget of one judge call; slower (or failed) is a miss, counted as a "judge" error.
    timeout_ms: Annotated[float, Field(gt=0, le=10_000)] = 250.0
    # Look for the candidate by words before embedding (above). None: embed every look-up.
    words_first: WordsFirstParams | None = None

    def words_rule(self) -> WordsFirst | None:
        wf = self.words_first
        if wf is None:
            return None
        guess = wf.speculate.min_overlap if wf.speculate is not None else None
        return WordsFirst(wf.min_overlap, wf.margin, guess)


class SemanticParams(FilterParams):
    # Cosine similarity a cached prompt needs to be considered at all. Default: 0.75 with
    # the guards (RECOMMENDED_THRESHOLD), 0.5 with the judge (JUDGE_THRESHOLD).
    threshold: Annotated[float, Field(gt=0, le=1)] = RECOMMENDED_THRESHOLD
    # Lexical guards against look-alike questions, applied in this order (README: what each
    # catches and costs; `floodwall cache eval` measures both on your own pairs). [] is none.
    guards: list[Guard] = Field(default_factory=lambda: list(GUARDS))
    # A trained verifier (`floodwall cache train`) judges each candidate instead of the rules
    # above: "shipped" (trained on the project's labelled sets) or the path of your own
    # model. It brings its own threshold, so `threshold` and `guards` then go unused; on the
    # project's held-out sets it serves more paraphrases and fewer look-alikes than the
    # guards (README "Semantic cache"). None: the threshold and the guards decide.
    verifier: str | None = None
    # The judge decides instead of the guards or a verifier: a cross-encoder reading both
    # prompts together, the one decider that met the quality target on the project's
    # held-out sets (README "Semantic cache"). One Triton call per look-up that finds a
    # candidate at or above `threshold`. None: the verifier or the guards decide.
    judge: JudgeParams | None = None
    # Nearest entries looked at per look-up: the nearest is judged (guards or verifier); the
    # others are served only if they are the question asked again (same words).
    candidates: Annotated[int, Field(ge=1, le=32)] = 4
    # Triton embedder: the upstream (by name) serving it and the model.
    upstream: str = "triton_http"
    model: str = "embedder"
    input_name: str = "TEXT"
    output_name: str = "EMBEDDING"
    dimensions: Annotated[int, Field(ge=1)] = 384
    # Look-up budget for the embedding; slower answers count as misses.
    timeout_ms: Annotated[float, Field(gt=0, le=10_000)] = 250.0
    # Longer prompt texts are matched exactly only. At most 16,384: the judge refuses texts
    # past 64 KiB (triton_models/pair_judge, MAX_INPUT_BYTES; 4 UTF-8 bytes a character).
    max_text_chars: Annotated[int, Field(ge=1, le=16_384)] = 2000
    # Scopes with more entries than this are searched approximately (IVF).
    flat_max: Annotated[int, Field(ge=100)] = 20_000

    @model_validator(mode="before")
    @classmethod
    def _judge_threshold(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("judge") is not None and "threshold" not in data:
            return {**data, "threshold": JUDGE_THRESHOLD}
        return data

    @model_validator(mode="after")
    def _verifier_fits(self) -> SemanticParams:
        if self.judge is not None and self.verifier is not None:
            raise ValueError("semantic: set `judge` or `verifier`, not both")
        v = load_verifier(self.verifier)
        if v is not None and v.dimensions not in (None, self.dimensions):
            raise ValueError(f"verifier {self.verifier!r} was trained on {v.dimensions}-d "
                             f"vectors, the embedder gives {self.dimensions}")  # fmt: skip
        return self


def load_verifier(spec: str | None) -> Verifier | None:
    """``"shipped"``, a path to a verifier model, or None."""
    if spec is None:
        return None
    return Verifier.load(SHIPPED if spec == "shipped" else Path(spec))


class OnBehalfParams(FilterParams):
    """Callers that run requests for other tenants (the async-job worker): their requests
    are cached in the scope of the tenant named in ``header``, not in their own, so one
    tenant's job answers never reach another's jobs and the tenant's invalidation drops
    them. The header counts only from these key ids (set by ``auth``); anyone else's is
    ignored."""

    key_ids: Annotated[list[str], Field(min_length=1)]
    header: str = "x-job-tenant"

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        v = v.lower()
        if not re.fullmatch(r"[a-z0-9-]+", v) or v.startswith("x-floodwall-"):
            raise ValueError(f"{v!r}: a header name, not one of the x-floodwall-* the gateway "
                             "strips from clients")  # fmt: skip
        return v


class CacheParams(FilterParams):
    routes: dict[str, RouteCache]
    # Requests run on behalf of another tenant (the jobs worker): cached in that tenant's
    # scope. None: every request in its own caller's tenant.
    on_behalf: OnBehalfParams | None = None
    semantic: SemanticParams = Field(default_factory=SemanticParams)
    # After a semantic hit, its answer is also stored under the asking request's exact key
    # (exact-only, ending with the entry it copies, still answered as hit-semantic): the same
    # paraphrase asked again costs an exact look-up instead of the embedder and the judge.
    alias_semantic_hits: bool = True
    # Bodies above these sizes are neither looked up nor stored.
    max_request_bytes: Annotated[int, Field(ge=1)] = 256 * 1024
    max_entry_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024
    # Per scope (tenant, route, model, model version): the soonest-expiring go first.
    max_entries_per_scope: Annotated[int, Field(ge=1)] = 10_000
    # Budget of one Redis call on the request path; slower is a miss (and a skipped store).
    redis_timeout_ms: Annotated[float, Field(gt=0, le=10_000)] = 100.0
    # Budget of the whole look-up (exact, embedding, semantic): past it, a miss. Cut at
    # run time to what the phase has left of processor.message_timeout_ms.
    lookup_budget_ms: Annotated[float, Field(gt=0, le=10_000)] = 250.0
    # Where model versions come from: Triton's repository index on this upstream, polled.
    # A new version starts new scopes and drops the old ones. None: versions are not tracked.
    versions_upstream: str | None = "triton_http"
    version_poll_s: Annotated[float, Field(gt=0)] = 2.0
    # SHA-256 (hex) of the bearer token the processor's admin endpoint
    # POST /cache/invalidate requires; None disables the endpoint.
    admin_token_sha256: str | None = None

    @field_validator("admin_token_sha256")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("admin_token_sha256 must be 64 lower-case hex digits")
        return v
