"""bench/placement.py: Triton's process tree on cores of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import placement


def test_tree_follows_children_transitively() -> None:
    children = {1: [2, 3], 3: [4], 4: [5], 9: [10]}
    assert sorted(placement.tree(1, children)) == [1, 2, 3, 4, 5]
    assert placement.tree(7, children) == [7]


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
    split = placement.Split.choose(shared=False)
    assert (None if split is None else (split.model, split.rest)) == expected
    assert placement.Split.choose(shared=True) is None


def test_children_of_this_process_are_found() -> None:
    # A real /proc scan: this test's own process is its parent's child.
    children = placement.children()
    assert os.getpid() in children.get(os.getppid(), [])


_APART = """
import os, shutil, subprocess, sys, tempfile
from bench import placement
d = tempfile.mkdtemp()
fake = os.path.join(d, "tritonserver")
shutil.copy(shutil.which("sleep"), fake)
procs = []
def start():
    procs.append(subprocess.Popen([fake, "30"]))
    procs.append(subprocess.Popen([shutil.which("sleep"), "30"]))
    return procs
before = os.sched_getaffinity(0)
split = placement.Split.choose(shared=False)
try:
    with placement.apart(split, start):
        got = [os.sched_getaffinity(p.pid) for p in procs] + [os.sched_getaffinity(0)]
    assert got == [split.model, split.rest, split.rest], got
    assert os.sched_getaffinity(0) == before
finally:
    for p in procs:
        p.kill()
print("ok")
"""


def test_apart_keeps_triton_on_the_model_cpus_and_moves_the_rest() -> None:
    """In a process of its own: ``apart`` moves every process of its caller."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to split")
    out = subprocess.run([sys.executable, "-c", _APART], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parents[2])  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
