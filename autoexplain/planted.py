"""Planted units: synthetic neurons with known rules, to check that a simulator carries signal.

Each planted unit fires by a fixed rule on the subject's token strings (digits, one word,
capitalised words, punctuation, semantic categories). Its records are built from real corpus
windows as recorded units' are (top-activating + random windows, in splits: dealt round-robin
here, where a recording deals whole documents), so
scoring a simulator with the true rule as the explanation, and with another unit's rule, measures
how much signal it carries: a useful simulator scores high with the true rule and near zero with a
wrong one.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from autoexplain.words import word_spans
from autoexplain.records import RANDOM_DEAL, TOP_DEAL, ActivationRecord


@dataclass(frozen=True)
class PlantedUnit:
    name: str
    explanation: str  # the true rule, phrased as an explainer would
    rule: Callable[[str], float]  # subject token string -> activation (0-10)
    # Apply the rule to the whole word each token belongs to (' bull|ock' -> ' bullock' on both
    # pieces), so ' Green' in ' Greenland' is not a colour and ' m|ules' is an animal.
    whole_word: bool = False

    def activations(self, tokens: Sequence[str]) -> list[float]:
        if not self.whole_word:
            return [float(self.rule(t)) for t in tokens]
        out = [0.0] * len(tokens)
        for start, end in word_spans(tokens):
            value = float(self.rule("".join(tokens[start:end])))  # keeps the word's leading space
            out[start:end] = [value] * (end - start)
        return out


def _word(token: str) -> str:
    return token.strip().lower()


def _in_set(words: set[str], value: float = 10.0) -> Callable[[str], float]:
    """Fires on word-initial tokens (leading space or capital) that are in `words`: a piece like
    'ram' in ' Ab|ram' is not the word 'ram'."""
    return lambda t: value if (t[:1].isspace() or t[:1].isupper()) and _word(t) in words else 0.0


COLOURS = {
    "black", "blue", "brown", "crimson", "gray", "green", "grey", "orange", "pink", "purple", "red",
    "scarlet", "violet", "white", "yellow",
}
ANIMALS = {
    "ant", "ants", "ass", "asses", "bee", "bees", "bird", "birds", "bull", "bullock", "bullocks",
    "bulls", "calf", "camel", "camels", "cat", "cats", "cattle", "cow", "cows", "deer", "dog",
    "dogs", "dove", "doves", "eagle", "eagles", "fish", "fishes", "fox", "foxes", "goat", "goats",
    "horse", "horses", "lamb", "lambs", "lion", "lions", "locust", "locusts", "mice", "mouse",
    "mule", "mules", "ox", "oxen", "ram", "rams", "serpent", "serpents", "sheep", "snake", "snakes",
    "wolf", "wolves",
}
BODY_PARTS = {
    "arm", "arms", "belly", "bone", "bones", "brain", "cheek", "chest", "ear", "ears", "eye",
    "eyes", "face", "feet", "finger", "fingers", "foot", "forehead", "hair", "hand", "hands",
    "head", "heart", "jaw", "knee", "knees", "leg", "legs", "lips", "liver", "lungs", "mouth",
    "muscles", "neck", "nose", "nostrils", "shoulder", "shoulders", "skin", "skull", "teeth",
    "thigh", "throat", "thumb", "thumbs", "toe", "toes", "tongue", "wrist",
}
NUMBER_WORDS = {
    "eight", "eighteen", "eighty", "eleven", "fifteen", "fifty", "five", "forty", "four",
    "fourteen", "hundred", "million", "nine", "nineteen", "ninety", "seven", "seventeen", "seventy",
    "six", "sixteen", "sixty", "ten", "thirteen", "thirty", "thousand", "three", "twelve", "twenty",
    "two",
}


def _digits(t: str) -> float:
    return 10.0 if any(c.isdigit() for c in t) else 0.0


def _capitalised(t: str) -> float:
    w = t.strip()
    return 10.0 if w[:1].isupper() and w.isalpha() else 0.0


def _punctuation(t: str) -> float:
    w = t.strip()
    if not w or any(c not in string.punctuation for c in w):
        return 0.0
    return 10.0 if w in {".", "!", "?"} else 7.0  # graded: sentence ends fire hardest


def planted_units() -> list[PlantedUnit]:
    """The built-in suite. Rules look at one token alone (context-independent by design)."""
    return [
        PlantedUnit("digits", "digits and numbers written with numerals", _digits),
        PlantedUnit("god", "the word 'God'", _in_set({"god"}), whole_word=True),
        PlantedUnit("capitalised", "capitalized words", _capitalised),
        PlantedUnit("punctuation", "punctuation marks", _punctuation),
        PlantedUnit("colours", "color words", _in_set(COLOURS), whole_word=True),
        PlantedUnit("animals", "animals", _in_set(ANIMALS), whole_word=True),
        PlantedUnit("body_parts", "parts of the human body", _in_set(BODY_PARTS), whole_word=True),
        PlantedUnit("number_words", "numbers written out as words", _in_set(NUMBER_WORDS), whole_word=True),
    ]


def corpus_windows(n_windows: int | None = 4000, window_len: int = 64, seed: int = 0, subject=None) -> list[list[str]]:
    """Real corpus windows as subject token strings: the embedded default corpus cut by the
    SmolLM2 tokenizer, exactly as `autoexplain record` cuts it, then `n_windows` drawn with the seed."""
    from autoexplain.corpus import cut_windows, load_documents

    if subject is None:
        from autoexplain.subject import load_subject

        subject = load_subject("smollm2", device="cpu")
    windows = [ids for _w, _d, ids in cut_windows(load_documents("default"), subject.tokenize, window_len, seed=seed)]
    if n_windows is not None and n_windows < len(windows):
        keep = np.sort(np.random.default_rng(seed).choice(len(windows), n_windows, replace=False))
        windows = [windows[i] for i in keep]
    decoded: dict[int, str] = {}
    for ids in windows:
        for i in ids:
            if i not in decoded:
                decoded[i] = subject.token_strings([i])[0]
    return [[decoded[i] for i in ids] for ids in windows]


def planted_records(
    windows: Sequence[Sequence[str]], unit: PlantedUnit, n_top: int = 40, n_random: int = 30, seed: int = 0
) -> list[ActivationRecord]:
    """A planted unit's records: the `n_top` windows with the highest max activation (ties broken at
    random) dealt round-robin into train/calib/valid/test, and `n_random` other windows dealt into
    calib/valid/test. No window appears twice, so train never shares a window with valid or test."""
    rng = np.random.default_rng(seed)
    acts = [unit.activations(w) for w in windows]
    peak = np.array([max(a) if a else 0.0 for a in acts])
    order = np.lexsort((rng.random(len(windows)), -peak))  # by peak, descending; random among ties
    top = [int(i) for i in order[:n_top] if peak[i] > 0]
    taken = set(top)
    rest = [int(i) for i in rng.permutation(len(windows)) if int(i) not in taken][:n_random]
    out = []
    for kind, chosen, deal in (("top", top, TOP_DEAL), ("random", rest, RANDOM_DEAL)):
        for n, i in enumerate(chosen):
            out.append(ActivationRecord(list(windows[i]), acts[i], window_id=i, kind=kind, split=deal[n % len(deal)]))
    return out


def _correlation(true: list[float], predicted: list[float]) -> float:
    """Pearson correlation over all tokens flattened (stand-in until scoring.py lands); nan when the
    truth is constant, 0 when the prediction is."""
    y, p = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    if y.size < 2 or y.std() == 0:
        return float("nan")
    if p.std() == 0:
        return 0.0  # a constant prediction carries no signal
    return float(np.corrcoef(y, p)[0, 1])


def _simulate_all(simulator, explanations: list[str], records: list[list[str]]) -> list[list[float]]:
    """Flattened predictions per explanation (`Simulator.simulate_many`: batched where it batches)."""
    batches = simulator.simulate_many(explanations, records)
    out = []
    for sims in batches:
        if not all(s.ok for s in sims):
            raise RuntimeError(f"simulation failed: {next(s.failure for s in sims if not s.ok)}")
        out.append([v for s in sims for v in s.expected])
    return out


def self_check(
    simulator,
    windows: Sequence[Sequence[str]] | None = None,
    split: str = "valid",
    seed: int = 0,
    units: list[PlantedUnit] | None = None,
    **record_kw,
) -> dict:
    """Score every planted unit with its true rule and with the others' rules.

    Per unit: `true` (true rule as the explanation), `shuffled` (the rule of the next unit in a
    seeded derangement) and `others` (mean over every other unit's rule). Scores are correlations
    over the `split` records (top + random), flattened. Returns {"units": {...}, "mean_true",
    "mean_shuffled", "mean_others"}.
    """
    units = units or planted_units()
    windows = windows if windows is not None else corpus_windows(seed=seed)
    explanations = [u.explanation for u in units]
    n = len(units)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    derange = {int(perm[k]): int(perm[(k + 1) % n]) for k in range(n)}  # no fixed points
    table = {}
    for i, unit in enumerate(units):
        recs = [r for r in planted_records(windows, unit, seed=seed, **record_kw) if r.split == split]
        true = [v for r in recs for v in r.activations]
        preds = _simulate_all(simulator, explanations, [r.tokens for r in recs])
        scores = [_correlation(true, p) for p in preds]
        others = [s for j, s in enumerate(scores) if j != i]
        table[unit.name] = {
            "true": scores[i],
            "shuffled": scores[derange[i]],
            "shuffled_rule": units[derange[i]].name,
            "others": float(np.nanmean(others)),
            "n_tokens": len(true),
        }
    return {
        "units": table,
        "mean_true": float(np.nanmean([t["true"] for t in table.values()])),
        "mean_shuffled": float(np.nanmean([t["shuffled"] for t in table.values()])),
        "mean_others": float(np.nanmean([t["others"] for t in table.values()])),
    }


def format_self_check(result: dict) -> str:
    """A plain-text table of `self_check`'s result."""
    lines = [f"{'unit':14s} {'true':>6s} {'shuffled':>9s}  {'(rule)':14s} {'others':>7s}"]
    for name, row in result["units"].items():
        lines.append(
            f"{name:14s} {row['true']:6.3f} {row['shuffled']:9.3f}  {row['shuffled_rule']:14s} {row['others']:7.3f}"
        )
    lines.append(
        f"{'mean':14s} {result['mean_true']:6.3f} {result['mean_shuffled']:9.3f}  {'':14s} {result['mean_others']:7.3f}"
    )
    return "\n".join(lines)
