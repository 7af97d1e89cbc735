"""Data contracts: each suite passes a valid table and names each specific violation in one line."""

from __future__ import annotations

import json
import math

import polars as pl
import pyarrow as pa
import pytest

from autoexplain.schemas import load_schema
from autoexplain.schemas.contracts import ContractError, ContractViolation, check, validate

T = 8  # window length for the small tables
SPLITS = ("train", "calib", "valid", "test")


def _table(rows: list[dict], name: str) -> pa.Table:
    """Rows -> a table of the schema; a non-nullable column the rows leave out gets a neutral value."""
    schema = load_schema(name)
    fill = {f.name: _neutral(f.type) for f in schema if not f.nullable}
    return pa.Table.from_pylist([{**{k: v for k, v in fill.items() if k not in r}, **r} for r in rows], schema=schema)


def _neutral(t: pa.DataType):
    if pa.types.is_list(t):
        return []
    if pa.types.is_string(t):
        return "x"
    return 0


def windows_rows(n: int = 6) -> list[dict]:
    return [{"window_id": w, "doc_id": w // 2, "token_ids": list(range(w, w + T)),
             "tokens": [f"t{i}" for i in range(T)]} for w in range(n)]


def records_rows(units=(0, 1), n_top: int = 4, n_random: int = 3) -> list[dict]:
    rows = []
    for unit in units:
        for polarity in (1, -1):
            wid = 0
            for r in range(n_top):
                rows.append(_record(unit, polarity, "top", SPLITS[r % 4], r, None, wid))
                wid += 1
            for r in range(n_random):
                rows.append(_record(unit, polarity, "random", SPLITS[1 + r % 3], r, None, wid))
                wid += 1
            rows.append(_record(unit, polarity, "quantile", "train", 0, 2, wid))
    return rows


def _record(unit, polarity, kind, split, rank, qbin, wid) -> dict:
    acts = [float((wid + i) % 5) for i in range(T)]
    return {"layer": 3, "unit": unit, "polarity": polarity, "kind": kind, "split": split, "rank": rank,
            "quantile_bin": qbin, "window_id": wid, "max_activation": max(acts), "activations": acts}


def explanation_rows() -> list[dict]:
    return [{"layer": 3, "unit": u, "polarity": p, "method": m, "explainer": "x", "prompt_hash": "h",
             "text": f"the word 'cat' ({m})", "candidates": ["a"], "candidate_valid_scores": [0.5],
             "prompt_tokens": 10, "completion_tokens": 5}
            for u in (0, 1) for p in (1, -1) for m in ("explainer", "token-lookup")]


def simulation_rows() -> list[dict]:
    return [{"layer": 3, "unit": 0, "polarity": 1, "method": "explainer", "simulator": "s", "prompt_hash": "h",
             "window_id": w, "kind": "top", "split": "test", "expected": [float(i % 11) for i in range(T)],
             "failure": None} for w in range(4)] + [
            {"layer": 3, "unit": 0, "polarity": 1, "method": "explainer", "simulator": "s", "prompt_hash": "h",
             "window_id": 9, "kind": "random", "split": "test", "expected": None, "failure": "no digits"}]


def score_rows() -> list[dict]:
    base = {"layer": 3, "unit": 0, "polarity": 1, "method": "explainer", "simulator": "s", "split": "test",
            "ci_low": None, "ci_high": None, "undefined_reason": None, "n_records": 10, "n_failed": 0,
            "explainer_tokens": 100, "simulator_tokens": 200}
    return [
        {**base, "metric": "top_and_random", "value": 0.4, "ci_low": 0.2, "ci_high": 0.6},
        {**base, "metric": "random_only", "value": -0.1},
        {**base, "metric": "calibrated_r2", "value": -35.0, "ci_low": -80.0, "ci_high": -1.0},
        {**base, "metric": "calibrated_abs_dev_explained", "value": None, "undefined_reason": "constant activations"},
        {**base, "metric": "detection_auc", "value": 0.75},
    ]


def classification_rows() -> list[dict]:
    base = {"layer": 3, "unit": 0, "polarity": 1, "method": "explainer", "scorer": "detection:x", "prompt": 0,
            "tokens": 12, "dollars": None, "failure": None, "p_one": 0.7}
    return [{**base, "negatives": "random", "window_id": 1, "label": 1, "prediction": 1},
            {**base, "negatives": "similar", "window_id": 2, "label": 0, "prediction": 0},
            {**base, "negatives": "random", "window_id": 3, "label": 2, "prediction": None, "p_one": None,
             "failure": "request failed: timeout"}]


def negatives_rows() -> list[dict]:
    return [{"unit": u, "polarity": p, "kind": k, "window_id": 100 + 10 * r + u, "rank": r,
             "similarity": 0.8 - 0.1 * r if k == "similar" else 1.2 - 0.2 * r, "max_activation": 0.1}
            for u in (0, 1) for p in (1, -1) for k in ("similar", "cofiring") for r in range(3)]


def word_vector_rows() -> list[dict]:
    return [{"word": w, "vector": [0.6, 0.8, 0.0] if i % 2 else [0.0, 0.0, -1.0]}
            for i, w in enumerate(("cat", "dog", "mill", "river"))]


def stats_rows() -> list[dict]:
    return [{"layer": 3, "unit": u, "polarity": p, "n_tokens": 800, "frac_active": 0.25} for u in (0, 1) for p in (1, -1)]


VALID = {
    "windows": (windows_rows, {"window_len": T}),
    "records": (records_rows, {"window_len": T, "max_exemplars": 4, "min_random": 3}),
    "explanations": (explanation_rows, {}),
    "simulations": (simulation_rows, {"window_len": T}),
    "scores": (score_rows, {}),
    "classifications": (classification_rows, {}),
    "unit_stats": (stats_rows, {}),
    "negatives": (negatives_rows, {"max_rank": 2, "active_fraction": 0.5}),
    "word_vectors": (word_vector_rows, {}),
}


@pytest.mark.parametrize("suite", sorted(VALID))
def test_valid_tables_pass(suite):
    rows, params = VALID[suite]
    report = check(_table(rows(), suite), suite, params)
    assert report.success and not report.failures
    assert report.n_rows == len(rows())
    json.dumps(report.to_dict())
    assert "passed" in report.to_markdown()


def test_polars_input_passes():
    df = pl.from_arrow(_table(records_rows(), "records"))
    assert validate(df, "records", VALID["records"][1]).success


def _fails(rows: list[dict], suite: str, *needles: str) -> list[str]:
    """Validate, expect failure, and return the lines; each needle must appear in one line."""
    params = VALID[suite][1]
    with pytest.raises(ContractViolation) as info:
        check(_table(rows, suite), suite, params)
    report = info.value.report
    assert not report.success
    text = "\n".join(report.failures)
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    assert str(info.value).startswith(f"{suite}: ")
    json.dumps(report.to_dict())
    assert "FAILED" in report.to_markdown()
    return report.failures


def _one(lines: list[str], needle: str) -> str:
    found = [line for line in lines if needle in line]
    assert found, lines
    return found[0]


# --- records ---------------------------------------------------------------------------------------


def test_nan_in_activations():
    rows = records_rows()
    rows[2]["activations"][3] = math.nan
    line = _one(_fails(rows, "records"), "n_nonfinite_activations")
    assert line.startswith("records: 1 of ") and "activations are finite" in line and "examples: 1" in line


def test_activations_length():
    rows = records_rows()
    rows[0]["activations"] = rows[0]["activations"][:5]
    rows[1]["activations"] = rows[1]["activations"] + [0.0]
    line = _one(_fails(rows, "records"), "n_activations")
    assert f"2 of {len(rows)} rows break 'activations length == {T}'" in line
    assert "expect_column_values_to_be_between" in line and "5" in line and str(T + 1) in line


def test_unit_with_too_many_exemplars_and_one_with_few():
    # A unit that fires in fewer windows than top_k has fewer top records: that passes.
    few = [r for r in records_rows() if not (r["unit"] == 0 and r["kind"] == "top" and r["rank"] == 3)]
    assert check(_table(few, "records"), "records", VALID["records"][1]).success
    rows = records_rows() + [_record(1, -1, "top", "train", 4, None, 50)]
    line = _one(_fails(rows, "records"), "n_top")
    assert "1 of 4 units break 'each unit has at most 4 top exemplars'" in line and "examples: 5" in line


def test_window_in_two_splits_of_one_unit():
    rows = records_rows()
    leak = dict(rows[0], split="valid", rank=9)  # unit 0, +1: window 0 is already in train
    lines = _fails(rows + [leak], "records")
    line = _one(lines, "splits are disjoint")
    assert "expect_compound_columns_to_be_unique on (layer, unit, polarity, window_id)" in line
    assert "window_id=0" in line


def test_random_record_in_train():
    rows = records_rows()
    random_row = next(r for r in rows if r["kind"] == "random")
    random_row["split"] = "train"
    line = _one(_fails(rows, "records"), "random records are never in train")
    assert "where kind == random" in line and "'train'" in line


def test_records_schema_problems():
    table = _table(records_rows(), "records").drop_columns(["activations"])
    lines = _fails_table(table, "records")
    assert any("column 'activations' is missing" in line for line in lines)


def _fails_table(table, suite):
    report = validate(table, suite, VALID[suite][1])
    assert not report.success
    return report.failures


def test_window_len_parameter_is_used():
    report = validate(_table(records_rows(), "records"), "records", {"window_len": T + 1})
    assert not report.success and any(f"activations length == {T + 1}" in x for x in report.failures)


# --- windows ---------------------------------------------------------------------------------------


def test_windows_violations():
    rows = windows_rows()
    rows[1]["token_ids"] = rows[1]["token_ids"][:-1]
    rows[2]["window_id"] = rows[3]["window_id"]
    lines = _fails(rows, "windows", f"token_ids length == {T}", "each window_id appears once")
    assert _one(lines, "token_ids length").startswith("windows: 1 of 6 rows")


# --- explanations ----------------------------------------------------------------------------------


def test_empty_explanation():
    rows = explanation_rows()
    rows[0]["text"] = ""
    rows[1]["text"] = "   "
    line = _one(_fails(rows, "explanations"), "not empty or blank")
    assert "2 of 8 rows" in line and "text_stripped_len" in line


def test_overlong_explanation():
    rows = explanation_rows()
    rows[3]["text"] = "x" * 301
    line = _one(_fails(rows, "explanations"), "at most 300 characters")
    assert "examples: 301" in line


def test_duplicate_explanation():
    rows = explanation_rows()
    lines = _fails(rows + [dict(rows[0], text="another")], "explanations")
    line = _one(lines, "one explanation per unit, polarity and method")
    assert "method='explainer'" in line


# --- simulations -----------------------------------------------------------------------------------


def test_simulation_out_of_range():
    rows = simulation_rows()
    rows[0]["expected"][2] = 10.5
    rows[1]["expected"][0] = -1.0
    lines = _fails(rows, "simulations", "expected values are in [0, 10]")
    assert "10.5" in _one(lines, "max_expected") and "-1" in _one(lines, "min_expected")


def test_simulation_wrong_length():
    rows = simulation_rows()
    rows[0]["expected"] = rows[0]["expected"][:3]
    line = _one(_fails(rows, "simulations"), f"expected length == {T}")
    assert "examples: 3" in line


def test_simulation_failure_without_reason():
    rows = simulation_rows()
    rows[-1]["failure"] = None
    line = _one(_fails(rows, "simulations"), "gives its failure reason")
    assert line.startswith("simulations: 1 of 1 rows where n_expected is null break")


# --- scores ----------------------------------------------------------------------------------------


def test_score_out_of_range():
    rows = score_rows()
    rows[0]["value"], rows[0]["ci_high"] = 1.5, 1.6
    rows[4]["value"] = -0.2
    lines = _fails(rows, "scores", "correlation is in [-1, 1]", "AUC is in [0, 1]")
    assert "1.5" in _one(lines, "correlation") and "-0.2" in _one(lines, "AUC")


def test_score_null_without_reason():
    rows = score_rows()
    rows[1]["value"] = None
    line = _one(_fails(rows, "scores"), "unless undefined_reason says why")
    assert "where undefined_reason is null" in line


def test_score_nan_without_reason_and_value_with_reason():
    rows = score_rows()
    rows[1]["value"] = math.nan
    rows[2]["undefined_reason"] = "because"
    _fails(rows, "scores", "unless undefined_reason says why", "an undefined score has no value")


def test_score_outside_its_ci():
    rows = score_rows()
    rows[0]["ci_low"] = 0.5
    _fails(rows, "scores", "ci_low <= value")


# --- classifications and unit statistics ----------------------------------------------------------


def test_classification_violations():
    rows = classification_rows()
    rows[0]["negatives"], rows[1]["label"] = "nearby", -1
    rows[2]["failure"] = None
    _fails(rows, "classifications", "negatives are random, similar, cofiring or active",
           "a label is 0, 1 or an intruder's position", "a trial with neither a prediction nor P(1) gives its failure reason")


def test_unit_stats_violations():
    rows = stats_rows()
    rows[0]["frac_active"], rows[1]["polarity"] = 1.5, 1
    _fails(rows, "unit_stats", "frac_active is in [0, 1]", "one row per unit and polarity")


# --- hard negatives and word vectors --------------------------------------------------------------


def test_negatives_violations():
    rows = negatives_rows()
    rows[0]["kind"], rows[1]["rank"], rows[2]["similarity"] = "nearby", 3, 1.5
    rows[5]["similarity"] = 0.2  # a co-firing partner below the active fraction
    rows[6]["window_id"] = rows[7]["window_id"]
    rows[8]["max_activation"] = math.nan
    _fails(rows, "negatives", "kind is similar or cofiring", "rank is in [0, 2]", "a cosine similarity is in [-1, 1]",
           "a co-firing partner is active (at least 0.5 of its top)", "no window twice among a unit's negatives",
           "max_activation is defined")


def test_word_vector_violations():
    rows = word_vector_rows()
    rows[0]["vector"] = [0.6, 0.8, math.nan]
    rows[1]["vector"] = [3.0, 4.0, 0.0]
    rows[2]["word"] = "  "
    rows[3]["vector"] = [1.0]
    lines = _fails(rows + [dict(rows[1], word="dog")], "word_vectors", "vector values are finite",
                   "vectors have unit length", "a word is not empty or blank", "every vector has the same length",
                   "each word appears once")
    assert "'dog'" in _one(lines, "unit length") and "5" in _one(lines, "unit length")


# --- API -------------------------------------------------------------------------------------------


def test_unknown_suite_and_missing_param():
    with pytest.raises(ContractError):
        validate(_table(score_rows(), "scores"), "nope")
    with pytest.raises(ContractError, match="window_len"):
        from autoexplain.schemas import contracts

        contracts._fill({"x": "$window_len"}, {})
