"""A learned check of a semantic match: is this pair a paraphrase (same answer) or a look-alike?

The lexical guards (``guards.py``) are rules: each vetoes a match on its own, and together
they refuse many paraphrases (an added "please" is no scope change, a product name written
two ways no other entity) while still missing look-alikes the rules did not foresee. The
verifier weighs the same evidence instead of obeying it: a logistic regression over

- the cosine of the two prompts' vectors,
- ``|u - v|`` and ``u * v`` per dimension (which way the two vectors differ: the features
  sentence-pair classifiers put on top of sentence embeddings),
- each guard's finding (0 or 1),

trained on labelled pairs (``floodwall cache train``). A cached prompt answers a new one when
their cosine reaches ``threshold`` and the predicted probability of "same answer" reaches
``cut``. ``threshold`` and ``cut`` are chosen by cross-validation on the training pairs alone
(the highest hit rate whose out-of-fold wrong-answer rate stays under ``max_wrong``), so the
held-out sets measure it without having shaped it.

Pure numpy; the model is a JSON file (weights, threshold, cut, what it was trained on).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from filters.cache.guards import GUARDS, veto

F64 = npt.NDArray[np.float64]
SHIPPED = Path(__file__).with_name("verifier.json")


def features(
    text: str, vector: Any, cached_text: str, cached_vector: Any, guards: Sequence[str]
) -> F64:
    """The feature row of a new prompt (``text``) against a cached one."""
    u = _unit(vector)
    v = _unit(cached_vector)
    flags = [float(veto(text, cached_text, (g,)) is not None) for g in guards]
    return np.concatenate([[float(u @ v)], np.abs(u - v), u * v, flags])


def _sigmoid(z: Any) -> Any:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + e^-z), without overflow for large |z|


def _unit(x: Any) -> F64:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    n = float(np.linalg.norm(a))
    return a / n if n > 0 else a


@dataclass(frozen=True)
class Verifier:
    threshold: float
    cut: float
    weights: F64
    bias: float
    guards: tuple[str, ...] = GUARDS
    about: dict[str, Any] = field(default_factory=dict)  # how it was trained and measured

    @property
    def dimensions(self) -> int:
        return (len(self.weights) - 1 - len(self.guards)) // 2

    def probability(self, row: F64) -> float:
        return float(_sigmoid(row @ self.weights + self.bias))

    def accepts(self, text: str, vector: Any, cached_text: str, cached_vector: Any) -> bool:
        row = features(text, vector, cached_text, cached_vector, self.guards)
        return row[0] >= self.threshold and self.probability(row) >= self.cut

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({
            "threshold": self.threshold, "cut": self.cut, "bias": self.bias,
            "guards": list(self.guards), "about": self.about,
            "weights": [round(float(w), 7) for w in self.weights],
        }, indent=1) + "\n")  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Verifier:
        try:
            d = json.loads(path.read_text())
            v = cls(float(d["threshold"]), float(d["cut"]), np.asarray(d["weights"], np.float64),
                    float(d["bias"]), tuple(d["guards"]), d.get("about", {}))  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a verifier model ({exc})") from None
        unknown = set(v.guards) - set(GUARDS)
        if unknown or (len(v.weights) - 1 - len(v.guards)) % 2:
            raise ValueError(f"{path}: unknown guards {sorted(unknown)} or bad weight count")
        return v


def fit(x: F64, y: npt.NDArray[np.bool_], c: float, iterations: int = 50) -> tuple[F64, float]:
    """L2-regularised logistic regression (``0.5 |w|^2 + c * log loss``, intercept free), by
    Newton's method: the same objective as scikit-learn's ``LogisticRegression(C=c)``."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    reg = np.full(d + 1, 1.0 / c)
    reg[-1] = 0.0
    w = np.zeros(d + 1)
    t = y.astype(np.float64)
    for _ in range(iterations):
        p = _sigmoid(xb @ w)
        grad = xb.T @ (p - t) + reg * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return w[:-1], float(w[-1])


@dataclass(frozen=True)
class Labelled:
    text: str  # the new prompt
    cached_text: str  # the prompt whose answer is cached
    same_answer: bool
    category: str


def train(
    pairs: Sequence[Labelled],
    vectors: dict[str, Any],
    *,
    cs: Sequence[float] = (1.0, 3.0, 10.0, 30.0, 100.0),
    thresholds: Sequence[float] = (0.4, 0.5, 0.6, 0.7),
    max_wrong: float = 0.015,
    folds: int = 5,
    guards: tuple[str, ...] = GUARDS,
) -> Verifier:
    """Chooses the regularisation, threshold and cut by ``folds``-fold cross-validation
    (folds stratified by category, deterministic), then fits on all ``pairs``."""
    x = np.array([features(p.text, vectors[p.text], p.cached_text, vectors[p.cached_text],
                           guards) for p in pairs])  # fmt: skip
    y = np.array([p.same_answer for p in pairs])
    if y.all() or not y.any():
        raise ValueError("training needs both paraphrases and look-alikes")
    fold = np.zeros(len(pairs), dtype=int)
    seen: dict[str, int] = defaultdict(int)
    for i, p in enumerate(pairs):
        fold[i] = seen[p.category] % folds
        seen[p.category] += 1
    best: tuple[float, float, float, float, float] | None = None  # hit, wrong, c, t, cut
    for c in cs:
        oof = np.zeros(len(pairs))
        for k in range(folds):
            w, b = fit(x[fold != k], y[fold != k], c)
            oof[fold == k] = _sigmoid(x[fold == k] @ w + b)
        for t in thresholds:
            # Hits only fall as the cut rises: the lowest cut within max_wrong is the best.
            for cut in np.arange(0.5, 0.995, 0.01):
                served = (oof >= cut) & (x[:, 0] >= t)
                hit, wrong = float(served[y].mean()), float(served[~y].mean())
                if wrong <= max_wrong:
                    if best is None or hit > best[0]:
                        best = (hit, wrong, c, t, round(float(cut), 2))
                    break
    if best is None:
        raise ValueError(f"no setting keeps wrong answers under {max_wrong:.1%}")
    hit, wrong, c, t, cut = best
    w, b = fit(x, y, c)
    cv = {"hit_rate": round(hit, 4), "wrong_hit_rate": round(wrong, 4)}
    about = {"pairs": len(pairs), "c": c, "max_wrong": max_wrong, "cross_validated": cv}
    return Verifier(t, cut, w, b, guards, about)
