"""The Great Expectations side of a contract check: one frame validated against a suite built from
its JSON, in the process's ephemeral GX context, and each failed expectation turned into one line
(the rule in words, the GX expectation and column, a few offending values with their row ids).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import warnings
from functools import cache
from typing import Any

import polars as pl

from autoexplain.schemas.contract_report import ROWS, ContractError, ContractReport, clip

N_EXAMPLES = 3  # offending values shown per failed expectation
_LOCK = threading.RLock()
_GX_LOGGERS = ("great_expectations", "great_expectations.core", "great_expectations.data_context",
               "great_expectations.validator", "great_expectations.execution_engine", "posthog")


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


def run_gx(suite: str, frame_name: str, frame: pl.DataFrame, exps: list[dict], ids: list[str]) -> list[dict]:
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


def add_failure(report: ContractReport, exp: dict, res: dict, noun: str, n: int, ids: list[str]) -> None:
    kwargs = exp.get("kwargs", {})
    etype = exp["expectation_type"]
    target = _target(kwargs)
    where = f" where {_condition_text(kwargs['row_condition'])}" if "row_condition" in kwargs else ""
    rule = exp.get("description") or etype.replace("_", " ")
    r = res["result"]
    count = r.get("unexpected_count")
    if res.get("exception"):
        line = f"{report.suite}: could not check '{rule}' ({etype} on {target}{where}): {clip(res['exception'], 200)}"
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
        return repr(clip(v, 60))
    return clip(str(v), 60)
