"""The shipped judge (triton_models/pair_judge) is the model its provenance describes: the file
is the one trained, on the training sets as they are now, and none of the sets it is judged
on (held out) or whose cut it was chosen on (validation) was among them."""

from __future__ import annotations

import json

import numpy as np

from filters.cache import judge
from filters.cache.evaluate import HELD_OUT


def test_the_shipped_judge_matches_its_provenance() -> None:
    info = json.loads((judge.SHIPPED_DIR / "training.json").read_text())
    # A truncated copy, a Git LFS pointer or a model swapped without its record fails here.
    assert judge.sha256(judge.SHIPPED) == info["onnx_sha256"]
    assert (judge.SHIPPED_DIR / "tokenizer.json").is_file()
    # A training set edited since: the shipped judge no longer follows its recipe; retrain
    # (`floodwall models train-judge`) and re-measure.
    assert info["trained_on"] == {
        n: judge.sha256(judge.EVAL_DIR / f"{n}.jsonl") for n in judge.training_sets()
    }
    assert not set(info["trained_on"]) & {*HELD_OUT, *judge.VALIDATION}
    recipe = (judge.MAX_TOKENS, judge.EPOCHS, judge.SEED, judge.NEIGHBOUR_FLOOR)
    assert (info["max_tokens"], info["epochs"], info["seed"], info["neighbour_floor"]) == recipe


def test_neighbours_pair_each_question_with_its_nearest_other_question_of_the_set() -> None:
    from filters.cache.evaluate import Pair

    e = np.eye(3, dtype=np.float32)
    vectors = {"reset password": e[0], "how to reset my password": e[0],
               "change password": (e[0] + 0.2 * e[1]) / np.linalg.norm(e[0] + 0.2 * e[1]),
               "weather today": e[2]}  # fmt: skip
    sets = {"s": [Pair("reset password", "how to reset my password", True, "p", None),
                  Pair("change password", "weather today", False, "number", None)],
            "t": [Pair("weather today", "weather today", True, "p", None)]}  # fmt: skip
    got = {(p.a, p.b) for p in judge.neighbours(sets, vectors, floor=0.5)}
    assert all(not p.same and p.category == "neighbour" for p in judge.neighbours(sets, vectors))
    # Each question, and its paraphrase, against the nearest other question of its own set;
    # another set's questions and neighbours below the floor are never used.
    assert got == {("change password", "reset password"),
                   ("change password", "how to reset my password"),
                   ("reset password", "change password")}  # fmt: skip
