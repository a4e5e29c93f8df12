"""Lexical guards a semantic match must pass on top of the similarity threshold.

Sentence embeddings place "cancel my subscription" and "don't cancel my subscription" close
together: they encode topic, not truth conditions. These guards compare the two prompts'
words for the classic ways look-alike questions need different answers, and veto the match
when they find one:

- ``negation``  one side negates (not, no, never, without, n't ...) and the other does not;
- ``antonym``   a word on one side has its opposite on the other (increase/decrease,
                enable/disable: a lexicon plus negating prefixes un-, dis-, de-, in-, non-);
- ``number``    the numbers differ (digits, number words and ordinals, normalised);
- ``date_time`` the dates and times differ (weekdays, months, today/tomorrow, next/last ...);
- ``swap``      the same two things on both sides with a directional word between them
                (to, from, than, vs, into ...) in opposite order: Paris->London vs London->Paris;
                or two words or numbers trading places ("2 to the power of 5" / "5 to ... 2");
- ``entity``    a name (capitalised word, acronym, code-like token or a known proper name
                such as a language, country or currency) on one side only;
- ``scope``     one side has every content word of the other and more: an added qualifier
                narrows or widens the question ("... on the mobile app").

They favour refusing: a vetoed paraphrase costs one model call, a served trap a wrong
answer. ``cache eval`` measures both rates on a labelled set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

_CONTRACTIONS = (
    (re.compile(r"\bcan['’]t\b"), "can not"),
    (re.compile(r"\bwon['’]t\b"), "will not"),
    (re.compile(r"\bshan['’]t\b"), "shall not"),
    (re.compile(r"\bain['’]t\b"), "is not"),
    (re.compile(r"n['’]t\b"), " not"),
    (re.compile(r"\bcannot\b"), "can not"),
    # The same typed without the apostrophe ("which states dont border canada").
    (re.compile(r"\bcant\b"), "can not"),
    (re.compile(r"\bwont\b"), "will not"),
    (
        re.compile(
            r"\b(do|does|did|is|are|was|were|has|have|had|should|would|could|must|need)nt\b"
        ),
        r"\1 not",
    ),
    (re.compile(r"['’](s|re|ve|ll|d|m)\b"), " "),
)
_TOKEN = re.compile(r"\d+(?:[.,:]\d+)*(?:st|nd|rd|th|%|s)?|[^\W\d_]+(?:[-'][^\W\d_]+)*", re.UNICODE)

NEGATIONS = frozenset(
    """not no never none nobody nothing nowhere neither nor without cannot noone""".split()
)

# Words that carry no content of their own: kept out of scope/entity comparisons.
STOPWORDS = frozenset(
    """a an the and or but if then else of in on at by for with about as into to from up
    down out over under again further once here there when where why how what which who
    whom whose this that these those am is are was were be been being have has had
    having do does did doing i me my mine myself we our ours you your yours he him his
    she her it its they them their what's can could should would will shall may might
    must also just so very too quite really some any each every both few more most other
    such own same than s t please pls plz thanks thank hi hey hello quick question help
    tell know want need like explain show give let get way ways kindly okay ok possible
    able going one someone something anyone anything things thing best good ever still
    currently actually basically exactly simply""".split()
)
# Words that frame a question without changing what it asks ("what are the steps to ...",
# "what's the reason ..."): ignored when comparing what the two sides ask about.
FRAMING = frozenset(
    """step steps reason reasons cause causes wrong happen happened happens overview
    summary summarize summarise meaning mean means define definition describe
    description difference differences range signs code example examples guide
    instructions tips method methods process procedure list details detail info
    information work works called make makes made appear people whats answer got go went
    find found figure out see look use using used learn understand say said typical
    typically usually usual normal general generally kind type sort far much many long
    often""".split()
)

# Antonym pairs (stems are compared, so "increasing"/"decreases" match increase/decrease).
_ANTONYM_PAIRS = """
increase decrease; increase reduce; raise lower; rise fall; upload download; buy sell;
buyer seller; hot cold; warm cool; before after; maximum minimum; max min; maximize minimize;
add remove; add delete; add subtract; plus minus; multiply divide; import export;
open close; start stop; start end; begin end; first last; early late; earlier later;
fast slow; faster slower; high low; higher lower; highest lowest; above below; more less;
more fewer; most least; best worst; better worse; big small; bigger smaller; biggest smallest;
large small; larger smaller; largest smallest; long short; longer shorter; heavy light;
gain lose; gain loss; win lose; profit loss; pros cons; advantage disadvantage; include exclude;
allow deny; allow block; accept reject; approve reject; push pull; send receive;
incoming outgoing; inbound outbound; input output; read write; left right; north south;
east west; old new; older newer; oldest newest; young old; cheap expensive; rich poor;
positive negative; true false; success failure; pass fail; join leave; arrive depart;
arrival departure; inhale exhale; ascending descending; asc desc; encode decode;
encrypt decrypt; compress decompress; zip unzip; attach detach; upgrade downgrade;
upvote downvote; inside outside; internal external; horizontal vertical; wet dry;
light dark; lighten darken; sweet sour; legal illegal; hire fire; borrow lend;
deposit withdraw; debit credit; asleep awake; past future; forward backward; front back;
top bottom; uppercase lowercase; upper lower; love hate; like dislike; agree disagree;
always never; everything nothing; all none; remember forget; easy hard; easy difficult;
simple complex; safe dangerous; safe unsafe; allowed forbidden; allowed prohibited;
mandatory optional; required optional; public private; synonym antonym; visible hidden; show hide;
online offline; synchronous asynchronous; sync async; client server; sender recipient;
lender borrower; employer employee; landlord tenant; parent child; men women; male female;
boy girl; day night; morning evening; summer winter; spring autumn; odd even;
install uninstall; inflation deflation; strengthen weaken; tighten loosen; shrink expand;
shrink grow; freeze thaw; float sink; acidic alkaline; enable disable; activate deactivate;
lock unlock; subscribe unsubscribe; connect disconnect; mount unmount; follow unfollow;
block unblock; mute unmute; pin unpin; archive unarchive; like unlike; merge split;
increment decrement; inbound outbound; overestimate underestimate; overpaid underpaid;
overweight underweight; overcooked undercooked; overflow underflow; import export;
min max; ceiling floor; maximal minimal; upstream downstream; uphill downhill; upstairs
downstairs; entry exit; enter exit; login logout; sign-in sign-out; signin signout;
lowercase uppercase; wide narrow; wider narrower; thick thin; thicker thinner; deep shallow;
strong weak; stronger weaker; loud quiet; louder quieter; full empty; present absent;
accept decline; approve deny; appreciate depreciate; appreciation depreciation;
credit debit; expand collapse; ascend descend; dominant recessive; predator prey;
import export; cause prevent; benefit risk; benefits risks; benefit harm; help hurt;
healthy unhealthy; clean dirty; quick slow; quickly slowly; rarely often; seldom often;
sunrise sunset; win loss; winner loser; victory defeat; attack defend; offense defense;
offensive defensive; inflow outflow; income expense; income expenses; revenue cost;
assets liabilities; asset liability; bullish bearish; bull bear; long short; buy short;
teacher student; doctor patient; host guest; server client; master slave; primary secondary;
parent subclass; superclass subclass; major minor; senior junior; manager employee;
warm cold; earliest latest; soonest latest; lowest highest;
lowest-rated highest-rated; zoom-in zoom-out; inhale exhale; import export
"""


def _stem(word: str) -> str:
    """A crude suffix stripper: enough to match increases/increased/increasing."""
    for suffix in ("ingly", "ing", "edly", "ed", "es", "s", "ly"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def _pairs(spec: str) -> dict[str, frozenset[str]]:
    """word stem -> the stems it is paired with, from "a b; c d e; ..." groups."""
    out: dict[str, set[str]] = {}
    for item in spec.replace("\n", " ").split(";"):
        stems = [_stem(w) for w in item.split()]
        for x in stems:
            out.setdefault(x, set()).update(y for y in stems if y != x)
    return {k: frozenset(v) for k, v in out.items()}


ANTONYMS = _pairs(_ANTONYM_PAIRS)
SYNONYMS: dict[str, frozenset[str]] = {}  # filled below
# Synonym groups: a one-word substitution between these is a paraphrase, not a trap.
_SYNONYM_GROUPS = """
big large huge; biggest largest; small little tiny; smallest tiniest; buy purchase;
start begin commence; delete remove erase; fix repair; car vehicle automobile; phone cellphone
mobile; quick fast rapid; quickly fast rapidly; cheap inexpensive affordable; cost price;
film movie; sofa couch; doctor physician; kid child; kids children; mistake error;
help assist; need require; get obtain; show display; change modify alter edit update;
make create; choose pick select; stop halt; end finish; correct right; wrong incorrect; job work;
salary pay wage; shop store; picture photo image; pc computer laptop; app application;
world earth; mom mother; dad father; ok fine; happy glad; sad unhappy; rich wealthy;
smart intelligent clever; hard difficult; easy simple; choose decide; learn study;
reset restore; setup configure; install set; password passcode; email e-mail mail;
refund reimbursement; cancel terminate; tv television; wifi wi-fi wireless; fridge
refrigerator; icon symbol; clothes clothing; trip journey travel; hotel accommodation;
teen teenager adolescent; meaning definition; answer reply; question query; couch sofa;
enable activate; disable deactivate; exit leave quit; view see; recover retrieve
"""
SYNONYMS.update(_pairs(_SYNONYM_GROUPS))
_NEG_PREFIXES = ("un", "dis", "de", "in", "im", "il", "ir", "non", "anti", "mis")

_UNITS: dict[str, float] = {
    "zero": 0.0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000,
    "million": 10**6, "billion": 10**9, "dozen": 12, "half": 0.5, "twice": 2, "double": 2,
    "triple": 3, "single": 1, "couple": 2, "pair": 2, "quarter": 0.25,
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
    "eighth": 8, "ninth": 9, "tenth": 10, "once": 1, "thrice": 3,
}  # fmt: skip
# "one" is too often a pronoun ("which one", "one of") to count as a number by itself.
_WEAK_NUMBERS = frozenset(
    {"one", "first", "second", "single", "pair", "couple", "once", "half", "double"}
)

_TIME_WORDS = {
    "mon": "monday", "monday": "monday", "tue": "tuesday", "tues": "tuesday",
    "tuesday": "tuesday", "wed": "wednesday", "wednesday": "wednesday", "thu": "thursday",
    "thurs": "thursday", "thursday": "thursday", "fri": "friday", "friday": "friday",
    "sat": "saturday", "saturday": "saturday", "sun": "sunday", "sunday": "sunday",
    "jan": "january", "january": "january", "feb": "february", "february": "february",
    "mar": "march", "march": "march", "apr": "april", "april": "april", "may": "may",
    "jun": "june", "june": "june", "jul": "july", "july": "july", "aug": "august",
    "august": "august", "sep": "september", "sept": "september", "september": "september",
    "oct": "october", "october": "october", "nov": "november", "november": "november",
    "dec": "december", "december": "december", "today": "today", "tonight": "tonight",
    "tomorrow": "tomorrow", "yesterday": "yesterday", "now": "now", "weekend": "weekend",
    "weekday": "weekday", "weekdays": "weekday", "weekends": "weekend", "morning": "morning",
    "afternoon": "afternoon", "evening": "evening", "night": "night", "midnight": "midnight",
    "noon": "noon", "am": "am", "pm": "pm", "next": "next", "last": "last",
    "previous": "last", "past": "last", "this": "this", "current": "this", "upcoming": "next",
    "spring": "spring", "summer": "summer", "autumn": "autumn", "fall": "autumn",
    "winter": "winter", "century": "century", "decade": "decade", "ago": "ago",
    "later": "later", "earlier": "earlier", "recent": "recent", "recently": "recent",
}  # fmt: skip
# Relative words that only mean a time next to a unit ("last week", not "the last step").
_RELATIVE = frozenset({"next", "last", "this", "past", "previous", "current", "upcoming"})
_TIME_UNITS = frozenset(
    """day days week weeks month months year years quarter quarters hour hours minute
    minutes night weekend morning evening season century decade""".split()
)

_FREQUENCY = {
    "daily": "daily", "weekly": "weekly", "monthly": "monthly", "yearly": "yearly",
    "annually": "yearly", "annual": "yearly", "hourly": "hourly", "quarterly": "quarterly",
    "nightly": "daily", "biweekly": "biweekly", "fortnightly": "biweekly",
}  # fmt: skip
_PARTICLES = {"in": "out", "out": "in", "on": "off", "off": "on", "up": "down", "down": "up"}
_FUTURE = frozenset({"will", "tomorrow", "upcoming", "next"})
_PAST = frozenset({"did", "was", "were", "yesterday", "ago", "previous"})

# Who or what a question is about: one side naming a population or condition the other
# does not ("... in children", "... for beginners") narrows it.
QUALIFIERS = frozenset(
    """child children kid kids toddler toddlers baby babies infant infants newborn newborns
    teen teens teenager teenagers adult adults elderly senior seniors woman women man
    men pregnant pregnancy breastfeeding beginner beginners expert experts advanced
    diabetic diabetics vegan vegans vegetarian vegetarians student students dog dogs cat
    cats puppy puppies kitten kittens commercial enterprise free beginner-friendly
    professional professionals athletes athlete veterans veteran retirees freelancer
    freelancers self-employed nonprofit""".split()
)

# Directional words: the order of the things around them carries the meaning.
_DIRECTIONAL = frozenset(
    """to into onto from than vs versus against with for by per when""".split()
)
SCOPE_MIN_EXTRA = 2
_NOT_CONTENT = _DIRECTIONAL | {"between", "versus"}

# Proper names that users type in lower case: languages, countries, currencies, platforms.
KNOWN_NAMES = frozenset(
    """python java javascript typescript golang ruby php perl kotlin swift scala haskell
    elixir erlang clojure lua julia matlab fortran cobol bash powershell sql mysql
    postgres postgresql sqlite mongodb redis oracle excel powerpoint windows linux macos
    mac ios android ubuntu debian fedora chrome firefox safari docker kubernetes aws
    azure gcp react angular vue django flask rails nodejs npm pip git github gitlab
    iphone ipad pixel samsung google apple microsoft amazon netflix spotify paypal
    mastercard amex usd eur gbp jpy cny inr cad aud chf btc eth bitcoin ethereum euro
    euros yuan rupee rupees peso pesos franc francs america usa britain england scotland
    wales ireland france germany spain portugal italy greece austria australia
    switzerland sweden norway denmark finland iceland poland russia ukraine china japan
    korea india pakistan bangladesh indonesia vietnam thailand malaysia singapore
    philippines canada mexico brazil argentina chile peru colombia egypt nigeria kenya
    ethiopia morocco turkey iran iraq israel saudi netherlands belgium hungary czech
    romania bulgaria serbia croatia zealand africa europe asia antarctica paris london
    berlin madrid rome lisbon vienna sydney melbourne tokyo beijing shanghai delhi
    mumbai moscow toronto vancouver chicago boston seattle york angeles francisco dubai
    istanbul cairo amsterdam brussels dublin prague warsaw budapest athens stockholm
    oslo copenhagen helsinki zurich geneva munich barcelona milan venice florence naples
    mercury venus mars jupiter saturn uranus neptune pluto ibuprofen acetaminophen
    paracetamol aspirin tylenol advil naproxen amoxicillin penicillin insulin metformin""".split()
)


@dataclass(frozen=True, slots=True)
class Features:
    """What the guards compare, extracted once per prompt (cached entries keep theirs)."""

    words: tuple[str, ...]  # lower-cased tokens, contractions expanded
    stems: frozenset[str]
    content: frozenset[str]  # stems of content words
    negations: int
    numbers: tuple[str, ...]  # canonical, sorted
    times: frozenset[str]
    names: frozenset[str]  # lower-cased names (see module doc)
    order: tuple[str, ...]  # stems of non-stopwords, directional words and numbers, in order
    initials: frozenset[str]  # acronyms the text could be abbreviated to
    qualifiers: frozenset[str]  # population words (QUALIFIERS), stemmed
    tense: str | None  # "past" or "future" when the text is clearly one of them
    abbrevs: frozenset[tuple[str, str]]  # (name, its CamelCase initials): javascript, js
    frequency: frozenset[str]  # daily, weekly, monthly ...
    particles: frozenset[tuple[str, str]]  # (verb, particle): zoom in, sign out


def _normalise(text: str) -> str:
    t = text.lower()
    for pattern, repl in _CONTRACTIONS:
        t = pattern.sub(repl, t)
    return t


def _canon(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.12g}"


def _number(token: str) -> str | None:
    """A numeric token in canonical form ("5", "0.5", "10:30", "v3.11.2"), else None."""
    t = token.rstrip("%")
    t = re.sub(r"(st|nd|rd|th|s)$", "", t)
    if not t or not t[0].isdigit():
        return None
    if ":" in t:  # a time of day: 10:30 (10:00 and 10 are the same hour)
        h, _, m = t.partition(":")
        return h.lstrip("0") or "0" if m.strip("0:") == "" else f"{h.lstrip('0')}:{m}"
    t = t.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", t) else t
    try:
        return _canon(float(t))
    except ValueError:
        return "v" + t  # a version such as 3.11.2


_CAMEL = re.compile(r"[A-Z][a-z]+|[A-Z]+(?![a-z])")


def _initials(tokens: list[str]) -> set[str]:
    """Acronyms the tokens could stand for: initials of 2-5 consecutive words (and of the
    parts of CamelCase words: JavaScript -> js)."""
    parts: list[str] = []
    for t in tokens:
        parts.extend(p.lower() for p in _CAMEL.findall(t)) if t[:1].isupper() else parts.append(
            t.lower()
        )
    out: set[str] = set()
    for n in range(2, 6):
        for i in range(len(parts) - n + 1):
            out.add("".join(p[0] for p in parts[i : i + n] if p))
    return out


@lru_cache(maxsize=65536)
def features(text: str) -> Features:
    original = _TOKEN.findall(text)
    words = tuple(_TOKEN.findall(_normalise(text)))
    negations = sum(1 for w in words if w in NEGATIONS)
    numbers: list[str] = []
    times: set[str] = set()
    for i, w in enumerate(words):
        n = _number(w)
        if n is not None:
            numbers.append(n)
        elif (w in _UNITS and w not in _WEAK_NUMBERS) or (
            w in _WEAK_NUMBERS
            and w != "one"
            and i + 1 < len(words)
            and words[i + 1] in (_TIME_UNITS)
        ):
            numbers.append(_canon(_UNITS[w]))
        if w in _TIME_WORDS:
            if w in _RELATIVE:
                nxt = words[i + 1] if i + 1 < len(words) else ""
                if nxt in _TIME_UNITS:
                    times.add(f"{_TIME_WORDS[w]} {_stem(nxt)}")
                elif nxt in _TIME_WORDS and nxt not in _RELATIVE:  # last Sunday, next May
                    times.add(f"{_TIME_WORDS[w]} {_TIME_WORDS[nxt]}")
            elif w not in ("may", "march", "sun", "sat", "fall", "spring", "mar", "wed", "now") or (
                w in ("march", "may") and i + 1 < len(words) and _number(words[i + 1])
            ):
                times.add(_TIME_WORDS[w])
    # Tense: a question about what happened is not one about what will happen.
    future, past = any(w in _FUTURE for w in words), any(w in _PAST for w in words)
    tense = "future" if future and not past else "past" if past and not future else None
    names: set[str] = set()
    for i, tok in enumerate(original):
        tok = re.sub(r"['’]s$", "", tok)
        low = tok.lower()
        if low in KNOWN_NAMES:
            names.add(low)
        elif i > 0 and tok[:1].isupper() and low not in STOPWORDS and low not in FRAMING:
            names.add(low)  # capitalised mid-sentence: a name
        elif len(tok) > 1 and tok.isupper() and tok.isalpha():
            names.add(low)  # an acronym, also at the start
    # Hyphenated words count as their parts too (lowest-rated: lowest, rated).
    split = [p for w in words for p in (w, *w.split("-")[1:], w.split("-")[0]) if p]
    stems = frozenset(_stem(w) for w in split)
    skip = STOPWORDS | NEGATIONS | FRAMING
    content = frozenset(
        _stem(w)
        for w in split
        if w not in skip and w not in _NOT_CONTENT and _number(w) is None and w not in _UNITS
    )
    # Numbers stay in the order (as "#n") so that trading them is a swap: "2 to the power of
    # 5" / "5 to the power of 2", "a 12V charger on a 24V battery" / "a 24V ... a 12V".
    order = tuple(
        w if w in _DIRECTIONAL else _stem(w) if (n := _number(w)) is None else "#" + n
        for w in words
        if w in _DIRECTIONAL or (w not in STOPWORDS and w not in NEGATIONS)
    )
    return Features(
        words, stems, content, negations, tuple(sorted(numbers)), frozenset(times),
        frozenset(names), order, frozenset(_initials(original)),
        frozenset(_stem(w) for w in split if w in QUALIFIERS), tense,
        frozenset((t.lower(), i) for t in original if t[:1].isupper() for i in _initials([t])),
        frozenset(_FREQUENCY[w] for w in words if w in _FREQUENCY),
        frozenset((words[i - 1], w) for i, w in enumerate(words) if i and w in _PARTICLES),
    )  # fmt: skip


def _antonym(a: Features, b: Features) -> bool:
    only_a = a.stems - b.stems
    only_b = b.stems - a.stems
    for w in only_a:
        if ANTONYMS.get(w, frozenset()) & only_b:
            return True
    # Opposite particles after the same verb: zoom in / zoom out, sign in / sign out.
    if any((v, _PARTICLES[p]) in b.particles for v, p in a.particles - b.particles):
        return True
    # Negating prefixes: enable/disable, lock/unlock, connect/disconnect.
    for x, y in ((only_a, only_b), (only_b, only_a)):
        for w in x:
            for p in _NEG_PREFIXES:
                if len(w) > 3 and p + w in y:
                    return True
    return False


def _unmatched_names(a: Features, b: Features) -> bool:
    """A name on one side that the other does not mention in any form."""
    for x, y in ((a, b), (b, a)):
        for name in x.names - y.names:
            if name in y.words or name in y.initials:
                continue
            if any(n == name and i in y.words for n, i in x.abbrevs):
                continue  # JavaScript / JS
            if any(len(w) >= 4 and (w.startswith(name) or name.startswith(w)) for w in y.words):
                continue  # Brazil / Brazilians, Canada / Canada's
            return True
    return False


def _substituted(a: Features, b: Features) -> bool:
    """A minimal pair: word for word the same text but one content word ("the chemical
    symbol for gold" / "... for silver"): a question about something else, unless the two
    words are known synonyms. Paraphrases reword more than one word."""
    if len(a.words) != len(b.words):
        return False
    diff = [(x, y) for x, y in zip(a.words, b.words, strict=True) if x != y]
    if len(diff) != 1:
        return False
    x, y = diff[0]
    if x in STOPWORDS or y in STOPWORDS or {x, y} & _UNITS.keys():
        return False
    if _number(x) is not None or _number(y) is not None:
        return False  # the number guard's business
    sx, sy = _stem(x), _stem(y)
    return not (sx.startswith(sy) or sy.startswith(sx) or sy in SYNONYMS.get(sx, ()))


def _swapped(a: Features, b: Features) -> bool:
    """The same things in other roles: two words trading places ("can dogs eat cat food" /
    "can cats eat dog food"), or the same words on both sides of the same directional word
    in opposite orders ("from savings to checking" / "from checking to savings")."""
    sa, sb = list(a.order), list(b.order)
    if sorted(sa) == sorted(sb) and sa != sb:
        diff = [i for i, (x, y) in enumerate(zip(sa, sb, strict=True)) if x != y]
        swapped = {sa[diff[0]], sa[diff[1]]} if len(diff) == 2 else set()
        if swapped and not swapped & _DIRECTIONAL and (len(sa) >= 3 or swapped <= a.names):
            return True  # a transposition (of two words alone: only of two names)
        pos_a = {w: i for i, w in enumerate(sa) if sa.count(w) == 1}
        pos_b = {w: i for i, w in enumerate(sb) if sb.count(w) == 1}
        for x in pos_a:
            for y in pos_a:
                if x in pos_b and y in pos_b and pos_a[x] < pos_a[y] and pos_b[y] < pos_b[x]:
                    between_a = set(sa[pos_a[x] + 1 : pos_a[y]])
                    between_b = set(sb[pos_b[y] + 1 : pos_b[x]])
                    if between_a & between_b:
                        return True  # x ... z ... y against y ... z ... x
    sides_b = _sides(b.order)
    for pivot, left_a, right_a in _sides(a.order):
        for p, left_b, right_b in sides_b:
            if (
                p == pivot
                and (left_a - right_a) & (right_b - left_b)
                and (right_a - left_a) & (left_b - right_b)
            ):
                return True
    return False


_PIVOT_CLASS = {"into": "to", "onto": "to", "versus": "vs"}


def _sides(order: tuple[str, ...]) -> list[tuple[str, frozenset[str], frozenset[str]]]:
    """(directional word, up to 4 content words before it, up to 4 after it) per occurrence,
    each side stopping at the neighbouring directional word."""
    pivots = [i for i, w in enumerate(order) if w in _DIRECTIONAL]
    out = []
    for n, i in enumerate(pivots):
        lo = pivots[n - 1] + 1 if n > 0 else 0
        hi = pivots[n + 1] if n + 1 < len(pivots) else len(order)
        left = frozenset(order[max(lo, i - 4) : i])
        right = frozenset(order[i + 1 : min(hi, i + 5)])
        if left and right:
            out.append((_PIVOT_CLASS.get(order[i], order[i]), left, right))
    return out


def _scope(a: Features, b: Features) -> bool:
    """One side asks about more: it has every content word of the other and two more (an
    added qualifier), or at least three more than the other has on its own."""
    small, big = sorted((a.content, b.content), key=len)
    if not small:
        return False
    extra, missing = big - small, small - big
    if (a.qualifiers - b.qualifiers) or (b.qualifiers - a.qualifiers):
        return True
    return (not missing and len(extra) >= SCOPE_MIN_EXTRA) or len(extra) >= 2 * len(missing) + 3


Guard = Literal["negation", "number", "date_time", "antonym", "entity", "swap", "scope"]
GUARDS: tuple[Guard, ...] = ("negation", "number", "date_time", "antonym", "entity", "swap",
                             "scope")  # fmt: skip

_CHECKS: dict[str, Callable[[Features, Features], bool]] = {
    "negation": lambda a, b: (
        (a.negations > 0) != (b.negations > 0) or abs(a.negations - b.negations) == 1
    ),
    "number": lambda a, b: a.numbers != b.numbers and not _one_as_article(a, b),
    "date_time": lambda a, b: (
        a.times != b.times
        or bool(a.tense and b.tense and a.tense != b.tense)
        or bool(a.frequency and b.frequency and a.frequency != b.frequency)
    ),
    "antonym": lambda a, b: _antonym(a, b),
    "entity": lambda a, b: _unmatched_names(a, b) or _substituted(a, b),
    "swap": lambda a, b: _swapped(a, b),
    "scope": lambda a, b: _scope(a, b),
}


def _one_as_article(a: Features, b: Features) -> bool:
    """ "1 cup" and "a cup" are the same amount: a lone extra 1 against an article."""
    for x, y in ((a, b), (b, a)):
        extra = list(x.numbers)
        for n in y.numbers:
            if n in extra:
                extra.remove(n)
        if extra == ["1"] and len(x.numbers) == len(y.numbers) + 1:
            return bool({"a", "an", "per", "each", "every"} & set(y.words))
    return False


# Greetings and thanks around a question, never part of it: "Hi, how do I ...?",
# "... thanks", "please ...". Only stripped at the ends, where they cannot be what is asked.
_OPENERS = (("quick", "question"), ("hi",), ("hey",), ("hello",), ("please",), ("pls",))
_CLOSERS = (("thank", "you"), ("thanks",), ("thx",), ("ty",), ("please",), ("pls",), ("plz",))


# Question openings that ask the same thing ("How do I reset ..." / "How can I reset ..." /
# "how to reset ..."), written as one, at the start only. "should" is left out: advice is
# not always the how-to.
_OPENINGS = {
    ("how", "do", "i"): ("how", "to"), ("how", "can", "i"): ("how", "to"),
    ("how", "do", "you"): ("how", "to"), ("how", "can", "you"): ("how", "to"),
    ("how", "does", "one"): ("how", "to"), ("how", "would", "i"): ("how", "to"),
    ("where", "do", "i"): ("where", "to"), ("where", "can", "i"): ("where", "to"),
    ("is", "it", "possible", "to"): ("can", "i"), ("am", "i", "able", "to"): ("can", "i"),
}  # fmt: skip
# "what's" is "what is" here, never a possessive (contractions drop the "'s").
_WH = frozenset("what where who how when why which".split())


def bare_words(words: tuple[str, ...]) -> tuple[str, ...]:
    """``words`` without the greetings and thanks at either end."""
    changed = True
    while changed and words:
        changed = False
        for x in _OPENERS:
            if words[: len(x)] == x and len(words) > len(x):
                words, changed = words[len(x) :], True
        for x in _CLOSERS:
            if words[-len(x) :] == x and len(words) > len(x):
                words, changed = words[: -len(x)], True
    return words


def same_question(query: str, cached: str) -> bool:
    """The same words in the same order, ignoring case, punctuation, contractions, the
    greetings and thanks around them, how a how-to question opens ("How do I" / "How can
    I" / "how to") and one typo (``typo``): the question asked again, whatever any model
    says."""
    a, b = _question_words(query), _question_words(cached)
    if a == b:
        return True
    if len(a) != len(b):
        return False
    differ = [i for i in range(len(a)) if a[i] != b[i]]
    return len(differ) == 1 and typo(a[differ[0]], b[differ[0]])


# Typos are looked for only in words this long: shorter ones swap into other words too often
# ("form"/"from", "dairy"/"diary").
TYPO_MIN_LETTERS = 6
_KNOWN_WORDS = Path(__file__).with_name("known_words.txt")


@lru_cache(maxsize=1)
def _known_words() -> frozenset[str]:
    """The whole words of all-MiniLM-L6-v2's WordPiece vocabulary (lower-case ASCII letters,
    TYPO_MIN_LETTERS or more): a dictionary of words the embedder knows."""
    return frozenset(_KNOWN_WORDS.read_text().split())


def typo(x: str, y: str) -> bool:
    """Whether ``x`` and ``y`` are one word, one of them mistyped: two neighbouring letters
    swapped ("convert"/"conevrt") or a letter doubled or undoubled ("address"/"adress"), not
    at the first letter, in words of TYPO_MIN_LETTERS or more letters; never two words the
    vocabulary knows ("martial"/"marital", "casual"/"causal"). Other typos (a letter missing,
    added or wrong) are left to the decider: those also turn one real term into another
    ("ethanol"/"methanol", "perineal"/"peroneal")."""
    if x == y or min(len(x), len(y)) < TYPO_MIN_LETTERS or x[0] != y[0]:
        return False
    if not (x.isascii() and x.isalpha() and y.isascii() and y.isalpha()):
        return False
    known = _known_words()
    if x in known and y in known:
        return False
    if len(x) == len(y):
        d = [i for i in range(len(x)) if x[i] != y[i]]
        return len(d) == 2 and d[1] == d[0] + 1 and (x[d[0]], x[d[1]]) == (y[d[1]], y[d[0]])
    short, long = (x, y) if len(x) < len(y) else (y, x)
    if len(long) - len(short) != 1:
        return False
    i = next((k for k in range(len(short)) if short[k] != long[k]), len(short))
    # ``long`` has one letter more, at i: a doubled letter if it repeats a neighbour.
    doubled = long[i] == long[i - 1] or (i + 1 < len(long) and long[i] == long[i + 1])
    return short[i:] == long[i + 1 :] and doubled


@lru_cache(maxsize=65536)
def _question_words(text: str) -> tuple[str, ...]:
    words = bare_words(features(text).words)
    if len(words) > 1 and words[0] in _WH and words[1] in ("is", "s"):
        words = (words[0], *words[2:])  # "what is" / "what's"
    for opening, canonical in _OPENINGS.items():
        if words[: len(opening)] == opening and len(words) > len(opening):
            return canonical + words[len(opening) :]
    return words


def veto(query: str, cached: str, guards: Iterable[str] = GUARDS) -> str | None:
    """The first of ``guards`` that refuses serving ``cached``'s answer to ``query``."""
    if same_question(query, cached):
        return None
    a, b = features(query), features(cached)
    for name in guards:
        if _CHECKS[name](a, b):
            return name
    return None
