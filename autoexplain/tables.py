"""Parquet tables written atomically: whole (`write_table`) or streamed (`TableWriter`); either
appears under its name only once complete."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from autoexplain import files
from autoexplain.schemas import conform, load_schema


def write_table(table: pa.Table, path: str | os.PathLike, schema_name: str | None = None) -> Path:
    """Write a parquet file atomically, cast to the named schema when one is given."""
    path = Path(path)
    if schema_name is not None:
        table = conform(table, schema_name)
    with files.replacing(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


class TableWriter:
    """Streams record batches into one parquet file; the file appears only on `close()`.

    Tables given to `write_table` are compressed and written on a second thread, one at a time and
    in order, while the caller builds the next: the end of a recording pass is otherwise one
    core's work, of which zstd was a quarter. A failed write is raised by the next call."""

    def __init__(self, path: str | os.PathLike, schema_name: str):
        self.path = Path(path)
        self.schema = load_schema(schema_name)
        self._tmp = files.temporary_beside(self.path)
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._pool = ThreadPoolExecutor(1)
        self._pending: Future | None = None  # the table being written

    def write(self, columns: dict[str, Iterable]) -> None:
        self._caught_up()
        self._writer.write_table(pa.Table.from_pydict(dict(columns), schema=self.schema))

    def write_table(self, table: pa.Table) -> None:
        self._caught_up()
        self._pending = self._pool.submit(self._writer.write_table, table.cast(self.schema))

    def _caught_up(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> Path:
        """Finish the file (again: nothing more), so that a writer can close it inside its block."""
        if self._writer is not None:
            try:
                self._caught_up()
            except BaseException:
                self.abort()
                raise
            self._pool.shutdown()
            self._writer.close()
            self._writer = None
            os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            self._pool.shutdown(wait=True)  # nothing may write after the file is gone
            self._writer.close()
            self._writer = None
            self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
