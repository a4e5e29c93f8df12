"""bench/overload.py's CPU placement: Triton's process tree on cores of its own."""

from __future__ import annotations

import os

import pytest

from bench import overload


def test_tree_follows_children_transitively() -> None:
    children = {1: [2, 3], 3: [4], 4: [5], 9: [10]}
    assert sorted(overload._tree(1, children)) == [1, 2, 3, 4, 5]
    assert overload._tree(7, children) == [7]


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [
        ({0}, None),
        ({0, 1}, ({1}, {0})),
        ({0, 1, 2, 3}, ({2, 3}, {0, 1})),
        ({2, 5, 7}, ({5, 7}, {2})),
    ],
)
def test_the_model_gets_the_upper_half(
    monkeypatch: pytest.MonkeyPatch, cpus: set[int], expected: object
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
    assert overload._placement() == expected


def test_children_of_this_process_are_found() -> None:
    # A real /proc scan: this test's own process is its parent's child.
    children = overload._children()
    assert os.getpid() in children.get(os.getppid(), [])
