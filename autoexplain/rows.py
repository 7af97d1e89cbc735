"""The typed per-unit rows of the explain, simulate and score stages, and their one Arrow codec.

`pipeline`'s per-unit functions take and return these dataclasses; only this module knows how they
lie on disk. A row's `unit` is a `UnitId`; its table keeps the columns it always had (layer, unit,
polarity), so a stage output is the same file, byte for byte, as before the rows were typed. Every
table written so far holds units of the `mlp` source, and decoding gives them that source; a
source that is not `mlp` (an SAE's latents) adds a `source` column here, read as 'mlp' where absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Iterable, TypeVar

import numpy as np
import pyarrow as pa

from autoexplain.records import UnitId
from autoexplain.sources import MLP
from autoexplain.schemas import OPTIONAL_COLUMNS, load_schema

MLP_KIND = MLP.kind  # rows of this source carry no `source` column


@dataclass
class ExplanationRow:
    """One explanation of a unit: the explainer's (method 'explainer'), a baseline or the control."""

    unit: UnitId
    method: str  # 'explainer', 'token-lookup' or 'shuffled'
    explainer: str
    prompt_hash: str
    text: str  # the chosen candidate, once the simulate stage has chosen
    candidates: list[str]
    candidate_valid_scores: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failure: str | None = None
    dollars: float | None = 0.0  # the explainer's requests
    # Best-of-k's simulations on the valid split, filled in by the simulate stage on the chosen row.
    selection_tokens: int = 0
    selection_dollars: float | None = 0.0


@dataclass
class SimulationRow:
    """One explanation simulated on one of the unit's records."""

    unit: UnitId
    method: str
    simulator: str
    prompt_hash: str
    window_id: int
    kind: str
    split: str
    expected: list[float] | None  # None: the simulation failed
    failure: str | None
    tokens: int
    dollars: float | None


@dataclass
class ScoreRow:
    """One metric of one explanation of a unit, on one split."""

    unit: UnitId
    method: str
    simulator: str
    split: str
    metric: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    undefined_reason: str | None
    n_records: int
    n_failed: int
    explainer_tokens: int
    simulator_tokens: int
    dollars: float | None


Row = TypeVar("Row", ExplanationRow, SimulationRow, ScoreRow)

SCHEMA_OF = {ExplanationRow: "explanations", SimulationRow: "simulations", ScoreRow: "scores"}


@lru_cache(maxsize=None)
def _names(cls) -> tuple[str, ...]:
    # once per class: `fields` per row cost more than the rest of encoding it
    return tuple(f.name for f in fields(cls) if f.name != "unit")


def to_rows(rows: Iterable[Row]) -> list[dict]:
    """Typed rows as plain dicts with the table's columns (what the stage memos store)."""
    out, heads = [], {}  # a unit's columns, made once per unit: its source is parsed to get them
    for row in rows:
        head = heads.get(row.unit)
        if head is None:
            u = row.unit
            head = heads[u] = {"layer": u.layer, "unit": u.index, "polarity": u.polarity,
                               **({} if u.kind == MLP_KIND else {"source": u.kind})}
        encoded = head.copy()
        for name in _names(type(row)):
            encoded[name] = getattr(row, name)
        out.append(encoded)
    return out


def from_rows(cls: type[Row], rows: Iterable[dict]) -> list[Row]:
    names, units, out = _names(cls), {}, []
    for r in rows:
        at = (r["layer"], r.get("source") or MLP_KIND, r["unit"], r["polarity"])
        unit = units.get(at)
        if unit is None:
            unit = units[at] = UnitId(f"L{at[0]}/{at[1]}", at[2], at[3])
        out.append(cls(unit, **{name: r[name] for name in names}))
    return out


def rows_to_table(rows: list[dict], schema_name: str) -> pa.Table:
    """Rows (`to_rows`, `table_rows`) as a table of the schema. A float-list column whose values
    come as numpy arrays is built from them whole, not float by float: the same table."""
    schema = load_schema(schema_name)
    if not rows:
        return schema.empty_table()
    whole = [i for i, f in enumerate(schema) if _is_float_list(f.type)
             and any(isinstance(r.get(f.name), np.ndarray) for r in rows)]
    table = pa.Table.from_pylist(rows, schema=pa.schema([f for i, f in enumerate(schema) if i not in whole]))
    for i in whole:
        table = table.add_column(i, schema.field(i), _float_lists([r.get(schema.field(i).name) for r in rows],
                                                                   schema.field(i).type))
    if any("source" in r for r in rows):  # a table of neurons stays byte for byte what it always was
        table = table.append_column(pa.field("source", OPTIONAL_COLUMNS["source"]),
                                    pa.array([r.get("source") or MLP_KIND for r in rows], pa.string()))
    return table


def table_rows(table: pa.Table, arrays: Iterable[str] = ("expected",)) -> list[dict]:
    """A table's rows as dicts, its float-list columns named in `arrays` as float64 numpy arrays
    (views of one array per column, None where a list is null): the values `to_pylist` gives,
    without a Python float for each of the millions of them, which cost more than the work on
    them. A column with a null inside a list keeps `to_pylist`'s lists."""
    names = [n for n in arrays if n in table.column_names]
    rows = table.drop_columns(names).to_pylist()
    for name in names:
        column = table.column(name).combine_chunks()
        if column.values.null_count:
            values = column.to_pylist()
        else:
            flat = column.values.to_numpy(zero_copy_only=False).astype(np.float64)
            ends, failed = column.offsets.to_numpy(), column.is_null().to_numpy(zero_copy_only=False)
            values = [None if failed[i] else flat[ends[i] : ends[i + 1]] for i in range(len(rows))]
        for row, value in zip(rows, values):
            row[name] = value
    return rows


def _is_float_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) and pa.types.is_floating(kind.value_type)


def _float_lists(values: list, kind: pa.ListType) -> pa.ListArray:
    """A list column from lists or arrays of floats (None: a null list), converted as `from_pylist`
    converts them."""
    sizes = np.fromiter((0 if v is None else len(v) for v in values), np.int64, len(values))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    flat = [np.asarray(v, dtype=np.float64) for v in values if v is not None]
    flat = np.concatenate(flat) if flat else np.zeros(0)
    nulls = np.fromiter((v is None for v in values), bool, len(values))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(kind.value_type.to_pandas_dtype())),
                                    type=kind, mask=pa.array(nulls) if nulls.any() else None)


def to_table(cls: type[Row], rows: Iterable[Row]) -> pa.Table:
    """Typed rows as a table of their stage's schema (`cls` names it when `rows` is empty)."""
    return rows_to_table(to_rows(rows), SCHEMA_OF[cls])


def from_table(cls: type[Row], table: pa.Table) -> list[Row]:
    return from_rows(cls, table.to_pylist())


@dataclass(frozen=True)
class TableRows:
    """Some rows of a table read back whole (a sealed stage output), kept as Arrow: a rerun that
    reads back most of a shard's units pays no dict per row going out and no row coming back in.
    `stamp`: columns these rows carry with one value, in place of what the table holds."""

    table: pa.Table
    indices: np.ndarray
    stamp: tuple[tuple[str, object], ...] = ()

    def __len__(self) -> int:
        return len(self.indices)

    def values(self, column: str) -> list:
        fixed = dict(self.stamp)
        if column in fixed:
            return [fixed[column]] * len(self)
        return self.table.column(column).take(pa.array(self.indices)).to_pylist()

    def to_table(self) -> pa.Table:
        table = self.table.take(pa.array(self.indices))
        for name, value in self.stamp:
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(i), pa.array([value] * len(table), table.schema.field(i).type))
        return table


Part = list | TableRows  # a unit's rows in a stage that reads some back (`assemble`)


def stamped(rows: Part, column: str, value) -> Part:
    """`rows` carrying `value` in `column`."""
    if isinstance(rows, TableRows):
        return TableRows(rows.table, rows.indices, tuple(s for s in rows.stamp if s[0] != column) + ((column, value),))
    return [{**r, column: value} for r in rows] if any(r.get(column) != value for r in rows) else rows


def part_values(parts: Iterable[Part], column: str) -> list:
    """One column's values over parts, in order."""
    return [v for part in parts for v in (part.values(column) if isinstance(part, TableRows) else (r[column] for r in part))]


def assemble(parts: list[Part], schema_name: str) -> pa.Table:
    """Parts (rows as dicts, or `TableRows`) as one table of the schema, in their order: the table
    `rows_to_table` gives for the same rows as dicts, read back slices taken from their table in as
    few calls as their runs allow."""
    tables, rows, run = [], [], None  # run: consecutive TableRows of one table and stamp

    def flush_run():
        if run is not None:
            tables.append(TableRows(run[0], np.concatenate(run[2]), run[1]).to_table())

    for part in parts:
        if isinstance(part, TableRows):
            if rows:
                tables.append(rows_to_table(rows, schema_name))
                rows = []
            if run is not None and run[0] is part.table and run[1] == part.stamp:
                run[2].append(part.indices)
            else:
                flush_run()
                run = (part.table, part.stamp, [part.indices])
        else:
            if part:
                flush_run()
                run = None
            rows += part
    flush_run()
    if rows or not tables:
        tables.append(rows_to_table(rows, schema_name))
    if len(tables) == 1 and not any(isinstance(p, TableRows) for p in parts):
        return tables[0]
    schema = pa.schema(list(load_schema(schema_name)))  # without the schema's metadata, as `rows_to_table`
    if any("source" in t.column_names for t in tables):
        schema = schema.append(pa.field("source", OPTIONAL_COLUMNS["source"]))
        tables = [t if "source" in t.column_names else
                  t.append_column(schema.field("source"), pa.array([MLP_KIND] * len(t), pa.string())) for t in tables]
    return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]).combine_chunks()
