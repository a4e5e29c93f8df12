"""Hypothesis strategies shared by the fuzz tests (tests/integration/test_fuzz_chain.py,
tests/unit/test_fuzz_config.py): any JSON, values that confuse parsers, and valid documents
edited a little."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=16,
)
# Values that confuse parsers: each type in the place of another, empties and extremes.
nasty = st.sampled_from(
    ["", "abc", "1", "-1", "1e309", "null", "\u0000", "x" * 5000, 0, -1, 1, 2**63, -(2**63),
     1e308, -0.0, 0.5, True, False, None, [], {}, [[]], [None], {"": None}, [1, "a"]]
) | json_values  # fmt: skip


def places(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON tree."""
    out: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        node = stack.pop()
        keys = (
            list(node)
            if isinstance(node, dict)
            else range(len(node))
            if isinstance(node, list)
            else []
        )
        for k in keys:
            out.append((node, k))
            stack.append(node[k])
    return out


@st.composite
def mutated(
    draw: st.DrawFn, valid: st.SearchStrategy[Any], edits: tuple[int, ...] = (0, 1, 1, 1, 2)
) -> Any:
    """A valid value, then up to two edits at places drawn evenly from its whole tree: a value
    replaced by a confusing one, a key dropped, an unknown key added. Most examples stay an
    edit or two from valid, where the parsers' edge cases are."""
    # Copies: strategies such as just() hand out one shared object, which an edit must not touch.
    value = copy.deepcopy(draw(valid))
    for _ in range(draw(st.sampled_from(edits))):
        where = places(value)
        edit = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if not where or draw(st.integers(0, 9)) == 0:  # the whole document
            value = copy.deepcopy(draw(nasty)) if edit == "replace" else value
            continue
        parent, key = draw(st.sampled_from(where))
        if edit == "replace":
            parent[key] = copy.deepcopy(draw(nasty))
        elif edit == "drop":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = copy.deepcopy(draw(nasty))
        else:
            parent.append(copy.deepcopy(draw(nasty)))
    return value
