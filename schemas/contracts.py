"""Data contracts: Great Expectations suites, kept as JSON data, checked at every stage boundary.

    report = validate(table, "records", {"window_len": 64, "max_exemplars": 4})
    check(table, "records", params)   # raises ContractViolation(report) when anything fails

`table` is a `pyarrow.Table` or a `polars.DataFrame`. A suite lives in
`schemas/expectations/<suite>.json`:

    {
      "suite": "records",
      "schema": "records",                  # the table schema (schemas/<schema>.json) it must match
      "params": {"window_len": 64},         # defaults; `validate(..., params)` overrides them
      "id_columns": ["layer", "unit"],      # what names a row in the failure lines
      "derive": [ ... ],                    # scalar columns and grouped frames computed first
      "expectations": [
        {"expectation_type": "expect_column_values_to_be_between",
         "kwargs": {"column": "n_activations", "min_value": "$window_len", "max_value": "$window_len"},
         "description": "activations hold one value per window token ($window_len)",
         "frame": "rows"}                   # optional: "rows" (default) or a group_by frame's name
      ]
    }

A kwarg (or a list item) that is exactly "$name" takes the parameter's value with its type; "$name"
inside a longer string (a description) is replaced by its text.

Checking runs in three steps:
1. **Schema.** Every column of the schema must be present and castable to its type, and a
   non-nullable column must hold no nulls. Extra columns are ignored. A missing or mistyped column
   stops here (the expectations could not run); nulls are reported and validation goes on.
2. **Derivations.** GX is slow on list columns, so scalar columns are derived first (with polars)
   and every list column is dropped before the data reaches GX:
   - `{"derive": "list_length", "column": c, "as": n}`: number of items (null for a null list);
   - `{"derive": "list_nonfinite", "column": c, "as": n}`: how many items are NaN or +-inf;
   - `{"derive": "list_min" | "list_max", "column": c, "as": n}`: smallest / largest item (NaN
     ignored, null for an empty or null list);
   - `{"derive": "list_norm", "column": c, "as": n}`: the Euclidean length of the list as a vector;
   - `{"derive": "str_length", "column": c, "as": n}`: characters of a string;
   - `{"derive": "str_strip_length", "column": c, "as": n}`: characters once surrounding
     whitespace is stripped;
   - `{"derive": "group_by", "keys": [...], "as": frame, "aggregate": [{"as": n, "count_where":
     {col: value or [values], ...}}, ...]}`: a new frame with one row per group, holding for each
     aggregate how many of the group's rows match every `col == value` (all rows when
     `count_where` is absent). Expectations name it with `"frame": frame`; `"noun"` (default
     "groups") is how the summary counts its rows.
3. **Expectations.** Each frame is first evaluated by `schemas.contract_fast`, which models in
   polars, with GX's semantics, exactly the expectation types and kwargs our suites use. When it
   certifies every expectation of the frame, the frame passes without GX (a pass reports nothing
   more). Otherwise (something fails, or the frame holds an expectation, kwarg, column type or
   condition the fast path does not model) the frame goes to GX as today, and GX's results make
   the report: GX stays the authority on every failure. `AUTOEXPLAIN_CONTRACTS=gx` sends every
   frame to GX. For GX a frame is passed as pandas (polars -> Arrow -> pandas) and validated
   against an `ExpectationSuite` built from the JSON, in an ephemeral context. A `row_condition`
   kwarg may be written compactly: `{"column": c, "op": "==", "value": v}` (ops `== != < <= > >=
   in not_in is_null is_not_null`), `{"all": [...]}` or `{"any": [...]}`; a dict with a "type" key
   is taken as GX's own serialised condition.

The report names each failed expectation in one line: the suite, how many rows break it, the rule
in words, the GX expectation and column, and a few offending values.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from typing import Any

import polars as pl
import pyarrow as pa

from autoexplain.errors import UserError
from autoexplain.schemas import HERE, load_schema
from autoexplain.schemas.contract_fast import passes
from autoexplain.schemas.contract_gx import add_failure, run_gx
from autoexplain.schemas.contract_report import ROWS, ContractError, ContractReport, ContractViolation, clip

__all__ = ["ContractError", "ContractReport", "ContractViolation", "check", "load_suite", "suite_names", "validate"]

SUITES_DIR = HERE / "expectations"
ENGINE_ENV = "AUTOEXPLAIN_CONTRACTS"  # "gx": skip the fast path, GX checks every frame
ENGINES = ("fast", "gx")  # unset means "fast"


def contract_engine() -> str:
    """Which engine certifies a passing frame, from $AUTOEXPLAIN_CONTRACTS. A misspelt value would
    otherwise pass silently as the fast path, so it is refused."""
    engine = os.environ.get(ENGINE_ENV) or "fast"
    if engine not in ENGINES:
        raise UserError(f"{ENGINE_ENV}={engine!r} is not a contract engine",
                        "set it to gx (Great Expectations checks every table) or unset it")
    return engine


_PLACEHOLDER = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def check(table: pa.Table | pl.DataFrame, suite: str, params: dict | None = None) -> ContractReport:
    """Validate and raise `ContractViolation` on any failure; return the (passing) report."""
    report = validate(table, suite, params)
    if not report.success:
        raise ContractViolation(report)
    return report


def validate(table: pa.Table | pl.DataFrame, suite: str, params: dict | None = None) -> ContractReport:
    """Check `table` against the suite `schemas/expectations/<suite>.json`."""
    spec = load_suite(suite)
    merged = {**spec.get("params", {}), **(params or {})}
    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    if not isinstance(table, pa.Table):
        raise TypeError(f"expected a pyarrow.Table or polars.DataFrame, got {type(table).__name__}")
    expectations = [_fill(e, merged) for e in spec.get("expectations", [])]
    report = ContractReport(suite=suite, success=True, n_rows=table.num_rows,
                            n_expectations=len(expectations), params=merged)

    table, fatal = _check_schema(table, spec.get("schema"), report)
    if fatal:
        report.success = False
        return report

    frames, nouns, ids = _derive(pl.from_arrow(table), spec.get("derive", []), spec.get("id_columns", []))
    by_frame: dict[str, list[dict]] = {}
    for e in expectations:
        by_frame.setdefault(e.get("frame", ROWS), []).append(e)
    for frame_name, exps in by_frame.items():
        if frame_name not in frames:
            raise ContractError(f"suite '{suite}': expectations name frame '{frame_name}', which no derivation makes")
        frame = frames[frame_name]
        if contract_engine() == "fast" and passes(frame, exps):
            continue  # certified on the fast path: GX would pass it too, and a pass reports nothing
        results = run_gx(suite, frame_name, frame, exps, ids[frame_name])
        for exp, res in zip(exps, results):
            if not res["success"]:
                add_failure(report, exp, res, nouns[frame_name], frame.height, ids[frame_name])
    report.success = not report.failures
    return report


# --- suites -------------------------------------------------------------------------------------


@cache
def load_suite(name: str) -> dict:
    path = SUITES_DIR / f"{name}.json"
    if not path.exists():
        raise ContractError(f"no expectation suite '{name}' (known: {', '.join(suite_names())})")
    return json.loads(path.read_text(encoding="utf-8"))


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.json"))


def _fill(obj: Any, params: dict) -> Any:
    """Replace "$name" placeholders with parameter values (typed when the whole string is one)."""
    if isinstance(obj, dict):
        return {k: _fill(v, params) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, params) for v in obj]
    if isinstance(obj, str) and "$" in obj:
        whole = _PLACEHOLDER.fullmatch(obj)
        if whole:
            return _param(whole.group(1), params)
        return _PLACEHOLDER.sub(lambda m: str(_param(m.group(1), params)), obj)
    return obj


def _param(name: str, params: dict) -> Any:
    if name not in params:
        raise ContractError(f"the suite needs parameter '{name}'; pass it in params")
    return params[name]


# --- schema -------------------------------------------------------------------------------------


def _check_schema(table: pa.Table, schema_name: str | None, report: ContractReport) -> tuple[pa.Table, bool]:
    """Select and cast the schema's columns; report missing, mistyped and null-holding columns."""
    if not schema_name:
        return table, False
    schema = load_schema(schema_name)
    fatal = False
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            _schema_failure(report, f.name, f"column '{f.name}' is missing (schema {schema_name})")
            fatal = True
            continue
        col = table.column(f.name)
        problem = None
        if not _same_kind(col.type, f.type):
            problem = f"column '{f.name}' has type {col.type}, expected {f.type}"
        else:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
                problem = f"column '{f.name}' ({col.type}) does not fit {f.type}: {clip(str(err), 120)}"
        if problem:
            _schema_failure(report, f.name, problem)
            fatal = True
            continue
        columns.append(col)
        if not f.nullable and col.null_count:
            _schema_failure(report, f.name, f"{col.null_count} of {table.num_rows} rows have a null "
                                            f"'{f.name}', which the schema does not allow", count=col.null_count)
    if fatal:
        report.failures.append(f"{report.suite}: expectations not run, the table does not match schema {schema_name}")
        return table, True
    return pa.Table.from_arrays(columns, schema=schema), False


def _same_kind(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether a column may be cast to the schema's type: same family (any width, large or view
    variants); integers may fill float columns; an all-null column fits anything."""
    t = pa.types
    if t.is_null(have):
        return True
    if t.is_integer(want):
        return t.is_integer(have)
    if t.is_floating(want):
        return t.is_floating(have) or t.is_integer(have)
    if t.is_string(want) or t.is_large_string(want):
        return t.is_string(have) or t.is_large_string(have) or t.is_string_view(have)
    if t.is_boolean(want):
        return t.is_boolean(have)
    if t.is_list(want) or t.is_large_list(want):
        return ((t.is_list(have) or t.is_large_list(have) or t.is_fixed_size_list(have) or t.is_list_view(have))
                and _same_kind(have.value_type, want.value_type))
    return have == want


def _schema_failure(report: ContractReport, column: str, text: str, count: int | None = None) -> None:
    report.failures.append(f"{report.suite}: {text}")
    report.details.append({"check": "schema", "column": column, "unexpected_count": count, "line": report.failures[-1]})


# --- derivations --------------------------------------------------------------------------------


def _derive(df: pl.DataFrame, derivations: list[dict], id_columns: list[str]):
    """The frames handed to GX (list columns dropped), the noun that counts each one's rows, and the
    columns that identify a row of each (shown next to the offending values)."""
    exprs, groups = [], []
    for d in derivations:
        kind = d.get("derive")
        if kind == "group_by":
            groups.append(d)
            continue
        col, name = pl.col(d["column"]), d["as"]
        if kind == "list_length":
            exprs.append(col.list.len().alias(name))
        elif kind == "list_nonfinite":
            exprs.append(col.list.eval((~pl.element().is_finite()).cast(pl.UInt32)).list.sum().alias(name))
        elif kind == "list_min":
            exprs.append(col.list.min().cast(pl.Float64).alias(name))
        elif kind == "list_max":
            exprs.append(col.list.max().cast(pl.Float64).alias(name))
        elif kind == "list_norm":
            exprs.append(col.list.eval(pl.element().cast(pl.Float64) ** 2).list.sum().sqrt().alias(name))
        elif kind == "str_length":
            exprs.append(col.str.len_chars().alias(name))
        elif kind == "str_strip_length":
            exprs.append(col.str.strip_chars().str.len_chars().alias(name))
        else:
            raise ContractError(f"unknown derivation {kind!r} (in {d})")
    if exprs:
        df = df.with_columns(exprs)
    frames = {ROWS: df}
    nouns = {ROWS: "rows"}
    ids = {ROWS: [c for c in id_columns if c in df.columns]}
    for g in groups:
        aggs = []
        for a in g.get("aggregate", []):
            cond = pl.lit(True)
            for column, value in a.get("count_where", {}).items():
                cond = cond & (pl.col(column).is_in(value) if isinstance(value, list) else pl.col(column) == value)
            aggs.append(cond.sum().alias(a["as"]))
        if aggs:
            frames[g["as"]] = df.group_by(g["keys"], maintain_order=True).agg(aggs)
        else:
            frames[g["as"]] = df.select(g["keys"]).unique(maintain_order=True)
        nouns[g["as"]] = g.get("noun", "groups")
        ids[g["as"]] = list(g["keys"])
    scalar = {name: f.select([c for c, t in f.schema.items() if not isinstance(t, (pl.List, pl.Array, pl.Struct))])
              for name, f in frames.items()}
    return scalar, nouns, ids
