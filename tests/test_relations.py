"""The relation channel: what an explanation says about where a unit fires, and the tokens that picks."""

from __future__ import annotations

import pytest

from autoexplain.relations import Relation, marks, parse
from autoexplain.surface import named_examples


def picked(explanation, tokens):
    relation = parse(explanation)
    assert relation is not None, explanation
    return [t for t, m in zip(tokens, marks(relation, tokens)) if m]


def test_parse_reads_relations_and_leaves_categories_alone():
    assert parse("the word right after 'son of'") == Relation("after", (("son", "of"),))
    assert parse('a number right before "years" or "days"') == Relation("before", (("years",), ("days",)), "number")
    assert parse("the object of 'took'").kind == "object"
    assert parse("what is given: the object right after 'gave'").kind == "object"
    assert parse("the word after a number") == Relation("after", (("#",),))
    assert parse("words inside double quotation marks").kind == "quoted"
    assert parse("the quotation marks themselves").kind == "quote_marks"
    assert parse("the second item of a list").kind == "list_2"
    for plain in ("animals", "the word 'God'", "words related to war, after the battle", "verbs in the past tense"):
        assert parse(plain) is None, plain


def test_marks_on_hand_made_tokens():
    tokens = [" Joshua", " the", " son", " of", " Nun", " took", " the", " sword", ";", " bread", ",", " wine",
              " and", " oil", ".", " He", " said", " \"", "go", " home", "\".", " 7", " days", " passed"]
    assert picked("the word after 'son of'", tokens) == [" Nun"]
    assert picked("the word right before 'son of'", tokens) == [" the"]
    assert picked("the object of 'took'", tokens) == [" sword"]  # past the determiner
    assert picked("the word after 'took'", tokens) == [" the"]
    assert picked("the second item of a list", tokens) == [" wine"]
    assert picked("the last item of a list", tokens) == [" oil"]
    assert picked("words inside quotation marks", tokens) == ["go", " home"]
    assert picked("the quotation marks themselves", tokens) == [" \"", "\"."]
    assert picked("the first word of each sentence", tokens) == [" He", " 7"]
    assert picked("what is counted: the word right after a number", tokens) == [" days"]
    assert picked("a number right before 'days'", tokens) == [" 7"]
    assert picked("the name right after 'son of'", [" son", " of", " man", " son", " of", " Nun"]) == [" Nun"]


def test_named_examples():
    assert named_examples("metals such as gold, silver and iron") == {"gold", "silver", "iron"}
    assert named_examples("family (father, mother, son)") == {"father", "mother", "son"}
    assert named_examples("war: swords, the battle of Jericho and armies") == {"swords", "armies"}  # single words only
    assert named_examples("animals") == set()


def test_the_simulators_code_identity_reaches_the_relation_channel():
    from autoexplain.identity import closure
    from autoexplain.layer import run_simulate

    assert {"autoexplain.embedding", "autoexplain.relations", "autoexplain.surface"} <= set(closure(run_simulate))


@pytest.mark.slow
def test_embedding_simulator_reads_relations_and_examples():
    from autoexplain.embedding import EmbeddingSimulator

    tokens = [" Joshua", " the", " son", " of", " Nun", " took", " gold", " and", " iron", ";", " the", " son",
              " of", " Jesse", " wept", "."]
    sim, before = EmbeddingSimulator(), EmbeddingSimulator(relations=False)
    assert sim.name != before.name and "relations=off" in before.name
    after = sim.simulate("the word right after 'son of'", [tokens])[0].expected
    assert [t for t, v in zip(tokens, after) if v > 0] == [" Nun", " Jesse"]
    metals = sim.simulate("metals such as gold and iron", [tokens])[0].expected
    assert metals[6] == metals[8] == 10.0
    # Before, the quoted anchor itself fired, as the word 'son' does.
    old = before.simulate("the word right after 'son of'", [tokens])[0].expected
    assert old[2] == 10.0 and old[4] < 10.0
