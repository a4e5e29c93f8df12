"""The shipped judge (triton_models/pair_judge) is the model its provenance describes: the file
is the one trained, on the training sets as they are now, and none of the sets it is judged
on (held out) or whose cut it was chosen on (validation) was among them."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

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
    recipe = (judge.LAYERS, judge.MAX_TOKENS, judge.EPOCHS, judge.SEED, judge.NEIGHBOUR_FLOOR)
    assert (info["layers"], info["max_tokens"], info["epochs"], info["seed"],
            info["neighbour_floor"]) == recipe  # fmt: skip
    # The file has the layers its record says.
    graph = onnx.load(str(judge.SHIPPED), load_external_data=False).graph
    layers = {m.group(1) for n in graph.node if (m := re.search(r"/encoder/layer\.(\d+)/", n.name))}
    assert len(layers) == info["layers"]


def test_the_judge_keeps_the_first_layers_it_is_asked_for() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                        intermediate_size=32)  # fmt: skip
    model = BertForSequenceClassification(config)
    first = model.bert.encoder.layer[0]
    judge._keep_layers(model, 3)
    assert len(model.bert.encoder.layer) == 3 and model.config.num_hidden_layers == 3
    assert model.bert.encoder.layer[0] is first
    for bad in (0, 4):
        with pytest.raises(ValueError, match=r"layers must be 1\.\.3"):
            judge._keep_layers(model, bad)


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
