"""Table schemas, kept as JSON data so that every stage (and every reader in any language) agrees.

`load_schema("records")` turns `records.json` into a `pyarrow.Schema`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pyarrow as pa

HERE = Path(__file__).parent

_SCALARS = {
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "bool": pa.bool_(),
}


def _arrow_type(spec: str) -> pa.DataType:
    if spec.startswith("list<") and spec.endswith(">"):
        return pa.list_(_arrow_type(spec[5:-1]))
    return _SCALARS[spec]


@cache
def load_schema(name: str) -> pa.Schema:
    doc = json.loads((HERE / f"{name}.json").read_text())
    fields = [pa.field(f["name"], _arrow_type(f["type"]), nullable=f["nullable"]) for f in doc["fields"]]
    return pa.schema(fields, metadata={"schema_name": name})


# Columns a table may carry beyond its schema. `source`: the unit source's kind on rows of units
# that are not a layer's MLP neurons ('sae-res-16k'); tables of neurons never have it, so they stay
# what they were before sources had names.
OPTIONAL_COLUMNS = {"source": pa.string()}


def conform(table: pa.Table, name: str) -> pa.Table:
    """`table` cast to schema `name`, keeping the optional columns it has (in a fixed order, last)."""
    schema = load_schema(name)
    cast = table.select(schema.names).cast(schema)
    for column, kind in OPTIONAL_COLUMNS.items():
        if column in table.column_names:
            cast = cast.append_column(pa.field(column, kind), table.column(column).cast(kind))
    return cast
