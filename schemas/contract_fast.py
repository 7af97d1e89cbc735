"""A fast evaluator of our GX suites in polars, which can certify that a frame passes.

GX spends one to three CPU seconds per frame on fixed per-expectation overhead (metric graphs,
pydantic) however small the table is. This module evaluates exactly the expectation types and
kwargs our suites use with GX's pandas-engine semantics, in a few milliseconds:

    verdicts = evaluate(frame, expectations)   # one Verdict per expectation, in order
    passes(frame, expectations)                # True only when every one is certainly met

It only ever certifies passes. A verdict is `None` ("ask GX") for an expectation type, kwarg,
column type or row condition it does not model; `contracts.validate` then runs GX on that frame,
and GX stays the authority on failures, their report lines and anything unknown.

The semantics copied from GX 1.x (great_expectations/expectations/core/ and metrics/), as seen
through the pandas frame GX is handed (polars -> Arrow -> pandas):
- pandas holds a null and a float NaN alike (both `isnull`), so NaN is null here too;
- column map expectations ignore null values, except to_be_null / to_not_be_null, which count them;
- a row_condition filters the rows first, with `DataFrame.query` semantics: a comparison with a null
  is False except `!=` and `not in`, which are True;
- compound-unique drops rows whose columns are all null (GX default "all_values_are_missing"), and
  pandas' `duplicated` takes two nulls as equal;
- the pair check drops rows by `ignore_row_if` (default "both_values_are_missing"); a missing value
  left in compares False;
- unique_value_count counts distinct non-null values (`nunique`);
- `mostly` other than 1 is not modelled (GX decides).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

# The kwargs each modelled expectation may carry; any other kwarg sends the frame to GX.
_COMMON = {"row_condition", "mostly"}
_KWARGS = {
    "expect_column_values_to_be_between": {"column", "min_value", "max_value", "strict_min", "strict_max"},
    "expect_column_values_to_be_in_set": {"column", "value_set"},
    "expect_column_values_to_not_be_in_set": {"column", "value_set"},
    "expect_column_values_to_be_null": {"column"},
    "expect_column_values_to_not_be_null": {"column"},
    "expect_column_values_to_be_unique": {"column"},
    "expect_compound_columns_to_be_unique": {"column_list", "ignore_row_if"},
    "expect_column_pair_values_a_to_be_greater_than_b": {"column_A", "column_B", "or_equal", "ignore_row_if"},
    "expect_column_unique_value_count_to_be_between": {"column", "min_value", "max_value", "strict_min",
                                                       "strict_max"},
}
_COMPARE = {"==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge"}
_GX_OPS = {"IN": "in", "NOT_IN": "not_in"}  # GX's serialised operators that differ from ours


class Unknown(Exception):
    """Something the fast path does not model: GX must decide."""


@dataclass(frozen=True)
class Verdict:
    success: bool | None  # None: not modelled, ask GX
    unexpected_count: int | None = None  # for map expectations, as GX would count them


def passes(frame: pl.DataFrame, exps: list[dict]) -> bool:
    """Whether every expectation certainly holds on `frame` (False also when any is unknown)."""
    return all(v.success is True for v in evaluate(frame, exps))


def evaluate(frame: pl.DataFrame, exps: list[dict]) -> list[Verdict]:
    try:
        df = _as_pandas_sees_it(frame)
    except pl.exceptions.PolarsError:  # e.g. a uint64 past int64: run_gx's own cast fails the same way
        return [Verdict(None) for _ in exps]
    out = []
    for e in exps:
        try:
            out.append(_one(df, e["expectation_type"], e.get("kwargs", {})))
        except (Unknown, pl.exceptions.PolarsError, KeyError, TypeError, ValueError):
            out.append(Verdict(None))
    return out


def _as_pandas_sees_it(frame: pl.DataFrame) -> pl.DataFrame:
    """The frame as GX's pandas holds it: integers as int64 and floats as float64 (run_gx widens
    them; a float32 value next to a float bound compares otherwise) and NaN as null (pandas cannot
    tell them apart). 0.0 and -0.0 are one value to both pandas and polars (the tests hold it)."""
    return frame.with_columns([pl.col(c).cast(pl.Int64) if t.is_integer()
                               else pl.col(c).cast(pl.Float64).fill_nan(None)
                               for c, t in frame.schema.items() if t.is_numeric()])


def _one(df: pl.DataFrame, etype: str, kw: dict) -> Verdict:
    if etype not in _KWARGS or set(kw) - _KWARGS[etype] - _COMMON:
        raise Unknown(etype)
    if kw.get("mostly", 1) != 1:
        raise Unknown("mostly")
    for c in _columns(kw):
        if c not in df.columns:
            raise Unknown(f"no column {c}")
    if kw.get("row_condition") is not None:
        df = df.filter(condition_mask(df, kw["row_condition"]))

    if etype == "expect_column_unique_value_count_to_be_between":
        n = df[kw["column"]].drop_nulls().n_unique()
        return Verdict(_between_scalar(n, kw))
    if etype == "expect_compound_columns_to_be_unique":
        if not isinstance(kw["column_list"], (list, tuple)):
            raise Unknown("column_list")
        rows = df.select(kw["column_list"])
        how = kw.get("ignore_row_if", "all_values_are_missing")
        if how == "all_values_are_missing":
            rows = rows.filter(~pl.all_horizontal(pl.all().is_null()))
        elif how == "any_value_is_missing":
            rows = rows.drop_nulls()
        elif how != "never":
            raise Unknown(how)
        return _counted(int(rows.is_duplicated().sum()))
    if etype == "expect_column_pair_values_a_to_be_greater_than_b":
        return _counted(_pair_unexpected(df, kw))

    s = df[kw["column"]]
    if etype == "expect_column_values_to_not_be_null":
        return _counted(s.null_count())
    if etype == "expect_column_values_to_be_null":
        return _counted(s.len() - s.null_count())
    s = s.drop_nulls()
    if etype == "expect_column_values_to_be_unique":
        return _counted(int(s.is_duplicated().sum()))
    if etype == "expect_column_values_to_be_between":
        return _counted(int((~_between(s, kw)).sum()))
    member = _is_in(s, kw["value_set"])
    if etype == "expect_column_values_to_be_in_set":
        return _counted(int((~member).sum()))
    return _counted(int(member.sum()))  # expect_column_values_to_not_be_in_set


def _counted(unexpected: int) -> Verdict:
    return Verdict(unexpected == 0, unexpected)


def _columns(kw: dict) -> list[str]:
    cols = [kw[k] for k in ("column", "column_A", "column_B") if k in kw]
    return cols + list(kw.get("column_list", []))


# --- values -------------------------------------------------------------------------------------


def _is_number(v) -> bool:
    # NaN is out: polars orders it above everything and matches it in is_in; pandas compares it False.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _fits(s: pl.Series, value) -> bool:
    """Whether pandas would compare the column with `value` as we do (same kind of value)."""
    if s.dtype.is_numeric():
        return _is_number(value)
    if s.dtype == pl.String:
        return isinstance(value, str)
    if s.dtype == pl.Boolean:
        return isinstance(value, bool)
    return False


def _numeric(s: pl.Series | pl.Expr, dtype: pl.DataType):
    # pandas compares an int64 column with a float bound as numbers; Float64 does that exactly in range.
    return s.cast(pl.Float64) if dtype.is_numeric() else s


def _is_in(s: pl.Series, values) -> pl.Series:
    if not isinstance(values, (list, tuple)) or not all(_fits(s, v) for v in values):
        raise Unknown("value_set")
    if s.dtype.is_numeric():
        s = s.cast(pl.Float64)
    return s.is_in(pl.Series(values, dtype=s.dtype).implode())  # implode: the set is one list value


def _bounds(kw: dict):
    lo, hi = kw.get("min_value"), kw.get("max_value")
    if lo is None and hi is None:
        raise Unknown("no bounds")
    if any(v is not None and not _is_number(v) for v in (lo, hi)):
        raise Unknown("non-numeric bounds")
    if lo is not None and hi is not None and lo > hi:
        raise Unknown("min_value > max_value")  # GX raises: its failure line is the report
    return lo, hi, bool(kw.get("strict_min")), bool(kw.get("strict_max"))


def _between(s: pl.Series, kw: dict) -> pl.Series:
    # GX's vectorised path holds for int / float columns only; others (bool, str) go to GX.
    if not s.dtype.is_numeric():
        raise Unknown("between on a non-numeric column")
    lo, hi, strict_lo, strict_hi = _bounds(kw)
    ok = pl.Series([True] * s.len(), dtype=pl.Boolean)
    if lo is not None:
        ok = ok & ((s > lo) if strict_lo else (s >= lo))
    if hi is not None:
        ok = ok & ((s < hi) if strict_hi else (s <= hi))
    return ok


def _between_scalar(n: int, kw: dict) -> bool:
    lo, hi, strict_lo, strict_hi = _bounds(kw)
    above = lo is None or (n > lo if strict_lo else n >= lo)
    below = hi is None or (n < hi if strict_hi else n <= hi)
    return above and below


def _pair_unexpected(df: pl.DataFrame, kw: dict) -> int:
    a, b = df[kw["column_A"]], df[kw["column_B"]]
    if not (a.dtype.is_numeric() and b.dtype.is_numeric()):
        raise Unknown("pair of non-numeric columns")
    how = kw.get("ignore_row_if", "both_values_are_missing")
    if how == "both_values_are_missing":
        keep = a.is_not_null() | b.is_not_null()
    elif how == "either_value_is_missing":
        keep = a.is_not_null() & b.is_not_null()
    elif how == "neither":
        keep = pl.Series([True] * a.len(), dtype=pl.Boolean)
    else:
        raise Unknown(how)
    a, b = a.filter(keep), b.filter(keep)
    met = (a >= b) if kw.get("or_equal") else (a > b)
    return int((~met.fill_null(False)).sum())  # a null left in compares False, as NaN does in pandas


# --- row conditions -----------------------------------------------------------------------------


def condition_mask(df: pl.DataFrame, spec) -> pl.Series:
    """A row condition (our compact form or GX's serialised one) -> a boolean mask, with the
    semantics of the pandas query string GX builds from it."""
    if not isinstance(spec, dict):
        raise Unknown("row_condition")
    kind = spec.get("type")
    if ("all" in spec or "any" in spec or kind in ("and", "or")) and not (
            spec.get("all") or spec.get("any") or spec.get("conditions")):
        raise Unknown("empty row_condition")  # GX's query string would be "()"
    if "all" in spec or kind == "and":
        parts = [condition_mask(df, s) for s in spec.get("all", spec.get("conditions", []))]
        return _fold(parts, df.height, all_of=True)
    if "any" in spec or kind == "or":
        parts = [condition_mask(df, s) for s in spec.get("any", spec.get("conditions", []))]
        return _fold(parts, df.height, all_of=False)
    if kind == "nullity":
        column, op, value = spec["column"]["name"], "is_null" if spec["is_null"] else "is_not_null", None
    elif kind == "comparison":
        column, value = spec["column"]["name"], spec["parameter"]
        op = _GX_OPS.get(spec["operator"], spec["operator"])
    elif kind is None:
        column, op, value = spec["column"], spec.get("op", "=="), spec.get("value")
    else:
        raise Unknown(f"row_condition type {kind}")  # e.g. pass_through: a pandas query string
    if column not in df.columns:
        raise Unknown(f"no column {column}")
    s = df[column]
    if op == "is_null":
        return s.is_null()
    if op == "is_not_null":
        return s.is_not_null()
    if op in ("in", "not_in"):
        member = _is_in(s, value)
        return member.fill_null(False) if op == "in" else ~member.fill_null(False)
    if op not in _COMPARE or not _fits(s, value):
        raise Unknown(f"row_condition {op} {value!r} on {s.dtype}")
    if op not in ("==", "!=") and not s.dtype.is_numeric():
        raise Unknown("ordered comparison on a non-numeric column")  # pandas may raise on None there
    hit = getattr(_numeric(s, s.dtype), _COMPARE[op])(value)
    return hit.fill_null(op == "!=")


def _fold(parts: list[pl.Series], n: int, all_of: bool) -> pl.Series:
    out = pl.Series([all_of] * n, dtype=pl.Boolean)
    for p in parts:
        out = (out & p) if all_of else (out | p)
    return out
