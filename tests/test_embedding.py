"""The embedding simulator and the planted-unit suite that checks it carries signal."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from autoexplain.embedding import EmbeddingSimulator  # noqa: E402
from autoexplain.surface import content_of, literal_only, quoted_literals  # noqa: E402
from autoexplain.words import word_of_each_token  # noqa: E402
from autoexplain.planted import (  # noqa: E402
    corpus_windows,
    format_self_check,
    planted_records,
    planted_units,
    self_check,
)

RECORDS = [
    ["The", " red", " fox", " ate", " 42", " sheep", ".", "\n", " ", " Then", " God", " sm", "it", "ten", "!"],
    [" blue", " and", " green", " hands", ",", " LORD", "'s", " horses"],
    [],
    ["\n\n"],
]


# -- pure helpers (no model) ---------------------------------------------------------------------
def test_word_of_each_token_joins_pieces():
    assert word_of_each_token([" he", " sm", "it", "ten", ",", " 1", "9", "\n", "The"]) == [
        "he", "smitten", "smitten", "smitten", ",", "19", "19", "", "The"
    ]


def test_explanation_parsing():
    assert content_of("color words") == "color"
    assert content_of("words related to physical medical conditions") == "physical medical conditions"
    assert content_of("numbers written out as words") == "numbers written out as words"
    assert content_of("words") == "words"
    assert quoted_literals("the word 'God'") == {"god"}
    assert quoted_literals("the LORD's people") == set()
    assert literal_only("the word 'God'") and literal_only('the words "and" and "or"')
    assert not literal_only("present tense verbs ending in 'ing'")


def test_planted_rules_on_tokens():
    units = {u.name: u for u in planted_units()}
    tokens = [" 7", " red", " Green", "land", " God", "head", " God", ".", ",", " hands", " m", "ules", " three"]
    acts = {name: u.activations(tokens) for name, u in units.items()}
    assert acts["digits"][0] == 10 and sum(acts["digits"]) == 10
    assert acts["colours"][1] == 10 and acts["colours"][2] == 0  # ' Green' in 'Greenland' is no colour
    assert acts["god"] == [0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0]  # not 'Godhead'
    assert acts["punctuation"][7] == 10 and acts["punctuation"][8] == 7
    assert acts["body_parts"][9] == 10
    assert acts["animals"][10] == acts["animals"][11] == 10  # ' m|ules' is one word
    assert acts["number_words"][12] == 10
    assert acts["capitalised"][2] == acts["capitalised"][4] == 10 and acts["capitalised"][1] == 0


def _synthetic_windows(n=300, seed=0):
    rng = np.random.default_rng(seed)
    vocab = [" the", " red", " cat", " 7", ".", " God", " house", " hands", " three", " walked", ","]
    return [[vocab[i] for i in rng.integers(0, len(vocab), 16)] for _ in range(n)]


@pytest.mark.parametrize("unit", planted_units(), ids=lambda u: u.name)
def test_planted_records_splits_are_disjoint(unit):
    windows = _synthetic_windows()
    records = planted_records(windows, unit, n_top=40, n_random=30, seed=3)
    ids = [r.window_id for r in records]
    assert len(ids) == len(set(ids)), "a window was used twice"
    train = {r.window_id for r in records if r.split == "train"}
    held_out = {r.window_id for r in records if r.split in ("valid", "test")}
    assert train and held_out and not train & held_out
    assert all(r.kind == "top" for r in records if r.split == "train")
    for r in records:
        assert r.activations == unit.activations(windows[r.window_id])
    tops = [r for r in records if r.kind == "top"]
    assert all(r.max_activation > 0 for r in tops)
    assert {r.split for r in records if r.kind == "random"} <= {"calib", "valid", "test"}


# -- the simulator (embedded MiniLM) -------------------------------------------------------------
@pytest.fixture(scope="module")
def simulator():
    return EmbeddingSimulator()


@pytest.mark.slow
def test_one_value_per_token_in_range(simulator):
    sims = simulator.simulate("animals", RECORDS)
    assert len(sims) == len(RECORDS)
    for record, sim in zip(RECORDS, sims):
        assert sim.ok and sim.failure is None
        assert len(sim.expected) == len(record)
        assert all(isinstance(v, float) and 0.0 <= v <= 10.0 for v in sim.expected)
    first = sims[0].expected
    assert first[RECORDS[0].index("\n")] == 0.0 and first[RECORDS[0].index(" ")] == 0.0  # whitespace
    assert first[RECORDS[0].index(" sheep")] > 5 > first[RECORDS[0].index(" ate")]


@pytest.mark.slow
def test_predictions_follow_the_explanation(simulator):
    record = RECORDS[0]
    colours = simulator.simulate("colors", [record])[0].expected
    digits = simulator.simulate("numbers written with digits", [record])[0].expected
    god = simulator.simulate("the word 'God'", [record])[0].expected
    assert colours[record.index(" red")] > colours[record.index(" fox")] + 3
    assert digits[record.index(" 42")] == max(digits) > 5
    assert god[record.index(" God")] == 10 and sum(god) == 10


@pytest.mark.slow
def test_window_embeddings_are_shared_across_units(simulator):
    records = [list(r) + [" cache", " probe"] for r in RECORDS]  # windows this module has not seen
    simulator.simulate("animals and livestock", records)
    calls, texts, misses = simulator.encode_calls, simulator.encoded_texts, simulator.window_misses
    hits = simulator.window_hits
    simulator.simulate("names of kings and rulers", records)  # a second unit on the same windows
    assert simulator.window_misses == misses
    assert simulator.window_hits == hits + len(records)
    # Only the new explanation (its content and its full text) was embedded, in one call.
    assert simulator.encode_calls == calls + 1
    assert simulator.encoded_texts - texts <= 2


@pytest.mark.slow
def test_simulate_many_equals_simulate(simulator):
    explanations = ["animals", "color words", "the word 'God'", "punctuation marks", "verbs of motion"]
    many = simulator.simulate_many(explanations, RECORDS)
    assert len(many) == len(explanations) and simulator.simulate_many([], RECORDS) == []
    for explanation, sims in zip(explanations, many):
        single = simulator.simulate(explanation, RECORDS)
        assert len(sims) == len(single) == len(RECORDS)
        for a, b in zip(sims, single):  # the same bits: a text's vector and scale do not depend on its batch
            assert a.expected == b.expected


@pytest.mark.slow
def test_planted_self_check_on_the_embedded_default():
    windows = corpus_windows(n_windows=4000, seed=0)
    for unit in planted_units():  # every rule occurs in the corpus sample, in enough windows
        assert sum(max(unit.activations(w)) > 0 for w in windows) >= 40, unit.name
    result = self_check(EmbeddingSimulator(), windows, split="valid", seed=0)
    print("\n" + format_self_check(result))
    assert result["mean_true"] >= 0.8
    assert result["mean_shuffled"] <= 0.1
    assert result["mean_others"] <= 0.1
    assert all(row["true"] > 0.25 for row in result["units"].values())
