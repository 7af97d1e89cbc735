"""Metrics of classifier trials (`classify.Trial`), per unit with 95 % bootstrap CIs, and pooled
over units the way delphi reports them (every trial of a layer in one confusion matrix).

A trial whose reply could not be read (prediction None) is left out and counted in `n_failed`: a
failure is never a 0 or a 1. Metric names carry the kind of negatives after '@' ('fuzzing_balanced_accuracy@
random', 'detection_auc@similar'), so the recall bias that random negatives hide shows as the gap between them.

- balanced accuracy: (TP/P + TN/N) / 2 over the read answers;
- AUC: the ROC AUC of P(1) (from the LLM's logprobs) for activating against non-activating windows;
- intruder accuracy: the fraction of prompts whose named example is the intruder;
- embedding AUC: the ROC AUC of the explanation-window similarity.
CIs resample trials with replacement (`n_boot` resamples, percentile interval, widened to hold the
point estimate as `scoring` does).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from autoexplain.scoring import MIN_DEFINED_RESAMPLES, Score, UndefinedMetric, detection_auc

BALANCED_ACCURACY, AUC, INTRUDER_ACCURACY, EMBEDDING_AUC = "balanced_accuracy", "auc", "intruder_accuracy", "embedding_auc"
# What each scorer's `metric` family reports.
FAMILIES = {"binary": (BALANCED_ACCURACY, AUC), "intruder": (INTRUDER_ACCURACY,), "similarity": (EMBEDDING_AUC,)}
NEGATIVE_KINDS = ("random", "similar", "cofiring", "active")
NO_TRIALS = "no trials: too few activating or non-activating test windows to ask about"
NO_NEGATIVES = {  # a unit asked about, but with none of the layer's hard negatives of this kind (`negatives`)
    "similar": "no similar negatives: no pool window like its activating ones leaves it silent",
    "cofiring": "no cofiring negatives: no pool window where a unit that fires with it fires and it does not",
}


PREFIXES = {"binary": ("detection", "fuzzing")}  # binary scorers name their metrics after themselves


def metric_names() -> list[str]:
    """Every metric name a classifier scorer can write (the scores contract lists them)."""
    return [f"{p}_{m}" if p else m for f, ms in FAMILIES.items() for p in PREFIXES.get(f, ("",)) for m in ms]


def balanced_accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    y, p = np.asarray(labels), np.asarray(predictions)
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        raise UndefinedMetric(f"no {'activating' if not pos.any() else 'non-activating'} windows answered")
    return float((np.mean(p[pos] == 1) + np.mean(p[neg] == 0)) / 2)


def auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    y, s = np.asarray(labels), np.asarray(scores, dtype=float)
    return detection_auc(s[y == 1], s[y == 0])


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    if len(labels) == 0:
        raise UndefinedMetric("no prompts answered")
    return float(np.mean(np.asarray(labels) == np.asarray(predictions)))


def _columns(trials, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(labels, values, failed) of the trials the metric can use."""
    if name == AUC or name == EMBEDDING_AUC:
        used = [t for t in trials if t.p_one is not None]
        return np.array([t.label for t in used]), np.array([t.p_one for t in used], float), len(trials) - len(used)
    used = [t for t in trials if t.prediction is not None]
    return np.array([t.label for t in used]), np.array([t.prediction for t in used]), len(trials) - len(used)


_FUNCTIONS: dict[str, Callable] = {BALANCED_ACCURACY: balanced_accuracy, AUC: auc, INTRUDER_ACCURACY: accuracy,
                                   EMBEDDING_AUC: auc}


def measure(name: str, trials: Sequence, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Score:
    """One metric of some trials, with its bootstrap CI over trials."""
    labels, values, failed = _columns(trials, name)
    base = dict(n_records=len(labels), n_failed=failed)
    if len(labels) == 0:
        reason = "every reply failed" if failed else NO_TRIALS
        if name == AUC and failed and not any(t.failure for t in trials):
            reason = "no P(1): the LLM gave no logprobs for its answers"
        return Score(None, undefined_reason=reason, **base)
    fn = _FUNCTIONS[name]
    try:
        value = fn(labels, values)
    except UndefinedMetric as e:
        return Score(None, undefined_reason=str(e), **base)
    boot = _resampled(name, labels, values, n_boot, seed)
    boot = boot[np.isfinite(boot)]
    if boot.size < max(1, MIN_DEFINED_RESAMPLES * n_boot) or len(labels) < 2:
        return Score(value, None, None, None, **base)
    lo, hi = (float(q) for q in np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]))
    return Score(value, min(lo, value), max(hi, value), None, **base)


def _resampled(name: str, labels: np.ndarray, values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The metric on `n_boot` resamples of the trials (NaN where undefined), all resamples at once."""
    idx = np.random.default_rng(seed).integers(0, len(labels), size=(n_boot, len(labels)))
    y, v = labels[idx], values[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        if name == INTRUDER_ACCURACY:
            return np.mean(y == v, axis=1)
        if name == BALANCED_ACCURACY:
            pos, neg = y == 1, y == 0
            return ((pos & (v == 1)).sum(1) / pos.sum(1) + (neg & (v == 0)).sum(1) / neg.sum(1)) / 2
        if len(labels) > 200:  # pooled over a layer: one resample at a time (n log n each)
            out = np.full(n_boot, np.nan)
            for b in range(n_boot):
                try:
                    out[b] = auc(y[b], v[b])
                except UndefinedMetric:
                    pass
            return out
        # AUC: every (activating, non-activating) pair of each resample, ties counting half (the
        # trials of one unit are a few dozen, so the pair cube stays small).
        pos, neg = y == 1, y == 0
        pairs = pos[:, :, None] & neg[:, None, :]
        wins = (v[:, :, None] > v[:, None, :]) + 0.5 * (v[:, :, None] == v[:, None, :])
        return (wins * pairs).sum(axis=(1, 2)) / (pos.sum(1) * neg.sum(1))


def metrics(family: str, trials: Sequence, n_boot: int = 1000, seed: int = 0, prefix: str = "",
            kinds: Sequence[str] = ()) -> dict[str, Score]:
    """Every metric of a scorer's family, per kind of negatives present in the trials, named
    '[PREFIX_]METRIC@KIND' ('detection_balanced_accuracy@similar', 'intruder_accuracy@random').
    The `kinds` given are reported even without trials (undefined, with the reason), so a unit too
    dense or too sparse to ask about, or without hard negatives of a kind its layer has, shows as
    such instead of missing."""
    out = {}
    for kind in NEGATIVE_KINDS:
        mine = [t for t in trials if t.negatives == kind]
        if mine or kind in kinds:
            for name in FAMILIES[family]:
                score = measure(name, mine, n_boot, seed)
                if not mine and trials and kind in NO_NEGATIVES:  # asked about, but had none of these
                    score = replace(score, undefined_reason=NO_NEGATIVES[kind])
                out[f"{prefix}_{name}@{kind}" if prefix else f"{name}@{kind}"] = score
    return out


def pooled(family: str, trials: Sequence, n_boot: int = 1000, seed: int = 0, prefix: str = "") -> dict[str, Score]:
    """The layer's value as delphi reports it: every unit's trials together (`metrics` on all)."""
    return metrics(family, trials, n_boot, seed, prefix)
