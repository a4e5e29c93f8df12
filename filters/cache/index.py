"""An in-process vector index per cache scope: exact below a size, IVF above it.

Vectors are L2-normalised float32 rows, so the inner product is the cosine. Up to
``flat_max`` rows a query scores every row (one BLAS matrix-vector product: ~0.6 ms for 10k
rows of 384 on this CPU). Above it, a full scan is memory-bound (100k rows is 150 MB: ~12
ms per query), so the index clusters the rows (k-means, ``nlist`` ≈ 4·√n centroids) and a
query scores only the rows of the ``nprobe`` lists nearest to it (IVF, as FAISS does). IVF
is approximate: a match can hide in a list not probed. For a cache that only costs a hit,
never a wrong answer (the threshold and the guards still judge every candidate), and the
near-duplicates a cache looks for sit in the query's own list almost always (tests measure
the recall).

Rows are never moved on delete: a tombstone (the key dropped, the vector zeroed) masks them,
and the storage is compacted when more than a quarter is dead. Rows added after the last
clustering are assigned to their nearest centroid; the index re-clusters when it has
doubled since.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass(slots=True)
class Hit:
    key: str
    score: float


class VectorIndex:
    def __init__(
        self,
        dim: int,
        *,
        flat_max: int = 20_000,
        nprobe: int = 16,
        seed: int = 0,
    ) -> None:
        self.dim = dim
        self.flat_max = flat_max
        self.nprobe = nprobe
        self._seed = seed
        # One row to start, doubling: most partitions (a conversation's earlier turns) hold
        # one or two entries, and 64 rows each made 10,000 partitions cost 700 MB.
        self._vecs: F32 = np.zeros((1, dim), dtype=np.float32)
        self._keys: list[str | None] = []
        self._row: dict[str, int] = {}
        self._dead = 0
        self._generation = 0  # bumped when rows are renumbered (compaction)
        # IVF state (None while flat).
        self._centroids: F32 | None = None
        self._assign: npt.NDArray[np.int32] = np.zeros(1, dtype=np.int32)
        self._lists: list[list[int]] = []
        self._trained_at = 0

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    @property
    def clustered(self) -> bool:
        return self._centroids is not None

    def add(self, key: str, vector: F32) -> None:
        """Adds or replaces ``key``'s vector (normalised here)."""
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise ValueError(f"vector has {v.shape[0]} dimensions, index has {self.dim}")
        norm = float(np.linalg.norm(v))
        if not math.isfinite(norm) or norm == 0.0:
            raise ValueError("vector is zero or not finite")
        if key in self._row:
            self.remove(key)
        n = len(self._keys)
        if n == self._vecs.shape[0]:
            self._grow(2 * n)
        self._vecs[n] = v / norm
        self._keys.append(key)
        self._row[key] = n
        if self._centroids is not None:
            self._place(n)

    def vector(self, key: str) -> F32 | None:
        """``key``'s (normalised) vector, or None."""
        row = self._row.get(key)
        return None if row is None else self._vecs[row]

    def remove(self, key: str) -> bool:
        row = self._row.pop(key, None)
        if row is None:
            return False
        self._keys[row] = None
        # A tombstone scores 0: replacing one entry many times (refreshes, replicas' echoes)
        # must not leave copies of its vector that crowd the live row out of the top k.
        self._vecs[row] = 0.0
        self._dead += 1
        if self._dead > 1024 and self._dead > len(self._keys) // 4:
            self._compact()
        return True

    def search(self, vector: F32, k: int = 4, min_score: float = -1.0) -> list[Hit]:
        """The best ``k`` rows scoring at least ``min_score``, best first."""
        if not self._row:
            return []
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        q = q / (float(np.linalg.norm(q)) or 1.0)
        n = len(self._keys)
        rows: npt.NDArray[np.int64] | None = None
        if self._centroids is None or len(self._row) <= self.flat_max:
            scores = self._vecs[:n] @ q
        else:
            nprobe = min(self.nprobe, self._centroids.shape[0])
            probe = np.argpartition(self._centroids @ q, -nprobe)[-nprobe:]
            rows = np.fromiter((r for c in probe for r in self._lists[c]), dtype=np.int64)
            if rows.size == 0:
                return []
            scores = self._vecs[rows] @ q
        take = min(scores.shape[0], k + 8)  # spares for tombstones (they score 0)
        top = np.argpartition(scores, -take)[-take:]
        top = top[np.argsort(scores[top])[::-1]]
        out: list[Hit] = []
        for i in top:
            s = float(scores[i])
            if s < min_score:
                break
            key = self._keys[int(rows[i]) if rows is not None else int(i)]
            if key is not None:
                out.append(Hit(key, s))
                if len(out) == k:
                    break
        return out

    # --- clustering: the k-means runs off the event loop ------------------------------------

    def wants_clustering(self) -> bool:
        live = len(self._row)
        return live > self.flat_max and live >= 2 * max(self._trained_at, 1)

    def snapshot(self) -> tuple[int, F32, npt.NDArray[np.int64]]:
        """What ``cluster`` needs; safe to hand to a thread: live rows are never rewritten
        (only zeroed once dead, which at worst adds a zero to the k-means sample), and a
        compaction replaces the array rather than changing it."""
        live = np.fromiter((i for i, k in enumerate(self._keys) if k is not None), dtype=np.int64)
        return self._generation, self._vecs, live

    def cluster(self, vecs: F32, live: npt.NDArray[np.int64]) -> tuple[F32, npt.NDArray[np.int32]]:
        """k-means centroids of the live rows, and each live row's centroid (CPU-heavy)."""
        rng = np.random.default_rng(self._seed + live.size)
        n = live.size
        nlist = max(16, int(2 * math.sqrt(n)))
        sample = live if n <= 16 * nlist else rng.choice(live, 16 * nlist, replace=False)
        x = vecs[sample]
        cent = x[rng.choice(x.shape[0], nlist, replace=False)].copy()
        for _ in range(8):
            near = np.argmax(x @ cent.T, axis=1)
            sums = np.zeros_like(cent)
            np.add.at(sums, near, x)
            counts = np.bincount(near, minlength=nlist)
            cent = np.where((counts == 0)[:, None], cent, sums / np.maximum(counts, 1)[:, None])
            cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-12
        cent = cent.astype(np.float32)
        assign = np.empty(n, dtype=np.int32)
        for start in range(0, n, 8192):
            rows = live[start : start + 8192]
            assign[start : start + rows.size] = np.argmax(vecs[rows] @ cent.T, axis=1)
        return cent, assign

    def install(
        self,
        generation: int,
        live: npt.NDArray[np.int64],
        centroids: F32,
        assign: npt.NDArray[np.int32],
    ) -> bool:
        """Switches to the clustering ``cluster`` computed; False if the rows were renumbered
        meanwhile (the caller may try again)."""
        if generation != self._generation:
            return False
        self._centroids = centroids
        self._lists = [[] for _ in range(centroids.shape[0])]
        self._assign[live] = assign
        for r, c in zip(live.tolist(), assign.tolist(), strict=True):
            self._lists[c].append(r)
        seen = int(live[-1]) + 1 if live.size else 0
        for r in range(seen, len(self._keys)):  # added while clustering
            if self._keys[r] is not None:
                self._place(r)
        self._trained_at = len(self._row)
        return True

    def cluster_now(self) -> None:
        """Clusters in the calling thread (benchmarks, tests)."""
        gen, vecs, live = self.snapshot()
        self.install(gen, live, *self.cluster(vecs, live))

    # --- internals ---------------------------------------------------------------------------

    def _place(self, row: int) -> None:
        assert self._centroids is not None
        c = int(np.argmax(self._centroids @ self._vecs[row]))
        self._assign[row] = c
        self._lists[c].append(row)

    def _grow(self, cap: int) -> None:
        n = len(self._keys)
        vecs = np.zeros((cap, self.dim), dtype=np.float32)
        vecs[:n] = self._vecs[:n]
        self._vecs = vecs
        assign = np.zeros(cap, dtype=np.int32)
        assign[:n] = self._assign[:n]
        self._assign = assign

    def _compact(self) -> None:
        live = [i for i, k in enumerate(self._keys) if k is not None]
        cap = max(1, 2 * len(live))
        vecs = np.zeros((cap, self.dim), dtype=np.float32)
        vecs[: len(live)] = self._vecs[live]
        assign = np.zeros(cap, dtype=np.int32)
        assign[: len(live)] = self._assign[live]
        self._vecs, self._assign = vecs, assign
        self._keys = [self._keys[i] for i in live]
        self._row = {k: i for i, k in enumerate(self._keys) if k is not None}
        self._dead = 0
        self._generation += 1
        if self._centroids is not None:
            # Centroids do not depend on row numbers: only the lists are rebuilt.
            self._lists = [[] for _ in range(self._centroids.shape[0])]
            for r, c in enumerate(self._assign[: len(live)].tolist()):
                self._lists[c].append(r)
