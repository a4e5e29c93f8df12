"""Answers repeated and paraphrased requests from Redis: exact, then semantic.

Request body: parse, canonicalise (``canon``), look up the exact id, then (chat with a last
user message, or a configured text) embed the prompt with Triton's embedder and ask the
process's ``SemanticIndex`` for a match its decider accepts (the judge, Triton's
``pair_judge``, when configured). A hit answers at once (``Respond``) with the stored body,
``x-floodwall-cache: hit-exact|hit-semantic`` and ``Age``; a miss goes on and, when the
response is a cacheable 200, is stored after it has been sent (a background task: the client
never waits for the store). Every failure of Redis, the embedder or the judge is a miss,
counted, never an error for the client.

Place it after ``auth`` (entries are per tenant) and before ``openai``: it must see the
client's OpenAI request, and (responses run in reverse order) the translated answer.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import orjson
from prometheus_client import Counter, Gauge, Histogram

from filters.cache import canon
from filters.cache.embedder import (
    Embedder,
    EmbedderError,
    JudgeError,
    PairJudge,
    TokenEmbedder,
    TritonEmbedder,
    TritonPairJudge,
)
from filters.cache.params import CacheParams, RouteCache, load_verifier
from filters.cache.semantic import Fetch, SemanticIndex, Verdict
from filters.cache.store import CacheStore, Entry, Indexed
from proxy import errors
from proxy.api import (
    CONTINUE,
    REDIS_FAULTS,
    AdminHandler,
    Decision,
    Deps,
    Filter,
    Headers,
    Mutate,
    Outcome,
    Phase,
    RequestContext,
    Respond,
    bearer_token,
    cancel_and_wait,
)
from proxy.config import RouteConfig

LOOKUPS = Counter(
    "floodwall_cache_lookups",
    "Cache look-ups by route and result (hit_exact, hit_semantic, stale, miss, bypass)",
    ["route", "result"],
)
BYPASS = Counter(
    "floodwall_cache_bypass",
    "Requests the cache did not look up or store, by reason",
    ["route", "reason"],
)
VETOES = Counter(
    "floodwall_cache_vetoes",
    "Semantic candidates above the threshold refused, by decider (a guard, verifier, judge)",
    ["guard"],
)
STORES = Counter(
    "floodwall_cache_stores", "Responses stored, or not stored and why", ["route", "result"]
)
ERRORS = Counter(
    "floodwall_cache_errors",
    "Cache faults by kind: a failed call to redis, the embedder or the judge; budget (a "
    "look-up over its time); feed (the change-feed follower failed and rebuilds); bad_entry "
    "(a stored entry the index cannot take, left out); housekeeping (an expiry or clustering "
    "tick failed)",
    ["kind"],
)
LOOKUP_SECONDS = Histogram(
    "floodwall_cache_lookup_duration_seconds",
    "Time to decide hit or miss, by level reached (exact, semantic)",
    ["level"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0),
)
SEMANTIC_HITS = Counter(
    "floodwall_cache_semantic_hits",
    "Semantic hits by how the served candidate was found: by its words (one judge call, "
    "no embedding), by the prompt's vector, or as an alias (the same paraphrase asked "
    "again: its exact key)",
    ["found_by"],
)
SPECULATIONS = Counter(
    "floodwall_cache_speculations",
    "Judge calls on a guess made while the prompt was embedded (words_first.speculate): used "
    "(the guess was the nearest: one call's time saved), wasted (it was not, or the look-up "
    "ended first), skipped (this process had max_in_flight of them running)",
    ["outcome"],
)
ENTRIES = Gauge("floodwall_cache_semantic_entries", "Semantic entries in this process's index")

log = logging.getLogger("floodwall.cache")
HEADER = "x-floodwall-cache"
# Response headers stored with an entry and replayed on a hit.
_KEPT_HEADERS = ("content-type",)
_ERROR_HEADERS = ("x-floodwall-error", "retry-after")


@dataclass(slots=True)
class _Pending:
    """A miss to store once its response is known to be cacheable."""

    scope: str
    scope_meta: dict[str, str]
    entry_id: str
    partition: str
    text: str
    vector: np.ndarray[Any, Any] | None
    ttl_ms: int
    stale_ms: int
    headers: dict[str, str] | None = None
    tokens: np.ndarray[Any, Any] | None = None  # the align verifier's token vectors


class _State:
    __slots__ = (
        "bypassed", "exact_hit", "max_age_s", "no_lookup", "no_store", "pending", "stale",
        "tenant", "tokens",
    )  # fmt: skip

    def __init__(self) -> None:
        self.tenant: str | None = None  # whose scope: the caller's, or whom it acts for
        self.no_store = False
        self.no_lookup = False
        self.max_age_s: int | None = None  # the request's Cache-Control max-age
        self.pending: _Pending | None = None
        # An expired exact entry still inside its stale-if-error window: the answer if the
        # model fails.
        self.stale: Entry | None = None
        self.tokens: np.ndarray[Any, Any] | None = None  # the prompt's, once embedded
        self.exact_hit = False  # answered by the exact look-up (an alias included)
        self.bypassed = False  # neither looked up nor stored: the answer says so


class CacheFilter(Filter):
    Params = CacheParams

    def __init__(
        self,
        params: CacheParams,
        deps: Deps,
        embedder: Embedder | None = None,
        judge: PairJudge | None = None,
    ) -> None:
        super().__init__(params, deps)
        # Per instance: two of this filter on one route keep their own request state.
        self._state = functools.partial(_State)
        self.p = params
        sem = params.semantic
        self.store = CacheStore(deps.redis) if deps.redis is not None else None
        if any(r.semantic for r in params.routes.values()):
            if embedder is None:
                embedder = TritonEmbedder(
                    self._triton(deps), sem.model, input_name=sem.input_name,
                    output_name=sem.output_name, timeout_s=sem.timeout_ms / 1000,
                )  # fmt: skip
            if judge is None and sem.judge is not None:
                judge = TritonPairJudge(
                    self._triton(deps), sem.judge.model, timeout_s=sem.judge.timeout_ms / 1000
                )
        self.embedder = embedder
        self.judge = judge
        self.index = SemanticIndex(
            sem.dimensions, threshold=sem.threshold, candidates=sem.candidates,
            guards=tuple(sem.guards), flat_max=sem.flat_max, verifier=load_verifier(sem.verifier),
            judge_cut=sem.judge.cut if sem.judge is not None else None,
            words_first=sem.judge.words_rule() if sem.judge is not None else None,
        )  # fmt: skip
        # Triton model -> its newest READY version; scopes include it (see _version).
        self.versions: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._writes: set[asyncio.Task[None]] = set()
        self._clustering = False
        self._feed_id = "0-0"
        wf = sem.judge.words_first if sem.judge is not None else None
        # Speculative judge calls this process may have running (None: no speculation).
        self._speculate_cap = wf.speculate.max_in_flight if wf and wf.speculate else None
        self._speculating: set[asyncio.Task[float]] = set()

    def _triton(self, deps: Deps) -> str:
        base = deps.upstreams.get(self.p.semantic.upstream)
        if base is None:
            raise ValueError(
                f"cache.semantic.upstream {self.p.semantic.upstream!r} is not an upstream "
                f"(known: {', '.join(sorted(deps.upstreams)) or 'none'})"
            )
        return base

    # --- lifecycle -------------------------------------------------------------------------

    def route_refs(self) -> Collection[str]:
        return self.p.routes.keys()

    def phases(self, route: RouteConfig) -> frozenset[Phase]:
        if route.name not in self.p.routes or route.grpc:
            return frozenset()
        return frozenset(Phase)

    async def start(self) -> None:
        if self.store is None:
            log.warning("cache: no Redis configured; every request is a miss")
            return
        if self.p.versions_upstream is not None:
            await self._poll_versions_once()
            self._tasks.append(asyncio.create_task(self._poll_versions()))
        self._tasks.append(asyncio.create_task(self._follow()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))

    async def stop(self) -> None:
        await cancel_and_wait([*self._tasks, *self._speculating])
        if self._writes:
            await asyncio.wait(self._writes, timeout=2)
        for client in (self.embedder, self.judge):
            if client is not None:
                await client.close()

    async def settle(self) -> None:
        """Waits for the stores already started (tests; shutdown does it too)."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    # --- request path ----------------------------------------------------------------------

    async def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        st = ctx.state(self._state)
        directives = _cache_control(headers.get("cache-control", ""))
        max_age = _seconds(directives.get("max-age"))
        if "no-store" in directives:
            st.no_store = st.no_lookup = True
        elif "no-cache" in directives or max_age == 0:
            st.no_lookup = True  # revalidate: ask the model, refresh the entry
        elif max_age is not None:
            st.max_age_s = max_age  # an older answer is not acceptable: ask the model
        st.tenant = ctx.tenant
        behalf = self.p.on_behalf
        if behalf is not None and ctx.key_id in behalf.key_ids:
            # The jobs worker runs every tenant's jobs under its own key: without the job's
            # tenant, all their answers would share one scope.
            st.tenant = headers.get(behalf.header) or None
        return CONTINUE

    async def on_request_body(self, ctx: RequestContext, body: bytes) -> Decision:
        st = ctx.state(self._state)
        route = self.p.routes[ctx.route_name]
        reason = self._bypass_reason(ctx, st, route, body)
        if reason is not None:
            return self._bypass(ctx, reason)
        assert self.store is not None
        try:
            key = canon.lookup(
                orjson.loads(body), api=ctx.route.api if ctx.route else "", model=ctx.model,
                max_temperature=route.max_temperature, text_pointer=route.text_pointer,
            )  # fmt: skip
        except orjson.JSONDecodeError:
            return self._bypass(ctx, "bad_json")  # the API filter answers 400
        except canon.NotCacheable as nc:
            return self._bypass(ctx, nc.reason)
        tenant = "*" if route.public else (st.tenant or "")
        meta = {"tenant": tenant, "route": ctx.route_name, "model": key.model,
                "version": self._version(key.model)}  # fmt: skip
        scope = _scope_id(meta)
        text = key.text if route.semantic and key.text else ""
        if len(text) > self.p.semantic.max_text_chars:
            text = ""
        t0 = time.perf_counter()
        now_ms = self._now_ms()
        vector = None
        if not st.no_lookup:
            try:
                # One budget for the whole look-up, cut to what the phase has left: it must
                # end inside Envoy's message timeout, whatever Redis and the embedder do (and
                # however long the filters before it took); past it, the request is a miss.
                async with asyncio.timeout(ctx.budget_s(self.p.lookup_budget_ms / 1000)):
                    found = await self._lookup(ctx, st, scope, meta, key, text, now_ms)
            except TimeoutError:
                ERRORS.labels("budget").inc()
                found = None
            if isinstance(found, Respond):
                # By the path that answered: an alias is a hit-semantic found by its key.
                level = "exact" if st.exact_hit else "semantic"
                LOOKUP_SECONDS.labels(level).observe(time.perf_counter() - t0)
                LOOKUPS.labels(ctx.route_name, found.headers[HEADER].replace("-", "_")).inc()
                return found
            vector = found
        LOOKUP_SECONDS.labels("semantic" if text else "exact").observe(time.perf_counter() - t0)
        LOOKUPS.labels(ctx.route_name, "miss").inc()
        if not st.no_store:
            ttl_ms, stale_ms = int(route.ttl_s * 1000), int(route.stale_if_error_s * 1000)
            st.pending = _Pending(scope, meta, key.exact_id, key.partition, text, vector,
                                  ttl_ms, stale_ms, tokens=st.tokens)  # fmt: skip
        return CONTINUE

    async def _lookup(
        self,
        ctx: RequestContext,
        st: _State,
        scope: str,
        meta: dict[str, str],
        key: canon.Lookup,
        text: str,
        now_ms: int,
    ) -> Respond | np.ndarray[Any, Any] | None:
        """A hit to answer with, else the prompt's vector if it was computed (kept for the
        store), else None."""
        entry, _ = await self._get(scope, key.exact_id, now_ms)
        if _servable(entry, st, now_ms):
            assert entry is not None
            st.exact_hit = True
            if entry.alias:
                SEMANTIC_HITS.labels("alias").inc()
                return self._hit(ctx, entry, "hit-semantic", now_ms)
            return self._hit(ctx, entry, "hit-exact", now_ms)
        # A client that set how old an answer may be (max-age) gets no stale one.
        st.stale = entry if st.max_age_s is None else None
        refusing = self.deps.signals.refusing(key.model, self.deps.clock.monotonic())
        if st.stale is not None and refusing:
            return self._hit(ctx, st.stale, "stale", now_ms)  # the model's breaker is open
        # Embed now only if there is something to compare with; a miss in an empty partition
        # is embedded after its answer went out, when it is stored (off the request path).
        if not text or self.embedder is None or not self.index.has_partition(scope, key.partition):
            return None
        # The judged candidate, fetched while judged: (entry, whether Redis answered).
        best: dict[str, tuple[Entry | None, bool]] = {}

        async def fetch(ids: list[str]) -> dict[str, np.ndarray[Any, Any]]:
            cached, entry, answered = await self._cached_tokens(scope, ids, now_ms)
            best[ids[0]] = entry, answered
            return cached

        known: dict[str, float] = {}
        if self.judge is not None and self.index.words_first is not None:
            # A candidate by its words first: a yes costs the judge's call alone.
            try:
                verdict, known = await self.index.by_words_fetching(
                    scope, key.partition, text, now_ms, fetch, self.judge.same_answer
                )
            except JudgeError as exc:
                ERRORS.labels("judge").inc()
                log.warning("cache judge failed (a miss): %s", exc)
                return None  # embedded when stored, off the request path
            if verdict is not None:
                hit = await self._serve(ctx, st, scope, meta, key, verdict, best, now_ms)
                if hit is not None:
                    return hit
        # No clear word candidate: maybe a guess, judged while the prompt is embedded.
        speculated = {} if known else self._speculate(scope, key.partition, text, now_ms, fetch)
        guesses = list(speculated)
        try:
            vector, tokens = await self._embed(text)
            if vector is None:
                return None
            st.tokens = tokens
            verdict = await self.index.judge_fetching(
                scope, key.partition, text, vector, now_ms, tokens, fetch,
                self.judge.same_answer if self.judge is not None else None, known, speculated,
            )  # fmt: skip
        except JudgeError as exc:
            ERRORS.labels("judge").inc()
            log.warning("cache judge failed (a miss): %s", exc)
            return vector
        finally:
            for guess in guesses:  # judge_fetching took out the one it used
                SPECULATIONS.labels("wasted" if guess in speculated else "used").inc()
        if verdict.veto is not None:
            VETOES.labels(verdict.veto).inc()
        if verdict.entry_id is not None:
            hit = await self._serve(ctx, st, scope, meta, key, verdict, best, now_ms)
            if hit is not None:
                return hit
        return vector

    def _speculate(
        self,
        scope: str,
        partition: str,
        text: str,
        now_ms: int,
        fetch: Fetch,
    ) -> dict[str, Awaitable[float]]:
        """The judge's answer on the words' guess (``SemanticIndex.word_guess``), asked now,
        by the guess; none without one, or with the cap's worth of them running. A wrong
        guess's call is left to finish (it is in Triton's queue anyway, and a cancel would
        cost its kept connection); a used one ends with the look-up, as any judge call. The
        judge's errors count only if its answer is used (``judge_fetching``); Redis's, while
        the guess's entry is fetched, count as any look-up's."""
        if self._speculate_cap is None or self.judge is None:
            return {}
        guess = self.index.word_guess(scope, partition, text, now_ms)
        if guess is None:
            return {}
        if len(self._speculating) >= self._speculate_cap:
            SPECULATIONS.labels("skipped").inc()
            return {}
        call = asyncio.create_task(
            self.index.ask_and_fetch(guess, text, scope, fetch, self.judge.same_answer)
        )
        self._speculating.add(call)
        call.add_done_callback(self._speculation_done)
        return {guess: call}

    def _speculation_done(self, call: asyncio.Task[float]) -> None:
        self._speculating.discard(call)
        if not call.cancelled():
            call.exception()  # retrieved: an unused guess's failure is no fault of the look-up

    async def _serve(
        self,
        ctx: RequestContext,
        st: _State,
        scope: str,
        meta: dict[str, str],
        key: canon.Lookup,
        verdict: Verdict,
        fetched: dict[str, tuple[Entry | None, bool]],
        now_ms: int,
    ) -> Respond | None:
        """The semantic hit ``verdict`` names, from ``fetched`` when the look-up brought it,
        else from Redis; None if it is no longer there (and then forgotten: only when Redis
        said so, never because it failed) or not fresh (or older than the request's max-age).
        With ``alias_semantic_hits``, the
        answer is copied under the asking request's key, off the request path."""
        assert verdict.entry_id is not None
        if verdict.entry_id in fetched:
            entry, answered = fetched[verdict.entry_id]
        else:
            entry, answered = await self._get(scope, verdict.entry_id, now_ms)
        if _servable(entry, st, now_ms):
            assert entry is not None
            SEMANTIC_HITS.labels("words" if verdict.by_words else "vector").inc()
            if self.p.alias_semantic_hits:
                alias = _Pending(scope, meta, key.exact_id, key.partition, "", None, 0, 0,
                                 entry.headers)  # fmt: skip
                self._spawn(self._alias(ctx.route_name, alias, verdict.entry_id, entry))
            return self._hit(ctx, entry, "hit-semantic", now_ms)
        if answered and entry is None:
            self.index.remove(scope, verdict.entry_id)  # gone from Redis
        return None

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        st = ctx.state(self._state)
        pending, st.pending = st.pending, None
        if pending is not None:
            why = _uncacheable_response(headers)
            if why is not None:
                STORES.labels(ctx.route_name, why).inc()
            else:
                max_age = _max_age(headers.get("cache-control", ""))
                if max_age is not None:
                    pending.ttl_ms = min(pending.ttl_ms, max_age * 1000)
                if pending.ttl_ms > 0:
                    pending.headers = {h: headers[h] for h in _KEPT_HEADERS if h in headers}
                    st.pending = pending
        return Mutate(set_headers={HEADER: "bypass" if st.bypassed else "miss"})

    async def on_response_body(self, ctx: RequestContext, body: bytes) -> Decision:
        st = ctx.state(self._state)
        if st.stale is not None and (ctx.response_status or 0) >= 500:
            # stale-if-error: the model failed (or Envoy could not reach it); the last good
            # answer, marked, beats an error.
            entry, st.stale, st.pending = st.stale, None, None
            hit = self._hit(ctx, entry, "stale", self._now_ms())
            LOOKUPS.labels(ctx.route_name, "stale").inc()
            length = str(len(hit.body))
            # Nothing of the error it replaces (the API filter's error type, a Retry-After).
            return Mutate(set_headers={":status": "200", **hit.headers, "content-length": length},
                          remove_headers=_ERROR_HEADERS, body=hit.body)  # fmt: skip
        pending, st.pending = st.pending, None
        if pending is None or not ctx.end_of_stream:
            return CONTINUE
        if ctx.response_status != 200:
            # A 200 that a filter before this one rewrote (the API filter answers 502 for a
            # body it could not read): the client got an error, which is never stored.
            STORES.labels(ctx.route_name, "not_200").inc()
            return CONTINUE
        if len(body) > self.p.max_entry_bytes:
            STORES.labels(ctx.route_name, "too_large").inc()
            return CONTINUE
        self._spawn(self._put(ctx.route_name, pending, bytes(body)))
        return CONTINUE

    async def _alias(self, route: str, pending: _Pending, of_id: str, entry: Entry) -> None:
        """Stores ``entry``'s answer as ``pending`` (the asking request's key), ending when
        ``entry`` does; nothing if ``entry`` was replaced or expired meanwhile."""
        pending.ttl_ms = entry.expires_ms - self._now_ms()
        if pending.ttl_ms > 0 and await self._write(
            route, pending, entry.body, alias_of=(of_id, entry.created_ms)
        ):
            STORES.labels(route, "alias").inc()

    def _spawn(self, write: Coroutine[Any, Any, None]) -> None:
        """A store off the request path, awaited by ``settle`` and ``stop``."""
        task = asyncio.create_task(write)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        ctx.state(self._state).pending = None

    # --- pieces ----------------------------------------------------------------------------

    def _bypass_reason(
        self, ctx: RequestContext, st: _State, route: RouteCache, body: bytes
    ) -> str | None:
        if self.store is None:
            return "no_redis"
        if st.no_store:
            return "no_store"
        if len(body) > self.p.max_request_bytes:
            return "too_large"
        if not route.public and not st.tenant:
            return "no_tenant"  # without an identity there is no isolation to keep
        return None

    def _bypass(self, ctx: RequestContext, reason: str) -> Decision:
        BYPASS.labels(ctx.route_name, reason).inc()
        LOOKUPS.labels(ctx.route_name, "bypass").inc()
        st = ctx.state(self._state)
        st.pending, st.bypassed = None, True
        return CONTINUE

    def _hit(self, ctx: RequestContext, entry: Entry, kind: str, now_ms: int) -> Respond:
        """The answer from ``entry`` (counted by the caller once it is served)."""
        headers = dict(entry.headers)
        headers.setdefault("content-type", "application/json")
        headers[HEADER] = kind
        headers["age"] = str(max(0, (now_ms - entry.created_ms) // 1000))
        if not entry.fresh:
            headers["warning"] = '110 - "Response is Stale"'
        return Respond(200, entry.body, headers)

    def _now_ms(self) -> int:
        return int(self.deps.clock.time() * 1000)

    def _version(self, model: str) -> str:
        backend = self.deps.signals.backend_models.get(model, model)
        return self.versions.get(backend, "")

    async def _get(self, scope: str, entry_id: str, now_ms: int) -> tuple[Entry | None, bool]:
        """The entry (None: absent or Redis failed) and whether Redis answered at all: a slow
        Redis must not make the index forget entries that exist."""
        assert self.store is not None
        try:
            entry = await asyncio.wait_for(
                self.store.get(scope, entry_id, now_ms), self.p.redis_timeout_ms / 1000
            )
        except REDIS_FAULTS as exc:
            ERRORS.labels("redis").inc()
            log.warning("cache look-up failed (a miss): %r", exc)
            return None, False
        return entry, True

    async def _embed(
        self, text: str
    ) -> tuple[np.ndarray[Any, Any] | None, np.ndarray[Any, Any] | None]:
        """The prompt's vector (None: a miss), with its token vectors when the verifier
        aligns tokens and the embedder gives them."""
        assert self.embedder is not None
        tokens = None
        try:
            if self.index.needs_tokens and hasattr(self.embedder, "embed_tokens"):
                vec, tokens = await cast(TokenEmbedder, self.embedder).embed_tokens(text)
            else:
                vec = await self.embedder.embed(text)
        except EmbedderError as exc:
            ERRORS.labels("embedder").inc()
            log.warning("cache embedding failed (a miss): %s", exc)
            return None, None
        if vec.shape != (self.index.dim,):
            ERRORS.labels("embedder").inc()
            log.warning("embedder returned %s values, expected %d", vec.shape, self.index.dim)
            return None, None
        return vec, tokens

    async def _cached_tokens(
        self, scope: str, ids: list[str], now_ms: int
    ) -> tuple[dict[str, np.ndarray[Any, Any]], Entry | None, bool]:
        """The stored token vectors of candidate entries, the first candidate's entry, and
        whether Redis answered (as ``_get``); none (so no hit) if Redis fails."""
        assert self.store is not None
        try:
            cached, entry = await asyncio.wait_for(
                self.store.tokens(scope, ids, self.index.dim, now_ms),
                self.p.redis_timeout_ms / 1000,
            )
        except REDIS_FAULTS as exc:
            ERRORS.labels("redis").inc()
            log.warning("cache token look-up failed (a miss): %r", exc)
            return {}, None, False
        return cached, entry, True

    async def _put(self, route: str, pending: _Pending, body: bytes) -> None:
        if pending.text and pending.vector is None and self.embedder is not None:
            # Not embedded at look-up: the first entry of its partition (nothing to compare
            # with), or a request that skipped the look-up (no-cache). The first is stored
            # exact-only at once, so the same request asked again is a hit, not a second
            # model call while the embedding runs; then with its vector. When the embedder
            # fails, the exact-only write keeps a vector already stored for the same id
            # (store.put), so a refresh during an outage leaves the paraphrases hitting.
            first = not self.index.has_partition(pending.scope, pending.partition)
            if first and not await self._write(route, pending, body, semantic=False):
                return
            pending.vector, pending.tokens = await self._embed(pending.text)
            if pending.vector is None:  # the embedder failed: exact-only
                if first or await self._write(route, pending, body, semantic=False):
                    STORES.labels(route, "stored").inc()
                return
        if await self._write(route, pending, body, semantic=True):
            STORES.labels(route, "stored").inc()

    async def _write(
        self,
        route: str,
        pending: _Pending,
        body: bytes,
        *,
        semantic: bool = False,
        alias_of: tuple[str, int] | None = None,
    ) -> bool:
        """One write of the entry (with its vector when ``semantic`` and there is one; as an
        alias of the entry ``alias_of`` names, see CacheStore.put); False when Redis failed
        (counted and logged) or the alias was refused."""
        assert self.store is not None
        now_ms = self._now_ms()
        vec = pending.vector if semantic else None
        vector = b"" if vec is None else vec.astype("<f4").tobytes()
        tokens = (
            b"" if vec is None or pending.tokens is None else pending.tokens.astype("<f2").tobytes()
        )
        try:
            evicted = await asyncio.wait_for(
                self.store.put(
                    scope=pending.scope, scope_meta=pending.scope_meta,
                    entry_id=pending.entry_id, body=body, headers=pending.headers or {},
                    partition=pending.partition, text=pending.text if vector else "",
                    vector=vector, tokens=tokens, now_ms=now_ms, ttl_ms=pending.ttl_ms,
                    max_entries=self.p.max_entries_per_scope, stale_ms=pending.stale_ms,
                    alias_of=alias_of,
                ),
                max(1.0, self.p.redis_timeout_ms / 1000),
            )  # fmt: skip
        except REDIS_FAULTS as exc:
            ERRORS.labels("redis").inc()
            STORES.labels(route, "redis_error").inc()
            log.warning("cache store failed: %r", exc)
            return False
        if evicted is None:
            return False  # an alias of an answer replaced meanwhile
        for gone in evicted:
            self.index.remove(pending.scope, gone)
        if vec is not None:
            expires = now_ms + pending.ttl_ms
            self.index.add(Indexed(pending.scope, pending.entry_id, pending.partition,
                                   pending.text, vec, expires))  # fmt: skip
            ENTRIES.set(len(self.index))
        return True

    # --- background: the feed, versions, expiry, clustering --------------------------------

    async def rebuild(self) -> int:
        """Replaces the index with every live semantic entry in Redis; returns how many.

        Built aside and swapped in whole, so entries that vanished from Redis meanwhile (a
        restarted Redis without persistence, say) leave with the old index; changes made
        while it loads are replayed from the feed, read from its tail taken first."""
        assert self.store is not None
        self._feed_id = await self.store.feed_tail()
        now_ms = self._now_ms()
        fresh = self.index.empty_copy()
        for scope in await self.store.scopes():
            ids = await self.store.live_ids(scope, now_ms)
            for start in range(0, len(ids), 500):
                for item in await self.store.load(scope, ids[start : start + 500]):
                    _index(fresh, item)
        self.index = fresh
        ENTRIES.set(len(self.index))
        return len(fresh)

    async def apply(self, op: str, scope: str, entry_id: str) -> None:
        """One feed event (another process's change, or our own echoed back)."""
        assert self.store is not None
        if op == "add":
            for item in await self.store.load(scope, [entry_id]):
                _index(self.index, item)
        elif op == "del":
            self.index.remove(scope, entry_id)
        elif op == "drop":
            self.index.drop_scope(scope)
        ENTRIES.set(len(self.index))

    async def _follow(self) -> None:
        assert self.store is not None
        # XREAD BLOCK must return before the client's socket timeout declares Redis dead.
        # (A cluster client keeps its connection settings on itself, having no single pool.)
        r = self.deps.redis
        kwargs = getattr(getattr(r, "connection_pool", r), "connection_kwargs", {})
        block_ms = int(min(0.5, 0.5 * (kwargs.get("socket_timeout") or 0.5)) * 1000)
        rebuilt = False
        while True:
            try:
                if not rebuilt:
                    n = await self.rebuild()
                    rebuilt = True
                    log.info("cache index rebuilt from Redis: %d semantic entries", n)
                self._feed_id = await self.store.follow(self._feed_id, self.apply, block_ms)
            except asyncio.CancelledError:
                raise
            except REDIS_FAULTS as exc:
                ERRORS.labels("redis").inc()
                log.warning("cache feed: %r; retrying (full rebuild)", exc)
                rebuilt = False  # events may have been missed
                await asyncio.sleep(1.0)
            except Exception:
                # A bug must not end the follower for good (the index would then know only
                # this process' own writes, silently): logged loudly, then the same retry.
                ERRORS.labels("feed").inc()
                log.exception("cache feed failed; retrying (full rebuild)")
                rebuilt = False
                await asyncio.sleep(1.0)

    async def _poll_versions_once(self) -> None:
        assert self.p.versions_upstream is not None
        base = self.deps.upstreams.get(self.p.versions_upstream)
        if base is None:
            return
        changed = await _triton_versions(base)
        if changed is None:
            return
        old, self.versions = self.versions, changed
        for model, version in changed.items():
            if model in old and old[model] != version:
                log.info("model %s now at version %s: its old cache entries are dropped",
                         model, version)  # fmt: skip
                await self._drop_versions(model, version)

    async def _drop_versions(self, backend_model: str, current: str) -> None:
        assert self.store is not None
        names = {k for k, v in self.deps.signals.backend_models.items() if v == backend_model}
        names.add(backend_model)
        for scope, meta in (await self.store.scopes()).items():
            if meta.get("model") in names and meta.get("version") != current:
                await self.store.drop_scope(scope)
                self.index.drop_scope(scope)

    async def _poll_versions(self) -> None:
        while True:
            await asyncio.sleep(self.p.version_poll_s)
            try:
                await self._poll_versions_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a poll failure keeps the last known versions
                log.warning("model version poll failed: %r", exc)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._housekeep()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad tick must not end expiry and clustering for good
                ERRORS.labels("housekeeping").inc()
                log.exception("cache housekeeping failed; it runs again in a second")

    async def _housekeep(self) -> None:
        if self.index.expire(self._now_ms()):
            ENTRIES.set(len(self.index))
        if not self._clustering:
            for ix in self.index.needing_clustering()[:1]:
                self._clustering = True
                try:
                    gen, vecs, live = ix.snapshot()
                    centroids, assign = await asyncio.to_thread(ix.cluster, vecs, live)
                    ix.install(gen, live, centroids, assign)
                finally:
                    self._clustering = False

    # --- invalidation (admin endpoint) -----------------------------------------------------

    def admin_routes(self) -> dict[str, AdminHandler]:
        if self.p.admin_token_sha256 is None:
            return {}
        return {"/cache/invalidate": self._admin_invalidate}

    async def _admin_invalidate(
        self, query: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, Any]:
        """POST /cache/invalidate?tenant=T&model=M&route=R (any combination) or ?all=1,
        with ``Authorization: Bearer <token>``; answers what was dropped."""
        assert self.p.admin_token_sha256 is not None
        # Parsed as the auth filter parses a key: a bare token (no scheme) is refused.
        token = bearer_token(headers.get("authorization"))
        digest = hashlib.sha256((token or "").encode()).hexdigest()
        if token is None or not hmac.compare_digest(digest, self.p.admin_token_sha256):
            return 401, _admin_error("unauthorized", "a valid admin bearer token is required")
        unknown = sorted(set(query) - {"tenant", "model", "route", "all"})
        if unknown:  # a misspelt field would widen the invalidation (?tenant=a&modle=x: all of a)
            return 400, _admin_error("invalid_request_error", f"unknown parameter(s) {unknown}")
        fields = {k: query[k] for k in ("tenant", "model", "route") if query.get(k)}
        if not fields and query.get("all") not in ("1", "true"):
            return 400, _admin_error(
                "invalid_request_error", "name tenant, model and/or route, or all=1 for everything"
            )
        try:
            dropped = await self.invalidate(**fields)
        except (errors.DependencyUnavailable, *REDIS_FAULTS) as exc:
            ERRORS.labels("redis").inc()
            return 503, _admin_error("unavailable", f"Redis: {type(exc).__name__}")
        log.info("cache invalidated (%s): %s", fields or "all", dropped)
        return 200, {"invalidated": fields or "all", **dropped}

    async def invalidate(
        self, tenant: str | None = None, model: str | None = None, route: str | None = None
    ) -> dict[str, int]:
        """Drops every scope matching all given fields (none given: everything)."""
        if self.store is None:
            raise errors.DependencyUnavailable("the cache has no Redis")
        scopes = entries = 0
        for scope, meta in (await self.store.scopes()).items():
            if (
                (tenant is None or meta.get("tenant") == tenant)
                and (model is None or meta.get("model") == model)
                and (route is None or meta.get("route") == route)
            ):
                entries += await self.store.drop_scope(scope)
                self.index.drop_scope(scope)
                scopes += 1
        ENTRIES.set(len(self.index))
        return {"scopes": scopes, "entries": entries}


def _admin_error(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


def _index(index: SemanticIndex, item: Indexed) -> None:
    """Adds a stored entry to ``index``; one it cannot take (a vector of another length,
    stored before ``semantic.dimensions`` or the embedder changed, or not finite) is left
    out and counted, not fatal: it still answers exact look-ups."""
    try:
        index.add(item)
    except ValueError as exc:
        ERRORS.labels("bad_entry").inc()
        log.warning("cache entry %s left out of the index: %s", item.entry_id, exc)


def _scope_id(meta: dict[str, str]) -> str:
    raw = "\x00".join(meta[k] for k in ("tenant", "route", "model", "version"))
    return hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


def _cache_control(value: str) -> dict[str, str | None]:
    """Directive -> argument (None: none given), names lower-cased, quotes taken off; the
    first of a repeated directive wins (RFC 9111, 4.2.1), so replicas agree on it."""
    out: dict[str, str | None] = {}
    for d in value.split(","):
        name, eq, arg = d.partition("=")
        name = name.strip().lower()
        if name and name not in out:
            out[name] = arg.strip().strip('"') if eq else None
    return out


def _servable(entry: Entry | None, st: _State, now_ms: int) -> bool:
    """Fresh, and no older than the request's max-age: an older one is a miss whose answer
    refreshes the entry (RFC 9111, 5.2.1.1)."""
    if entry is None or not entry.fresh:
        return False
    return st.max_age_s is None or (now_ms - entry.created_ms) // 1000 <= st.max_age_s


def _seconds(arg: str | None) -> int | None:
    """A delta-seconds argument (RFC 9111, 1.2.2: digits only); None if malformed."""
    return int(arg) if arg is not None and arg.isascii() and arg.isdigit() else None


def _max_age(value: str) -> int | None:
    """The freshness lifetime a shared cache takes from a response's Cache-Control:
    ``s-maxage`` before ``max-age`` (RFC 9111, 5.2.2.10); None if neither is given. A
    malformed one makes the response stale (0: not stored), as 4.2.1 advises: its lifetime
    cannot be known."""
    d = _cache_control(value)
    for name in ("s-maxage", "max-age"):
        if name in d:
            age = _seconds(d[name])
            return 0 if age is None else age
    return None


def _uncacheable_response(headers: Headers) -> str | None:
    if headers.get(":status") != "200":
        return "not_200"
    if "x-floodwall-degraded" in headers:
        return "degraded"  # a lighter model's answer must not outlive the overload
    directives = _cache_control(headers.get("cache-control", ""))
    # With field names too (no-cache="set-cookie"): a shared cache that cannot revalidate
    # must not reuse the response at all.
    if directives.keys() & {"no-store", "private", "no-cache"}:
        return "upstream_no_store"
    return None


async def _triton_versions(base_url: str) -> dict[str, str] | None:
    """Triton's repository index: model -> newest READY version; None when unreachable."""
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s,
            s.post(f"{base_url.rstrip('/')}/v2/repository/index", json={"ready": True}) as r,
        ):
            if r.status != 200:
                return None
            models = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    out: dict[str, str] = {}
    for m in models if isinstance(models, list) else []:
        if not isinstance(m, dict):
            continue  # not what Triton lists: skipped, not a crash of the cache's start
        name, version = m.get("name"), str(m.get("version", ""))
        if isinstance(name, str) and (m.get("state") in (None, "READY")):
            prev = out.get(name)
            if prev is None or (
                version.isdigit() and (not prev.isdigit() or int(version) > int(prev))
            ):
                out[name] = version
    return out
