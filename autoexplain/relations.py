"""The relation channel of the embedding simulator: explanations that say *where* a unit fires rather
than *on what* ("the word right after 'son of'", "words inside quotation marks", "the second item
of a list", "the object of 'took'", "the first word of a sentence").

A sentence embedder compares an explanation with one word at a time, so it cannot simulate a rule
about context: "the word after 'not'" and "the word 'not'" land on the same tokens. This module reads
such a relation out of the explanation's text (a few fixed phrasings, below) and marks the tokens it
picks in a window, using the window's words as `suite`-style whole words. An explanation with no
relation gets None and the simulator's other channels alone.

Kept apart from `embedding.py` because it is pure text handling, with its own tests; the simulator's
code identity reaches it through the import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from autoexplain.words import word_spans

_QUOTED = r"[\"'\u2018\u201c]([^\"'\u2019\u201d]{1,40})[\"'\u2019\u201d]"
_ANCHORS = re.compile(rf"{_QUOTED}(?:\s*(?:,|or|and|,\s*or|,\s*and)\s*{_QUOTED})*")
_RELATION = re.compile(
    r"\b(?:(?:right|directly|immediately|just|that\s+comes?|which\s+comes?|comes?)\s+)*"
    r"(after|following|follows|preceded\s+by|before|preceding|precedes|followed\s+by|object\s+of|objects\s+of)\s+"
    r"(?:the\s+(?:word|words|phrase|verb|verbs)\s+|a\s+word\s+|the\s+)?(?=[\"'\u2018\u201c]|a\s+number|numbers?\b)",
    re.I,
)
_DETERMINERS = {"the", "a", "an", "his", "her", "their", "my", "thy", "thine", "our", "your", "its", "this", "that",
                "these", "those", "all", "every", "no", "some", "any"}
_NUMBER_WORDS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                 "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand",
                 "million"}
_STRUCTURES = [  # (pattern over the explanation, structure name); first match wins
    (re.compile(r"\bquotation marks themselves\b|\bthe quotes themselves\b", re.I), "quote_marks"),
    (re.compile(r"\b(?:inside|within|in|between)\s+(?:double\s+)?(?:quotation\s+marks|quotes)\b|\bquoted\s+(?:words|text|speech)", re.I), "quoted"),
    (re.compile(r"\b(?:inside|within|in|between)\s+(?:parentheses|brackets|round\s+brackets)\b", re.I), "parens"),
    (re.compile(r"\b(?:first\s+word\s+of\s+(?:a|each|every|the)\s+sentence|(?:at\s+)?the\s+(?:start|beginning)\s+of\s+(?:a|each|the)\s+sentence|sentence[- ]initial)\b", re.I), "sentence_first"),
    (re.compile(r"\b(?:last\s+word\s+of\s+(?:a|each|every|the)\s+sentence|(?:at\s+)?the\s+end\s+of\s+(?:a|each|the)\s+sentence|before\s+the\s+full\s+stop|sentence[- ]final)\b", re.I), "sentence_last"),
    (re.compile(r"\b(?:second)\s+(?:item|element|entry|word)\s+(?:of|in)\s+(?:a\s+)?list", re.I), "list_2"),
    (re.compile(r"\b(?:first)\s+(?:item|element|entry|word)\s+(?:of|in)\s+(?:a\s+)?list", re.I), "list_1"),
    (re.compile(r"\b(?:last|final)\s+(?:item|element|entry|word)\s+(?:of|in)\s+(?:a\s+)?list", re.I), "list_-1"),
    (re.compile(r"\b(?:repeated|repeats?|occurred|appeared)\s+(?:from\s+)?earlier\b|\bwords?\s+that\s+(?:were|was)\s+already\s+used", re.I), "repeated"),
    (re.compile(r"\bfirst\s+time\s+a\s+word\s+appears\b|\bfirst\s+occurrence", re.I), "first_occurrence"),
    (re.compile(r"\bcapitali[sz]ed\s+words?\s+(?:in\s+the\s+middle\s+of|inside|within)\s+a\s+sentence", re.I), "capital_inside"),
]


_SUFFIX = re.compile(r"\bending\s+in\s+(?:an?\s+)?['\"]?-?([a-z]{1,6})\b", re.I)
_LENGTH = [  # (pattern, (lo, hi) from the match's numbers)
    (re.compile(r"\b(\w+)\s+to\s+(\w+)\s+letters\b", re.I), lambda a, b: (a, b)),
    (re.compile(r"\b(\w+)\s+or\s+(\w+)\s+letters\b", re.I), lambda a, b: (a, b)),
    (re.compile(r"\b(?:more\s+than|over|longer\s+than)\s+(\w+)\s+letters\b", re.I), lambda a: (a + 1, 99)),
    (re.compile(r"\b(?:at\s+least\s+)?(\w+)\s+letters\s+or\s+(?:more|longer)\b|\bat\s+least\s+(\w+)\s+letters\b", re.I),
     lambda a, b=None: (a or b, 99)),
    (re.compile(r"\b(?:fewer\s+than|less\s+than|under)\s+(\w+)\s+letters\b", re.I), lambda a: (1, a - 1)),
    (re.compile(r"\bwords\s+of\s+(\w+)\s+letters\b", re.I), lambda a: (a, a)),
]
_COUNTS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}


@dataclass(frozen=True)
class Relation:
    kind: str  # 'after' | 'before' | 'object' | 'suffix' | 'length' | a structure name
    anchors: tuple[tuple[str, ...], ...] = ()  # phrases (lowercased words); ('#',) stands for any number
    target: str = "word"  # 'word' | 'number' | 'capital': what may sit at the marked place
    surface: tuple = ()  # ('ly',) for a suffix, (lo, hi) letters for a length

    @property
    def alone(self) -> bool:
        """Whether the relation decides alone (a context), or adds to the other channels (a
        surface property: 'adverbs ending in -ly' still names adverbs)."""
        return self.kind not in ("suffix", "length")


def _count(word: str | None) -> int | None:
    if word is None:
        return None
    return int(word) if word.isdigit() else _COUNTS.get(word.lower())


def _surface(text: str) -> Relation | None:
    m = _SUFFIX.search(text)
    if m:
        return Relation("suffix", surface=(m.group(1).lower(),))
    for pattern, bounds in _LENGTH:
        m = pattern.search(text)
        if m:
            nums = [_count(g) for g in m.groups() if g is not None]
            if nums and all(n is not None for n in nums):
                return Relation("length", surface=bounds(*nums))
    return None


@lru_cache(maxsize=1 << 14)
def parse(explanation: str) -> Relation | None:
    """The relation an explanation states, or None. Only the phrasings above are read; anything else
    is left to the lexical channels."""
    text = " ".join(explanation.split())
    for pattern, name in _STRUCTURES:
        if pattern.search(text):
            return Relation(name, target=_target(text[: pattern.search(text).start()]))
    m = _RELATION.search(text)
    if not m:
        return _surface(text)
    rest = text[m.end():]
    word, head = m.group(1).lower(), text[: m.start()]
    kind = ("object" if word.startswith("object") else
            "after" if word in ("after", "following", "follows", "preceded by") else "before")
    if kind == "after" and re.search(r"\bobjects?\b", head, re.I):  # "the object right after 'gave'"
        kind = "object"
    if re.match(r"a\s+number|numbers?\b", rest, re.I):
        anchors: tuple[tuple[str, ...], ...] = (("#",),)
    else:
        a = _ANCHORS.match(rest)
        if not a:
            return None
        anchors = tuple(tuple(re.findall(r"[\w']+", q.lower())) for q in re.findall(_QUOTED, a.group(0)))
        anchors = tuple(x for x in anchors if x)
    return Relation(kind, anchors, _target(head)) if anchors else None


def _target(head: str) -> str:
    """What the explanation says sits at the marked place: a number, a name, or any word."""
    if re.search(r"\bnumbers?\b|\byears?\b(?!\s+or)|\bdigits?\b", head, re.I):
        return "number"
    if re.search(r"\bnames?\b|\bcapitali[sz]ed\b", head, re.I):
        return "capital"
    return "word"


def _words(tokens: Sequence[str]) -> list[tuple[int, int, str, str, bool]]:
    """(start, end, text, key, spaced) of each non-blank whole word, as `suite` reads words."""
    out = []
    for s, e in word_spans(tokens):
        text = "".join(tokens[s:e]).strip()
        if text:
            out.append((s, e, text, re.sub(r"^[^\w]+|[^\w]+$", "", text.lower()), tokens[s][:1].isspace()))
    return out


def _is_number(key: str) -> bool:
    return key in _NUMBER_WORDS or bool(re.fullmatch(r"\d[\d,]*", key))


def _ok(target: str, text: str, key: str) -> bool:
    if not key:
        return False
    if target == "number":
        return _is_number(key)
    if target == "capital":
        return text[:1].isupper()
    return key[:1].isalpha() or _is_number(key)


def _sentence_end(text: str) -> bool:
    return bool(re.search(r"[.!?][\"')]*$", text))


def marks(relation: Relation, tokens: Sequence[str]) -> np.ndarray:
    """(len(tokens),) bool: the tokens the relation picks in this window."""
    words = _words(tokens)
    n = len(words)
    picked = np.zeros(n, dtype=bool)
    keys = [w[3] for w in words]
    k = relation.kind

    def at(i: int) -> bool:
        return 0 <= i < n and _ok(relation.target, words[i][2], keys[i])

    if k in ("after", "before", "object"):
        for phrase in relation.anchors:
            L = len(phrase)
            for i in range(n - L + 1):
                if phrase == ("#",):
                    hit = _is_number(keys[i])
                else:
                    hit = tuple(keys[i : i + L]) == phrase
                if not hit:
                    continue
                if k == "before":
                    j = i - 1
                else:
                    j = i + L
                    if k == "object":
                        while j < n and keys[j] in _DETERMINERS:
                            j += 1
                if at(j) and not (phrase == ("#",) and _is_number(keys[j]) and relation.target != "number"):
                    picked[j] = True
    elif k in ("quoted", "parens", "quote_marks"):
        inside = False
        for i, (_s, _e, text, key, spaced) in enumerate(words):
            quote = any(c in "\"\u201c\u201d" for c in text) and not text.strip("\"\u201c\u201d.,;:!?)")
            opening = text.startswith("(") if k == "parens" else quote and spaced and not inside
            closing = text.startswith(")") if k == "parens" else quote and not spaced and inside
            if opening or closing:
                inside = opening
                picked[i] = k == "quote_marks"
                continue
            picked[i] = inside and k != "quote_marks" and at(i)
    elif k == "sentence_first":
        picked[1:] = [at(i) and _sentence_end(words[i - 1][2]) for i in range(1, n)]
    elif k == "sentence_last":
        picked[:-1] = [at(i) and bool(re.match(r"^[.!?]", words[i + 1][2])) for i in range(n - 1)]
    elif k.startswith("list_"):
        item = int(k[5:])
        i = 0
        while i < n:
            items, j = [i], i
            while j + 2 < n and words[j + 1][2] == "," and at(j + 2) and keys[j + 2] not in ("and", "or"):
                items.append(j + 2)
                j += 2
            c = j + 1 + (j + 1 < n and words[j + 1][2] == ",")
            if len(items) >= 2 and c + 1 < n and keys[c] in ("and", "or") and at(c + 1) and all(at(x) for x in items):
                items.append(c + 1)
                picked[items[item if item < 0 else item - 1]] = True
                i = c + 2
                continue
            i += 1
    elif k in ("repeated", "first_occurrence"):
        seen: set[str] = set()
        for i, key in enumerate(keys):
            if key.isalpha() and len(key) >= 5:
                picked[i] = (key in seen) == (k == "repeated")
                seen.add(key)
    elif k == "suffix":
        sfx = relation.surface[0]
        picked[:] = [key.isalpha() and key.endswith(sfx) and len(key) > len(sfx) + 1 for key in keys]
    elif k == "length":
        lo, hi = relation.surface
        picked[:] = [key.isalpha() and lo <= len(key) <= hi for key in keys]
    elif k == "capital_inside":
        picked[1:] = [words[i][2][:1].isupper() and keys[i].isalpha() and not _sentence_end(words[i - 1][2])
                      for i in range(1, n)]
    out = np.zeros(len(tokens), dtype=bool)
    for (s, e, *_), p in zip(words, picked):
        out[s:e] = p
    return out
