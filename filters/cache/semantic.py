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
and its topical neighbours.

With a judge and ``words_first`` (``words.py``), the candidate may come from the prompt's
words before any embedding: the cached prompt that clearly shares the most of them is judged
first (``by_words``), and only if there is none, or the judge refuses it, is the prompt
embedded and its nearest judged. With words-first's ``speculate``, when no candidate is clear,
the one sharing the most words (``word_guess``) is judged while the prompt is embedded (the
caller runs both), and ``judge_fetching`` uses that answer if the guess is the nearest."""

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
from filters.cache.words import WordIndex, WordsFirst, content_words, overlap

# Brings candidate entries from Redis by id (the caller keeps them); their token vectors back.
Fetch = Callable[[list[str]], Awaitable[Mapping[str, np.ndarray[Any, Any]]]]


@dataclass(frozen=True, slots=True)
class Verdict:
    entry_id: str | None  # the entry to serve, or None
    score: float  # similarity of the best candidate seen (0 when none)
    veto: str | None = None  # why the best candidate above the threshold was refused
    by_words: bool = False  # served a candidate found by its words (score: their overlap)


@dataclass(slots=True)
class _Meta:
    partition: str
    text: str
    expires_ms: int
    words: frozenset[str] | None  # content words, kept only with words_first


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
        words_first: WordsFirst | None = None,
    ) -> None:
        if verifier is not None and judge_cut is not None:
            raise ValueError("a verifier or a judge decides, not both")
        if words_first is not None and judge_cut is None:
            # Only the judge reads a candidate's words in context; the guards and the
            # verifier need the embedding anyway.
            raise ValueError("words_first needs a judge")
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
        self.words_first = words_first
        self._parts: dict[tuple[str, str], VectorIndex] = {}
        self._words: dict[tuple[str, str], WordIndex] = {}
        self._scopes: dict[str, set[str]] = {}
        self._meta: dict[tuple[str, str], _Meta] = {}
        self._expiry: list[tuple[int, str, str]] = []

    def __len__(self) -> int:
        return len(self._meta)

    def empty_copy(self) -> SemanticIndex:
        return SemanticIndex(self.dim, threshold=self.threshold, candidates=self.candidates,
                             guards=self.guards, flat_max=self.flat_max,
                             verifier=self.verifier, judge_cut=self.judge_cut,
                             words_first=self.words_first)  # fmt: skip

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
        words = None
        if self.words_first is not None:
            words = content_words(item.text)
            self._words.setdefault(part, WordIndex()).add(item.entry_id, words)
        self._meta[key] = _Meta(item.partition, item.text, item.expires_ms, words)
        heapq.heappush(self._expiry, (item.expires_ms, item.scope, item.entry_id))
        if len(self._expiry) > 2 * len(self._meta) + 1024:
            # Re-adds (refreshes, replicas' echoes) leave stale items until their time comes:
            # keep one per live entry, or the heap grows with the write rate times the TTL.
            self._expiry = [(m.expires_ms, s, e) for (s, e), m in self._meta.items()]
            heapq.heapify(self._expiry)

    def remove(self, scope: str, entry_id: str) -> None:
        meta = self._meta.pop((scope, entry_id), None)
        if meta is None:
            return
        part = (scope, meta.partition)
        index = self._parts.get(part)
        words = self._words.get(part)
        if words is not None:
            words.remove(entry_id)
            if not len(words):
                del self._words[part]
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
            self._words.pop((scope, partition), None)
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

    def word_candidate(self, scope: str, partition: str, text: str, now_ms: int) -> str | None:
        """The entry that words-first judges for ``text``, if any (module docstring)."""
        words = self._words.get((scope, partition))
        if self.words_first is None or words is None:
            return None
        found = words.candidate(content_words(text), self.words_first, self._live(scope, now_ms))
        return found[0] if found is not None else None

    def _live(self, scope: str, now_ms: int) -> Callable[[str], bool]:
        """Whether an entry of ``scope`` is known and unexpired at ``now_ms``."""

        def live(key: str) -> bool:
            meta = self._meta.get((scope, key))
            return meta is not None and meta.expires_ms > now_ms

        return live

    def word_guess(self, scope: str, partition: str, text: str, now_ms: int) -> str | None:
        """With words-first's ``speculate``, when ``text`` has no word candidate: the live
        entry sharing the most of its words, if at least ``speculate`` of them; else None.
        A guess at the nearest by vector, worth judging while the prompt is embedded; never
        the question asked again (the judge is not asked about that one)."""
        rule, words = self.words_first, self._words.get((scope, partition))
        if rule is None or rule.speculate is None or words is None:
            return None
        best = words.best(content_words(text), self._live(scope, now_ms))
        if best is None or best[1] < rule.speculate or rule.clear(*best[1:]):
            return None
        return None if same_question(text, self._meta[(scope, best[0])].text) else best[0]

    def by_words(
        self, scope: str, partition: str, text: str, now_ms: int, same_answer: Mapping[str, float]
    ) -> Verdict | None:
        """The words-first verdict: the word candidate served (it is the question asked again,
        or the judge's probability for it in ``same_answer`` reaches the cut), else None (go
        on to the embedding)."""
        entry = self.word_candidate(scope, partition, text, now_ms)
        return None if entry is None else self._words_verdict(scope, entry, text, same_answer)

    def _words_verdict(
        self, scope: str, entry: str, text: str, same_answer: Mapping[str, float]
    ) -> Verdict | None:
        meta = self._meta.get((scope, entry))
        if meta is None:  # gone while the judge was asked (invalidated, evicted, expired)
            return None
        assert self.judge_cut is not None and meta.words is not None  # words_first needs both
        if same_question(text, meta.text) or same_answer.get(entry, -1.0) >= self.judge_cut:
            return Verdict(entry, overlap(content_words(text), meta.words), by_words=True)
        return None

    async def by_words_fetching(
        self,
        scope: str,
        partition: str,
        text: str,
        now_ms: int,
        fetch: Fetch,
        ask_judge: Callable[[str, str], Awaitable[float]],
    ) -> tuple[Verdict | None, dict[str, float]]:
        """``by_words``, asking the judge about the word candidate while ``fetch`` brings its
        entry (as ``judge_fetching``); also the probabilities learnt, for ``judge_fetching``'s
        ``known`` so the same pair is not asked twice."""
        entry = self.word_candidate(scope, partition, text, now_ms)
        if entry is None:
            return None, {}
        probability: dict[str, float] = {}
        if not same_question(text, self._meta[(scope, entry)].text):
            probability[entry] = await self.ask_and_fetch(entry, text, scope, fetch, ask_judge)
        else:
            await fetch([entry])
        return self._words_verdict(scope, entry, text, probability), probability

    async def ask_and_fetch(
        self,
        entry: str,
        text: str,
        scope: str,
        fetch: Fetch,
        ask_judge: Callable[[str, str], Awaitable[float]],
    ) -> float:
        """The judge's probability that ``entry``'s answer serves ``text``, asked while
        ``fetch`` brings the entry."""
        # return_exceptions: a failed judge must not leave the fetch running unawaited.
        said, fetched = await asyncio.gather(
            ask_judge(self._meta[(scope, entry)].text, text), fetch([entry]),
            return_exceptions=True,
        )  # fmt: skip
        if isinstance(said, BaseException):
            raise said
        if isinstance(fetched, BaseException):
            raise fetched
        return float(said)

    async def judge_fetching(
        self,
        scope: str,
        partition: str,
        text: str,
        vector: np.ndarray[Any, Any],
        now_ms: int,
        tokens: np.ndarray[Any, Any] | None,
        fetch: Fetch,
        ask_judge: Callable[[str, str], Awaitable[float]] | None = None,
        known: Mapping[str, float] | None = None,
        speculated: dict[str, Awaitable[float]] | None = None,
    ) -> Verdict:
        """``judge``, first fetching what deciding on the nearest candidate needs: its token
        vectors when the verifier aligns words (they live in Redis with the entries, not in
        this process), the judge's probability (``ask_judge(cached_text, text)``) when a judge
        decides and the candidate is not the same question asked again. While the judge
        runs, ``fetch`` runs too (its caller keeps the candidate's entry it brings back), so
        a yes answers without another Redis round trip. ``known``: probabilities the judge
        already gave (``by_words_fetching``), not asked again. ``speculated``: the answers
        (``ask_and_fetch``) the caller asked for before the embedding (``word_guess``); the
        nearest's, if there, is used where the judge would be asked, and removed. The
        judge's errors propagate: the caller counts them and misses."""
        hits = self._search(scope, partition, vector)
        cached: Mapping[str, np.ndarray[Any, Any]] = {}
        probability: dict[str, float] = {}
        nearest = self._nearest_live(scope, hits, now_ms)
        cached_text = self._meta[(scope, nearest)].text if nearest is not None else ""
        if nearest is None:
            pass
        elif known and nearest in known:
            probability[nearest] = known[nearest]  # refused by words-first: no second ask
        elif self.judge_cut is not None and not same_question(text, cached_text):
            if speculated is not None and nearest in speculated:
                # The guess was right. Taken out, so the caller can tell (even if it fails).
                probability[nearest] = await speculated.pop(nearest)
            elif ask_judge is None:
                raise ValueError("this index decides with a judge: pass ask_judge")
            else:
                probability[nearest] = await self.ask_and_fetch(nearest, text, scope, fetch,
                                                                ask_judge)  # fmt: skip
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
