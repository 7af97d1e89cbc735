"""The fast contract path against Great Expectations itself, expectation by expectation.

For every suite: its valid table passes both ways; then, for every expectation, a frame that breaks
just that one, and frames with a null / NaN / boundary value in its column. On each, every
expectation the fast path decides must get GX's verdict and unexpected count, and `validate` on a
breaking table must give exactly the report forced GX gives.
"""

from __future__ import annotations

import math

import polars as pl
import pyarrow as pa
import pytest

from autoexplain.schemas.contract_fast import Verdict, condition_mask, evaluate, passes
from autoexplain.schemas.contract_gx import run_gx
from autoexplain.schemas.contracts import ENGINE_ENV, _check_schema, _derive, _fill, load_suite, validate
from autoexplain.schemas.contract_report import ROWS, ContractReport
from tests.test_contracts import VALID, _table

NAN = float("nan")


def _valid(suite: str) -> tuple[pa.Table, dict]:
    """The valid table of tests/test_contracts.py; scores also gets a classifier metric, so that
    the [0, 1] rule on them has a row to break."""
    rows, params = VALID[suite]
    rows = rows()
    if suite == "scores":
        rows.append({**rows[-1], "metric": "detection_auc@random", "value": 0.6})
    return _table(rows, suite), params


def _frames(suite: str, table: pa.Table, params: dict) -> dict[str, tuple[pl.DataFrame, list[dict], list[str]]]:
    """The frames `validate` hands to the checkers, with their expectations and id columns."""
    spec = load_suite(suite)
    merged = {**spec.get("params", {}), **params}
    exps = [_fill(e, merged) for e in spec["expectations"]]
    report = ContractReport(suite=suite, success=True, n_rows=table.num_rows, n_expectations=len(exps), params=merged)
    table, fatal = _check_schema(table, spec.get("schema"), report)
    assert not fatal
    frames, _, ids = _derive(pl.from_arrow(table), spec.get("derive", []), spec.get("id_columns", []))
    return {name: (frames[name], [e for e in exps if e.get("frame", ROWS) == name], ids[name]) for name in frames}


def _agree(frame: pl.DataFrame, exps: list[dict], ids: list[str]) -> tuple[list[Verdict], list[dict]]:
    """Fast and GX verdicts on one frame; every verdict the fast path gives matches GX's."""
    fast, gx = evaluate(frame, exps), run_gx("test", "frame", frame, exps, ids)
    for e, f, g in zip(exps, fast, gx):
        if f.success is None:
            continue
        assert f.success == g["success"], (e, f, g)
        if f.unexpected_count is not None:
            assert f.unexpected_count == g["result"].get("unexpected_count"), (e, f, g)
    assert passes(frame, exps) == all(g["success"] for g in gx) or any(f.success is None for f in fast)
    return fast, gx


def _set(frame: pl.DataFrame, column: str, row: int, value) -> pl.DataFrame:
    values = frame[column].to_list()
    values[row] = value
    return frame.with_columns(pl.Series(column, values, dtype=frame.schema[column], strict=False))


def _rows_in_domain(frame: pl.DataFrame, kw: dict, column: str | None = None) -> list[int]:
    mask = condition_mask(frame, kw["row_condition"]) if kw.get("row_condition") else pl.Series([True] * frame.height)
    if column is not None:
        mask = mask & frame[column].is_not_null()
    return [i for i, ok in enumerate(mask.to_list()) if ok]


def _breaks(frame: pl.DataFrame, e: dict) -> pl.DataFrame | None:
    """`frame` changed so that expectation `e` fails (None when the valid table gives no row to change)."""
    kw, etype = e["kwargs"], e["expectation_type"]
    col = kw.get("column")
    rows = _rows_in_domain(frame, kw)
    if etype == "expect_column_unique_value_count_to_be_between":
        n = kw["max_value"] + 1
        fresh = [f"v{i}" if frame.schema[col] == pl.String else i for i in range(frame.height)]
        return frame.with_columns(pl.Series(col, fresh, dtype=frame.schema[col])) if frame.height >= n else None
    if not rows:
        return None
    r = rows[0]
    if etype == "expect_column_values_to_not_be_null":
        return _set(frame, col, r, None)
    if etype == "expect_column_values_to_be_null":
        return _set(frame, col, r, "x" if frame.schema[col] == pl.String else 1)
    if etype == "expect_column_values_to_be_between":
        integer = frame.schema[col].is_integer()
        if kw.get("max_value") is not None:
            v = kw["max_value"] if kw.get("strict_max") else (math.floor(kw["max_value"]) + 1 if integer
                                                              else kw["max_value"] + 0.5)
        else:
            v = kw["min_value"] if kw.get("strict_min") else (math.ceil(kw["min_value"]) - 1 if integer
                                                              else kw["min_value"] - 0.5)
        return _set(frame, col, r, v)
    if etype == "expect_column_values_to_be_in_set":
        values = kw["value_set"]
        return _set(frame, col, r, "not-in-the-set" if isinstance(values[0], str) else max(values) + 1)
    if etype == "expect_column_values_to_not_be_in_set":
        return _set(frame, col, r, kw["value_set"][0])
    if etype == "expect_column_pair_values_a_to_be_greater_than_b":
        b = frame[kw["column_B"]][r]
        return _set(frame, kw["column_A"], r, (b if b is not None else 0) - 1) if b is not None else \
            _set(_set(frame, kw["column_B"], r, 1), kw["column_A"], r, 0)
    if etype == "expect_column_values_to_be_unique":
        rows = _rows_in_domain(frame, kw, col)
        return _set(frame, col, rows[1], frame[col][rows[0]]) if len(rows) > 1 else None
    if etype == "expect_compound_columns_to_be_unique":
        if len(rows) < 2:
            return None
        for c in kw["column_list"]:
            frame = _set(frame, c, rows[1], frame[c][rows[0]])
        return frame
    raise AssertionError(f"no breaker for {etype}")


def _edges(frame: pl.DataFrame, e: dict) -> list[pl.DataFrame]:
    """The frame with a null, a NaN (float columns) and the exact bound (between) in e's column."""
    kw = e["kwargs"]
    col = kw.get("column") or kw.get("column_A") or kw["column_list"][0]
    rows = _rows_in_domain(frame, kw)
    if not rows:
        return []
    r = rows[-1]
    out = [_set(frame, col, r, None)]
    if frame.schema[col].is_float():
        out.append(_set(frame, col, r, NAN))
    if e["expectation_type"] == "expect_column_values_to_be_between":
        out += [_set(frame, col, r, kw[k]) for k in ("min_value", "max_value") if kw.get(k) is not None]
    return out


CASES = [(suite, frame, i) for suite in sorted(VALID)
         for frame, (_, exps, _) in _frames(suite, *_valid(suite)).items()
         for i in range(len(exps))]


@pytest.mark.parametrize("suite", sorted(VALID))
def test_valid_frames_pass_both_ways(suite):
    for frame, exps, ids in _frames(suite, *_valid(suite)).values():
        fast, gx = _agree(frame, exps, ids)
        assert all(f.success is True for f in fast), [(e, f) for e, f in zip(exps, fast) if f.success is not True]
        assert all(g["success"] for g in gx)


@pytest.mark.parametrize(("suite", "frame_name", "index"), CASES, ids=[f"{s}-{f}-{i}" for s, f, i in CASES])
def test_each_expectation_broken_and_at_its_edges(suite, frame_name, index):
    frame, exps, ids = _frames(suite, *_valid(suite))[frame_name]
    e = exps[index]
    broken = _breaks(frame, e)
    if broken is None:
        pytest.skip(f"the valid {suite} table has no row in the domain of {e}")
    fast, gx = _agree(broken, exps, ids)
    assert not gx[index]["success"], f"the breaker did not break {e}"
    assert fast[index].success is False  # modelled, not left to GX
    for edge in _edges(frame, e):
        _agree(edge, exps, ids)


@pytest.mark.parametrize(("suite", "frame_name", "index"), [c for c in CASES if c[1] == ROWS],
                         ids=[f"{s}-{i}" for s, f, i in CASES if f == ROWS])
def test_validate_on_a_breaking_table_reports_as_gx(suite, frame_name, index, monkeypatch):
    table, params = _valid(suite)
    frame, exps, _ = _frames(suite, table, params)[frame_name]
    broken = _breaks(frame, exps[index])
    changed = [c for c in table.column_names if c in frame.columns and broken is not None
               and not broken[c].equals(frame[c], null_equal=True)]
    if broken is None or not changed:
        pytest.skip("breaks a derived column only; the frame-level test covers it")
    for c in changed:
        table = table.set_column(table.column_names.index(c), c,
                                 broken[c].to_arrow().cast(table.schema.field(c).type))
    fast = validate(table, suite, params)
    monkeypatch.setenv(ENGINE_ENV, "gx")
    gx = validate(table, suite, params)
    assert not gx.success
    assert fast.to_dict() == gx.to_dict()


def test_an_unknown_engine_is_refused_not_taken_for_the_fast_path(monkeypatch):
    from autoexplain.errors import UserError
    from autoexplain.preflight import explain_layer

    table, params = _valid("scores")
    monkeypatch.setenv(ENGINE_ENV, "GX")
    with pytest.raises(UserError, match="is not a contract engine"):
        validate(table, "scores", params)
    with pytest.raises(UserError, match="AUTOEXPLAIN_CONTRACTS='GX'"):
        explain_layer({"tokens": 1})  # a flow's parameters: refused before the model is read
    monkeypatch.setenv(ENGINE_ENV, "fast")
    assert validate(table, "scores", params).success


EDGE = pl.DataFrame({"f": [0.0, 1.0, NAN, None, -0.0, 2.0], "i": [1, 2, None, 4, 5, 6],
                     "s": ["a", None, "b", "a", "c", "d"], "g": [1.0, None, None, 3.0, NAN, 1.0],
                     "h": [None] * 6}, schema_overrides={"h": pl.Float64})


def _e(etype: str, **kwargs) -> dict:
    return {"expectation_type": f"expect_{etype}", "kwargs": kwargs}


EDGE_EXPS = [
    _e("column_values_to_be_between", column="f", min_value=0, max_value=2),
    _e("column_values_to_be_between", column="f", min_value=0, max_value=2, strict_max=True),
    _e("column_values_to_be_between", column="f", min_value=0, strict_min=True),
    _e("column_values_to_be_between", column="i", min_value=1.5),
    _e("column_values_to_be_unique", column="f"),  # 0.0 and -0.0 are one value to pandas
    _e("column_values_to_be_unique", column="g"),  # NaN and null are ignored, 1.0 repeats
    _e("column_values_to_be_in_set", column="i", value_set=[1, 2, 4, 5, 6.0]),
    _e("column_values_to_not_be_in_set", column="s", value_set=["d"]),
    _e("column_values_to_not_be_null", column="f"),  # NaN counts as null
    _e("column_values_to_be_null", column="h"),
    _e("column_values_to_be_null", column="g", row_condition={"column": "s", "op": "!=", "value": "a"}),
    _e("column_values_to_not_be_null", column="g", row_condition={"column": "s", "op": "not_in", "value": ["a", "d"]}),
    _e("column_values_to_not_be_null", column="g", row_condition={"column": "f", "op": ">=", "value": 1}),
    _e("column_values_to_not_be_null", column="g", row_condition={
        "any": [{"column": "f", "op": "is_null"}, {"column": "s", "op": "==", "value": "d"}]}),
    _e("column_values_to_not_be_null", column="g", row_condition={
        "type": "comparison", "column": {"name": "i"}, "operator": "NOT_IN", "parameter": [2, 5]}),
    _e("compound_columns_to_be_unique", column_list=["g", "h"]),  # (1.0, null) twice: duplicates
    _e("compound_columns_to_be_unique", column_list=["s", "g"]),
    _e("column_pair_values_a_to_be_greater_than_b", column_A="i", column_B="f"),
    _e("column_pair_values_a_to_be_greater_than_b", column_A="i", column_B="g", or_equal=True,
       ignore_row_if="either_value_is_missing"),
    _e("column_unique_value_count_to_be_between", column="f", max_value=3),
    _e("column_unique_value_count_to_be_between", column="f", max_value=2),
]


def test_null_nan_condition_and_bound_edges_agree_with_gx():
    fast, gx = _agree(EDGE, EDGE_EXPS, [])
    assert all(f.success is not None for f in fast)
    assert {True, False} <= {g["success"] for g in gx}  # the table exercises both verdicts


def test_what_the_fast_path_does_not_model_goes_to_gx():
    unknown = [_e("column_values_to_be_between", column="f", min_value=0, mostly=0.5),
               _e("column_values_to_match_regex", column="s", regex="a"),
               _e("column_values_to_be_between", column="s", min_value=0),
               _e("column_values_to_be_in_set", column="s", value_set=[1]),
               _e("column_values_to_be_in_set", column="s", value_set="abcd"),  # a string is no set
               _e("column_values_to_be_between", column="f", max_value=NAN),  # polars orders NaN last
               _e("column_values_to_not_be_null", column="g", row_condition={"column": "f", "op": "in",
                                                                             "value": [NAN]}),
               _e("column_values_to_be_null", column="nope"),
               _e("column_values_to_be_null", column="f", row_condition={"type": "pass_through",
                                                                        "pass_through_filter": "f > 0"})]
    assert all(v.success is None for v in evaluate(EDGE, unknown))
    assert not passes(EDGE, unknown[:1])


@pytest.mark.parametrize("suite", sorted(VALID))
def test_an_empty_table_reports_as_gx(suite, monkeypatch):
    table, params = _valid(suite)
    table = table.slice(0, 0)
    fast = validate(table, suite, params)
    monkeypatch.setenv(ENGINE_ENV, "gx")
    assert fast.to_dict() == validate(table, suite, params).to_dict()
