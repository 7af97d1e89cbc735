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
    schema = load_schema(schema_name)
    if not rows:
        return schema.empty_table()
    table = pa.Table.from_pylist(rows, schema=schema)
    if any("source" in r for r in rows):  # a table of neurons stays byte for byte what it always was
        table = table.append_column(pa.field("source", OPTIONAL_COLUMNS["source"]),
                                    pa.array([r.get("source") or MLP_KIND for r in rows], pa.string()))
    return table


def to_table(cls: type[Row], rows: Iterable[Row]) -> pa.Table:
    """Typed rows as a table of their stage's schema (`cls` names it when `rows` is empty)."""
    return rows_to_table(to_rows(rows), SCHEMA_OF[cls])


def from_table(cls: type[Row], table: pa.Table) -> list[Row]:
    return from_rows(cls, table.to_pylist())
