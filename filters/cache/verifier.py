"""A learned check of a semantic match: is this pair a paraphrase (same answer) or a look-alike?

The lexical guards (``guards.py``) are rules: each vetoes a match on its own, and together
they refuse many paraphrases (an added "please" is no scope change, a product name written
two ways no other entity) while still missing look-alikes the rules did not foresee. The
verifier weighs the same evidence instead of obeying it: a logistic regression over

- the cosine of the two prompts' vectors,
- ``|u - v|`` and ``u * v`` per dimension (which way the two vectors differ: the features
  sentence-pair classifiers put on top of sentence embeddings),
- each guard's finding (0 or 1),

or, in the ``align`` form (the shipped one), a regression over the cosine, each guard's finding
and how well the two prompts' *words* line up: the last-layer vector of each word piece with a
letter or digit (from the same MiniLM run that gives the sentence vector) is matched to its
most similar one in the other prompt, as BERTScore does, and the features say how badly the
worst-matched fare (the lowest and second-lowest match on each side, the mean match, the
share below 0.7, how many fall below 0.5, and the length difference) and whether the matched
words come in the same order (the share of crossed pairs, each side). A changed entity, a
negation or a new number is a word the other prompt has no counterpart for, while the
sentence vectors stay close; swapped entities have every word matched, but crossed.
A question asked again in the same words never reaches the verifier (``guards.same_question``
serves it first). ``floodwall cache train`` adds two copies of each question to the pairs
(``evaluate.near_duplicates``): re-cased, and framed ("I was wondering, ..."). Without the
framed ones the fit learns that words on one side only mean a narrower question and refuses
nine in ten such re-asks; without the re-cased ones, that one changed word means a
look-alike. Measured in filters/cache/README.md.

Either is trained on labelled pairs (``floodwall cache train``). A cached prompt answers a
new one when their cosine reaches ``threshold`` and the predicted probability of "same
answer" reaches ``cut``. ``threshold`` and ``cut`` are chosen by cross-validation on the
training pairs alone (the highest hit rate whose out-of-fold wrong-answer rate stays under
``max_wrong``), so the held-out sets measure it without having shaped it.

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


# The align form's features after the cosine and the guards: 11 of how well the words match,
# then 2 of their order (see alignment()). Verifiers trained before the order features keep
# working: a model's weight count says how many of them it uses.
ALIGN_FEATURES = 13
ALIGN_SIZES = (11, ALIGN_FEATURES)


def features(
    text: str,
    vector: Any,
    cached_text: str,
    cached_vector: Any,
    guards: Sequence[str],
    tokens: Any = None,
    cached_tokens: Any = None,
    n_align: int = ALIGN_FEATURES,
) -> F64:
    """The feature row of a new prompt (``text``) against a cached one: the vector form, or
    the ``align`` form (its first ``n_align`` alignment features) when both prompts' token
    vectors are given."""
    u = _unit(vector)
    v = _unit(cached_vector)
    flags = [float(veto(text, cached_text, (g,)) is not None) for g in guards]
    if tokens is not None and cached_tokens is not None:
        aligned = alignment(tokens, cached_tokens)[:n_align]
        return np.concatenate([[float(u @ v)], flags, aligned])
    return np.concatenate([[float(u @ v)], np.abs(u - v), u * v, flags])


def alignment(tokens: Any, cached_tokens: Any) -> F64:
    """How well two prompts' word pieces ([n, d] last-layer vectors, as the embedder's
    ``embed_tokens`` gives them) match each other: see the module docstring."""
    a = _rows(tokens)
    b = _rows(cached_tokens)
    if not len(a) or not len(b):
        return np.zeros(ALIGN_FEATURES)
    sim = a @ b.T
    ra, rb = sim.max(axis=1), sim.max(axis=0)  # each token's best match on the other side

    def second(x: F64) -> float:
        return float(np.partition(x, 1)[1]) if len(x) > 1 else float(x.min())

    return np.array([
        ra.min(), rb.min(), second(ra), second(rb), ra.mean(), rb.mean(),
        min(int((ra < 0.5).sum()), 3) / 3, min(int((rb < 0.5).sum()), 3) / 3,
        (ra < 0.7).mean(), (rb < 0.7).mean(),
        abs(len(a) - len(b)) / max(len(a), len(b)),
        _inversions(sim, ra), _inversions(sim.T, rb),
    ], dtype=np.float64)  # fmt: skip


def _inversions(sim: F64, best: F64, matched: float = 0.6) -> float:
    """Word order: of the pairs of well-matched word pieces of one prompt (best match at
    least ``matched``), the share whose matches in the other prompt come in the opposite
    order. "teaspoons in a tablespoon" against "tablespoons in a teaspoon" has every word
    matched (so the match features above see nothing) but its two nouns crossed."""
    keep = np.flatnonzero(best >= matched)
    if len(keep) < 2:
        return 0.0
    pos = sim[keep].argmax(axis=1)
    i, j = np.triu_indices(len(keep), 1)
    return float((pos[i] > pos[j]).mean())


def _rows(x: Any) -> F64:
    a = np.asarray(x, dtype=np.float64)
    a = a.reshape(-1, a.shape[-1]) if a.size else a.reshape(0, 0)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)


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
    align: bool = False  # the token-alignment form: needs both prompts' token vectors

    @property
    def dimensions(self) -> int | None:
        """The sentence vectors' size it was trained on (None: the align form takes any)."""
        return None if self.align else (len(self.weights) - 1 - len(self.guards)) // 2

    def probability(self, row: F64) -> float:
        return float(_sigmoid(row @ self.weights + self.bias))

    def accepts(
        self,
        text: str,
        vector: Any,
        cached_text: str,
        cached_vector: Any,
        tokens: Any = None,
        cached_tokens: Any = None,
    ) -> bool:
        if self.align and (tokens is None or cached_tokens is None):
            return False  # cannot judge without the tokens: a miss, never a guess
        t, ct = (tokens, cached_tokens) if self.align else (None, None)
        row = features(text, vector, cached_text, cached_vector, self.guards, t, ct,
                       n_align=len(self.weights) - 1 - len(self.guards))  # fmt: skip
        return row[0] >= self.threshold and self.probability(row) >= self.cut

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({
            "threshold": self.threshold, "cut": self.cut, "bias": self.bias,
            "guards": list(self.guards), "align": self.align, "about": self.about,
            "weights": [round(float(w), 7) for w in self.weights],
        }, indent=1) + "\n")  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Verifier:
        try:
            d = json.loads(path.read_text())
            v = cls(float(d["threshold"]), float(d["cut"]), np.asarray(d["weights"], np.float64),
                    float(d["bias"]), tuple(d["guards"]), d.get("about", {}),
                    bool(d.get("align", False)))  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a verifier model ({exc})") from None
        unknown = set(v.guards) - set(GUARDS)
        rest = len(v.weights) - 1 - len(v.guards)
        if unknown or (rest not in ALIGN_SIZES if v.align else rest % 2):
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
    tokens: dict[str, Any] | None = None,
    cs: Sequence[float] = (1.0, 3.0, 10.0, 30.0, 100.0),
    thresholds: Sequence[float] = (0.6, 0.7),
    max_wrong: float = 0.02,
    min_near_duplicates: float = 0.9,
    folds: int = 5,
    guards: tuple[str, ...] = GUARDS,
) -> Verifier:
    """Chooses the regularisation, threshold and cut by ``folds``-fold cross-validation
    (folds stratified by category, deterministic), then fits on all ``pairs``: the highest
    out-of-fold hit rate on paraphrases whose out-of-fold wrong-answer rate stays under
    ``max_wrong`` and which serves at least ``min_near_duplicates`` of the pairs of category
    ``near_duplicate`` (a question re-asked in framing words: without this floor the
    fit trades them for look-alikes, which the labelled sets hold many more of). With
    ``tokens`` (each text's token vectors) it trains the align form.

    The cosine floor starts at 0.6: the labelled pairs are all look-alikes or paraphrases,
    so below the cosines they cover the fit is not calibrated, and with a floor of 0.4 it
    served 0.7% of random pairs of unrelated questions (0.01% at 0.6).

    The re-cased copies stay in although the live path serves them before asking the
    verifier (``same_question``): they anchor "nearly the same words" on the paraphrase
    side. Left out (measured in session 10), the fit learns that one changed word means a
    look-alike, as it does in most traps, and refuses half the everyday rewordings ("How do
    I delete my account?" / "how do I remove my account")."""
    x = np.array([features(p.text, vectors[p.text], p.cached_text, vectors[p.cached_text],
                           guards, *((tokens[p.text], tokens[p.cached_text]) if tokens is not None
                                     else (None, None)))
                  for p in pairs])  # fmt: skip
    y = np.array([p.same_answer for p in pairs])
    if y.all() or not y.any():
        raise ValueError("training needs both paraphrases and look-alikes")
    near = np.array([p.category == "near_duplicate" for p in pairs])
    fold = np.zeros(len(pairs), dtype=int)
    seen: dict[str, int] = defaultdict(int)
    for i, p in enumerate(pairs):
        fold[i] = seen[p.category] % folds
        seen[p.category] += 1
    labelled = y & ~near
    best: tuple[float, float, float, float, float, float] | None = None
    for c in cs:
        oof = np.zeros(len(pairs))
        for k in range(folds):
            w, b = fit(x[fold != k], y[fold != k], c)
            oof[fold == k] = _sigmoid(x[fold == k] @ w + b)
        for t in thresholds:
            # Hits only fall as the cut rises: the lowest cut within max_wrong is the best.
            for cut in np.arange(0.5, 0.995, 0.01):
                served = (oof >= cut) & (x[:, 0] >= t)
                hit, wrong = float(served[labelled].mean()), float(served[~y].mean())
                dups = float(served[near].mean()) if near.any() else 1.0
                if wrong <= max_wrong:
                    if dups >= min_near_duplicates and (best is None or hit > best[0]):
                        best = (hit, wrong, dups, c, t, round(float(cut), 2))
                    break
    if best is None:
        raise ValueError(f"no setting keeps wrong answers under {max_wrong:.1%} while serving "
                         f"{min_near_duplicates:.0%} of near-duplicates")  # fmt: skip
    hit, wrong, dups, c, t, cut = best
    w, b = fit(x, y, c)
    cv = {"hit_rate": round(hit, 4), "wrong_hit_rate": round(wrong, 4),
          "near_duplicates_hit_rate": round(dups, 4)}  # fmt: skip
    about = {"pairs": len(pairs), "c": c, "max_wrong": max_wrong,
             "min_near_duplicates": min_near_duplicates, "cross_validated": cv}  # fmt: skip
    return Verifier(t, cut, w, b, guards, about, align=tokens is not None)
