"""The synthetic-neuron suite: its data, its split, its rules on hand-made tokens, and the measure."""

from __future__ import annotations

import math

import pytest

from autoexplain.suite import FALSE_KINDS, activations, pairwise_accuracy, split_of, suite_rules


def fired(spec, tokens):
    return [t for t, a in zip(tokens, activations(spec, tokens)) if a > 0]


def test_suite_loads_with_enough_rules_and_hard_false_explanations():
    rules = suite_rules()
    assert len(rules) >= 60
    assert {r.family for r in rules} == {"lexical", "semantic", "surface", "context"}
    assert sum(r.family == "context" for r in rules) >= 15
    for r in rules:
        assert len(r.false) >= 3 and set(r.false) <= set(FALSE_KINDS), r.name
        assert r.true not in r.false.values() and len(set(r.false.values())) == len(r.false), r.name
    kinds = [k for r in rules for k in r.false]
    assert all(kinds.count(k) >= 50 for k in FALSE_KINDS)  # every kind is well represented


def test_split_is_stable_disjoint_and_blind_to_order():
    rules = suite_rules()
    dev, held = suite_rules("dev"), suite_rules("heldout")
    assert {r.name for r in dev}.isdisjoint({r.name for r in held})
    assert len(dev) + len(held) == len(rules) and min(len(dev), len(held)) >= 25
    # The split is a function of the name alone (a salted sha256): pinned for a few names, so an
    # edit that would redraw the halves fails here.
    assert [split_of(n) for n in ("family", "metals", "lord", "quoted", "list_second")] == \
        ["heldout", "dev", "dev", "heldout", "dev"]
    assert all(r.half == split_of(r.name) for r in rules)


def test_lexical_and_semantic_rules_on_whole_words():
    tokens = [" The", " sm", "it", "ten", " father", " gave", " his", " sons", " gold", ",", " God", "'s", " word"]
    assert fired({"kind": "words", "words": ["father", "sons"]}, tokens) == [" father", " sons"]
    assert fired({"kind": "words", "words": ["smitten"]}, tokens) == [" sm", "it", "ten"]  # every piece of the word
    assert fired({"kind": "words", "words": ["it"]}, tokens) == []  # a piece is not the word
    assert fired({"kind": "suffix", "suffix": "ten"}, tokens) == [" sm", "it", "ten"]
    assert fired({"kind": "cased", "words": ["God"]}, tokens) == [" God"]


def test_after_and_before_rules():
    tokens = [" Joshua", " the", " son", " of", " Nun", " and", " the", " son", " of", " man", ".",
              " In", " ", "1", "8", "5", "4", " the", " king", " of", " Egypt", " died"]
    assert fired({"kind": "after", "phrase": ["son", "of"]}, tokens) == [" Nun", " man"]
    assert fired({"kind": "before", "phrase": ["the", "son"]}, tokens) == [" Joshua", " and"]
    # the blank token before the digits is no word: 'in' is right before the year
    assert fired({"kind": "after", "phrase": ["in"], "pattern": r"1[5-9]\d\d"}, tokens) == ["1", "8", "5", "4"]
    assert fired({"kind": "after", "phrase": ["king", "of"], "words": ["israel"]}, tokens) == []


def test_quotation_parenthesis_and_sentence_rules():
    tokens = [" He", " said", " \"", "the", " end", "\".", " It", " (", "born", " 1854", ")", " ended", ".", " And",
              " then", " \"", "open"]
    # the last quotation is never closed in the window: not known to be inside
    assert fired({"kind": "quoted"}, tokens) == ["the", " end"]
    assert fired({"kind": "parens"}, tokens) == ["born"]  # '1854' is a number, not a word
    assert fired({"kind": "sentence_first"}, tokens) == [" It", " And"]
    assert fired({"kind": "sentence_last"}, tokens) == [" ended"]
    # not the window's first word (its sentence may start there), nor a sentence's first
    assert fired({"kind": "capital_inside"}, tokens + [" to", " Moses", ".", " Then"]) == [" Moses"]


def test_list_items_and_verb_objects():
    tokens = [" bread", ",", " wine", ",", " oil", " and", " salt", " were", " red", ",", " blue", " or", " green",
              ";", " he", " took", " the", " sword", " and", " took", " away", " bread"]
    assert fired({"kind": "list_item", "item": 2}, tokens) == [" wine", " blue"]
    assert fired({"kind": "list_item", "item": -1}, tokens) == [" salt", " green"]
    assert fired({"kind": "list_item", "item": 1}, tokens) == [" bread", " red"]
    # past determiners to the object; 'away' is no object
    assert fired({"kind": "object", "verbs": ["took"], "not": ["away"]}, tokens) == [" sword"]


def test_number_and_repetition_rules():
    tokens = [" seven", " days", " and", " 2", ",", "000", " men", ";", " the", " people", " of", " the", " people"]
    assert fired({"kind": "after_number"}, tokens) == [" days", " men"]
    assert fired({"kind": "number_before", "words": ["men"]}, tokens) == ["000"]
    assert fired({"kind": "repeated", "min_len": 5}, tokens) == [" people"] and \
        activations({"kind": "repeated"}, tokens)[9] == 0 and activations({"kind": "repeated"}, tokens)[12] == 10


def test_unknown_rule_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown rule kind"):
        activations({"kind": "nope"}, [" a"])


def test_pairwise_accuracy_by_hand():
    assert pairwise_accuracy(0.8, [0.1, 0.9, 0.3, 0.8]) == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert pairwise_accuracy(0.5, [float("nan"), 0.2]) == 1.0  # an undefined false score loses
    assert pairwise_accuracy(float("nan"), [0.1, float("nan")]) == pytest.approx(0.25)
    assert math.isnan(pairwise_accuracy(0.5, []))


def test_every_rule_fires_on_the_corpus_sample():
    from autoexplain.planted import corpus_windows

    windows = corpus_windows(n_windows=1000, seed=0)
    for r in suite_rules():
        assert sum(max(r.activations(w)) > 0 for w in windows) >= 8, r.name
