"""Typed units across stages: `UnitId`, the one Arrow codec of the stage rows, the `Scorer` and
`UnitSource` interfaces in the registry, and the notebook call `autoexplain.api.score`, which gives the
score stage's numbers without Prefect, files or schemas."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from autoexplain import pipeline, registry, rows
from autoexplain.api import score
from autoexplain.components import Explainer, Scorer, Simulator
from autoexplain.errors import UserError
from autoexplain.layer import load_units
from autoexplain.records import Explanation, Simulation, UnitId
from autoexplain.score_simulation import SimulationScorer
from autoexplain.scoring import Score
from autoexplain.sources import MlpSource
from autoexplain.schemas import load_schema

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_notebook_snippet_runs():
    section = README.read_text(encoding="utf-8").split("### Use it from a notebook", 1)[1].split("\n### ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md:notebook", "exec"), {"__name__": "readme_notebook"})


def test_unit_id_names_its_source_and_orders_within_it():
    u = UnitId.mlp(15, 7, -1)
    assert u == UnitId("L15/mlp", 7, -1) and (u.layer, u.kind, str(u)) == (15, "mlp", "L15/mlp/7-")
    assert sorted([UnitId.mlp(3, 2), UnitId.mlp(3, 1, 1), UnitId.mlp(3, 1, -1)]) == \
        [UnitId.mlp(3, 1, -1), UnitId.mlp(3, 1, 1), UnitId.mlp(3, 2)]
    for bad in (dict(source="mlp", index=1), dict(source="L1/mlp", index=1, polarity=0)):
        with pytest.raises(ValueError):
            UnitId(**bad)


def test_the_codec_keeps_the_table_columns_and_round_trips():
    u = UnitId.mlp(4, 9, -1)
    explained = [rows.ExplanationRow(u, "explainer", "x", "h", "cats", ["cats", "dogs"], [0.5, 0.1], 3, 4)]
    sims = [rows.SimulationRow(u, "explainer", "toy", "", 12, "top", "test", [1.0, 2.0], None, 0, 0.0),
            rows.SimulationRow(u, "explainer", "toy", "", 13, "random", "calib", None, "no digits", 5, None)]
    for cls, typed in ((rows.ExplanationRow, explained), (rows.SimulationRow, sims)):
        table = rows.to_table(cls, typed)
        assert table.schema == load_schema(rows.SCHEMA_OF[cls])
        assert table.column("layer").to_pylist()[0] == 4 and table.column("polarity").to_pylist()[0] == -1
        assert rows.from_table(cls, table) == typed
        assert rows.to_table(cls, []).num_rows == 0


def test_registry_builds_scorers_and_unit_sources():
    assert isinstance(registry.make_scorer(), SimulationScorer) and registry.make_scorer("simulation").needs_simulations
    with pytest.raises(UserError, match="unknown scorer 'nope'"):
        registry.parse_scorer("nope")
    source = registry.make_source("mlp")
    assert isinstance(source, MlpSource)
    assert source.unit_ids(15, [7]) == [UnitId("L15/mlp", 7, 1), UnitId("L15/mlp", 7, -1)]
    with pytest.raises(UserError, match="unknown unit source .* use .mlp., .sae:PATH. or .transcoder:PATH."):
        registry.make_source("sae")

    class Length(Scorer):
        """A scorer that needs no simulation: the explanation's length, as one metric."""

        kind = name = "length"
        needs_simulations = False

        def score(self, explanation, records, simulations, *, n_boot=1000, seed=0):
            assert simulations is None
            return {"length": Score(float(len(explanation)), n_records=len(records))}

    registry.register_scorer(Length)
    try:
        assert registry.make_scorer("length").score("cats", [], None) == {"length": Score(4.0)}
    finally:
        registry.unregister("length")
    with pytest.raises(UserError):
        registry.parse_scorer("length")


class FirstWords(Explainer):
    kind = name = "first-words"

    def explain_records(self, units, k=4, temperature=1.0, max_tokens=60, chat=False):
        return [Explanation(recs[0].tokens[1].strip(), [r.tokens[1].strip() for r in recs[:k]], explainer=self.name)
                for recs in units]


class Names(Simulator):
    """Predictions that float32 holds exactly, as the simulations table stores them."""

    kind = name = "names"

    def simulate(self, explanation, records):
        return [Simulation([float(10 * (t.strip() == explanation)) + 0.25 * min(len(t), 8) for t in tokens]) for tokens in records]


def test_the_notebook_score_is_the_score_stage(tiny_records):
    records_dir, _ = tiny_records
    units = load_units(records_dir, 1, [0, 5])
    sim = Names()
    explanations = pipeline.explain_stage(units, FirstWords(), pipeline.ExplainConfig(k=3))
    chosen, sims = pipeline.simulate_stage(units, explanations, sim)
    table = pipeline.score_stage(units, sims, chosen, n_boot=50)
    texts = {r.unit: r.text for r in rows.from_table(rows.ExplanationRow, chosen) if r.method == pipeline.EXPLAINER}
    stage = [r for r in rows.from_table(rows.ScoreRow, table) if r.method == pipeline.EXPLAINER]
    for unit in units:
        mine = score(sim, texts[unit.id], unit, n_boot=50)
        theirs = {r.metric: Score(r.value, r.ci_low, r.ci_high, r.undefined_reason, r.n_records, r.n_failed)
                  for r in stage if r.unit == unit.id}
        assert mine == theirs


class _Counting(Simulator):
    kind = name = "counting"

    def __init__(self):
        self.calls = 0

    def simulate(self, explanation, records):
        self.calls += 1
        return [Simulation([0.0] * len(tokens)) for tokens in records]


def test_the_notebook_score_refuses_bad_calls_in_one_line_before_simulating(tiny_records):
    """n_boot 0 crashed inside the bootstrap (IndexError), a list of units with an AttributeError, a
    record with one activation too few counted as a failed simulation, and records outside the held-out
    splits gave only 'no records'."""
    from autoexplain.records import ActivationRecord

    unit = load_units(tiny_records[0], 1, [0])[0]
    short = ActivationRecord([" a", " b"], [1.0], 7, "top", "test")
    bad = {"n_boot must be a whole number of at least 1 \\(got 0\\)": (unit, 0),
           "one unit's records, and was given a list of 1 units": ([unit], 10),
           "record of window 7 has 2 tokens and 1 activations": ([*unit.records, short], 10),
           "none of the 1 records is held out for scoring": ([ActivationRecord([" a"], [1.0])], 10)}
    for message, (records, n_boot) in bad.items():
        sim = _Counting()
        with pytest.raises(UserError, match=message):
            score(sim, "a", records, n_boot=n_boot)
        assert sim.calls == 0, message
    assert score(_Counting(), "a", unit, n_boot=10)  # the unit itself scores
