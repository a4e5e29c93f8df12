"""Units of the cache: canonical keys, guards, the vector index, the eval report, params."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from filters.cache import canon
from filters.cache.embedder import JudgeError, _tensor
from filters.cache.evaluate import Judged, Pair, one_index_report, report
from filters.cache.filter import CacheFilter, _cache_control, _max_age, _uncacheable_response
from filters.cache.guards import same_question, typo, veto
from filters.cache.index import VectorIndex
from filters.cache.params import JUDGE_THRESHOLD, RECOMMENDED_THRESHOLD
from filters.cache.semantic import SemanticIndex
from filters.cache.store import Indexed
from proxy.api import Deps

# --- canonical keys ----------------------------------------------------------------------------


def key(req: object, api: str = "openai_chat", max_temperature: float = 0.0) -> canon.Lookup:
    return canon.lookup(req, api=api, model=None, max_temperature=max_temperature)


def chat(q: str, history: list[dict[str, str]] | None = None, **extra: object) -> dict[str, object]:
    return {"model": "m", "temperature": 0,
            "messages": [*(history or []), {"role": "user", "content": q}], **extra}  # fmt: skip


def test_exact_id_ignores_order_and_output_neutral_fields() -> None:
    a = key(chat("hi", max_tokens=5))
    b = key(orjson.loads(b'{"max_tokens":5,"temperature":0,"user":"u1","stream":false,'
                         b'"messages":[{"content":"hi","role":"user"}],"model":"m"}'))  # fmt: skip
    assert a.exact_id == b.exact_id
    assert key(chat("hi", max_tokens=6)).exact_id != a.exact_id
    assert key(chat("hi", seed=1)).exact_id != a.exact_id


# Output-neutral fields with values the API filter refuses: never left out of the key.
BAD_NEUTRAL = {
    "openai_chat": [("stream", "x"), ("user", 5), ("metadata", 5), ("store", "yes"),
                    ("service_tier", 1), ("stream_options", 5),
                    ("stream_options", {"include_usage": "yes"}),
                    ("stream_options", {"other": True}),
                    ("stream_options", {"include_usage": False})],  # without "stream": true
    "openai_embeddings": [("stream", "yes"), ("user", 5), ("metadata", {}), ("store", True)],
}  # fmt: skip


@pytest.mark.parametrize("api", sorted(BAD_NEUTRAL))
async def test_a_neutral_field_the_api_refuses_never_hits(api: str) -> None:
    """A cache hit answers before the API filter validates: a request it would refuse must
    not share the key of a valid one (the API filter then answers 400)."""
    from tests.unit.test_openai_requests import _harness

    if api == "openai_chat":
        req: dict[str, object] = {"model": "sim", "messages": [{"role": "user", "content": "q"}],
                                  "temperature": 0}  # fmt: skip
        path = "/v1/chat/completions"
    else:
        req, path = {"model": "mini", "input": "q"}, "/v1/embeddings"
    clean = canon.lookup(req, api=api, model=None, max_temperature=0).exact_id
    fine = {"stream": False, "user": "u"}
    for field, value in [(f, v) for f, v in fine.items() if f in canon.IGNORABLE[api]]:
        same = canon.lookup({**req, field: value}, api=api, model=None, max_temperature=0)
        assert same.exact_id == clean, field  # what the API filter accepts stays neutral
    for field, value in BAD_NEUTRAL[api]:
        bad = {**req, field: value}
        assert canon.lookup(bad, api=api, model=None, max_temperature=0).exact_id != clean
        r = await _harness().request("POST", path, body=orjson.dumps(bad))
        assert r.status == 400, (field, value, r.body)


def test_partition_holds_everything_but_the_last_question() -> None:
    one = key(chat("What now?", [{"role": "system", "content": "Be brief."}]))
    two = key(chat("What next?", [{"role": "system", "content": "Be brief."}]))
    other = key(chat("What now?", [{"role": "system", "content": "Be verbose."}]))
    assert one.partition == two.partition != other.partition
    assert one.exact_id != two.exact_id
    assert (one.text, two.text) == ("What now?", "What next?")
    assert key(chat("x", max_tokens=9)).partition != key(chat("x")).partition


def test_what_is_not_cacheable() -> None:
    for req, reason in (
        (chat("q", temperature=0.7), "nondeterministic"),
        ({"model": "m", "messages": [{"role": "user", "content": "q"}]}, "nondeterministic"),
        (chat("q", stream=True), "streamed"),
        ({"messages": []}, "no_model"),
        ([1, 2], "not_json_object"),
    ):
        with pytest.raises(canon.NotCacheable) as e:
            key(req)  # type: ignore[arg-type]
        assert e.value.reason == reason
    assert key(chat("q", temperature=0.5), max_temperature=0.5).text == "q"


def test_text_sources_per_api() -> None:
    assert key({"model": "e", "input": "hello"}, api="openai_embeddings").text is None
    last_is_assistant = chat("q", [])
    last_is_assistant["messages"] = [{"role": "user", "content": "q"},  # type: ignore[index]
                                     {"role": "assistant", "content": "a"}]  # fmt: skip
    assert key(last_is_assistant).text is None
    parts = chat("")
    parts["messages"] = [{"role": "user", "content": [{"type": "text", "text": "a"},  # type: ignore[index]
                                                      {"type": "text", "text": "b"}]}]  # fmt: skip
    assert key(parts).text == "ab"
    k = canon.lookup({"inputs": [{"data": ["what is x"]}], "id": 1}, api="kserve_http",
                     model="m", max_temperature=0, text_pointer="/inputs/0/data/0")  # fmt: skip
    k2 = canon.lookup({"inputs": [{"data": ["what's x"]}], "id": 1}, api="kserve_http",
                      model="m", max_temperature=0, text_pointer="/inputs/0/data/0")  # fmt: skip
    assert k.text == "what is x" and k.partition == k2.partition and k.exact_id != k2.exact_id


# --- guards --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "guard"),
    [
        ("Cancel my subscription", "Don't cancel my subscription", "negation"),
        ("Can I fly with a cold?", "Can I fly without a cold?", "negation"),
        ("Which US states border Canada?", "which US states dont border canada", "negation"),
        ("convert 5 miles to km", "convert 50 miles to km", "number"),
        ("Is Python 3.11 faster than 3.10?", "Is Python 3.12 faster than 3.10?", "number"),
        ("weather in Oslo today", "weather in Oslo tomorrow", "date_time"),
        ("Did it rain last Sunday?", "Will it rain this Sunday?", "date_time"),
        ("how to increase the volume", "how to decrease the volume", "antonym"),
        ("How do I enable 2FA?", "How do I disable 2FA?", "antonym"),
        ("How do I zoom in on a Mac?", "How do I zoom out on a Mac?", "antonym"),
        ("What is the capital of Australia?", "What is the capital of Austria?", "entity"),
        ("What is the chemical symbol for gold?", "What is the chemical symbol for silver?",
         "entity"),
        ("flights from Paris to London", "flights from London to Paris", "swap"),
        ("Can dogs eat cat food?", "Can cats eat dog food?", "swap"),
        ("How do I reset my password?",
         "How do I reset my password in the mobile app?", "scope"),
        ("Symptoms of a heart attack in women", "Symptoms of a heart attack", "scope"),
    ],
)  # fmt: skip
def test_each_guard_refuses_its_trap(a: str, b: str, guard: str) -> None:
    assert veto(b, a) == guard
    assert veto(a, b) == guard  # symmetric


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I reset my password?", "How can I reset my password?"),
        ("What are the steps to cancel my subscription?", "How do I cancel my subscription?"),
        ("How many tablespoons are in a cup?", "1 cup = how many tablespoons?"),
        ("three apples", "3 apples"),
        ("How do I reverse a list in Python?", "python: how to reverse a list"),
        ("flights from Paris to London", "flights to London from Paris"),
        ("What is the length of an array in JavaScript?", "length of a JS array"),
        ("What's the difference between TCP and UDP?", "TCP vs UDP"),
    ],
)
def test_guards_let_paraphrases_through(a: str, b: str) -> None:
    assert veto(b, a) is None


def test_the_same_question_asked_again_is_recognised() -> None:
    assert same_question("Hi, who invented the telephone", "Who invented the telephone?")
    assert same_question("who invented the telephone?? thanks", "Who invented the telephone?")
    assert same_question("Quick question: how do I undo a commit", "How do I undo a commit?")
    assert same_question("Please explain TCP slow start. Thank you!", "explain tcp slow start")
    # How a how-to question opens, and "what's" for "what is".
    assert same_question("how can I reset my password", "How do I reset my password?")
    assert same_question("how to reset my password", "How can you reset my password")
    assert same_question("where's my order", "Where is my order?")
    assert same_question("Is it possible to pay by card?", "can I pay by card")
    assert not same_question("How should I reset my password?", "How do I reset my password?")
    assert not same_question("How do I not reset my password?", "How do I reset my password?")
    assert not same_question("Who invented the radio?", "Who invented the telephone?")
    assert not same_question("Convert USD to EUR", "Convert EUR to USD")  # order counts
    # Greetings and thanks only at the ends: inside, a word is part of the question.
    assert not same_question("Is it rude to say please twice", "Is it rude to say twice")
    assert not same_question("thanks", "please")  # nothing is left of either: not the same


def test_one_typo_in_a_long_word_is_the_same_question() -> None:
    assert same_question("How do I conevrt a PDF to Word?", "How do I convert a PDF to Word?")
    assert same_question("what is my billing adress", "What is my billing address?")
    assert same_question("Is it neccessary to book ahead?", "Is it necessary to book ahead?")
    # Two words the vocabulary knows are two questions, however close their spelling.
    assert not same_question("What is martial law?", "What is marital law?")
    # Not at the first letter, not in short words, one word only, and only swaps or
    # doubled letters: a letter added or changed also turns one term into another.
    assert not same_question("How do I ocnvert a PDF?", "How do I convert a PDF?")
    assert not same_question("Where is the from?", "Where is the form?")
    assert not same_question("How do I conevrt a PDF to Wrod?", "How do I convert a PDF to Word?")
    assert not same_question("The boiling point of methanol", "The boiling point of ethanol")
    assert not same_question("Where is the peroneal nerve?", "Where is the perineal nerve?")
    assert typo("colonsocopy", "colonoscopy") and not typo("colonoscopy", "colonoscopy")
    assert not typo("m\u00fcllerstrasse", "m\u00fclelrstrasse")  # non-ASCII: left to the decider


def test_no_trap_of_the_shipped_sets_reads_as_the_same_question() -> None:
    from filters.cache.evaluate import SHIPPED_PAIRS, read_pairs

    traps = [p for f in sorted(SHIPPED_PAIRS.parent.glob("*.jsonl")) for p in read_pairs(f)
             if not p.same]  # fmt: skip
    assert len(traps) > 1000
    assert [(p.a, p.b) for p in traps if same_question(p.a, p.b)] == []


def test_a_question_asked_again_is_served_whatever_the_verifier_says() -> None:
    from filters.cache.guards import GUARDS
    from filters.cache.verifier import ALIGN_FEATURES, Verifier

    never = Verifier(threshold=0.5, cut=0.99, weights=np.zeros(1 + len(GUARDS) + ALIGN_FEATURES),
                     bias=-50.0, align=True)  # fmt: skip
    si = SemanticIndex(4, threshold=0.8, verifier=never)
    si.add(Indexed("s", "e1", "p", "How do I reset my password?", np.array([1.0, 0, 0, 0]), 10**12))
    v = np.array([0.99, 0.14, 0, 0])
    assert si.judge("s", "p", "hey, how do I reset my password thanks", v, 0).entry_id == "e1"
    refused = si.judge("s", "p", "what is the way to reset my password", v, 0)
    assert refused.entry_id is None and refused.veto == "verifier"


def test_guards_can_be_chosen() -> None:
    assert veto("Don't cancel it", "Cancel it", ("number",)) is None
    assert veto("Don't cancel it", "Cancel it", ()) is None


# --- vector index ------------------------------------------------------------------------------


def unit(v: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_flat_index_finds_best_and_honours_removal() -> None:
    rng = np.random.default_rng(0)
    ix = VectorIndex(16)
    vecs = {f"k{i}": unit(rng.standard_normal(16)) for i in range(50)}
    for k, v in vecs.items():
        ix.add(k, v)
    hits = ix.search(vecs["k7"], k=3)
    assert hits[0].key == "k7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert ix.remove("k7") and not ix.remove("k7")
    assert all(h.key != "k7" for h in ix.search(vecs["k7"], k=5))
    assert ix.search(vecs["k8"], k=3, min_score=0.999)[0].key == "k8"
    with pytest.raises(ValueError):
        ix.add("bad", np.zeros(16, dtype=np.float32))
    with pytest.raises(ValueError):
        ix.add("bad", np.ones(3, dtype=np.float32))


def test_ivf_recall_on_near_duplicates_and_compaction() -> None:
    rng = np.random.default_rng(1)
    n, dim = 6000, 32
    topics = rng.standard_normal((200, dim))
    x = np.stack([unit(topics[rng.integers(200)] + 0.5 * rng.standard_normal(dim))
                  for _ in range(n)])  # fmt: skip
    ix = VectorIndex(dim, flat_max=1000, nprobe=8)
    for i in range(n):
        ix.add(str(i), x[i])
    assert ix.wants_clustering()
    ix.cluster_now()
    assert ix.clustered and not ix.wants_clustering()
    found = 0
    for i in rng.choice(n, 200, replace=False):
        q = unit(x[i] + 0.15 * rng.standard_normal(dim) / np.sqrt(dim))
        hits = ix.search(q, k=1)
        found += bool(hits) and hits[0].key == str(i)
    assert found >= 194  # >= 97% recall of the planted near-duplicate
    for i in range(0, 3000):  # a quarter dead -> compaction renumbers rows
        ix.remove(str(i))
    assert len(ix) == 3000
    assert ix.search(x[4000], k=1)[0].key == "4000"
    ix.add("new", x[10])
    assert ix.search(x[10], k=1)[0].key == "new"


def test_clustering_result_is_dropped_if_rows_moved_meanwhile() -> None:
    rng = np.random.default_rng(2)
    ix = VectorIndex(8, flat_max=100)
    for i in range(2500):
        ix.add(str(i), unit(rng.standard_normal(8)))
    gen, vecs, live = ix.snapshot()
    result = ix.cluster(vecs, live)
    for i in range(1500):
        ix.remove(str(i))  # compaction in between
    assert not ix.install(gen, live, *result)
    assert not ix.clustered


def test_semantic_index_scopes_partitions_and_expiry() -> None:
    si = SemanticIndex(4, threshold=0.9)
    v = unit(np.array([1, 0, 0, 0.0]))
    si.add(Indexed("s1", "e1", "p", "How do I reset my password?", v, expires_ms=1000))
    assert si.judge("s1", "p", "how can I reset my password", v, 0).entry_id == "e1"
    assert si.judge("s2", "p", "how can I reset my password", v, 0).entry_id is None
    assert si.judge("s1", "q", "how can I reset my password", v, 0).entry_id is None
    trap = si.judge("s1", "p", "How do I not reset my password?", v, 0)
    assert trap.entry_id is None and trap.veto == "negation"
    far = si.judge("s1", "p", "x", unit(np.array([0, 1, 0, 0.0])), 0)
    assert far.entry_id is None and far.veto is None
    assert si.judge("s1", "p", "how can I reset my password", v, 1000).entry_id is None
    assert si.expire(1000) == 1 and len(si) == 0
    si.add(Indexed("s1", "e1", "p", "t", v, 5000))
    si.drop_scope("s1")
    assert len(si) == 0 and si.judge("s1", "p", "t", v, 0).entry_id is None


def test_a_body_nested_past_what_orjson_writes_is_not_cacheable() -> None:
    deep: Any = "x"
    for _ in range(300):  # orjson reads 1,024 levels, writes 255
        deep = [deep]
    req = {"model": "m", "messages": [{"role": "user", "content": "hi", "extra": deep}]}
    with pytest.raises(canon.NotCacheable) as e:
        canon.lookup(req, api="openai_chat", model=None, max_temperature=1)
    assert e.value.reason == "too_deep"


def test_memory_follows_the_live_entries() -> None:
    # A partition per conversation prefix: each held 64 preallocated rows (700 MB for 10k).
    ix = VectorIndex(384)
    ix.add("a", unit(np.ones(384)))
    assert ix._vecs.nbytes <= 2 * 384 * 4
    for i in range(100):
        ix.add(f"k{i}", unit(np.arange(384.0) + i))
    assert len(ix) == 101 and ix.search(unit(np.arange(384.0) + 7), k=1)[0].key == "k7"
    # Refreshing one entry many times (replicas' echoes) must not grow the expiry heap.
    si = SemanticIndex(4, threshold=0.9)
    v = unit(np.array([1, 0, 0, 0.0]))
    for t in range(5000):
        si.add(Indexed("s", "e", "p", "How do I reset my password?", v, expires_ms=10**9 + t))
    assert len(si._expiry) <= 2 * len(si) + 1024
    assert si.expire(10**9 + 4998) == 0 and si.expire(10**9 + 4999) == 1


def test_only_the_nearest_candidate_is_judged() -> None:
    si = SemanticIndex(4, threshold=0.6)
    asked = unit(np.array([1, 0, 0, 0.0]))
    # The nearest is a look-alike (refused); the next, further away, passes every guard but
    # asks something else: a full cache always holds such neighbours.
    si.add(Indexed("s", "near", "p", "How do I not reset my password?", asked, 10**12))
    si.add(Indexed("s", "next", "p", "How do I change my email address?",
                   unit(np.array([0.8, 0.6, 0, 0])), 10**12))  # fmt: skip
    v = si.judge("s", "p", "How do I reset my password?", asked, 0)
    assert v.entry_id is None and v.veto == "negation"
    # A neighbour that is the question asked again is still served.
    si.add(Indexed("s", "again", "p", "how do I reset my password",
                   unit(np.array([0.7, 0, 0.7, 0])), 10**12))  # fmt: skip
    assert si.judge("s", "p", "How do I reset my password?", asked, 0).entry_id == "again"
    # An expired nearest is skipped: the nearest live candidate is the one judged.
    si.add(Indexed("s", "near", "p", "How do I not reset my password?", asked, 5))
    si.remove("s", "again")
    assert si.judge("s", "p", "How can I change my email address?", asked, 10).entry_id == "next"


async def test_the_judge_is_asked_about_the_nearest_live_candidate_only() -> None:
    si = SemanticIndex(4, threshold=0.6, judge_cut=0.5)
    asked = unit(np.array([1, 0, 0, 0.0]))
    si.add(Indexed("s", "near", "p", "How do I not reset my password?", asked, 10**12))
    si.add(Indexed("s", "next", "p", "How do I change my email address?",
                   unit(np.array([0.8, 0.6, 0, 0])), 10**12))  # fmt: skip
    calls: list[tuple[str, str]] = []

    def judge(p: float) -> Any:
        async def ask(cached: str, text: str) -> float:
            calls.append((cached, text))
            return p

        return ask

    fetched: list[list[str]] = []

    async def fetch(ids: list[str]) -> dict[str, Any]:
        # The candidate's entry comes back with it (the caller keeps it): fetched while
        # the judge runs, never instead of asking it.
        fetched.append(ids)
        return {}

    args = ("s", "p", "How do I reset my password?", asked, 0, None, fetch)
    refused = await si.judge_fetching(*args, judge(0.2))
    assert refused.entry_id is None and refused.veto == "judge"
    assert calls == [("How do I not reset my password?", "How do I reset my password?")]
    assert (await si.judge_fetching(*args, judge(0.5))).entry_id == "near"
    assert fetched == [["near"], ["near"]]
    # Below the threshold nothing is asked; the same question asked again needs no judge.
    calls.clear()
    fetched.clear()
    far = unit(np.array([0, 0, 0, 1.0]))
    below = await si.judge_fetching("s", "p", "x", far, 0, None, fetch, judge(1.0))
    assert below.entry_id is None and below.veto is None and calls == []
    again = await si.judge_fetching("s", "p", "how do I not reset my password", asked, 0, None,
                                    fetch, judge(0.0))  # fmt: skip
    assert again.entry_id == "near" and calls == [] and fetched == []

    # A failing judge fails the look-up even though the fetch succeeded.
    async def broken(cached: str, text: str) -> float:
        raise JudgeError("judge unreachable")

    with pytest.raises(JudgeError):
        await si.judge_fetching(*args, broken)
    # Without probabilities (a sync caller that fetched none) the candidate is refused.
    assert si.judge("s", "p", "How do I reset my password?", asked, 0).veto == "judge"
    with pytest.raises(ValueError, match="ask_judge"):
        await si.judge_fetching(*args)
    with pytest.raises(ValueError, match="not both"):
        SemanticIndex(4, threshold=0.6, judge_cut=0.5, verifier=object())  # type: ignore[arg-type]


def test_one_index_report_counts_another_questions_answer_as_wrong() -> None:
    vectors = {
        "How do I reset my password?": unit(np.array([1, 0, 0, 0.0])),
        "how can I reset my password": unit(np.array([0.95, 0.3, 0, 0])),
        "How do I not reset my password?": unit(np.array([0.96, 0, 0.28, 0])),
        "How do I change my email address?": unit(np.array([0, 1, 0, 0.0])),
        "How do I change my email?": unit(np.array([0.1, 0.99, 0, 0])),
        "Why do I not change my email address?": unit(np.array([0.5, 0.8, 0.33, 0])),
    }
    pairs = [Pair("How do I reset my password?", "how can I reset my password", True, "p", None),
             Pair("How do I change my email address?", "How do I change my email?", True, "p",
                  None),
             Pair("How do I change my email address?", "Why do I not change my email address?",
                  False, "negation", None)]  # fmt: skip
    r = one_index_report(pairs, vectors, threshold=0.6)
    assert r["stored"] == 2 and r["hit_rate"] == 1.0 and r["wrong_hit_rate"] == 0.0
    # Store the trap's question too: asked again, the paraphrase of another entry is found,
    # but a question nearer to the wrong entry is served its answer: counted as wrong.
    vectors["What is my password?"] = unit(np.array([0.93, 0.37, 0, 0]))
    r = one_index_report(pairs, vectors, threshold=0.6, distractors=["What is my password?"])
    assert r["stored"] == 3 and r["paraphrases_served_another"] == 1
    assert r["examples"] == [{"asked": "how can I reset my password",
                              "served": "What is my password?"}]  # fmt: skip
    assert r["wrong_answers"] == 1 and r["hit_rate"] == 0.5


# --- eval report -------------------------------------------------------------------------------


def test_report_rates_table_and_recommendation() -> None:
    def j(same: bool, score: float, veto: str | None, cat: str) -> Judged:
        return Judged(Pair("a", "b", same, cat, None), score, veto)

    judged = [j(True, 0.95, None, "paraphrase"), j(True, 0.8, None, "paraphrase"),
              j(True, 0.7, "scope", "paraphrase"), j(False, 0.9, None, "negation"),
              j(False, 0.85, "negation", "negation"), j(False, 0.5, None, "number")]  # fmt: skip
    r = report(judged, 0.75)
    assert (r["hit_rate"], r["wrong_hit_rate"]) == (round(2 / 3, 4), round(1 / 3, 4))
    row = {x["threshold"]: x for x in r["thresholds"]}
    assert row[0.925]["wrong_hit_rate"] == 0 and row[0.925]["hit_rate"] == round(1 / 3, 4)
    assert row[0.6]["wrong_hit_rate_unguarded"] == round(2 / 3, 4)
    assert r["recommended_threshold"] == 0.925
    assert r["by_category"]["negation"]["served"] == 1
    only_true = report([x for x in judged if x.pair.same], 0.75)  # no traps: no wrong rate
    assert only_true["wrong_hit_rate"] is None and only_true["recommended_threshold"] is None
    assert "NaN" not in json.dumps(only_true)


# --- params and HTTP semantics -----------------------------------------------------------------


def test_params_fail_loudly() -> None:
    with pytest.raises(ValidationError, match="routes"):
        CacheFilter.Params.model_validate({})
    with pytest.raises(ValidationError, match="JSON pointer"):
        CacheFilter.Params.model_validate({"routes": {"r": {"text_pointer": "inputs/0"}}})
    with pytest.raises(ValidationError, match="hex"):
        CacheFilter.Params.model_validate({"routes": {}, "admin_token_sha256": "secret"})
    with pytest.raises(ValidationError):
        CacheFilter.Params.model_validate({"routes": {}, "semantic": {"guards": ["vibes"]}})
    with pytest.raises(ValueError, match="upstream"):
        CacheFilter(
            CacheFilter.Params.model_validate({"routes": {"r": {"semantic": True}}}), Deps()
        )
    with pytest.raises(ValidationError, match="not both"):
        CacheFilter.Params.model_validate(
            {"routes": {}, "semantic": {"judge": {}, "verifier": "shipped"}}
        )
    with pytest.raises(ValidationError, match="cut"):
        CacheFilter.Params.model_validate({"routes": {}, "semantic": {"judge": {"cut": 1.5}}})
    p = CacheFilter.Params.model_validate({"routes": {"r": {"ttl_s": "10m"}}})
    assert p.routes["r"].ttl_s == 600
    # The judge's threshold defaults lower (it only gates what the judge is asked about);
    # one set explicitly stays.
    judged = {"routes": {}, "semantic": {"judge": {}}}
    assert CacheFilter.Params.model_validate(judged).semantic.threshold == JUDGE_THRESHOLD
    judged["semantic"]["threshold"] = 0.8  # type: ignore[index]
    assert CacheFilter.Params.model_validate(judged).semantic.threshold == 0.8
    assert p.semantic.threshold == RECOMMENDED_THRESHOLD


def test_cache_control_parsing() -> None:
    assert _cache_control('No-Cache, max-age="0", Private="x"') == {
        "no-cache": None, "max-age": "0", "private": "x",
    }  # fmt: skip
    assert _max_age("public, max-age=30") == 30 and _max_age("s-maxage=5") == 5
    assert _max_age('max-age="30"') == 30 and _max_age("max-age = 30") == 30
    assert _max_age("public") is None
    # A malformed lifetime is stale (not stored), as RFC 9111 4.2.1 advises: it was the
    # route's whole TTL; int() also took "+60" and "1_000".
    for bad in ("max-age=oops", "max-age=+60", "max-age=1_000", "max-age=-5", "max-age"):
        assert _max_age(bad) == 0, bad
    # The first of a repeated directive, whatever the hash seed (a set picked either).
    assert _max_age("max-age=60, max-age=0") == 60
    # A shared cache takes s-maxage over max-age, in either order (was: set order).
    assert _max_age("max-age=0, s-maxage=3600") == 3600
    assert _max_age("s-maxage=3600, max-age=0") == 3600
    assert _max_age("max-age=60, s-maxage=oops") == 0
    assert _uncacheable_response({":status": "200"}) is None
    assert _uncacheable_response({":status": "201"}) == "not_200"
    for cc in ("private", 'no-cache="set-cookie"', 'private="authorization"', "No-Store"):
        assert _uncacheable_response({":status": "200", "cache-control": cc}) == (
            "upstream_no_store"
        ), cc


def test_replacing_an_entry_many_times_keeps_it_findable() -> None:
    """Regression: each replacement left a tombstone with its old vector, and a dozen of them
    crowded the live row out of the candidates (a silent semantic miss under refreshes; the
    embedder's vectors for one text differ in the last bits from batch to batch)."""
    rng = np.random.default_rng(5)
    ix = VectorIndex(8)
    v = unit(np.arange(1, 9, dtype=np.float64))
    ix.add("other", unit(np.ones(8)))
    ix.add("entry", v)
    for _ in range(50):
        ix.add("entry", unit(v + 1e-3 * rng.standard_normal(8)))
    hits = ix.search(v, k=1)
    assert len(ix) == 2 and hits and hits[0].key == "entry"


def test_embedder_answers_binary_or_json_and_refuses_short_ones() -> None:
    vec = np.arange(4, dtype="<f4")
    other = np.ones(2, dtype="<f4").tobytes()
    header = orjson.dumps({"outputs": [
        {"name": "TOKENS", "datatype": "FP32", "shape": [1, 2],
         "parameters": {"binary_data_size": len(other)}},
        {"name": "EMBEDDING", "datatype": "FP32", "shape": [1, 4],
         "parameters": {"binary_data_size": 16}},
    ]})  # fmt: skip
    raw = header + other + vec.tobytes()
    assert _tensor(raw, str(len(header)), "EMBEDDING").tolist() == [[0, 1, 2, 3]]
    half = np.ones((1, 3, 2), dtype="<f2").tobytes()
    fp16 = orjson.dumps(
        {
            "outputs": [
                {
                    "name": "T",
                    "datatype": "FP16",
                    "shape": [1, 3, 2],
                    "parameters": {"binary_data_size": len(half)},
                }
            ]
        }
    )
    assert _tensor(fp16 + half, str(len(fp16)), "T").shape == (1, 3, 2)
    with pytest.raises(ValueError):  # cut short: never read past the end
        _tensor(raw[:-4], str(len(header)), "EMBEDDING")
    with pytest.raises(KeyError):
        _tensor(raw, str(len(header)), "NOPE")
    as_json = orjson.dumps({"outputs": [{"name": "EMBEDDING", "shape": [1, 2],
                                         "data": [0.5, 1.5]}]})  # fmt: skip
    assert _tensor(as_json, None, "EMBEDDING").tolist() == [[0.5, 1.5]]


async def test_a_failed_housekeeping_tick_does_not_end_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    f = CacheFilter(CacheFilter.Params.model_validate({"routes": {"r": {}}}), Deps())
    ticks: list[int] = []

    def expire(now_ms: int) -> int:
        ticks.append(now_ms)
        if len(ticks) == 1:
            raise RuntimeError("one bad tick")
        return 0

    monkeypatch.setattr(f.index, "expire", expire)
    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda s: real_sleep(0))
    task = asyncio.ensure_future(f._housekeeping())
    for _ in range(20):
        await real_sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(ticks) >= 3  # it went on after the failure


async def test_a_repository_index_of_odd_entries_is_read_not_a_crash() -> None:
    # Triton's repository index is read at the cache's start: entries that are not objects
    # are skipped (they stopped the processor's start), the newest READY version kept.
    from aiohttp import web

    from filters.cache.filter import _triton_versions

    index = [1, "x", None, [2], {"name": "m", "version": "2", "state": "READY"},
             {"name": "m", "version": "10", "state": "READY"},
             {"name": "m", "version": "11", "state": "UNAVAILABLE"}]  # fmt: skip

    async def answer(_: web.Request) -> web.Response:
        return web.json_response(index)

    app = web.Application()
    app.router.add_post("/v2/repository/index", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        assert await _triton_versions(f"http://127.0.0.1:{port}") == {"m": "10"}
    finally:
        await runner.cleanup()
