"""The semantic decision, shared by the live filter and ``floodwall cache eval``: which cached
prompt (if any) may answer a new one. Candidates come from the vector index of the request's
partition, best first. The nearest one must reach the threshold and then be accepted by
one of three deciders: the judge (``judge.py``, a cross-encoder Triton serves: its
probability of "same answer" must reach ``judge_cut``), a trained verifier
(``verifier.py``, with its own threshold), or every guard (``guards.py``). The others are
served only if they are the question asked again (``same_question``).

Only the nearest is judged because the rest are the neighbours a full cache always has:
questions on the same topic that ask something else. Judging them too ("the first that
passes") served another question's answer to 20% of the look-alike traps of the held-out
sets once all of a set's questions were stored (``cache eval``'s ``one_index``), against 3%
when only the nearest is judged, for the same share of paraphrases served (76.7% / 76.5%);
the verifier and the guards were fitted on a question and its look-alike, not on a question
and its topical neighbours."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from filters.cache.guards import GUARDS, same_question, veto
from filters.cache.index import Hit, VectorIndex
from filters.cache.store import Indexed
from filters.cache.verifier import Verifier


@dataclass(frozen=True, slots=True)
class Verdict:
    entry_id: str | None  # the entry to serve, or None
    score: float  # similarity of the best candidate seen (0 when none)
    veto: str | None = None  # why the best candidate above the threshold was refused


@dataclass(slots=True)
class _Meta:
    partition: str
    text: str
    expires_ms: int


class SemanticIndex:
    """Every semantic entry this process knows, indexed per (scope, partition)."""

    def __init__(
        self,
        dim: int,
        *,
        threshold: float,
        candidates: int = 4,
        guards: tuple[str, ...] = GUARDS,
        flat_max: int = 20_000,
        verifier: Verifier | None = None,
        judge_cut: float | None = None,
    ) -> None:
        if verifier is not None and judge_cut is not None:
            raise ValueError("a verifier or a judge decides, not both")
        self.dim = dim
        # A verifier brings its own threshold and weighs the guards' findings itself.
        self.threshold = verifier.threshold if verifier is not None else threshold
        self.candidates = candidates
        self.guards = guards
        self.flat_max = flat_max
        self.verifier = verifier
        # With a judge, the nearest candidate at or above the threshold is served when the
        # judge's probability for it (fetched by judge_fetching) reaches this.
        self.judge_cut = judge_cut
        self._parts: dict[tuple[str, str], VectorIndex] = {}
        self._scopes: dict[str, set[str]] = {}
        self._meta: dict[tuple[str, str], _Meta] = {}
        self._expiry: list[tuple[int, str, str]] = []

    def __len__(self) -> int:
        return len(self._meta)

    def empty_copy(self) -> SemanticIndex:
        return SemanticIndex(self.dim, threshold=self.threshold, candidates=self.candidates,
                             guards=self.guards, flat_max=self.flat_max,
                             verifier=self.verifier, judge_cut=self.judge_cut)  # fmt: skip

    def add(self, item: Indexed) -> None:
        key = (item.scope, item.entry_id)
        old = self._meta.get(key)
        if old is not None and old.partition != item.partition:
            self.remove(item.scope, item.entry_id)
        part = (item.scope, item.partition)
        index = self._parts.get(part)
        if index is None:
            index = self._parts[part] = VectorIndex(self.dim, flat_max=self.flat_max)
            self._scopes.setdefault(item.scope, set()).add(item.partition)
        index.add(item.entry_id, item.vector)
        self._meta[key] = _Meta(item.partition, item.text, item.expires_ms)
        heapq.heappush(self._expiry, (item.expires_ms, item.scope, item.entry_id))

    def remove(self, scope: str, entry_id: str) -> None:
        meta = self._meta.pop((scope, entry_id), None)
        if meta is None:
            return
        part = (scope, meta.partition)
        index = self._parts.get(part)
        if index is not None:
            index.remove(entry_id)
            if not len(index):
                del self._parts[part]
                partitions = self._scopes.get(scope)
                if partitions is not None:
                    partitions.discard(meta.partition)
                    if not partitions:
                        del self._scopes[scope]

    def drop_scope(self, scope: str) -> None:
        for partition in self._scopes.pop(scope, set()):
            self._parts.pop((scope, partition), None)
        for key in [k for k in self._meta if k[0] == scope]:
            del self._meta[key]

    def expire(self, now_ms: int) -> int:
        """Forgets entries past their expiry; returns how many."""
        n = 0
        while self._expiry and self._expiry[0][0] <= now_ms:
            expires, scope, entry_id = heapq.heappop(self._expiry)
            meta = self._meta.get((scope, entry_id))
            if meta is not None and meta.expires_ms == expires:  # not replaced since
                self.remove(scope, entry_id)
                n += 1
        return n

    @property
    def needs_tokens(self) -> bool:
        """Whether judging needs both prompts' token vectors (the align verifier)."""
        return self.verifier is not None and self.verifier.align

    def judge(
        self,
        scope: str,
        partition: str,
        text: str,
        vector: np.ndarray[Any, Any],
        now_ms: int,
        tokens: np.ndarray[Any, Any] | None = None,
        cached_tokens: Mapping[str, np.ndarray[Any, Any]] | None = None,
        same_answer: Mapping[str, float] | None = None,
    ) -> Verdict:
        """The entry (if any) whose answer may serve ``text``; with the align verifier,
        ``tokens`` are the new prompt's token vectors and ``cached_tokens`` the candidates'
        by entry id (a candidate without them is refused); with a judge, ``same_answer``
        holds its probabilities by entry id (a candidate without one is refused)."""
        hits = self._search(scope, partition, vector)
        return self._decide(
            scope, partition, hits, text, vector, now_ms, tokens, cached_tokens or {},
            same_answer or {},
        )  # fmt: skip

    async def judge_fetching(
        self,
        scope: str,
        partition: str,
        text: str,
        vector: np.ndarray[Any, Any],
        now_ms: int,
        tokens: np.ndarray[Any, Any] | None,
        fetch: Callable[[list[str]], Awaitable[Mapping[str, np.ndarray[Any, Any]]]],
        ask_judge: Callable[[str, str], Awaitable[float]] | None = None,
    ) -> Verdict:
        """``judge``, first fetching what deciding on the nearest candidate needs: its token
        vectors when the verifier aligns words (they live in Redis with the entries, not in
        this process), the judge's probability (``ask_judge(cached_text, text)``) when a judge
        decides and the candidate is not the same question asked again. While the judge
        runs, ``fetch`` runs too (its caller keeps the candidate's entry it brings back), so
        a yes answers without another Redis round trip. ``ask_judge``'s errors propagate:
        the caller counts them and misses."""
        hits = self._search(scope, partition, vector)
        cached: Mapping[str, np.ndarray[Any, Any]] = {}
        probability: dict[str, float] = {}
        nearest = self._nearest_live(scope, hits, now_ms)
        cached_text = self._meta[(scope, nearest)].text if nearest is not None else ""
        if nearest is None:
            pass
        elif self.judge_cut is not None and not same_question(text, cached_text):
            if ask_judge is None:
                raise ValueError("this index decides with a judge: pass ask_judge")
            # return_exceptions: a failed judge must not leave the fetch running unawaited.
            said, fetched = await asyncio.gather(
                ask_judge(cached_text, text), fetch([nearest]), return_exceptions=True
            )
            if isinstance(said, BaseException):
                raise said
            if isinstance(fetched, BaseException):
                raise fetched
            probability[nearest] = said
        elif self.needs_tokens:
            cached = await fetch([nearest])
        return self._decide(
            scope, partition, hits, text, vector, now_ms, tokens, cached, probability
        )

    def _nearest_live(self, scope: str, hits: list[Hit], now_ms: int) -> str | None:
        """The candidate the deciders judge: the nearest unexpired one at or above the
        threshold."""
        for hit in hits:
            if hit.score < self.threshold:
                return None
            meta = self._meta.get((scope, hit.key))
            if meta is not None and meta.expires_ms > now_ms:
                return hit.key
        return None

    def _search(self, scope: str, partition: str, vector: np.ndarray[Any, Any]) -> list[Hit]:
        index = self._parts.get((scope, partition))
        return [] if index is None else index.search(vector, self.candidates, min_score=-1.0)

    def _decide(
        self,
        scope: str,
        partition: str,
        hits: list[Hit],
        text: str,
        vector: np.ndarray[Any, Any],
        now_ms: int,
        tokens: np.ndarray[Any, Any] | None,
        cached_tokens: Mapping[str, np.ndarray[Any, Any]],
        same_answer: Mapping[str, float],
    ) -> Verdict:
        if not hits:
            return Verdict(None, 0.0)
        index = self._parts.get((scope, partition))
        refused: str | None = None
        judged = False
        for hit in hits:
            if hit.score < self.threshold:
                break
            meta = self._meta.get((scope, hit.key))
            if meta is None or meta.expires_ms <= now_ms:
                continue
            if same_question(text, meta.text):
                return Verdict(hit.key, hit.score)  # asked again: no look-alike to fear
            if judged:
                continue  # a neighbour of the nearest: served only if asked again (above)
            judged = True
            if self.judge_cut is not None:
                reason = None if same_answer.get(hit.key, -1.0) >= self.judge_cut else "judge"
            elif self.verifier is not None:
                cached = index.vector(hit.key) if index is not None else None
                ok = cached is not None and self.verifier.accepts(
                    text, vector, meta.text, cached, tokens, cached_tokens.get(hit.key)
                )
                reason = None if ok else "verifier"
            else:
                reason = veto(text, meta.text, self.guards) if self.guards else None
            if reason is None:
                return Verdict(hit.key, hit.score)
            refused = reason
        return Verdict(None, hits[0].score, refused)

    def has_partition(self, scope: str, partition: str) -> bool:
        return (scope, partition) in self._parts

    def needing_clustering(self) -> list[VectorIndex]:
        return [ix for ix in self._parts.values() if ix.wants_clustering()]
