"""Where a benchmark's processes run: Triton on cores of its own, or everything everywhere.

On a GPU host the model computes on its accelerator, and the gateway's CPU work (Envoy, the
processor, Redis) takes nothing from it. On this CPU-only box both share two cores, so under
load every request the gateway handles, refused or served, takes CPU the model needed: a
benchmark then measures co-location, not the gateway. ``apart()`` gives Triton (the server
and its python-backend stubs) the upper half of the CPUs, standing in for the accelerator,
and every other process of the benchmark (Envoy, processors, Redis, the load generator and
the benchmark itself) the lower half; benchmarks keep a ``--shared`` flag for the other way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Split:
    model: frozenset[int]  # Triton's CPUs
    rest: frozenset[int]  # everyone else's

    @classmethod
    def choose(cls, shared: bool) -> Split | None:
        """The upper half of this process' CPUs for the model; None when ``shared`` or on
        one CPU (nothing to split)."""
        cpus = sorted(os.sched_getaffinity(0))
        if shared or len(cpus) < 2:
            return None
        half = len(cpus) // 2
        return cls(frozenset(cpus[half:]), frozenset(cpus[:half]))

    def describe(self) -> dict[str, Any]:
        return {"triton_cpus": sorted(self.model), "gateway_cpus": sorted(self.rest)}


def words(placement: dict[str, Any] | str | None) -> str:
    """A results file's ``placement`` in words, for a Markdown table's caption."""
    if not isinstance(placement, dict):
        return "Triton sharing every core with the gateway and the load generator"
    return (f"Triton on CPU {','.join(map(str, placement['triton_cpus']))} alone (standing in "
            f"for an accelerator), the gateway and the load generator on CPU "
            f"{','.join(map(str, placement['gateway_cpus']))}")  # fmt: skip


@contextlib.contextmanager
def apart(split: Split | None, start: Callable[[], T]) -> Iterator[T]:
    """``start()`` (which launches the stack) with this process on the model's CPUs, so
    Triton starts there and onnxruntime sizes its thread pool for them; then every process
    of ours but Triton's tree moves to the other CPUs. This process gets all of its CPUs back
    on exit. With no split, just ``start()``."""
    if split is None:
        yield start()
        return
    everywhere = os.sched_getaffinity(0)
    pin(os.getpid(), split.model)
    try:
        started = start()
        place(split)
        yield started
    finally:
        pin(os.getpid(), everywhere)


def place(split: Split) -> None:
    """Triton's process tree on ``split.model``, every other process of ours on ``split.rest``."""
    kids = children()
    mine = tree(os.getpid(), kids)
    triton: set[int] = set()
    for pid in mine:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver":
                triton.update(tree(pid, kids))
    if not triton:
        raise RuntimeError("no tritonserver among this benchmark's processes to place")
    for pid in mine:
        pin(pid, set(split.model if pid in triton else split.rest))


def pin(pid: int, cpus: AbstractSet[int]) -> None:
    """Every thread of ``pid`` (sched_setaffinity on a pid moves its main thread only)."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces
        out.setdefault(ppid, []).append(int(entry))
    return out


def tree(root: int, kids: dict[int, list[int]]) -> list[int]:
    """``root`` and all its descendants."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out
