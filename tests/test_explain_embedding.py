"""The embedding explainer: its candidates from records, and whether it recovers planted rules."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from autoexplain import scoring  # noqa: E402
from autoexplain.explain_embedding import EmbeddingExplainer, _profile  # noqa: E402
from autoexplain.records import ActivationRecord  # noqa: E402


def _rec(tokens, acts):
    return ActivationRecord(list(tokens), [float(a) for a in acts])


def test_profile_ranks_whole_words_and_finds_a_dominant_class():
    records = [_rec([" The", " 19", "84", " war", ","], [0, 9, 8, 1, 0]),
               _rec([" in", " 20", "01", "."], [0, 10, 7, 0])]
    p = _profile(records)
    assert p.dominant_class == "digit"
    assert p.top_words[0][0] in ("1984", "2001")  # pieces joined into the word they belong to
    words = _profile([_rec([" red", " fox", " blue", " sky"], [10, 0, 8, 1])])
    assert [w for w, _ in words.top_words[:2]] == ["red", "blue"]
    assert words.dominant_class is None
    assert _profile([_rec([" a", " b"], [0, 0])]).top_words == []


@pytest.fixture(scope="module")
def explainer():
    return EmbeddingExplainer()


@pytest.mark.slow
def test_candidates_name_the_words_and_their_category(explainer):
    colours = [_rec([" the", " red", " car", " and", " green", " door"], [0, 10, 0, 0, 9, 0]),
               _rec([" a", " blue", " shirt", " ,", " yellow"], [0, 8, 0, 0, 10])]
    (exp,) = explainer.explain_records([colours], k=6)
    assert exp.text == exp.candidates[0] and len(exp.candidates) >= 3
    assert any('"red"' in c or '"yellow"' in c for c in exp.candidates)
    semantic = [c for c in exp.candidates if c.startswith("words related to")]
    assert semantic and any(w in semantic[0] for w in ("colour", "color", "colors", "colours", "red", "blue", "green"))
    assert explainer.explain_records([colours], k=1)[0].candidates == exp.candidates[:1]
    nothing = explainer.explain_records([[_rec([" a", " b"], [0, 0])]], k=4)[0]
    assert nothing.candidates == ["nothing in particular"]


@pytest.mark.slow
def test_recovers_planted_rules_better_than_a_wrong_rule(explainer):
    """Best-of-k on valid, reported on test: the explainer must carry most of the true rule's signal."""
    from autoexplain.embedding import EmbeddingSimulator
    from autoexplain.pipeline import shown_records
    from autoexplain.planted import corpus_windows, planted_records, planted_units
    from autoexplain.records import UnitId, UnitRecords

    sim = EmbeddingSimulator()
    windows = corpus_windows(n_windows=4000, seed=0)

    def corr(text, recs):
        sims = sim.simulate(text, [r.tokens for r in recs])
        try:
            return scoring.correlation([r.activations for r in recs], [s.expected for s in sims])
        except scoring.UndefinedMetric:
            return 0.0

    got, true = {}, {}
    for unit in planted_units():
        records = planted_records(windows, unit)
        valid = [r for r in records if r.split == "valid"]
        test = [r for r in records if r.split == "test"]
        candidates = explainer.explain_records([shown_records(UnitRecords(UnitId.mlp(0, 0), records), 5)], k=4)[0].candidates
        best = max(candidates, key=lambda c: corr(c, valid))
        got[unit.name], true[unit.name] = corr(best, test), corr(unit.explanation, test)
    print({k: round(v, 3) for k, v in got.items()})
    assert np.mean(list(got.values())) >= 0.6
    assert np.mean(list(got.values())) >= 0.7 * np.mean(list(true.values()))
