"""Score: how well a simulation of an explanation reproduces a unit's true activations.

Pure numpy. The metric functions raise `UndefinedMetric` (with the reason) when a value does not
exist; `score_unit` turns that into an explicit undefined `Score`: never a crash, never a silent 0.

Every metric pools the tokens of all scored records into one vector before computing (the
reference's `ev_correlation_score`), so a long record weighs more than a short one. Confidence
intervals resample whole records, because tokens within a record are strongly correlated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Callable, Sequence

import numpy as np

# Two points always correlate at +-1, so a correlation over fewer than this means nothing.
MIN_POINTS = 3
# Below this fraction of defined resamples, the percentiles would describe a biased subset.
MIN_DEFINED_RESAMPLES = 0.5
# Spread relative to magnitude below which a vector counts as constant (float noise, not signal).
_CONSTANT_RTOL = 1e-12

TOP_AND_RANDOM = "top_and_random"
RANDOM_ONLY = "random_only"
CALIBRATED_R2 = "calibrated_r2"
CALIBRATED_ABS_DEV = "calibrated_abs_dev_explained"

Records = Sequence[Sequence[float]] | np.ndarray
Metric = Callable[[Records, Records], float]


class UndefinedMetric(ValueError):
    """The metric has no value on these inputs; the message says why."""


@dataclass(frozen=True)
class Score:
    """One metric for one unit: its value or the reason it has none, with a bootstrap CI."""

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    undefined_reason: str | None = None
    n_records: int = 0  # records that entered the metric
    n_failed: int = 0  # records of the same selection whose simulation failed, left out

    @property
    def defined(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class ScoringRecord:
    """One scoring record: true activations, expected values (None = failed), kind and split."""

    true: Sequence[float]
    expected: Sequence[float] | None
    kind: str  # 'top' | 'random' | 'quantile'
    split: str  # 'calib' | 'valid' | 'test' (train records are never scored)

    @classmethod
    def of(cls, record, simulation) -> "ScoringRecord":
        """Pair an ActivationRecord with its Simulation."""
        return cls(record.activations, simulation.expected, record.kind, record.split)


def _flat(x: Records) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float64, copy=False).ravel()
    if len(x) and np.ndim(x[0]) > 0:
        return np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in x])
    return np.asarray(x, dtype=np.float64).ravel()


def _is_constant(a: np.ndarray) -> bool:
    return bool(np.ptp(a) <= _CONSTANT_RTOL * np.max(np.abs(a)))


def _pair(true: Records, pred: Records, *, need_spread: bool) -> tuple[np.ndarray, np.ndarray]:
    y, p = _flat(true), _flat(pred)
    if y.shape != p.shape:
        raise ValueError(f"{y.size} true activations but {p.size} predictions")
    if not np.all(np.isfinite(y)):
        raise UndefinedMetric("non-finite true activations")
    if not np.all(np.isfinite(p)):
        raise UndefinedMetric("non-finite predictions")
    if y.size < MIN_POINTS:
        raise UndefinedMetric(f"too few points ({y.size} < {MIN_POINTS})")
    if _is_constant(y):
        raise UndefinedMetric("constant true activations")
    if need_spread and _is_constant(p):
        raise UndefinedMetric("constant predictions")
    return y, p


def correlation(true: Records, pred: Records) -> float:
    """Pearson correlation over all records flattened together: the headline ev_correlation_score."""
    y, p = _pair(true, pred, need_spread=True)
    yc, pc = y - y.mean(), p - p.mean()
    return float(np.dot(yc, pc) / np.sqrt(np.dot(yc, yc) * np.dot(pc, pc)))


def r_squared(true: Records, pred: Records) -> float:
    """Standard coefficient of determination 1 - SSE/SST over the flattened records."""
    # Constant predictions are allowed: R^2 then honestly says how bad they are.
    y, p = _pair(true, pred, need_spread=False)
    yc = y - y.mean()
    return float(1.0 - np.sum((y - p) ** 2) / np.dot(yc, yc))


def absolute_deviation_explained(true: Records, pred: Records) -> float:
    """The reference's 1 - mean|y - y_hat| / mean|y| over the flattened records."""
    y, p = _pair(true, pred, need_spread=False)
    return float(1.0 - np.mean(np.abs(y - p)) / np.mean(np.abs(y)))


def fit_calibration(true: Records, pred: Records) -> tuple[float, float]:
    """Least-squares fit true ~ slope * pred + intercept; returns (slope, intercept)."""
    # Constant truth is fine here (slope 0); only constant predictions leave the line unfixed.
    y, p = _flat(true), _flat(pred)
    if y.shape != p.shape:
        raise ValueError(f"{y.size} true activations but {p.size} predictions")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(p))):
        raise UndefinedMetric("non-finite values")
    if y.size < 2:
        raise UndefinedMetric(f"too few points ({y.size} < 2)")
    if _is_constant(p):
        raise UndefinedMetric("constant predictions")
    pc = p - p.mean()
    slope = float(np.dot(pc, y - y.mean()) / np.dot(pc, pc))
    return slope, float(y.mean() - slope * p.mean())


def apply_calibration(pred: Records, slope: float, intercept: float) -> Records:
    """Map predictions through the fitted line, keeping per-record structure if given."""
    # A positive slope leaves the correlation unchanged; a negative one flips its sign.
    if isinstance(pred, np.ndarray) or not len(pred) or np.ndim(pred[0]) == 0:
        return slope * np.asarray(pred, dtype=np.float64) + intercept
    return [slope * np.asarray(r, dtype=np.float64) + intercept for r in pred]


# Vectorised bootstrap: each metric is a function of per-record sums, so a resample's value is
# (multiplicity matrix) @ (per-record sums). Each `_sums` gives per-token terms whose per-record
# sums are taken; the pooled means are subtracted first to avoid cancellation.
def _corr_sums(y, p, cy, cp):
    y, p = y - cy, p - cp
    return [np.ones_like(y), y, p, y * y, p * p, y * p]


def _corr_from(s, tol):
    n, sy, sp, syy, spp, syp = s.T
    vy, vp = syy - sy * sy / n, spp - sp * sp / n
    ok = (vy > tol[0] * n) & (vp > tol[1] * n)
    return np.where(ok, (syp - sy * sp / n) / np.sqrt(np.where(ok, vy * vp, 1.0)), np.nan)


def _r2_sums(y, p, cy, cp):
    d, y = y - p, y - cy
    return [np.ones_like(y), y, y * y, d * d]


def _r2_from(s, tol):
    n, sy, syy, sdd = s.T
    sst = syy - sy * sy / n
    ok = sst > tol[0] * n
    return np.where(ok, 1.0 - sdd / np.where(ok, sst, 1.0), np.nan)


def _ade_sums(y, p, cy, cp):
    yc = y - cy
    return [np.ones_like(y), yc, yc * yc, np.abs(y - p), np.abs(y)]


def _ade_from(s, tol):
    # Constant truth is undefined here too, to agree with the point estimate.
    n, sy, syy, sad, say = s.T
    ok = (say > 0) & (syy - sy * sy / n > tol[0] * n)
    return np.where(ok, 1.0 - sad / np.where(ok, say, 1.0), np.nan)


_SUMS = {
    correlation: (_corr_sums, _corr_from),
    r_squared: (_r2_sums, _r2_from),
    absolute_deviation_explained: (_ade_sums, _ade_from),
}


@lru_cache(maxsize=64)
def _resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each of n records appears in each resample: the same draws for every unit of the
    same size, so they are made once (read-only, shared)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    counts = np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
    counts.flags.writeable = False
    return counts


def _resample_values(metric, y_all: np.ndarray, p_all: np.ndarray, sizes: np.ndarray, n_boot: int,
                     seed: int) -> np.ndarray:
    """The metric on each of n_boot resamples of the records, given as their tokens pooled (y_all,
    p_all) and each record's length."""
    n = len(sizes)
    if metric in _SUMS:
        sums_of, value_from = _SUMS[metric]
        cy, cp = y_all.mean(), p_all.mean()
        starts = np.minimum(np.cumsum(sizes) - sizes, max(y_all.size - 1, 0))
        # Per-record sums of the whole token vectors at once: one reduceat per sum, no record loop
        # (reduceat gives an empty record the next value, not 0, hence the mask).
        per_record = np.stack([np.add.reduceat(v, starts) for v in sums_of(y_all, p_all, cy, cp)], axis=1)
        per_record[sizes == 0] = 0.0
        # A resample made of one constant stretch still shows float-noise variance; treat that as 0.
        tol = (1e-10 * np.max(np.abs(y_all - cy)) ** 2, 1e-10 * np.max(np.abs(p_all - cp)) ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            return value_from(_resample_counts(n, n_boot, seed) @ per_record, tol)
    cuts = np.cumsum(sizes)[:-1]
    ys, ps = np.split(y_all, cuts), np.split(p_all, cuts)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    out = np.full(n_boot, np.nan)
    for b, row in enumerate(idx):
        try:
            out[b] = metric([ys[i] for i in row], [ps[i] for i in row])
        except UndefinedMetric:
            pass
    return out


def bootstrap_ci(
    metric: Metric,
    true_records: Sequence[Sequence[float]],
    pred_records: Sequence[Sequence[float]],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile CI of a flattened metric, resampling whole records; None when it cannot be had."""
    ys = [np.asarray(r, dtype=np.float64).ravel() for r in true_records]
    ps = [np.asarray(r, dtype=np.float64).ravel() for r in pred_records]
    if len(ys) != len(ps):
        raise ValueError(f"{len(ys)} true records but {len(ps)} predicted records")
    if any(y.size != p.size for y, p in zip(ys, ps)):
        return None
    sizes = np.array([y.size for y in ys], dtype=np.int64)
    pooled = (np.concatenate(ys), np.concatenate(ps)) if ys else (np.zeros(0), np.zeros(0))
    return _pooled_ci(metric, *pooled, sizes, n_boot, seed, level)


def _pooled_ci(metric: Metric, y_all: np.ndarray, p_all: np.ndarray, sizes: np.ndarray, n_boot: int, seed: int,
               level: float) -> tuple[float, float] | None:
    """`bootstrap_ci` of records given pooled, with their lengths (a unit's records are pooled once
    for all its metrics: per-record arrays cost more than the resampling)."""
    if len(sizes) < 2:
        return None
    if not (np.isfinite(y_all).all() and np.isfinite(p_all).all()):
        return None
    values = _resample_values(metric, y_all, p_all, sizes, n_boot, seed)
    values = values[np.isfinite(values)]
    if values.size < MIN_DEFINED_RESAMPLES * n_boot:
        return None
    return _percentiles(values, (1 - level) / 2, (1 + level) / 2)


def mean_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float | None, ...]:
    """(mean, low, high) of per-unit values (None and NaN left out), with a percentile bootstrap CI
    over the units. It stays within the values' range (a mean of correlations never gets a bound
    above 1, as a normal interval over a few units did), and one value has no interval (None),
    not one of zero width. All None without a value."""
    return mean_ci_units(values, n_boot, seed, level)[:3]


def mean_ci_units(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple:
    """`mean_ci` and the number of units it is over (the values defined): (mean, low, high, units)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return None, None, None, 0
    mean = float(v.mean())
    if v.size < 2:
        return mean, None, None, 1
    rng, means = np.random.default_rng(seed), np.empty(n_boot)
    step = max(1, (1 << 22) // v.size)  # resamples at a time: bounded memory for layers of many units
    for s in range(0, n_boot, step):
        k = min(step, n_boot - s)
        means[s:s + k] = v[rng.integers(0, v.size, size=(k, v.size))].mean(axis=1)
    low, high = _percentiles(means, (1 - level) / 2, (1 + level) / 2)
    return mean, min(low, mean), max(high, mean), int(v.size)


def _percentiles(values: np.ndarray, *qs: float) -> tuple[float, ...]:
    """np.quantile's default (linear) method on a 1-D array, without its per-call overhead, which
    outweighed the bootstrap itself when a layer's thousands of scores each take two quantiles."""
    v = np.sort(values)
    out = []
    for q in qs:
        pos = q * (v.size - 1)
        i = min(int(pos), v.size - 1)
        j = min(i + 1, v.size - 1)
        out.append(float(v[i] + (pos - i) * (v[j] - v[i])))
    return tuple(out)


def detection_auc(
    scores_activating: Sequence[float], scores_nonactivating: Sequence[float]
) -> float:
    """ROC AUC of telling activating windows from non-activating ones (Mann-Whitney, ties 0.5)."""
    pos = np.asarray(scores_activating, dtype=np.float64).ravel()
    neg = np.sort(np.asarray(scores_nonactivating, dtype=np.float64).ravel())
    if pos.size == 0 or neg.size == 0:
        raise UndefinedMetric(f"no {'' if pos.size == 0 else 'non-'}activating windows")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise UndefinedMetric("non-finite detection scores")
    below = np.searchsorted(neg, pos, side="left")
    tied = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (pos.size * neg.size))


@dataclass(frozen=True)
class _Pooled:
    """Selected records' tokens pooled into one vector each way, with each record's length."""

    y: np.ndarray
    p: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, trues: list, preds: list) -> "_Pooled":
        sizes = np.array([len(t) for t in trues], dtype=np.int64)
        total = int(sizes.sum())
        return cls(pool(trues, total), pool(preds, total), sizes)


def pool(records: list, total: int) -> np.ndarray:
    """Records (lists or arrays of numbers) end to end as one float64 vector: the values of
    concatenating each as a float64 array, without an array per record."""
    if records and all(type(r) is list for r in records):
        return np.fromiter(chain.from_iterable(records), dtype=np.float64, count=total)
    return np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in records]) if records else np.zeros(0)


def _score(metric: Metric, data: _Pooled, n_failed: int, n_boot: int, seed: int, level: float) -> Score:
    base = dict(n_records=len(data.sizes), n_failed=n_failed)
    if not len(data.sizes):
        reason = "all simulations failed" if n_failed else "no records"
        return Score(None, undefined_reason=reason, **base)
    try:
        value = metric(data.y, data.p)
    except UndefinedMetric as e:
        return Score(None, undefined_reason=str(e), **base)
    ci = _pooled_ci(metric, data.y, data.p, data.sizes, n_boot, seed, level)
    if ci is not None:
        # Percentile intervals of a biased statistic (calibrated R² on few records) can miss the
        # point estimate itself; report the interval stretched to contain it.
        ci = (min(ci[0], value), max(ci[1], value))
    return Score(value, *(ci or (None, None)), **base)


def _usable(records: Sequence[ScoringRecord], split: str, kinds: tuple[str, ...]) -> tuple[_Pooled, int]:
    """The selected records' (true, expected) values pooled, and how many of them failed."""
    ys, ps, failed = [], [], 0
    for r in records:
        if r.split != split or r.kind not in kinds:
            continue
        # A prediction of the wrong length cannot be aligned to tokens: count it as failed.
        if r.expected is None or len(r.expected) != len(r.true):
            failed += 1
            continue
        ys.append(r.true)
        ps.append(r.expected)
    return _Pooled.of(ys, ps), failed


def score_unit(
    records: Sequence[ScoringRecord],
    *,
    split: str = "valid",
    calib_split: str = "calib",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Score]:
    """A unit's Scores on one split, keyed TOP_AND_RANDOM, RANDOM_ONLY, CALIBRATED_R2/_ABS_DEV.

    records: every scoring record of the unit (any split, any kind); only `split` is scored, and
    only `calib_split` feeds the calibration. Correlations use the raw expected values (0-10
    scale); R^2 and absolute deviation explained use them after the linear calibration fitted on
    the calib split's top-and-random records, because raw 0-10 predictions are not on the
    activations' scale. Failed simulations (expected None, or the wrong length) are left out and
    counted in each Score's n_failed. Quantile records are not scored here.
    """
    boot = dict(n_boot=n_boot, seed=seed, level=level)
    scored, failed = _usable(records, split, ("top", "random"))
    scores = {
        TOP_AND_RANDOM: _score(correlation, scored, failed, **boot),
        RANDOM_ONLY: _score(correlation, *_usable(records, split, ("random",)), **boot),
    }
    calib, _ = _usable(records, calib_split, ("top", "random"))
    try:
        if not len(calib.sizes):
            raise UndefinedMetric("no records")
        slope, intercept = fit_calibration(calib.y, calib.p)
    except UndefinedMetric as e:
        reason = f"calibration on {calib_split!r}: {e}"
        for key in (CALIBRATED_R2, CALIBRATED_ABS_DEV):
            scores[key] = Score(None, undefined_reason=reason, n_records=len(scored.sizes), n_failed=failed)
        return scores
    # elementwise: the same values as calibrating record by record
    cal = _Pooled(scored.y, apply_calibration(scored.p, slope, intercept), scored.sizes)
    scores[CALIBRATED_R2] = _score(r_squared, cal, failed, **boot)
    scores[CALIBRATED_ABS_DEV] = _score(absolute_deviation_explained, cal, failed, **boot)
    return scores
