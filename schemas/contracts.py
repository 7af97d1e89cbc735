"""Data contracts: Great Expectations suites, kept as JSON data, checked at every stage boundary.

    report = validate(table, "records", {"window_len": 64, "min_exemplars": 4})
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
   - `{"derive": "str_length", "column": c, "as": n}`: characters of a string;
   - `{"derive": "str_strip_length", "column": c, "as": n}`: characters once surrounding
     whitespace is stripped;
   - `{"derive": "group_by", "keys": [...], "as": frame, "aggregate": [{"as": n, "count_where":
     {col: value or [values], ...}}, ...]}`: a new frame with one row per group, holding for each
     aggregate how many of the group's rows match every `col == value` (all rows when
     `count_where` is absent). Expectations name it with `"frame": frame`; `"noun"` (default
     "groups") is how the summary counts its rows.
3. **Expectations.** Each frame goes to GX as pandas (polars -> Arrow -> pandas) and is validated
   against an `ExpectationSuite` built from the JSON, in an ephemeral context. A `row_condition`
   kwarg may be written compactly: `{"column": c, "op": "==", "value": v}` (ops `== != < <= > >=
   in not_in is_null is_not_null`), `{"all": [...]}` or `{"any": [...]}`; a dict with a "type" key
   is taken as GX's own serialised condition.

The report names each failed expectation in one line: the suite, how many rows break it, the rule
in words, the GX expectation and column, and a few offending values.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import polars as pl
import pyarrow as pa

from schemas import HERE, load_schema

__all__ = ["ContractError", "ContractReport", "ContractViolation", "check", "load_suite", "suite_names", "validate"]

SUITES_DIR = HERE / "expectations"
N_EXAMPLES = 3
ROWS = "rows"

_PLACEHOLDER = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_LOCK = threading.RLock()
_GX_LOGGERS = ("great_expectations", "great_expectations.core", "great_expectations.data_context",
               "great_expectations.validator", "great_expectations.execution_engine", "posthog")


class ContractError(ValueError):
    """A suite that cannot be used: unknown suite, bad derivation, missing parameter."""


@dataclass
class ContractReport:
    """The outcome of validating one table against one suite."""

    suite: str
    success: bool
    n_rows: int
    failures: list[str] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)  # one dict per failed expectation / schema check
    n_expectations: int = 0
    params: dict = field(default_factory=dict)

    def summary(self) -> str:
        if self.success:
            return f"{self.suite}: all {self.n_expectations} expectations hold on {self.n_rows} rows"
        head = f"{self.suite}: {len(self.failures)} failed check(s) on {self.n_rows} rows"
        return "\n".join([head, *("  - " + line for line in self.failures)])

    def to_markdown(self) -> str:
        status = "passed" if self.success else "**FAILED**"
        lines = [f"### Data contract `{self.suite}`: {status}", "",
                 f"{self.n_rows} rows, {self.n_expectations} expectations, {len(self.failures)} failed."]
        if self.params:
            lines += ["", "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in sorted(self.params.items()))]
        if self.failures:
            lines += [""] + [f"- {line}" for line in self.failures]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"suite": self.suite, "success": self.success, "n_rows": self.n_rows,
                "n_expectations": self.n_expectations, "params": _jsonable(self.params),
                "failures": list(self.failures), "details": _jsonable(self.details)}

    def __str__(self) -> str:
        return self.summary()


class ContractViolation(Exception):
    """Raised by `check` when a table breaks its contract; `.report` holds the details."""

    def __init__(self, report: ContractReport):
        self.report = report
        super().__init__(report.summary())


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
        results = _run_gx(suite, frame_name, frame, exps, ids[frame_name])
        for exp, res in zip(exps, results):
            if not res["success"]:
                _add_failure(report, exp, res, nouns[frame_name], frame.height, ids[frame_name])
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
                problem = f"column '{f.name}' ({col.type}) does not fit {f.type}: {_clip(str(err), 120)}"
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


# --- GX -----------------------------------------------------------------------------------------


@cache
def _gx():
    """The process's ephemeral GX context and the whole-dataframe batch definition (built once)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    for name in _GX_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        source = context.data_sources.add_pandas("autoexplain_contracts")
        asset = source.add_dataframe_asset("table")
        batch_definition = asset.add_batch_definition_whole_dataframe("whole")
    return gx, context, batch_definition


_SUITE_CACHE: dict[str, Any] = {}


def _gx_suite(suite: str, frame: str, exps: list[dict]):
    key = json.dumps([suite, frame, exps], sort_keys=True, default=str)
    if key in _SUITE_CACHE:
        return _SUITE_CACHE[key]
    gx, context, _ = _gx()
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    gsuite = gx.ExpectationSuite(name=f"{suite}.{frame}.{len(_SUITE_CACHE)}")
    for i, e in enumerate(exps):
        kwargs = dict(e.get("kwargs", {}))
        if "row_condition" in kwargs:
            kwargs["row_condition"] = _condition(kwargs["row_condition"])
        try:
            config = ExpectationConfiguration(type=e["expectation_type"], kwargs=kwargs,
                                              description=e.get("description"), meta={"contract_index": i})
            gsuite.add_expectation(config.to_domain_obj())
        except Exception as err:  # noqa: BLE001 -- a malformed suite entry, named for whoever edits it
            raise ContractError(f"suite '{suite}': cannot build {e.get('expectation_type')} {kwargs}: {err}") from err
    gsuite = context.suites.add(gsuite)
    _SUITE_CACHE[key] = gsuite
    return gsuite


_OPS = {"==": "__eq__", "!=": "__ne__", "<": "__lt__", "<=": "__le__", ">": "__gt__", ">=": "__ge__",
        "in": "is_in", "not_in": "is_not_in"}


def _condition(spec: Any):
    """A compact JSON row condition -> a GX Condition object."""
    from great_expectations.expectations.row_conditions import (
        AndCondition,
        Column,
        OrCondition,
        deserialize_row_condition,
    )

    if not isinstance(spec, dict):
        raise ContractError(f"row_condition must be a dict, got {spec!r}")
    if "type" in spec:
        return deserialize_row_condition(spec)
    if "all" in spec:
        return AndCondition(conditions=[_condition(s) for s in spec["all"]])
    if "any" in spec:
        return OrCondition(conditions=[_condition(s) for s in spec["any"]])
    column, op = Column(spec["column"]), spec.get("op", "==")
    if op == "is_null":
        return column.is_null()
    if op == "is_not_null":
        return column.is_not_null()
    if op not in _OPS:
        raise ContractError(f"unknown row_condition op {op!r} (in {spec})")
    return getattr(column, _OPS[op])(spec["value"])


def _run_gx(suite: str, frame_name: str, frame: pl.DataFrame, exps: list[dict], ids: list[str]) -> list[dict]:
    """Validate one frame; return one plain result dict per expectation, in the suite's order."""
    # GX's between-checks are vectorised only for int64 / float64 columns: widen the rest first.
    frame = frame.with_columns([pl.col(c).cast(pl.Int64) if t.is_integer() else pl.col(c).cast(pl.Float64)
                                for c, t in frame.schema.items() if t.is_numeric()])
    pdf = frame.to_arrow().to_pandas()
    with _LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, batch_definition = _gx()
        gsuite = _gx_suite(suite, frame_name, exps)
        batch = batch_definition.get_batch(batch_parameters={"dataframe": pdf})
        # No `unexpected_index_column_names`: GX would build them row by row in Python (a minute
        # for 300k failing rows). Its partial index list holds row positions; ids are looked up here.
        result = batch.validate(gsuite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20})
    by_index = {r.expectation_config.meta.get("contract_index"): r for r in result.results}
    out = []
    for i in range(len(exps)):
        r = by_index.get(i)
        if r is None:
            out.append({"success": False, "result": {}, "exception": "GX returned no result"})
            continue
        res = {"success": bool(r.success), "result": dict(r.result or {}), "exception": _exception(r)}
        if not res["success"] and ids:
            res["result"]["partial_unexpected_index_list"] = _rows_at(frame, res["result"], exps[i], ids)
        out.append(res)
    return out


def _rows_at(frame: pl.DataFrame, result: dict, exp: dict, ids: list[str]) -> list[dict]:
    """The id and checked columns of the rows GX names by position in its partial index list."""
    positions = [p for p in result.get("partial_unexpected_index_list") or [] if isinstance(p, int)]
    if not positions:
        return []
    kwargs = exp.get("kwargs", {})
    checked = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
    checked += list(kwargs.get("column_list", []))
    columns = list(dict.fromkeys(c for c in ids + checked if c in frame.columns))
    return frame.select(columns)[positions].to_dicts()


def _exception(r) -> str | None:
    info = r.exception_info or {}
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return (info.get("exception_message") or "error") if info["raised_exception"] else None
    messages = [v.get("exception_message") or "error" for v in info.values()
                if isinstance(v, dict) and v.get("raised_exception")]
    return "; ".join(dict.fromkeys(messages)) or None


# --- report lines -------------------------------------------------------------------------------


def _add_failure(report: ContractReport, exp: dict, res: dict, noun: str, n: int, ids: list[str]) -> None:
    kwargs = exp.get("kwargs", {})
    etype = exp["expectation_type"]
    target = _target(kwargs)
    where = f" where {_condition_text(kwargs['row_condition'])}" if "row_condition" in kwargs else ""
    rule = exp.get("description") or etype.replace("_", " ")
    r = res["result"]
    count = r.get("unexpected_count")
    if res.get("exception"):
        line = f"{report.suite}: could not check '{rule}' ({etype} on {target}{where}): {_clip(res['exception'], 200)}"
    elif count is not None:
        total = r.get("element_count", n)
        examples = _examples(r, kwargs, ids)
        line = (f"{report.suite}: {count} of {total} {noun}{where} break '{rule}' ({etype} on {target}"
                + (f"; examples: {examples}" if examples else "") + ")")
    else:
        observed = r.get("observed_value")
        line = (f"{report.suite}: '{rule}' does not hold ({etype} on {target}{where}"
                + (f"; observed: {_value(observed)}" if observed is not None else "") + ")")
    report.failures.append(line)
    report.details.append({"check": etype, "column": target, "description": rule, "frame": exp.get("frame", ROWS),
                           "row_condition": kwargs.get("row_condition"), "unexpected_count": count,
                           "element_count": r.get("element_count"),
                           "examples": list(r.get("partial_unexpected_index_list") or r.get("partial_unexpected_list")
                                            or [])[:N_EXAMPLES],
                           "observed_value": r.get("observed_value"), "exception": res.get("exception"), "line": line})


def _target(kwargs: dict) -> str:
    if "column" in kwargs:
        return kwargs["column"]
    if "column_A" in kwargs:
        return f"{kwargs['column_A']}, {kwargs['column_B']}"
    if "column_list" in kwargs:
        return "(" + ", ".join(kwargs["column_list"]) + ")"
    return "the table"


def _condition_text(spec: Any) -> str:
    if not isinstance(spec, dict):
        return str(spec)
    if "all" in spec:
        return " and ".join(_condition_text(s) for s in spec["all"])
    if "any" in spec:
        return "(" + " or ".join(_condition_text(s) for s in spec["any"]) + ")"
    if "type" in spec:
        return repr(_condition(spec))
    op = spec.get("op", "==")
    if op in ("is_null", "is_not_null"):
        return f"{spec['column']} is {'null' if op == 'is_null' else 'not null'}"
    value = spec.get("value")
    shown = "{" + ", ".join(map(str, value)) + "}" if isinstance(value, list) else str(value)
    return f"{spec['column']} {op.replace('_', ' ')} {shown}"


def _examples(r: dict, kwargs: dict, ids: list[str]) -> str:
    """A few offending values, each with the id columns of its row when GX returned them."""
    names = kwargs.get("column_list") or ([kwargs["column_A"], kwargs["column_B"]] if "column_A" in kwargs else None)

    def show(v: Any) -> str:
        if names and isinstance(v, (list, tuple)) and len(v) == len(names):
            v = dict(zip(names, v))
        return "" if _missing(v) else _value(v)

    index = r.get("partial_unexpected_index_list") or []
    values = list(r.get("partial_unexpected_list") or [])
    parts: list[str] = []
    if ids and index and all(isinstance(e, dict) for e in index):
        for i, entry in enumerate(index):
            if "column" in kwargs and kwargs["column"] in entry:
                v = entry[kwargs["column"]]
            elif kwargs.get("column_list") and all(c in entry for c in kwargs["column_list"]):
                v = {c: entry[c] for c in kwargs["column_list"]}
            else:
                v = values[i] if i < len(values) else None
            at = {k: entry[k] for k in ids if k in entry and not (names and k in names)}
            text = " at ".join(x for x in (show(v), _value(at) if at else "") if x)
            if text and text not in parts:
                parts.append(text)
            if len(parts) == N_EXAMPLES:
                break
        more = i + 1 < len(index) or r.get("unexpected_count", 0) > len(index)
    else:
        for c in (r.get("partial_unexpected_counts") or [])[:N_EXAMPLES]:
            text = show(c.get("value"))
            if text:
                parts.append(text + (f" (x{c['count']})" if c.get("count", 1) > 1 else ""))
        if not parts:
            parts = [t for t in (show(v) for v in values[:N_EXAMPLES]) if t]
        more = len(r.get("partial_unexpected_counts") or values) > len(parts)
    if parts and more:
        parts.append("...")
    return ", ".join(parts)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _value(v: Any) -> str:
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict)):
        v = v.item()
    if isinstance(v, dict):
        return "(" + ", ".join(f"{k}={_value(x)}" for k, x in v.items()) + ")"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_value(x) for x in v) + ")"
    if isinstance(v, float):
        return f"{int(v)}" if v.is_integer() else f"{v:.4g}"
    if isinstance(v, str):
        return repr(_clip(v, 60))
    return _clip(str(v), 60)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
