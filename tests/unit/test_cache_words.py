"""Words-first (filters/cache/words.py): content words, the word index's candidate, and the
semantic index asking the judge about it before any embedding."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from filters.cache import words
from filters.cache.embedder import JudgeError
from filters.cache.evaluate import Pair, judge_report, one_index_report
from filters.cache.params import SemanticParams
from filters.cache.semantic import SemanticIndex
from filters.cache.store import Indexed
from filters.cache.words import WordIndex, WordsFirst, content_words, overlap

RULE = WordsFirst(min_overlap=0.2, margin=0.3)


def always(_: str) -> bool:
    return True


def test_content_words() -> None:
    assert content_words("How do I cancel my Subscriptions?") == {"cancel", "subscription"}
    # Digits and "not" are content words; one-letter tokens are not ("can't": the judge reads
    # the whole prompt).
    assert content_words("Why can't I NOT pay 2 invoices?") == {"not", "pay", "2", "invoice"}
    assert content_words("my address, addresses") == {"address", "addresse"}
    assert content_words("Ändern Sie das Passwort") == {"ändern", "sie", "das", "passwort"}
    # Short words keep their endings: "bus" and "used" are not "bu" and "us".
    assert content_words("bus used") == {"bus", "used"}
    assert content_words("the of and ?") == frozenset()
    assert overlap(frozenset(), frozenset()) == 0.0
    assert overlap(frozenset({"a", "b"}), frozenset({"b", "c"})) == pytest.approx(1 / 3)


def test_the_word_candidate_needs_its_overlap_and_a_clear_margin() -> None:
    ix = WordIndex()
    ix.add("order", content_words("Can I cancel my order today?"))
    ix.add("invoice", content_words("Where is my invoice for March?"))
    asked = content_words("today can I cancel the order")
    assert ix.candidate(asked, RULE, always) == ("order", 1.0)
    # Too few shared words.
    unrelated = content_words("cancel everything tomorrow please now")
    assert ix.candidate(unrelated, RULE, always) is None
    # Two cached prompts share the words about as much: no clear candidate.
    ix.add("order2", content_words("Can I cancel my order tomorrow?"))
    assert ix.candidate(content_words("cancel my order"), RULE, always) is None
    # Unless the runner-up is not live (expired): then the next one is the runner-up.
    assert ix.candidate(content_words("cancel my order today"), RULE,
                        lambda k: k != "order2") == ("order", 1.0)  # fmt: skip
    ix.remove("order2")
    ix.remove("order2")  # removing twice is harmless
    assert ix.candidate(content_words("cancel my order"), RULE, always) == ("order", 2 / 3)
    # Replacing an entry's words drops the old ones.
    ix.add("order", content_words("Where do I park?"))
    assert ix.candidate(asked, RULE, always) is None
    assert len(ix) == 2


def test_a_word_in_too_many_entries_finds_no_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(words, "MAX_POSTINGS", 2)
    ix = WordIndex()
    for i in range(3):
        ix.add(str(i), frozenset({"order", f"w{i}"}))
    # "order" is in 3 > 2 entries: not gathered; "w1" finds entry 1, scored on all its words.
    assert ix.candidate(frozenset({"order"}), RULE, always) is None
    assert ix.candidate(frozenset({"order", "w1"}), RULE, always) == ("1", 1.0)


def unit(*v: float) -> np.ndarray[Any, Any]:
    a = np.array(v, dtype=np.float32)
    return a / np.linalg.norm(a)


async def test_the_index_asks_the_judge_about_the_word_candidate_first() -> None:
    si = SemanticIndex(4, threshold=0.6, judge_cut=0.5, words_first=RULE)
    si.add(Indexed("s", "order", "p", "Can I cancel my order today?", unit(1, 0, 0, 0), 10**12))
    si.add(Indexed("s", "old", "p", "Where is my invoice for March?", unit(0, 1, 0, 0), 5))
    asked: list[tuple[str, str]] = []
    fetched: list[list[str]] = []

    def judge(p: float) -> Any:
        async def ask(cached: str, text: str) -> float:
            asked.append((cached, text))
            return p

        return ask

    async def fetch(ids: list[str]) -> dict[str, Any]:
        fetched.append(ids)
        return {}

    text = "today can I cancel the order"
    verdict, known = await si.by_words_fetching("s", "p", text, 0, fetch, judge(0.9))
    assert verdict is not None and verdict.entry_id == "order" and verdict.by_words
    assert verdict.score == 1.0 and known == {"order": 0.9}
    assert asked == [("Can I cancel my order today?", text)] and fetched == [["order"]]
    refused, known = await si.by_words_fetching("s", "p", text, 0, fetch, judge(0.1))
    assert refused is None and known == {"order": 0.1}
    # The refusal is carried into the vector look-up: not asked again about the same entry.
    asked.clear()
    v = await si.judge_fetching("s", "p", text, unit(1, 0.1, 0, 0), 0, None, fetch,
                                judge(0.9), known)  # fmt: skip
    assert v.entry_id is None and v.veto == "judge" and asked == []
    # The same question asked again is served without the judge.
    again, known = await si.by_words_fetching("s", "p", "can i cancel my order today", 0, fetch,
                                              judge(0.0))  # fmt: skip
    assert again is not None and again.entry_id == "order" and asked == [] and known == {}
    # An expired entry is never the candidate; nor is anything in another partition.
    assert si.word_candidate("s", "p", "my invoice for March", 10) is None
    assert si.word_candidate("s", "p", "my invoice for March", 0) == "old"
    assert si.word_candidate("s", "q", text, 0) is None
    assert si.expire(10) == 1 and si.word_candidate("s", "p", "my invoice for March", 0) is None
    si.drop_scope("s")
    assert si.word_candidate("s", "p", text, 0) is None
    assert si.empty_copy().words_first == RULE


async def test_a_candidate_removed_while_the_judge_decides_is_no_verdict() -> None:
    """Invalidation, eviction or expiry may remove the word candidate while the judge is
    asked about it: no verdict (a miss), not a KeyError."""
    si = SemanticIndex(4, threshold=0.6, judge_cut=0.5, words_first=RULE)
    si.add(Indexed("s", "order", "p", "Can I cancel my order today?", unit(1, 0, 0, 0), 10**12))

    async def ask(cached: str, text: str) -> float:
        si.remove("s", "order")
        return 0.9

    async def fetch(ids: list[str]) -> dict[str, Any]:
        return {}

    verdict, known = await si.by_words_fetching("s", "p", "today can I cancel the order", 0,
                                                fetch, ask)  # fmt: skip
    assert verdict is None and known == {"order": 0.9}


def test_words_first_needs_the_judge() -> None:
    with pytest.raises(ValueError, match="needs a judge"):
        SemanticIndex(4, threshold=0.6, words_first=RULE)
    p = SemanticParams.model_validate({"judge": {"words_first": {}}})
    assert p.judge is not None and p.judge.words_rule() == WordsFirst(0.2, 0.3)
    assert SemanticParams.model_validate({"judge": {}}).judge.words_rule() is None  # type: ignore[union-attr]
    with pytest.raises(ValidationError):
        SemanticParams.model_validate({"judge": {"words_first": {"margin": -0.1}}})


def test_the_eval_reports_judge_the_way_the_filter_does() -> None:
    """``one_index_report`` asks about the word candidate first and then about the nearest of
    the questions it did not serve, and counts what words-first served; ``judge_report``
    serves a pair by its words even below the cosine threshold."""
    cached, para, trap = "Can I cancel my order today?", "today can I cancel the order", (
        "Can I not cancel my order today?")  # fmt: skip
    other = "Where is my invoice for March?"
    vectors = {cached: unit(1, 0, 0, 0), para: unit(0.3, 1, 0, 0), trap: unit(1, 0.1, 0, 0),
               other: unit(0, 0, 1, 0)}  # fmt: skip
    pairs = [Pair(cached, para, True, "paraphrase", None),
             Pair(cached, trap, False, "negation", None)]  # fmt: skip
    rounds: list[list[tuple[str, str]]] = []

    def ask_judge(asks: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        rounds.append(asks)
        return {pair: 0.1 if "not" in pair[1] else 0.9 for pair in asks}

    r = one_index_report(pairs, vectors, threshold=0.5, distractors=[other], judge_cut=0.5,
                         ask_judge=ask_judge, words_first=RULE)  # fmt: skip
    assert r["hit_rate"] == 1.0 and r["wrong_hit_rate"] == 0.0 and r["served_by_words"] == 1
    # Both word candidates in one batch; then nothing: the trap's nearest was already asked.
    assert rounds == [[(cached, para), (cached, trap)], []]
    embedding_only = one_index_report(pairs, vectors, threshold=0.5, distractors=[other],
                                      judge_cut=0.5, ask_judge=ask_judge)  # fmt: skip
    # The paraphrase's vector is far below the threshold: only its words find it.
    assert embedding_only["hit_rate"] == 0.0 and embedding_only["served_by_words"] == 0
    prob = {(cached, para): 0.9, (cached, trap): 0.1}
    by_words = judge_report(pairs, vectors, prob, threshold=0.5, cut=0.5, words_first=RULE)
    assert by_words["hit_rate"] == 1.0 and by_words["wrong_hit_rate"] == 0.0
    assert judge_report(pairs, vectors, prob, threshold=0.5, cut=0.5)["hit_rate"] == 0.0


async def test_the_guess_is_the_best_unclear_word_candidate_and_counts_only_if_nearest() -> None:
    """speculate: with no clear candidate, the entry sharing the most words (at least the
    guess's overlap) is the guess; judge_fetching uses the answer on it only if it is the
    nearest by vector, else asks about the nearest, so the verdicts do not change."""
    ix = WordIndex()
    ix.add("order", content_words("Can I cancel my order today?"))
    ix.add("parcel", content_words("Where is the parcel I ordered last week?"))
    placed = content_words("I placed an order last week and want to cancel it, possible?")
    assert ix.best(placed, always) == ("parcel", 3 / 8, 2 / 8)
    assert ix.best(placed, lambda k: k != "parcel") == ("order", 2 / 8, 0.0)
    assert ix.best(content_words("weather in Paris"), always) is None

    guessing = WordsFirst(0.2, 0.3, speculate=0.1)
    si = SemanticIndex(4, threshold=0.6, judge_cut=0.5, words_first=guessing)
    si.add(Indexed("s", "order", "p", "Can I cancel my order today?", unit(1, 0, 0, 0), 10**12))
    si.add(Indexed("s", "parcel", "p", "Where is the parcel I ordered last week?",
                   unit(0.6, 0.8, 0, 0), 10**12))  # fmt: skip
    text = "I placed an order last week and want to cancel it, possible?"
    assert si.word_guess("s", "p", text, 0) == "parcel"
    # A clear candidate is no guess (words-first judges it); nor is one sharing too little,
    # an expired one, one in another partition, or anything with speculation off.
    assert si.word_candidate("s", "p", "today can I cancel the order", 0) == "order"
    assert si.word_guess("s", "p", "today can I cancel the order", 0) is None
    little = "parcel sent to the wrong city, broken, no tracking, refund asked"  # 1 of 11
    assert si.word_guess("s", "p", little, 0) is None
    assert si.word_guess("s", "p", text, 10**12) is None
    assert si.word_guess("s", "q", text, 0) is None
    off = SemanticIndex(4, threshold=0.6, judge_cut=0.5, words_first=RULE)
    off.add(Indexed("s", "order", "p", "Can I cancel my order today?", unit(1, 0, 0, 0), 10**12))
    assert off.word_guess("s", "p", text, 0) is None

    asked: list[str] = []

    async def ask(cached: str, _: str) -> float:
        asked.append(cached)
        return 0.9

    async def fetch(ids: list[str]) -> dict[str, Any]:
        return {}

    def answer(p: float | Exception) -> asyncio.Future[float]:  # a speculative call, done
        done = asyncio.get_running_loop().create_future()
        if isinstance(p, Exception):
            done.set_exception(p)
        else:
            done.set_result(p)
        return done

    # The guess is the nearest: its answer decides (a refusal here), no other call; it is
    # taken out of `speculated`, which tells the caller it was used.
    spec = {"parcel": answer(0.1)}
    v = await si.judge_fetching("s", "p", text, unit(0.6, 0.8, 0, 0), 0, None, fetch, ask,
                                speculated=spec)  # fmt: skip
    assert v.entry_id is None and v.veto == "judge" and asked == [] and spec == {}
    # Its failure is the look-up's, as the judge's own would be.
    spec = {"parcel": answer(JudgeError("judge unreachable (test)"))}
    with pytest.raises(JudgeError):
        await si.judge_fetching("s", "p", text, unit(0.6, 0.8, 0, 0), 0, None, fetch, ask,
                                speculated=spec)  # fmt: skip
    assert spec == {}
    # It is not the nearest: the nearest is asked about, and served; the guess stays unused.
    spec = {"parcel": answer(0.1)}
    v = await si.judge_fetching("s", "p", text, unit(1, 0.1, 0, 0), 0, None, fetch, ask,
                                speculated=spec)  # fmt: skip
    assert v.entry_id == "order" and asked == ["Can I cancel my order today?"] and "parcel" in spec
    # The nearest is the question asked again: served without the judge, guess or not.
    asked.clear()
    spec = {"order": answer(JudgeError("never awaited (test)"))}
    v = await si.judge_fetching("s", "p", "can i cancel my order today", unit(1, 0, 0, 0), 0,
                                None, fetch, ask, speculated=spec)  # fmt: skip
    assert v.entry_id == "order" and asked == [] and "order" in spec
    spec["order"].exception()  # retrieved, as the filter's done-callback does
    # Nor is the question asked again ever the guess.
    si.add(Indexed("s", "order2", "p", "Can I cancel my order today or tomorrow?",
                   unit(0.9, 0.1, 0, 0), 10**12))  # fmt: skip
    assert si.word_candidate("s", "p", "can i cancel my order today", 0) is None
    assert si.word_guess("s", "p", "can i cancel my order today", 0) is None


def test_the_eval_counts_how_often_the_guess_is_the_nearest() -> None:
    order, parcel = "Can I cancel my order today?", "Where is the parcel I ordered last week?"
    placed = "I placed an order last week and want to cancel it, possible?"  # guess: parcel
    stop = "I want to stop an order placed today"  # guess: order
    clear = "the parcel I ordered last week: where is it now?"  # words-first's candidate
    vectors = {order: unit(1, 0, 0, 0), parcel: unit(0.6, 0.8, 0, 0), placed: unit(1, 0.1, 0, 0),
               stop: unit(1, 0.2, 0, 0), clear: unit(0.6, 0.8, 0.1, 0)}  # fmt: skip
    pairs = [Pair(order, placed, True, "paraphrase", None),
             Pair(order, stop, True, "paraphrase", None),
             Pair(parcel, clear, True, "paraphrase", None)]  # fmt: skip

    def ask_judge(asks: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        return dict.fromkeys(asks, 0.9)

    r = one_index_report(pairs, vectors, threshold=0.5, judge_cut=0.5, ask_judge=ask_judge,
                         words_first=WordsFirst(0.2, 0.3, speculate=0.1))  # fmt: skip
    assert r["speculation"] == {"true": {"embedded": 2, "guessed": 2, "guessed_nearest": 1},
                                "false": {}}  # fmt: skip
    assert "speculation" not in one_index_report(pairs, vectors, threshold=0.5, judge_cut=0.5,
                                                 ask_judge=ask_judge, words_first=RULE)  # fmt: skip
