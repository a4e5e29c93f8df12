"""The semantic cache's learned verifier: the fit, the cross-validated choice of threshold and
cut, the model file, the params that load it, and its place in the live decision."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from filters.cache import evaluate
from filters.cache.filter import CacheFilter
from filters.cache.guards import GUARDS
from filters.cache.semantic import SemanticIndex
from filters.cache.store import Indexed
from filters.cache.verifier import (
    ALIGN_FEATURES,
    SHIPPED,
    Labelled,
    Verifier,
    alignment,
    features,
    fit,
    train,
)


def test_fit_reaches_the_regularised_optimum() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 5))
    y = (x @ np.array([2.0, -1.0, 0.0, 0.5, 0.0]) + 0.3 + 0.5 * rng.standard_normal(400)) > 0
    w, b = fit(x, y, c=1.0)
    # At the optimum the gradient of 0.5|w|^2 + C * log loss vanishes (intercept unpenalised).
    p = 1 / (1 + np.exp(-(x @ w + b)))
    assert np.abs(x.T @ (p - y) + w).max() < 1e-6 and abs(float((p - y).sum())) < 1e-6
    assert w[0] > 1 and w[1] < -0.5 and abs(w[2]) < abs(w[1]) / 2  # signs and sizes as drawn


def _toy(n: int = 120) -> tuple[list[Labelled], dict[str, np.ndarray]]:
    """Paraphrases: the cached vector nudged. Look-alikes: nudged along one fixed direction
    (what a negation does to an embedding), so |u - v| tells them apart and cosine does not."""
    rng = np.random.default_rng(1)
    trap_dir = np.zeros(384)
    trap_dir[7] = 1.0
    pairs, vectors = [], {}
    for i in range(n):
        base = rng.standard_normal(384)
        base /= np.linalg.norm(base)
        same = i % 2 == 0
        nudge = 0.25 * rng.standard_normal(384) / np.sqrt(384)
        other = base + nudge + (0.0 if same else 0.35 * trap_dir)
        a, b = f"cached question {i}", f"new question {i}"
        vectors[a], vectors[b] = base, other / np.linalg.norm(other)
        pairs.append(Labelled(b, a, same, "paraphrase" if same else "negation"))
    return pairs, vectors


def test_training_picks_a_setting_that_refuses_look_alikes_out_of_fold() -> None:
    pairs, vectors = _toy()
    v = train(pairs, vectors, cs=(1.0, 10.0), thresholds=(0.5,), max_wrong=0.02)
    assert v.threshold == 0.5 and 0.5 <= v.cut < 1
    assert v.about["cross_validated"]["wrong_hit_rate"] <= 0.02
    served = [v.accepts(p.text, vectors[p.text], p.cached_text, vectors[p.cached_text])
              for p in pairs]  # fmt: skip
    same = [p.same_answer for p in pairs]
    assert sum(s and t for s, t in zip(served, same, strict=True)) >= 0.8 * sum(same)
    assert sum(s and not t for s, t in zip(served, same, strict=True)) <= 1
    with pytest.raises(ValueError, match="both"):
        train([p for p in pairs if p.same_answer], vectors)


def test_model_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    pairs, vectors = _toy(60)
    v = train(pairs, vectors, cs=(1.0,), thresholds=(0.5,), max_wrong=0.05)
    v.save(tmp_path / "v.json")
    back = Verifier.load(tmp_path / "v.json")
    row = features("q", vectors[pairs[0].text], "c", vectors[pairs[0].cached_text], GUARDS)
    assert back.dimensions == 384 and back.probability(row) == pytest.approx(v.probability(row))
    (tmp_path / "bad.json").write_text(json.dumps({"threshold": 0.5}))
    with pytest.raises(ValueError, match="not a verifier"):
        Verifier.load(tmp_path / "bad.json")
    d = json.loads((tmp_path / "v.json").read_text())
    d["guards"] = ["vibes"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="unknown guards"):
        Verifier.load(tmp_path / "bad.json")


def test_the_shipped_verifier_loads_and_params_check_it(tmp_path: Path) -> None:
    shipped = Verifier.load(SHIPPED)
    assert shipped.align and shipped.dimensions is None and shipped.guards == GUARDS
    assert len(shipped.weights) == 1 + len(GUARDS) + ALIGN_FEATURES
    assert shipped.about["trained_on"] == [f"{n}.jsonl" for n in evaluate.VERIFIER_TRAINED_ON]
    assert not set(evaluate.HELD_OUT) & set(evaluate.VERIFIER_TRAINED_ON)
    p = CacheFilter.Params.model_validate({"routes": {}, "semantic": {"verifier": "shipped"}})
    assert p.semantic.verifier == "shipped"
    pairs, vectors = _toy(60)
    train(pairs, vectors, cs=(1.0,), thresholds=(0.5,), max_wrong=0.05).save(tmp_path / "v.json")
    with pytest.raises(ValidationError, match="384-d"):  # the vector form is tied to its size
        CacheFilter.Params.model_validate(
            {"routes": {}, "semantic": {"verifier": str(tmp_path / "v.json"), "dimensions": 768}}
        )
    with pytest.raises(ValidationError, match="not a verifier"):
        CacheFilter.Params.model_validate(
            {"routes": {}, "semantic": {"verifier": str(tmp_path / "missing.json")}}
        )


def test_the_live_decision_asks_the_verifier() -> None:
    # A hand-made verifier: "same answer" unless dimension 0 differs (|u0 - v0| is feature 1).
    w = np.zeros(1 + 2 * 4 + len(GUARDS))
    w[1] = -50.0
    v = Verifier(threshold=0.5, cut=0.5, weights=w, bias=5.0)
    si = SemanticIndex(4, threshold=0.99, verifier=v)
    assert si.threshold == 0.5  # the verifier's own
    cached = np.array([0.6, 0.8, 0.0, 0.0])
    si.add(Indexed("s", "e1", "p", "How do I reset my password?", cached, 10**12))
    near = np.array([0.62, 0.78, 0.1, 0.0])
    assert si.judge("s", "p", "what is the way to reset my password", near, 0).entry_id == "e1"
    moved = np.array([0.0, 0.8, 0.6, 0.0])  # cosine 0.64: above its threshold, dim 0 differs
    refused = si.judge("s", "p", "what is the way to reset my password", moved, 0)
    assert refused.entry_id is None and refused.veto == "verifier"


def _tokens(*words: str) -> np.ndarray:
    """One made-up token vector per word: the same word, the same vector."""
    rows = [np.random.default_rng(zlib.crc32(w.encode())).standard_normal(8) for w in words]
    return np.array(rows)


def test_alignment_finds_the_token_the_other_prompt_lacks() -> None:
    same = alignment(_tokens("reset", "my", "password"), _tokens("reset", "my", "password"))
    assert same[0] == pytest.approx(1.0) and same[1] == pytest.approx(1.0) and same[10] == 0
    assert same[11:].tolist() == [0.0, 0.0]  # nothing crossed
    changed = alignment(_tokens("reset", "my", "iphone"), _tokens("reset", "my", "pixel"))
    assert changed[0] < 0.9 and changed[1] < 0.9  # each side has one token unmatched
    assert alignment(np.zeros((0, 8)), _tokens("a")).tolist() == [0.0] * ALIGN_FEATURES


def test_alignment_sees_swapped_words_that_all_match() -> None:
    a = _tokens("convert", "usd", "to", "eur")
    swapped = alignment(a, _tokens("convert", "eur", "to", "usd"))
    assert swapped[0] == pytest.approx(1.0) and swapped[1] == pytest.approx(1.0)
    # Of the 6 pairs of words, 3 cross: (usd, to), (usd, eur), (to, eur).
    assert swapped[11:].tolist() == [pytest.approx(0.5), pytest.approx(0.5)]
    assert alignment(a, a)[11:].tolist() == [0.0, 0.0]


def _toy_tokens(pairs: list[Labelled]) -> dict[str, np.ndarray]:
    """Paraphrases share their tokens; a look-alike has one token the cached prompt lacks."""
    tokens = {}
    for i, p in enumerate(pairs):
        words = [f"w{i}", f"x{i}", f"y{i}", f"z{i}"]
        tokens[p.cached_text] = _tokens(*words)
        tokens[p.text] = _tokens(*words[:3], words[3] if p.same_answer else f"other{i}")
    return tokens


def test_the_align_form_trains_saves_and_refuses_without_tokens(tmp_path: Path) -> None:
    pairs, vectors = _toy(80)
    # Vectors that cannot tell the look-alikes apart: only the tokens can.
    vectors = {k: vectors[f"cached question {k.split()[-1]}"] for k in vectors}
    tokens = _toy_tokens(pairs)
    v = train(pairs, vectors, tokens=tokens, cs=(10.0,), thresholds=(0.5,), max_wrong=0.02)
    assert v.align and len(v.weights) == 1 + len(GUARDS) + ALIGN_FEATURES
    served = [v.accepts(p.text, vectors[p.text], p.cached_text, vectors[p.cached_text],
                        tokens[p.text], tokens[p.cached_text]) for p in pairs]  # fmt: skip
    assert all(s == p.same_answer for s, p in zip(served, pairs, strict=True))
    p = pairs[0]
    assert not v.accepts(p.text, vectors[p.text], p.cached_text, vectors[p.cached_text])
    v.save(tmp_path / "v.json")
    assert Verifier.load(tmp_path / "v.json").align
    d = json.loads((tmp_path / "v.json").read_text())
    d["weights"] = d["weights"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="bad weight count"):
        Verifier.load(tmp_path / "bad.json")
    # A verifier trained before the two word-order features still loads and judges.
    d["weights"] = d["weights"][:-1]
    (tmp_path / "old.json").write_text(json.dumps(d))
    old = Verifier.load(tmp_path / "old.json")
    for q in pairs:
        row = features(q.text, vectors[q.text], q.cached_text, vectors[q.cached_text], GUARDS,
                       tokens[q.text], tokens[q.cached_text])[: len(old.weights)]  # fmt: skip
        expected = row[0] >= old.threshold and old.probability(row) >= old.cut
        assert old.accepts(q.text, vectors[q.text], q.cached_text, vectors[q.cached_text],
                           tokens[q.text], tokens[q.cached_text]) == expected  # fmt: skip


async def test_the_live_decision_fetches_the_candidates_tokens() -> None:
    w = np.zeros(1 + len(GUARDS) + ALIGN_FEATURES)
    w[1 + len(GUARDS)] = w[2 + len(GUARDS)] = 20.0  # the worst-matched token on each side
    v = Verifier(threshold=0.5, cut=0.5, weights=w, bias=-30.0, align=True)
    si = SemanticIndex(4, threshold=0.99, verifier=v)
    si.add(Indexed("s", "e1", "p", "reset my password", np.array([1.0, 0, 0, 0]), 10**12))
    si.add(Indexed("s", "e2", "p", "unrelated", np.array([0, 0, 0, 1.0]), 10**12))
    asked: list[list[str]] = []
    stored = {"e1": _tokens("reset", "my", "password"), "e2": _tokens("unrelated")}

    async def fetch(ids: list[str]) -> dict[str, np.ndarray]:
        asked.append(ids)
        return {i: stored[i] for i in ids}

    vec = np.array([0.9, 0.1, 0, 0])
    hit = await si.judge_fetching("s", "p", "my password reset", vec, 0,
                                  _tokens("my", "password", "reset"), fetch)  # fmt: skip
    assert hit.entry_id == "e1" and asked == [["e1"]]  # only candidates above the threshold
    lookalike = await si.judge_fetching("s", "p", "reset my pin", vec, 0,
                                        _tokens("reset", "my", "pin"), fetch)  # fmt: skip
    assert lookalike.entry_id is None and lookalike.veto == "verifier"


def test_near_duplicates_and_reasks_are_the_question_reworded_only_around_it() -> None:
    from filters.cache.evaluate import Pair, near_duplicates, reasks
    from filters.cache.guards import same_question

    qs = [Pair(f"How do I rotate the {w} keys of my account?", "x", True, "paraphrase", None)
          for w in ("API", "signing", "deploy", "backup", "session", "webhook")]  # fmt: skip
    dups, again = near_duplicates(qs), reasks(qs)
    assert len(dups) == 2 * len(qs) and len(again) == 4 * len(qs)
    for p in dups + again:
        assert p.same and p.b != p.a
        words = set(p.b.lower().replace("?", "").split())
        if p.category != "typo":
            assert set(p.a.lower().replace("?", "").split()) <= words  # nothing taken away
    # The re-cased copy is the question asked again, and so is the one with a letter swap
    # (guards.typo); the framed ones the verifier judges.
    assert sum(same_question(p.b, p.a) for p in dups) == len(qs)
    assert not any(same_question(p.b, p.a) for p in again if p.category == "reask")
    assert all(same_question(p.b, p.a) for p in again if p.category == "typo")
    assert {p.category for p in again} == {"reask", "typo"}
    assert not {p.b for p in dups} & {p.b for p in again}  # reasks were never trained on


def test_training_keeps_serving_near_duplicates_above_the_floor() -> None:
    """Near-duplicates the higher threshold would refuse (here: a low cosine): without a
    floor the fit takes that threshold, as it serves as many paraphrases; with one it must
    keep serving them."""
    pairs, vectors = _toy(160)
    rng = np.random.default_rng(2)
    for i in range(60):
        a = f"cached question {i}"
        away = rng.standard_normal(384)
        other = vectors[a] + 1.2 * away / np.linalg.norm(away)  # cosine about 0.64
        vectors[f"again {i}"] = other / np.linalg.norm(other)
        pairs.append(Labelled(f"again {i}", a, True, "near_duplicate"))

    def near_served(v: Verifier) -> float:
        near = [p for p in pairs if p.category == "near_duplicate"]
        return sum(v.accepts(p.text, vectors[p.text], p.cached_text, vectors[p.cached_text])
                   for p in near) / len(near)  # fmt: skip

    kw: dict[str, Any] = {"cs": (10.0,), "thresholds": (0.7, 0.5), "max_wrong": 0.05}
    loose = train(pairs, vectors, min_near_duplicates=0.0, **kw)
    floored = train(pairs, vectors, min_near_duplicates=0.9, **kw)
    assert loose.threshold == 0.7 and near_served(loose) == 0.0
    cv = floored.about["cross_validated"]
    assert floored.threshold == 0.5 and cv["near_duplicates_hit_rate"] >= 0.9
    assert cv["wrong_hit_rate"] <= 0.05 and near_served(floored) >= 0.9
    with pytest.raises(ValueError, match="near-duplicates"):
        train(pairs, vectors, min_near_duplicates=1.0, **{**kw, "thresholds": (0.7,)})
