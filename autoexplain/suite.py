"""A held-out suite of synthetic neurons: rules over real corpus text, each with one true and several
hard false explanations, to measure whether a simulator tells them apart.

The planted suite (`planted.py`) has eight context-free rules phrased as the embedding explainer
phrases them, and the default simulator was tuned on it: it measures a fit to itself. This suite is
larger (`suite_rules.RULES`), has context-dependent rules (the word after a given word, words inside
quotation marks or parentheses, the second item of a list, a verb's object, the first word of a
sentence) besides lexical and semantic ones, and gives every rule false explanations of four kinds:

- `list`: a literal word list narrower or wider than the rule;
- `category`: a related but wrong category;
- `context`: the right tokens in the wrong context;
- `surface`: a surface property that co-occurs with the rule's tokens.

A rule is data (a `kind` and its arguments, interpreted by `activations`); its activations come
from running it on corpus windows. The rules are split once, by a hash of the rule's name, into a
dev half (a simulator may be tuned on it) and a held-out half (reported, never tuned on).

The measure is pairwise accuracy: for each false explanation, whether the simulator's correlation
score with the true explanation beats the one with the false explanation, on the rule's scoring
records (calib, valid and test: never train).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from autoexplain.words import word_spans

FALSE_KINDS = ("list", "category", "context", "surface")
SPLIT_SALT = "autoexplain-suite-v1"  # fixed before any tuning: changing it would redraw the halves
SCORED_SPLITS = ("calib", "valid", "test")
_DETERMINERS = {"the", "a", "an", "his", "her", "their", "my", "thy", "thine", "our", "your", "its", "this",
                "that", "these", "those", "all", "every", "no", "some", "any", "him", "them"}
_QUOTES = '"\u201c\u201d'


@dataclass(frozen=True)
class SuiteRule:
    name: str
    spec: dict  # {"kind": ..., arguments}: see `activations`
    true: str  # the true explanation
    false: dict  # false-explanation kind -> explanation
    family: str  # 'lexical', 'semantic', 'context' or 'surface'

    def activations(self, tokens: Sequence[str]) -> list[float]:
        return activations(self.spec, tokens)

    @property
    def half(self) -> str:
        return split_of(self.name)


def split_of(name: str) -> str:
    """'dev' or 'heldout', from a salted hash of the rule's name alone: stable, and blind to how any
    simulator does on the rule."""
    return "dev" if hashlib.sha256(f"{SPLIT_SALT}:{name}".encode()).digest()[0] % 2 == 0 else "heldout"


def suite_rules(half: str | None = None) -> list[SuiteRule]:
    """Every rule of `suite_rules.RULES` (or those of one half), checked."""
    from autoexplain.suite_rules import RULES

    rules = [SuiteRule(r["name"], r["rule"], r["true"], dict(r["false"]), r["family"]) for r in RULES]
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ValueError("duplicate rule names in suite_rules.RULES")
    for r in rules:
        bad = set(r.false) - set(FALSE_KINDS)
        if bad or len(r.false) < 3:
            raise ValueError(f"rule {r.name}: false explanations must be >= 3 of {FALSE_KINDS}, got {sorted(r.false)}")
    return [r for r in rules if half is None or r.half == half]


# -- the rule language: words of a window, and what each kind of rule marks ----------------------

@dataclass(frozen=True)
class _Word:
    start: int
    end: int
    text: str  # stripped, as written
    key: str  # lowercased, surrounding punctuation removed ('' for punctuation)
    spaced: bool  # the word's first token starts with a space


def _words(tokens: Sequence[str]) -> list[_Word]:
    out = []
    for s, e in word_spans(tokens):
        text = "".join(tokens[s:e]).strip()
        if not text:  # a blank token is no word: ' ' before '2010' must not hide 'in'
            continue
        out.append(_Word(s, e, text, re.sub(r"^[^\w]+|[^\w]+$", "", text.lower()), tokens[s][:1].isspace()))
    return out


def _is_word(w: _Word) -> bool:
    return bool(w.key) and w.key[0].isalpha()


def _number(w: _Word) -> bool:
    from autoexplain.suite_rules import NUMBER_WORDS

    return w.key in NUMBER_WORDS or bool(re.fullmatch(r"\d[\d,]*", w.key))


def _prev_words(words: list[_Word], i: int, n: int) -> list[str]:
    """The keys of the n words before word i (punctuation included as '' keys, which match nothing)."""
    return [w.key for w in words[max(0, i - n) : i]]


def _marks(spec: dict, words: list[_Word]) -> list[float]:
    kind = spec["kind"]
    n = len(words)
    out = [0.0] * n
    value = float(spec.get("value", 10.0))
    targets = set(spec.get("words", ()))
    pattern = re.compile(spec["pattern"]) if "pattern" in spec else None

    def target_ok(w: _Word) -> bool:
        if pattern is not None:
            return bool(pattern.fullmatch(w.key))
        return _is_word(w) and (not targets or w.key in targets)

    if kind == "words":  # whole words in a set, any case
        return [value if w.key in targets else 0.0 for w in words]
    if kind == "cased":  # whole words written exactly so
        return [value if w.text.strip(".,;:!?()\"'") in targets else 0.0 for w in words]
    if kind == "suffix":  # words ending in a suffix, longer than it by >= 3 letters
        sfx = spec["suffix"]
        return [value if w.key.isalpha() and w.key.endswith(sfx) and len(w.key) >= len(sfx) + 3 else 0.0 for w in words]
    if kind == "regex":  # the whole word as written matches
        return [value if pattern.fullmatch(w.text) else 0.0 for w in words]
    if kind == "after":  # a (target) word right after a phrase
        phrase = spec["phrase"]
        for i, w in enumerate(words):
            if target_ok(w) and _prev_words(words, i, len(phrase)) == phrase:
                out[i] = value
        return out
    if kind == "before":  # a (target) word right before a phrase
        phrase = spec["phrase"]
        for i, w in enumerate(words):
            if target_ok(w) and [x.key for x in words[i + 1 : i + 1 + len(phrase)]] == phrase:
                out[i] = value
        return out
    if kind == "object":  # the first word after a verb, past determiners and possessives
        verbs, skip = set(spec["verbs"]), set(spec.get("not", ()))
        for i, w in enumerate(words):
            if w.key in verbs:
                j = i + 1
                while j < n and words[j].key in _DETERMINERS - {"him", "them"}:
                    j += 1
                if j < n and _is_word(words[j]) and words[j].key not in skip:
                    out[j] = value
        return out
    if kind in ("quoted", "parens"):  # words between an opening and the next closing mark in the window
        inside = False
        for i, w in enumerate(words):
            t = w.text
            if kind == "parens":
                if t.startswith("("):
                    inside = True
                    continue
                if t.startswith(")"):
                    inside = False
                    continue
            elif any(c in _QUOTES for c in t) and t.strip(_QUOTES + ".,;:!?)") == "":
                # An opening mark follows a space ( "word ); a closing one is attached ( word." ).
                if w.spaced and not inside:
                    inside = True
                elif not w.spaced and inside:
                    inside = False
                continue
            if inside and _is_word(w):
                out[i] = value
        if inside:  # a mark the window never closes: not known to be inside
            last = max((i for i, w in enumerate(words) if w.text[:1] == "(" or any(c in _QUOTES for c in w.text[:1])), default=n)
            out[last:] = [0.0] * (n - last)
        return out
    if kind == "sentence_first":  # the first word of a sentence (after . ! ?)
        for i in range(1, n):
            if _is_word(words[i]) and re.search(r"[.!?][\"')]*$", words[i - 1].text):
                out[i] = value
        return out
    if kind == "sentence_last":  # the last word before . ! ?
        for i in range(n - 1):
            if _is_word(words[i]) and re.match(r"^[.!?]", words[i + 1].text):
                out[i] = value
        return out
    if kind == "list_item":  # the k-th item (1-based; -1: last) of a list "A, B(, C)* and|or D"
        k = spec["item"]
        i = 0
        while i < n:
            items = [i]
            j = i
            while j + 2 < n and words[j + 1].text == "," and _is_word(words[j + 2]) and words[j + 2].key not in ("and", "or"):
                items.append(j + 2)
                j += 2
            if len(items) >= 2 and j + 2 < n:  # "A, B and C" or "A, B, and C"
                c = j + 1 + (words[j + 1].text == ",")
                if c + 1 < n and words[c].key in ("and", "or") and _is_word(words[c + 1]):
                    items.append(c + 1)
                    if all(_is_word(words[x]) for x in items):
                        out[items[k if k < 0 else k - 1]] = value
                        i = c + 2
                        continue
            i += 1
        return out
    if kind == "after_number":  # the word right after a number (what is counted)
        for i in range(1, n):
            if _is_word(words[i]) and not _number(words[i]) and _number(words[i - 1]) and target_ok(words[i]):
                out[i] = value
        return out
    if kind == "number_before":  # a number right before one of the words
        for i in range(n - 1):
            if _number(words[i]) and words[i + 1].key in targets:
                out[i] = value
        return out
    if kind == "repeated":  # a long word that already occurred earlier in the window
        seen: set[str] = set()
        min_len = spec.get("min_len", 5)
        for i, w in enumerate(words):
            if w.key.isalpha() and len(w.key) >= min_len:
                if w.key in seen:
                    out[i] = value
                seen.add(w.key)
        return out
    if kind == "capital_inside":  # a capitalised word not at a sentence start
        first = _marks({"kind": "sentence_first"}, words)
        for i, w in enumerate(words):
            if i and not first[i] and w.text[:1].isupper() and w.key.isalpha() and w.key not in ("i",):
                out[i] = value
        return out
    raise ValueError(f"unknown rule kind {kind!r}")


def activations(spec: dict, tokens: Sequence[str]) -> list[float]:
    """The rule's activation on every token: a marked word's value on each of its tokens."""
    words = _words(tokens)
    out = [0.0] * len(tokens)
    for w, v in zip(words, _marks(spec, words)):
        if v:
            out[w.start : w.end] = [v] * (w.end - w.start)
    return out


# -- records and the measure ----------------------------------------------------------------------

def rule_records(windows: Sequence[Sequence[str]], rule: SuiteRule, seed: int = 0, **kw) -> list:
    """The rule's scoring records (calib, valid, test), built as planted units' are."""
    from autoexplain.planted import PlantedUnit, planted_records

    class _Unit(PlantedUnit):  # planted_records reads only .activations
        def activations(self, tokens):
            return rule.activations(tokens)

    unit = _Unit(rule.name, rule.true, lambda t: 0.0)
    return [r for r in planted_records(windows, unit, seed=seed, **kw) if r.split in SCORED_SPLITS]


def pairwise_accuracy(true_score: float, false_scores: Sequence[float]) -> float:
    """The fraction of false explanations the true one beats (a tie counts half; an undefined score
    - nan - loses to any defined one, and two undefined scores tie)."""
    wins = []
    for f in false_scores:
        t_ok, f_ok = np.isfinite(true_score), np.isfinite(f)
        if t_ok and f_ok:
            wins.append(1.0 if true_score > f else 0.5 if true_score == f else 0.0)
        else:
            wins.append(0.5 if t_ok == f_ok else float(t_ok))
    return float(np.mean(wins)) if wins else float("nan")


def score_rule(simulator, rule: SuiteRule, records) -> dict:
    """The correlation score of the true and every false explanation on the rule's records."""
    from autoexplain.scoring import UndefinedMetric, correlation

    truth = [r.activations for r in records]
    texts = [rule.true, *rule.false.values()]
    batches = simulator.simulate_many(texts, [r.tokens for r in records])
    scores = []
    for sims in batches:
        if not all(s.ok for s in sims):
            scores.append(float("nan"))  # a failed simulation scores nothing, never 0
            continue
        try:
            scores.append(correlation(truth, [s.expected for s in sims]))
        except UndefinedMetric:
            scores.append(float("nan"))
    false = dict(zip(rule.false, scores[1:]))
    return {"true": scores[0], "false": false, "accuracy": pairwise_accuracy(scores[0], list(false.values()))}
