"""Words-first: the semantic candidate found by the words a prompt shares with a cached one,
so that a paraphrase which keeps most of its words is judged without embedding it first.

With the judge deciding, a semantic hit is two transformer passes one after the other: the
embedder (to find the nearest cached prompt) and then the judge (to read the pair). When one
cached prompt shares clearly more of the new prompt's content words than any other, that
prompt is the candidate, and the judge alone decides; only when the words find no clear
candidate, or the judge refuses it, does the look-up go on to the embedding.

A candidate needs:
- ``min_overlap``: the Jaccard overlap of the two prompts' content words (below), and
- ``margin``: that much more overlap than the runner-up, because where several cached
  prompts share the new one's words (the topical neighbours every full cache has) the judge,
  asked about the wrong one, said yes more often than when it is asked about the nearest by
  embedding (``floodwall cache eval``'s ``one_index`` with and without ``--words-first``;
  README "Semantic cache").

Speculation (``speculate``): when no candidate is clear, the cached prompt sharing the most
words (at least ``speculate`` overlap) is a guess at the nearest by embedding. The judge reads
it while the prompt is embedded, and its answer counts only if the guess is the nearest
(``SemanticIndex.judge_fetching``): the verdicts are those without speculation, and a hit
found by its vector costs the slower of the two Triton calls instead of both. A wrong guess
costs a judge call.

Content words: the prompt case-folded, split on ``\\w+``, without a short list of English
function words and one-letter tokens (digits are kept), with a final "s" (not "ss"), "ing"
or "ed" dropped from words of 5+ letters. Words only find the candidate; the judge, which
reads both prompts whole ("can't" included), decides.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_WORD = re.compile(r"\w+")
_FUNCTION_WORDS = frozenset(
    """a an the of to in on for and or is are was were be been being do does did i my me
    mine we our ours you your yours it its this that these those with at by from as can
    could would should will shall may might must how what which who whom whose when where
    why there their theirs they them he she his her hers him us am have has had so if then
    than just please""".split()  # noqa: SIM905 (a word list reads better as prose)
)
_ENDINGS = ("ing", "ed", "s")
# A word in more cached prompts of one partition than this cannot single out a candidate:
# its entries are not gathered (they are scored if a rarer shared word finds them), which
# keeps a look-up's cost bounded however large the partition.
MAX_POSTINGS = 1000

# The defaults (semantic.judge.words_first): on the judge's validation sets (holdout12,
# holdout13; `cache eval --judge --words-first`), margin 0.3 served as many paraphrases with
# no more wrong answers than embedding every look-up, each set's questions stored alone or
# among all 6,700 of the twenty-two sets; 0.2 and 0.1 served 2 and 3 more wrong answers
# (of 600 pairs) among the 6,700. min_overlap 0.2 and 0.3 gave the same figures.
WORDS_MIN_OVERLAP = 0.2
WORDS_MARGIN = 0.3


def content_words(text: str) -> frozenset[str]:
    out = set()
    for w in _WORD.findall(text.casefold()):
        if w in _FUNCTION_WORDS or (len(w) == 1 and not w.isdigit()):
            continue
        for ending in _ENDINGS:
            if len(w) > len(ending) + 3 and w.endswith(ending) and not w.endswith("ss"):
                w = w[: -len(ending)]
                break
        out.add(w)
    return frozenset(out)


def overlap(a: frozenset[str], b: frozenset[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 0.0


@dataclass(frozen=True, slots=True)
class WordsFirst:
    min_overlap: float
    margin: float
    speculate: float | None = None  # the overlap a guess needs (module docstring); None: off

    def clear(self, best: float, second: float) -> bool:
        """Whether an entry sharing ``best`` of the words, the runner-up ``second``, is the
        candidate."""
        return best >= self.min_overlap and best - second >= self.margin


class WordIndex:
    """The content words of one partition's cached prompts, by entry."""

    __slots__ = ("_postings", "_words")

    def __init__(self) -> None:
        self._words: dict[str, frozenset[str]] = {}
        self._postings: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._words)

    def add(self, key: str, words: frozenset[str]) -> None:
        self.remove(key)
        self._words[key] = words
        for w in words:
            self._postings.setdefault(w, set()).add(key)

    def remove(self, key: str) -> None:
        words = self._words.pop(key, None)
        for w in words or ():
            keys = self._postings.get(w)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._postings[w]

    def candidate(
        self, words: frozenset[str], rule: WordsFirst, live: Callable[[str], bool]
    ) -> tuple[str, float] | None:
        """The live entry whose words overlap ``words`` by at least ``rule.min_overlap`` and
        by ``rule.margin`` more than any other live entry's, with its overlap; else None."""
        best = self.best(words, live)
        return None if best is None or not rule.clear(*best[1:]) else best[:2]

    def best(
        self, words: frozenset[str], live: Callable[[str], bool]
    ) -> tuple[str, float, float] | None:
        """The live entry sharing the most of ``words``, its overlap and the runner-up's (0
        when there is none); None when no live entry shares any."""
        found: set[str] = set()
        for w in words:
            keys = self._postings.get(w)
            if keys is not None and len(keys) <= MAX_POSTINGS:
                found.update(keys)
        scored = sorted(((overlap(words, self._words[k]), k) for k in found), reverse=True)
        best: tuple[str, float] | None = None
        second = 0.0
        for score, key in scored:
            if not live(key):
                continue
            if best is not None:
                second = score
                break
            best = (key, score)
        return None if best is None else (*best, second)
