"""The classifier scorers: each metric against a hand computation, a reply that does not parse
recorded as a failure (never a 0 or a 1), the windows they score (never one the explainer saw), and
the scorers asked through a real loopback server (bench/llm_server.py, keyword rules)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from autoexplain import registry
from autoexplain.classify import (
    ACTIVE_FRACTION,
    ActiveFuzzingScorer,
    DetectionScorer,
    Example,
    FuzzingScorer,
    IntruderScorer,
    ParseFailure,
    Trial,
    hot_tokens,
    label_probabilities,
    parse_choice,
    parse_labels,
    render,
)
from autoexplain.classify_metrics import measure, metric_names, metrics, pooled
from autoexplain.records import ActivationRecord
from autoexplain.scoring import UndefinedMetric


def trials(labels, predictions, p_one=None, kind="random", failure=None):
    p_one = p_one or [None] * len(labels)
    return [Trial(kind, 0, i, y, p, q, failure if p is None else None) for i, (y, p, q) in enumerate(zip(labels, predictions, p_one))]


# ---- metrics against hand computations ------------------------------------------------------------

def test_balanced_accuracy_by_hand():
    # 3 activating (2 said 1), 2 not (1 said 0): (2/3 + 1/2) / 2
    s = measure("balanced_accuracy", trials([1, 1, 1, 0, 0], [1, 0, 1, 0, 1]), n_boot=200)
    assert s.value == pytest.approx((2 / 3 + 1 / 2) / 2) and s.n_records == 5 and s.n_failed == 0
    assert s.ci_low <= s.value <= s.ci_high


def test_auc_by_hand():
    # pairs (pos, neg): 0.9>0.4, 0.9>0.1, 0.4=0.4 (half), 0.4>0.1 -> 3.5 / 4
    s = measure("auc", trials([1, 1, 0, 0], [1, 0, 0, 0], [0.9, 0.4, 0.4, 0.1]), n_boot=200)
    assert s.value == pytest.approx(0.875)


def test_intruder_accuracy_by_hand():
    s = measure("intruder_accuracy", trials([0, 2, 4], [0, 1, 4], kind="random"), n_boot=200)
    assert s.value == pytest.approx(2 / 3)


def test_embedding_auc_by_hand():
    # similarities: activating 0.5, 0.2; not 0.3, 0.1 -> pairs 0.5>0.3, 0.5>0.1, 0.2<0.3, 0.2>0.1 -> 3/4
    s = measure("embedding_auc", trials([1, 1, 0, 0], [None] * 4, [0.5, 0.2, 0.3, 0.1]), n_boot=200)
    assert s.value == pytest.approx(0.75) and s.n_failed == 0


def test_the_ci_is_the_percentiles_of_resampled_trials():
    """The vectorised bootstrap gives what a plain loop over the same resamples gives."""
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 1, 0]
    preds = [1, 0, 1, 1, 0, 1, 0, 0, 1, 0]
    s = measure("balanced_accuracy", trials(labels, preds), n_boot=300, seed=5)
    idx = np.random.default_rng(5).integers(0, 10, size=(300, 10))
    y, p = np.array(labels), np.array(preds)
    boot = []
    for row in idx:
        yy, pp = y[row], p[row]
        if (yy == 1).any() and (yy == 0).any():
            boot.append((np.mean(pp[yy == 1] == 1) + np.mean(pp[yy == 0] == 0)) / 2)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert (s.ci_low, s.ci_high) == (pytest.approx(min(lo, s.value)), pytest.approx(max(hi, s.value)))


def test_metrics_are_per_kind_of_negatives_and_pooled_over_units():
    unit_a = trials([1, 0], [1, 0]) + trials([1, 0], [1, 1], kind="similar")
    unit_b = trials([1, 0, 0], [0, 0, 0])
    per_a = metrics("binary", unit_a, n_boot=50, prefix="detection")
    assert per_a["detection_balanced_accuracy@random"].value == 1.0
    assert per_a["detection_balanced_accuracy@similar"].value == 0.5  # the recall bias random negatives hide
    both = pooled("binary", unit_a + unit_b, n_boot=50, prefix="detection")
    # random trials of both units in one confusion matrix: positives 1 of 2 said 1, negatives 3 of 3 said 0
    assert both["detection_balanced_accuracy@random"].value == pytest.approx((1 / 2 + 3 / 3) / 2)


def test_a_failed_reply_is_left_out_and_counted_never_a_0_or_a_1():
    answered = trials([1, 1, 0, 0], [1, 0, 0, 0])
    failed = [Trial("random", 1, 9, 1, None, None, "unparseable reply: no list in the reply")]
    s = measure("balanced_accuracy", answered + failed, n_boot=50)
    assert s.n_failed == 1 and s.n_records == 4
    assert s.value == pytest.approx((1 / 2 + 1) / 2)  # as if the failed window had not been asked
    as_zero = measure("balanced_accuracy", answered + trials([1], [0]), n_boot=50).value
    as_one = measure("balanced_accuracy", answered + trials([1], [1]), n_boot=50).value
    assert s.value not in (as_zero, as_one)
    everything_failed = measure("balanced_accuracy", failed, n_boot=50)
    assert everything_failed.value is None and everything_failed.undefined_reason == "every reply failed"


def test_undefined_without_both_classes():
    s = measure("balanced_accuracy", trials([1, 1], [1, 0]), n_boot=50)
    assert s.value is None and "non-activating" in s.undefined_reason
    with pytest.raises(UndefinedMetric):
        from autoexplain.classify_metrics import auc

        auc(np.array([1, 1]), np.array([0.3, 0.2]))


def test_a_unit_with_nothing_to_ask_about_is_scored_undefined_not_left_out():
    """A unit that fires on every random window has no negatives, so no trials: its score row must
    still be there (undefined, with the reason), as the simulation scorer writes one for every unit."""
    from autoexplain.classify_stage import classifier_score_rows

    chosen = [{"layer": 3, "unit": u, "polarity": 1, "method": m, "text": "x", "prompt_tokens": 5,
               "completion_tokens": 2} for u in (0, 1) for m in ("explainer", "shuffled")]
    asked = [{"layer": 3, "unit": 0, "polarity": 1, "method": m, "scorer": spec, "negatives": "random",
              "prompt": 0, "window_id": i, "label": y, "prediction": None, "p_one": p, "failure": None,
              "tokens": 0, "dollars": 0.0}
             for spec in ("embedding",) for m in ("explainer", "shuffled")
             for i, (y, p) in enumerate([(1, 0.9), (1, 0.4), (0, 0.2), (0, 0.1)])]
    rows = classifier_score_rows(asked, chosen, "embedding", n_boot=50)
    got = {(r["unit"], r["method"], r["metric"]): r for r in rows}
    assert set(got) == {(u, m, "embedding_auc@random") for u in (0, 1) for m in ("explainer", "shuffled")}
    assert got[0, "explainer", "embedding_auc@random"]["value"] == 1.0
    empty = got[1, "explainer", "embedding_auc@random"]
    assert empty["value"] is None and "no trials" in empty["undefined_reason"] and empty["n_records"] == 0
    assert empty["explainer_tokens"] == 7 and empty["simulator_tokens"] == 0
    # the intruder needs no explanation: one row per unit, under 'explainer' only
    intruder = classifier_score_rows([], chosen, "intruder:openai:m@http://127.0.0.1:1/v1", n_boot=50)
    assert {(r["unit"], r["method"], r["metric"]) for r in intruder} == {(u, "explainer", "intruder_accuracy@random")
                                                                         for u in (0, 1)}
    active = classifier_score_rows([], chosen, "fuzzing-active:openai:m@http://127.0.0.1:1/v1", n_boot=50)
    assert {r["metric"] for r in active} == {"fuzzing_balanced_accuracy@active", "fuzzing_auc@active"}


def test_a_unit_without_the_hard_negatives_its_layer_has_is_scored_undefined_not_left_out():
    """Similar negatives found for unit 0 but not for unit 1: unit 1's @similar row is there,
    undefined with the reason (it was missing, so the layer's count of such units fell silently);
    cofiring, which no unit of the layer has, is not reported."""
    from autoexplain.classify_stage import classifier_score_rows

    chosen = [{"layer": 3, "unit": u, "polarity": 1, "method": "explainer", "text": "x", "prompt_tokens": 5,
               "completion_tokens": 2} for u in (0, 1)]
    asked = [{"layer": 3, "unit": u, "polarity": 1, "method": "explainer", "scorer": "embedding", "negatives": kind,
              "prompt": 0, "window_id": i, "label": y, "prediction": None, "p_one": p, "failure": None,
              "tokens": 0, "dollars": 0.0}
             for u, kinds in ((0, ("random", "similar")), (1, ("random",))) for kind in kinds
             for i, (y, p) in enumerate([(1, 0.9), (1, 0.4), (0, 0.2), (0, 0.1)])]
    rows = classifier_score_rows(asked, chosen, "embedding", n_boot=50)
    got = {(r["unit"], r["metric"]): r for r in rows}
    assert set(got) == {(u, f"embedding_auc@{k}") for u in (0, 1) for k in ("random", "similar")}
    assert got[0, "embedding_auc@similar"]["value"] == 1.0
    missing = got[1, "embedding_auc@similar"]
    assert missing["value"] is None and missing["undefined_reason"].startswith("no similar negatives")


def test_the_scores_contract_knows_every_classifier_metric():
    from autoexplain.schemas import HERE

    suite = json.loads((HERE / "expectations" / "scores.json").read_text())
    known = suite["expectations"][0]["kwargs"]["value_set"]
    for name in metric_names():
        for kind in ("random", "similar", "cofiring", "active"):
            assert f"{name}@{kind}" in known


# ---- replies ---------------------------------------------------------------------------------------

def test_replies_parse_or_fail():
    assert parse_labels("Sure: [1, 0, 1]", 3) == [1, 0, 1]
    for bad in ("1 0 1", "[1, 0]", "[1, 0, 2]", "[true, false, true]", "[1, 0, oops]"):
        with pytest.raises(ParseFailure):
            parse_labels(bad, 3)
    assert parse_choice("The intruder is example 3.", 5) == 2
    with pytest.raises(ParseFailure):
        parse_choice("Example 7", 5)


def test_p_one_from_the_logprobs_of_the_answer_digits():
    tops = [[("[", 0.0)], [("1", math.log(0.8)), ("0", math.log(0.2))], [(",", 0.0)],
            [("0", math.log(0.6)), ("1", math.log(0.3))], [("]", 0.0)]]
    p = label_probabilities(tops, 2)
    assert p[0] == pytest.approx(0.8) and p[1] == pytest.approx(0.3 / 0.9)
    assert label_probabilities(tops, 3) == [None] * 3 and label_probabilities(None, 2) == [None, None]


# ---- what is shown --------------------------------------------------------------------------------

def rec(acts, wid, kind="top", split="test"):
    return ActivationRecord([f" t{i}" for i in range(len(acts))], list(acts), wid, kind, split)


def test_fuzzing_highlights_the_tokens_at_three_tenths_of_the_window_max():
    r = rec([0.0, 1.0, 0.29, 0.3, 0.5], 1)
    assert ACTIVE_FRACTION == 0.3 and hot_tokens(r) == (1, 3, 4)
    assert render(Example(r.tokens, 1, 1, hot_tokens(r))) == "t0<< t1>> t2<< t3>><< t4>>"


def test_the_prompts_hold_what_each_scorer_promises():
    pos = [rec([0, 1, 0.5, 0, 0], i) for i in range(6)]
    neg = [rec([0, 0.01, 0, 0, 0], 100 + i, "random") for i in range(6)]
    rng = random.Random(0)
    det = [e for batch in DetectionScorer().prompts("x", pos, neg, rng) for e in batch]
    assert len(det) == 12 and sum(e.label for e in det) == 6 and not any(e.highlight for e in det)
    assert max(len(b) for b in DetectionScorer().prompts("x", pos, neg, rng)) == 5
    fuzz = [e for batch in FuzzingScorer().prompts("x", pos, neg, rng) for e in batch]
    assert all(len(e.highlight) == 2 for e in fuzz)  # incorrect ones highlight as many tokens
    assert all(e.window_id >= 100 for e in fuzz if e.label == 0)
    active = [e for batch in ActiveFuzzingScorer().prompts("x", pos, neg, rng) for e in batch]
    assert all(e.window_id < 100 for e in active)  # wrong tokens of activating windows
    assert all(set(e.highlight).isdisjoint({1, 2}) and len(e.highlight) == 2 for e in active if e.label == 0)
    intruder = IntruderScorer().prompts(None, pos, neg, rng)
    assert len(intruder) == 6 and all(len(b) == 5 and sum(e.label == 0 for e in b) == 1 for b in intruder)


def test_every_scorer_is_registered_with_its_llm_grammar():
    for spec in ("detection", "fuzzing", "fuzzing-active", "intruder"):
        p = registry.parse_scorer(spec)
        assert p.llm == "local" and not p.cls.needs_simulations
    assert registry.parse_scorer("embedding").llm is None
    assert [p.spec for p in registry.parse_scorers("simulation,detection:openai:m@http://127.0.0.1:9/v1")] == [
        "simulation", "detection:openai:m@http://127.0.0.1:9/v1"]
    from autoexplain.errors import UserError

    with pytest.raises(UserError, match="unknown scorer 'detectoin'"):
        registry.parse_scorers("simulation,detectoin")
    with pytest.raises(UserError, match="takes no LLM"):
        registry.parse_scorers("embedding:local")


# ---- through a real server -------------------------------------------------------------------------

def server_scorer(cls, bench_server):
    return registry.make_scorer(f"{cls.kind}:openai:bench@{bench_server.base_url}")


def unit_records():
    """A unit that fires on ' river': test top windows hold it, test random ones do not."""
    def window(words, wid, kind, split, hot):
        acts = [1.0 if w == hot else 0.0 for w in words]
        return ActivationRecord(words, acts, wid, kind, split)

    tops = [window([" the", " river", " ran", " by"], i, "top", "test", " river") for i in range(4)]
    train = [window([" a", " river", " bank"], 50 + i, "top", "train", " river") for i in range(3)]
    rand = [window([" cats", " sat", " on", " mats"], 100 + i, "random", "test", None) for i in range(4)]
    return tops + train + rand


def test_detection_through_the_loopback_server_with_logprobs(bench_server):
    scorer = server_scorer(DetectionScorer, bench_server)
    got = scorer.trials("the word river", unit_records())
    assert len(got) == 8 and all(t.failure is None for t in got)
    assert {t.window_id for t in got} == {0, 1, 2, 3, 100, 101, 102, 103}  # test windows only
    assert all(t.prediction == t.label for t in got)  # the keyword rule finds 'river'
    assert all(t.p_one is not None for t in got) and all(t.prompt_tokens > 0 for t in got)
    s = scorer.score("the word river", unit_records(), n_boot=50)
    assert s["detection_balanced_accuracy@random"].value == 1.0 and s["detection_auc@random"].value == 1.0


def test_a_reply_that_does_not_parse_is_a_failure_through_the_server(bench_server):
    scorer = server_scorer(FuzzingScorer, bench_server)
    got = scorer.trials("garble river", unit_records())  # the server answers no list to 'garble'
    assert got and all(t.prediction is None and t.failure.startswith("unparseable reply") for t in got)
    assert "after 2 attempts" in got[0].failure  # asked again once, sampling, before giving up
    s = scorer.score("garble river", unit_records(), n_boot=50)["fuzzing_balanced_accuracy@random"]
    assert s.value is None and s.n_failed == 8 and s.n_records == 0


def test_the_intruder_needs_no_explanation(bench_server):
    scorer = server_scorer(IntruderScorer, bench_server)
    got = scorer.trials(None, unit_records())
    assert len(got) == 4 and all(t.prediction == t.label for t in got)  # 'cats sat' shares nothing with 'river'
    assert {t.window_id for t in got} == {100, 101, 102, 103}


# ---- agreement between instruments -----------------------------------------------------------------

def test_spearman_by_hand():
    from autoexplain.agreement import spearman

    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(1.5 * 2))  # ties get their mean rank
    assert spearman([1, 2], [2, 1]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_agreement_pairs_each_units_headline_values(tmp_path):
    import polars as pl

    from autoexplain.agreement import agreement, agreement_markdown, per_unit

    rows = []
    for u, (sim, det, fuzz) in enumerate([(0.1, 0.5, 0.6), (0.3, 0.7, 0.5), (0.5, 0.6, 0.9), (0.7, 0.9, 0.8)]):
        for simulator, metric, value in (("embedding", "top_and_random", sim),
                                         ("detection:local", "detection_balanced_accuracy@random", det),
                                         ("detection:local", "detection_balanced_accuracy@similar", 0.0),
                                         ("fuzzing:local", "fuzzing_balanced_accuracy@random", fuzz)):
            rows.append({"layer": 1, "unit": u, "polarity": 1, "method": "explainer", "simulator": simulator,
                         "split": "test", "metric": metric, "value": value, "ci_low": None, "ci_high": None,
                         "undefined_reason": None, "n_records": 4, "n_failed": 0, "explainer_tokens": 0,
                         "simulator_tokens": 10, "dollars": 0.0})
    table = per_unit(pl.DataFrame(rows))
    got = {(a, b): rho for a, b, rho, n in agreement(table)}
    assert got[("simulation", "detection")] == pytest.approx(0.8)  # ranks 1,2,3,4 vs 1,3,2,4
    assert got[("simulation", "fuzzing")] == pytest.approx(1 - 6 * 4 / 60)  # ranks 1,2,3,4 vs 2,1,4,3
    path = tmp_path / "scores" / "layer_1.parquet"
    path.parent.mkdir()
    pl.DataFrame(rows).write_parquet(path)
    (tmp_path / "scores" / "manifest.json").write_text(json.dumps({"inputs": {}}))
    text = agreement_markdown([path], tmp_path / "agreement.png", n_boot=20)
    assert "| simulation vs detection | 0.800 | 4 |" in text and (tmp_path / "agreement.png").is_file()


def test_the_auc_ci_is_the_percentiles_of_resampled_trials():
    """The vectorised AUC bootstrap gives what `auc` on each resample gives."""
    from autoexplain.classify_metrics import auc

    labels = [1, 1, 1, 0, 0, 0, 1, 0]
    p_one = [0.9, 0.3, 0.6, 0.3, 0.2, 0.7, 0.6, 0.1]
    s = measure("auc", trials(labels, [1] * 8, p_one), n_boot=200, seed=3)
    idx = np.random.default_rng(3).integers(0, 8, size=(200, 8))
    boot = []
    for row in idx:
        try:
            boot.append(auc(np.array(labels)[row], np.array(p_one)[row]))
        except UndefinedMetric:
            pass
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert (s.ci_low, s.ci_high) == (pytest.approx(min(lo, s.value)), pytest.approx(max(hi, s.value)))


def test_pooled_auc_over_many_trials_takes_the_same_resamples():
    from autoexplain.classify_metrics import auc

    rng = np.random.default_rng(0)
    labels = list(rng.integers(0, 2, 300))
    p_one = list(np.round(rng.random(300), 2))
    s = measure("auc", trials(labels, [1] * 300, p_one), n_boot=100, seed=1)
    assert s.value == pytest.approx(auc(np.array(labels), np.array(p_one))) and s.ci_low < s.value < s.ci_high


def test_the_intruder_asks_the_same_whatever_the_explanation(bench_server):
    scorer = server_scorer(IntruderScorer, bench_server)
    a, b = scorer.trials("the word river", unit_records()), scorer.trials("something else", unit_records())
    assert [(t.window_id, t.label, t.prediction) for t in a] == [(t.window_id, t.label, t.prediction) for t in b]


def test_cofiring_negatives_are_where_a_partner_fires_and_the_unit_does_not():
    from autoexplain.negatives import cofiring_negatives

    # 6 pool windows, 3 units (+1 polarity): unit 1 mostly fires with unit 0 (its partner), unit 2 never with it.
    hi = np.array([[10, 5, 0], [9, 4, 1], [0, 5, 0], [1, 0, 3], [0, 4.5, 3], [0, 0, 0]], dtype=float)
    tops = {(0, 1): 10.0, (1, 1): 5.0, (2, 1): 3.0}
    rows = cofiring_negatives(np.arange(100, 106), {1: hi, -1: np.zeros_like(hi)}, tops, [(0, 1)], per_unit=5, partners=1)
    # unit 0 is quiet (< 0.3 x 10) on windows 2-5; its partner, unit 1, fires (>= 0.3 x 5) on 2 (1.0) and 4 (0.9)
    assert [(r["window_id"], r["rank"], r["kind"]) for r in rows] == [(102, 0, "cofiring"), (104, 1, "cofiring")]
