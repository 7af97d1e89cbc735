"""Tests for autoexplain.scoring: the reference's definitions, re-derived here independently."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from autoexplain.records import ActivationRecord
from autoexplain.scoring import (
    CALIBRATED_ABS_DEV,
    CALIBRATED_R2,
    RANDOM_ONLY,
    TOP_AND_RANDOM,
    Score,
    ScoringRecord,
    UndefinedMetric,
    absolute_deviation_explained,
    apply_calibration,
    bootstrap_ci,
    correlation,
    detection_auc,
    fit_calibration,
    r_squared,
    score_unit,
)


# --- the reference's definitions, written from REFERENCE.md, not from scoring.py -------------------


def ref_ev_correlation(true_records, pred_records):
    return np.corrcoef(np.concatenate(true_records), np.concatenate(pred_records))[0, 1]


def ref_abs_dev_explained(true_records, pred_records):
    y, p = np.concatenate(true_records), np.concatenate(pred_records)
    return 1 - np.mean(np.abs(y - p)) / np.mean(np.abs(y))


def ref_nonstandard_r2(y, p):
    return 1 - np.mean((y - p) ** 2) / np.mean(y**2)


def standard_r2(y, p):
    return 1 - np.sum((y - p) ** 2) / np.sum((y - np.mean(y)) ** 2)


def sparse_unit(rng, n_records, length=64, noise=1.0):
    """Neuron-like records: mostly silent, a few bursts; predictions are a noisy 0-10 copy."""
    trues, preds = [], []
    for _ in range(n_records):
        y = np.where(rng.random(length) < 0.15, rng.gamma(2.0, 2.0, length), 0.0)
        p = np.clip(10 * y / 12 + rng.normal(0, noise, length), 0, 10)
        trues.append(y)
        preds.append(p)
    return trues, preds


# --- correlation and absolute deviation agree with the reference ---------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_correlation_and_abs_dev_match_reference_on_ragged_records(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 70, size=rng.integers(2, 12))
    trues = [rng.normal(size=n) + 2 for n in lengths]
    preds = [0.5 * t + rng.normal(size=t.size) for t in trues]
    assert correlation(trues, preds) == pytest.approx(ref_ev_correlation(trues, preds), abs=1e-12)
    assert absolute_deviation_explained(trues, preds) == pytest.approx(
        ref_abs_dev_explained(trues, preds), abs=1e-12
    )
    flat_t, flat_p = np.concatenate(trues), np.concatenate(preds)
    assert correlation(flat_t, flat_p) == pytest.approx(correlation(trues, preds), abs=1e-12)


def test_correlation_flattens_rather_than_averaging_per_record():
    # Within each record prediction and truth run opposite ways; across records they agree strongly.
    trues = [np.array([0.0, 1.0, 0.5]), np.array([10.0, 11.0, 10.5])]
    preds = [np.array([1.0, 0.0, 0.5]), np.array([9.0, 8.0, 8.5])]
    per_record_mean = np.mean([np.corrcoef(t, p)[0, 1] for t, p in zip(trues, preds)])
    flat = correlation(trues, preds)
    assert per_record_mean == pytest.approx(-1.0)
    assert flat > 0.9
    assert flat == pytest.approx(ref_ev_correlation(trues, preds))


def test_r_squared_is_standard_not_the_references_variant():
    rng = np.random.default_rng(1)
    y = 20 + rng.normal(size=200)  # a large offset makes mean(y^2) dwarf the variance
    p = y + rng.normal(scale=0.8, size=200)
    ours = r_squared(y, p)
    assert ours == pytest.approx(standard_r2(y, p), abs=1e-12)
    assert ref_nonstandard_r2(y, p) > 0.99
    assert ours < 0.6
    # Records are flattened for R^2 too.
    assert r_squared([y[:50], y[50:]], [p[:50], p[50:]]) == pytest.approx(ours, abs=1e-12)


# --- calibration ---------------------------------------------------------------------------------


def test_calibration_recovers_a_noiseless_line():
    p = np.random.default_rng(2).uniform(0, 10, 100)
    slope, intercept = fit_calibration(3.0 * p - 2.0, p)
    assert slope == pytest.approx(3.0, abs=1e-10)
    assert intercept == pytest.approx(-2.0, abs=1e-10)


def test_calibration_keeps_correlation_and_per_record_structure():
    trues, preds = sparse_unit(np.random.default_rng(3), 12)
    slope, intercept = fit_calibration(trues, preds)
    assert slope > 0
    cal = apply_calibration(preds, slope, intercept)
    assert isinstance(cal, list) and [c.size for c in cal] == [p.size for p in preds]
    r = correlation(trues, preds)
    assert correlation(trues, cal) == pytest.approx(r, abs=1e-12)
    # Fitted and scored on the same data, calibrated R^2 is r^2.
    assert r_squared(trues, cal) == pytest.approx(r**2, abs=1e-10)
    assert r_squared(trues, preds) < r**2  # raw 0-10 predictions are on the wrong scale


# --- bootstrap -----------------------------------------------------------------------------------


def test_bootstrap_ci_contains_point_and_is_deterministic():
    trues, preds = sparse_unit(np.random.default_rng(4), 20)
    point = correlation(trues, preds)
    lo, hi = bootstrap_ci(correlation, trues, preds, n_boot=1000, seed=7)
    assert lo < point < hi
    assert hi - lo > 0.01
    assert bootstrap_ci(correlation, trues, preds, n_boot=1000, seed=7) == (lo, hi)
    assert bootstrap_ci(correlation, trues, preds, n_boot=1000, seed=8) != (lo, hi)


def test_bootstrap_ci_narrows_with_more_records():
    rng = np.random.default_rng(5)
    trues, preds = sparse_unit(rng, 160, noise=3.0)
    few = bootstrap_ci(correlation, trues[:10], preds[:10], seed=0)
    many = bootstrap_ci(correlation, trues, preds, seed=0)
    assert many[1] - many[0] < 0.6 * (few[1] - few[0])


@pytest.mark.parametrize("metric", [correlation, r_squared, absolute_deviation_explained])
def test_vectorised_bootstrap_matches_a_plain_loop(metric):
    rng = np.random.default_rng(6)
    trues, preds = sparse_unit(rng, 8)
    preds = [p * 0.9 + 0.1 for p in preds]
    fast = bootstrap_ci(metric, trues, preds, n_boot=300, seed=3)
    slow = bootstrap_ci(lambda t, p: metric(t, p), trues, preds, n_boot=300, seed=3)
    assert fast == pytest.approx(slow, abs=1e-9)


def test_bootstrap_resamples_records_and_skips_undefined_resamples():
    # Three records, one constant: resamples of only that record are undefined and skipped.
    trues = [np.array([0.0, 1.0, 2.0]), np.array([2.0, 0.0, 1.0]), np.array([5.0, 5.0, 5.0])]
    preds = [np.array([0.0, 1.0, 2.0]), np.array([2.0, 0.0, 1.0]), np.array([3.0, 3.0, 3.0])]
    ci = bootstrap_ci(correlation, trues, preds, n_boot=500, seed=0)
    slow = bootstrap_ci(lambda t, p: correlation(t, p), trues, preds, n_boot=500, seed=0)
    assert ci is not None and ci == pytest.approx(slow, abs=1e-9)
    assert bootstrap_ci(correlation, trues[:1], preds[:1]) is None  # one record cannot be resampled


# --- undefined cases -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "true, pred, reason",
    [
        ([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], "constant predictions"),
        ([0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], "constant true"),
        ([0.3, 0.3, 0.1 + 0.2, 0.3], [1.0, 2.0, 3.0, 4.0], "constant true"),  # float noise only
        ([1.0, np.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], "non-finite"),
        ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, np.inf, 4.0], "non-finite"),
        ([1.0, 2.0], [1.0, 2.0], "too few"),
    ],
)
def test_degenerate_inputs_are_undefined_with_a_reason(true, pred, reason):
    with pytest.raises(UndefinedMetric, match=reason):
        correlation(true, pred)
    records = [ScoringRecord(true, pred, "top", "valid"), ScoringRecord(true, pred, "top", "calib")]
    scores = score_unit(records, n_boot=50)
    s = scores[TOP_AND_RANDOM]
    assert s.value is None and not s.defined
    assert reason in s.undefined_reason
    for key in (CALIBRATED_R2, CALIBRATED_ABS_DEV):
        assert scores[key].value is None and scores[key].undefined_reason


def test_constant_truth_is_undefined_for_every_metric():
    y, p = [2.0] * 5, [1.0, 2.0, 3.0, 4.0, 5.0]
    for metric in (r_squared, absolute_deviation_explained):
        with pytest.raises(UndefinedMetric, match="constant true"):
            metric(y, p)
    with pytest.raises(UndefinedMetric, match="constant predictions"):
        fit_calibration(p, y)


# --- detection AUC -------------------------------------------------------------------------------


def brute_auc(pos, neg):
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_detection_auc_extremes_and_ties():
    assert detection_auc([5, 6, 7], [1, 2, 3]) == 1.0
    assert detection_auc([1, 2, 3], [5, 6, 7]) == 0.0
    assert detection_auc([4, 4, 4], [4, 4]) == 0.5
    with pytest.raises(UndefinedMetric):
        detection_auc([], [1.0])
    with pytest.raises(UndefinedMetric):
        detection_auc([1.0], [math.nan])


@pytest.mark.parametrize("seed", range(5))
def test_detection_auc_matches_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 6, size=rng.integers(1, 30)).astype(float)  # small range: many ties
    neg = rng.integers(0, 5, size=rng.integers(1, 30)).astype(float)
    assert detection_auc(pos, neg) == pytest.approx(brute_auc(pos, neg), abs=1e-12)


# --- score_unit ----------------------------------------------------------------------------------


def make_unit(rng, split, n_top=5, n_random=5, flip=False):
    out = []
    for kind, n in (("top", n_top), ("random", n_random)):
        trues, preds = sparse_unit(rng, n, length=32)
        for t, p in zip(trues, preds):
            out.append(ScoringRecord(t, (10 - p) if flip else p, kind, split))
    return out


def test_score_unit_excludes_and_counts_failed_simulations():
    rng = np.random.default_rng(10)
    valid = make_unit(rng, "valid", n_top=6, n_random=6)
    calib = make_unit(rng, "calib")
    failed = [
        ScoringRecord(valid[0].true, None, "top", "valid"),
        ScoringRecord(valid[7].true, None, "random", "valid"),
        ScoringRecord(valid[8].true, [1.0, 2.0], "random", "valid"),  # wrong length
    ]
    scores = score_unit(valid + calib + failed, n_boot=200)
    s = scores[TOP_AND_RANDOM]
    assert (s.n_records, s.n_failed) == (12, 3)
    assert s.value == pytest.approx(
        ref_ev_correlation([r.true for r in valid], [r.expected for r in valid]), abs=1e-12
    )
    assert s.ci_low < s.value < s.ci_high
    randoms = [r for r in valid if r.kind == "random"]
    assert (scores[RANDOM_ONLY].n_records, scores[RANDOM_ONLY].n_failed) == (6, 2)
    assert scores[RANDOM_ONLY].value == pytest.approx(
        ref_ev_correlation([r.true for r in randoms], [r.expected for r in randoms]), abs=1e-12
    )
    assert scores[CALIBRATED_R2].n_failed == 3

    everything_failed = [ScoringRecord(r.true, None, r.kind, r.split) for r in valid] + calib
    s = score_unit(everything_failed, n_boot=50)[TOP_AND_RANDOM]
    assert s.value is None and s.undefined_reason == "all simulations failed" and s.n_failed == 12


def test_score_unit_uses_only_the_requested_split_and_calibrates_on_calib():
    rng = np.random.default_rng(11)
    valid, test = make_unit(rng, "valid"), make_unit(rng, "test", flip=True)
    calib = make_unit(rng, "calib")
    quantile = [ScoringRecord(r.true, 10 - np.asarray(r.expected), "quantile", "valid") for r in valid]
    base = score_unit(valid + calib, n_boot=100)
    noisy = score_unit(valid + calib + test + quantile, n_boot=100)
    for key in base:
        assert noisy[key] == base[key]
    assert score_unit(valid + calib + test, split="test", n_boot=100)[TOP_AND_RANDOM].value < 0

    vt, vp = [r.true for r in valid], [r.expected for r in valid]
    slope, intercept = fit_calibration([r.true for r in calib], [r.expected for r in calib])
    cal = apply_calibration(vp, slope, intercept)
    assert base[CALIBRATED_R2].value == pytest.approx(standard_r2(np.concatenate(vt), np.concatenate(cal)))
    assert base[CALIBRATED_ABS_DEV].value == pytest.approx(ref_abs_dev_explained(vt, cal))
    # The calibration comes from calib, not from the scored split itself.
    own = fit_calibration(vt, vp)
    assert own != pytest.approx((slope, intercept))

    no_calib = score_unit(valid, n_boot=50)
    assert no_calib[TOP_AND_RANDOM].defined
    assert "calib" in no_calib[CALIBRATED_R2].undefined_reason


def test_scoring_record_pairs_an_activation_record_with_its_simulation():
    rec = ActivationRecord(tokens=["a", "b"], activations=[0.0, 1.5], kind="random", split="test")

    class Sim:
        expected = [0.0, 9.0]

    sr = ScoringRecord.of(rec, Sim())
    assert (list(sr.true), list(sr.expected), sr.kind, sr.split) == ([0.0, 1.5], [0.0, 9.0], "random", "test")
    assert isinstance(Score(None, undefined_reason="x"), Score)


def test_the_mean_over_units_has_a_bootstrap_ci_inside_the_values_range():
    """A layer's mean of a few units' correlations: a normal interval (mean +- 1.96 sd / sqrt n) gave
    [0.627, 1.016] here, above what a correlation can be; the bootstrap over units stays inside."""
    import polars as pl

    from autoexplain.scoring import _percentiles, mean_ci
    from autoexplain.summary import compare, layer_summary

    values = [0.99, 0.95, 0.98, 0.37]
    m, lo, hi = mean_ci(values)
    assert m == pytest.approx(np.mean(values)) and min(values) <= lo <= m <= hi <= max(values)
    # the same resamples by hand: units drawn with replacement, the mean of each, its percentiles
    draws = np.random.default_rng(0).integers(0, 4, size=(1000, 4))
    assert (lo, hi) == pytest.approx(_percentiles(np.asarray(values)[draws].mean(axis=1), 0.025, 0.975))
    assert mean_ci([0.4, None, float("nan")]) == (0.4, None, None), "one value: no interval, not a zero-width one"
    assert mean_ci([None]) == (None, None, None) and mean_ci(values) == mean_ci(values + [None])
    unit = dict(layer=1, polarity=1, metric="top_and_random", method="explainer")
    scores = pl.DataFrame([{**unit, "unit": i, "value": v} for i, v in enumerate(values)])
    row = layer_summary(scores).row(0, named=True)
    assert (row["mean"], row["ci_low"], row["ci_high"]) == pytest.approx((m, lo, hi))
    change = compare(scores, scores.with_columns(pl.col("value") - 0.1))
    assert change["mean_change"] == pytest.approx(-0.1) and change["ci_low"] == pytest.approx(-0.1)


def test_a_comparison_lists_only_units_whose_score_changed():
    """A rerun that changed nothing listed ten units 'that moved most', each +0.000."""
    import polars as pl

    from autoexplain.summary import compare, compare_markdown

    unit = dict(layer=1, polarity=1, metric="top_and_random", method="explainer")
    before = pl.DataFrame([{**unit, "unit": i, "value": 0.1 * i} for i in range(4)])
    same = compare(before, before)
    assert same["moved"] == [] and same["paired"] == 4
    assert compare_markdown(same, "t").endswith("## Units that moved most\n\nNo unit's score changed.\n")
    after = before.with_columns(pl.when(pl.col("unit") == 2).then(0.5).otherwise(pl.col("value")).alias("value"))
    moved = compare(before, after)["moved"]
    assert [(m["unit"], round(m["change"], 6)) for m in moved] == [(2, 0.3)]
    assert "| 1 | 2 | +1 | +0.200 | +0.500 | +0.300 |" in compare_markdown(compare(before, after), "t")
