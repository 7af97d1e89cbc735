"""Per-unit results inside a stage, keyed by content: a rerun after a crash, or after an edit that
touches a few units, recomputes only the units whose inputs changed.

While a stage runs, each unit's result is appended to its writer's log, `memo/<stage>/<writer>.log`
(a length-prefixed key and pickle per record, flushed as it is written). One file per writer, not
one per unit: on a whole layer, creating 12k small files and removing them again at the seal cost
about a third of what simulating and scoring the layer cost. A record that a crash cut short is
shorter than its header says and is ignored; everything before it is kept.

Once the stage's output is sealed, `seal` compacts the results it used: a unit's result is rows of
the sealed tables (its rows, with the methods it produced), so the memo keeps only an index from
each unit key to (folder, unit, polarity, methods) under `memo/<stage>/sealed/<scope>/`, a few dozen
bytes a unit (the folder relative to the output root, which may move), and every log whose results
are all sealed goes, as does an older index whose results the new one's folder all holds. A later
run reads a compacted result back from the folder's tables, as dicts or, for a stage that builds its table from them, as Arrow
slices (`columnar`); a folder since deleted or changed (not `is_complete`) answers nothing, and
the unit is recomputed.

Local only, also under a URL root: they only speed up a rerun on the same machine. Stored as
pickles while a stage runs: a unit's simulations are thousands of floats, which JSON encoded and
decoded slower than the embedding simulator computes them. Like any cache under `out`, they are
trusted as this user's own files.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import threading
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from autoexplain import files, layout
from autoexplain.storage import is_complete
from autoexplain.tables import write_table

_HEADER = struct.Struct("<II")  # key bytes, value bytes


class Memo:
    """`scope`: a name that every key of this stage's user is a function of (its records and layer):
    the compacted index is kept per scope, so that a shard reads the index of its own layer, not
    that of every shard of the model."""

    def __init__(self, root: str | os.PathLike, stage: str, scope: str = ""):
        self.root, self.dir = Path(root), layout.memo(root, stage)
        self.sealed_dir = self.dir / "sealed" / scope if scope else self.dir / "sealed"
        self._files: dict[Path, set[str]] = {}  # index file -> its keys, as read
        self.used: dict[str, list] = {}  # key -> its rows' shape, for `seal`
        self._index: dict[str, list[tuple]] | None = None  # compacted results
        self._folders: dict[tuple[str, str], dict | None] = {}
        self._lock = threading.Lock()  # a stage's unit threads look results up at once
        self._where: dict[str, tuple[Path, int, int]] | None = None  # key -> (log, offset, size)
        self._keys: dict[Path, set[str]] = {}  # log -> the keys it holds
        self._log = None  # this writer's log, opened on the first `put`

    # ------------------------------------------------------------ the logs

    def _scan(self) -> dict[str, tuple[Path, int, int]]:
        """Every complete record of the logs there now (called under the lock, once)."""
        if self._where is None:
            self._where = {}
            for path in sorted(self.dir.glob("*.log")):
                self._keys[path] = set()
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    while len(head := f.read(_HEADER.size)) == _HEADER.size:
                        n_key, n_value = _HEADER.unpack(head)
                        key = f.read(n_key).decode()
                        at = f.tell()
                        if at + n_value > size:
                            break  # cut short by a crash
                        self._where[key] = (path, at, n_value)
                        self._keys[path].add(key)
                        f.seek(n_value, os.SEEK_CUR)
        return self._where

    def get(self, key: str, columnar: bool = False):
        """A result, or None. `columnar`: a result compacted into a sealed folder comes back as
        `rows.TableRows` (one per table), not as dicts."""
        with self._lock:
            found = self._scan().get(key)
        value = None
        if found is not None:
            path, at, size = found
            try:
                with open(path, "rb") as f:
                    f.seek(at)
                    value = pickle.loads(f.read(size))
            except (OSError, pickle.UnpicklingError, EOFError):
                value = None  # a log compacted away meanwhile: fall back to the index
        if value is None:
            with self._lock:
                value = self._sealed_locked(key, columnar)  # notes its shape itself
        else:
            self._remember(key, value)
        return value

    def put(self, key: str, value) -> None:
        data, name = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), key.encode()
        with self._lock:
            where = self._scan()
            if self._log is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                path = self.dir / f"{files.writer_tag()}-{uuid.uuid4().hex[:8]}.log"
                self._log, self._keys[path] = open(path, "ab"), set()
            path = Path(self._log.name)
            self._log.write(_HEADER.pack(len(name), len(data)) + name)
            at = self._log.tell()
            self._log.write(data)
            self._log.flush()
            where[key] = (path, at, len(data))
            self._keys[path].add(key)
        self._remember(key, value)

    def get_or_compute(self, key: str, compute: Callable, keep: Callable | None = None, columnar: bool = False):
        """The remembered value, computing and storing it first if needed (unless `keep(value)` says no)."""
        value = self.get(key, columnar)
        if value is None:
            value = compute()
            if keep is None or keep(value):
                self.put(key, value)
        return value

    # ------------------------------------------------------------ compaction

    def _remember(self, key: str, value) -> None:
        """Note the shape of a result that is rows of one unit: a list of rows, or a tuple of lists
        (one per table). Anything else stays in its log."""
        lists = list(value) if isinstance(value, tuple) else [value]
        shape, unit = [], None
        for rows in lists:
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                return
            for r in rows:
                if unit is None:
                    unit = (r.get("unit"), r.get("polarity"))
                if (r.get("unit"), r.get("polarity")) != unit or "method" not in r:
                    return
            shape.append(sorted({r["method"] for r in rows}))
        if unit is not None and None not in unit:
            self.used[key] = [int(unit[0]), int(unit[1]), isinstance(value, tuple), shape]

    def seal(self, directory: Path, tables: list[str]) -> None:
        """The stage output in `directory` is sealed, and the results used for it are rows of its
        `tables` (in the order of a result's lists): index them, and remove the logs that hold
        nothing else."""
        if not self.used:
            return
        import polars as pl

        keys = sorted(self.used)
        index = pl.DataFrame({"key": keys, "unit": [self.used[k][0] for k in keys],
                              "polarity": [self.used[k][1] for k in keys],
                              "shape": [json.dumps([self.used[k][2], self.used[k][3]]) for k in keys]})
        index = index.with_columns(folder=pl.lit(layout.within(self.root, directory)), tables=pl.lit(json.dumps(tables)))
        written = self.sealed_dir / f"{Path(directory).name}.parquet"
        write_table(index.to_arrow(), written)
        with self._lock:
            for path, held in self._files.items():  # every result it points to is in the new one's folder too
                if path != written and held <= self.used.keys():
                    path.unlink(missing_ok=True)
            if self._log is not None:
                self._log.close()
                self._log = None
            gone = {path for path, held in self._keys.items() if held <= self.used.keys()}  # all compacted now
            for path in gone:
                path.unlink(missing_ok=True)
                del self._keys[path]
            self._where = {k: v for k, v in (self._where or {}).items() if v[0] not in gone}
            self._index = None

    def _sealed_locked(self, key: str, columnar: bool):
        if self._index is None:
            import polars as pl

            self._index = {}
            for path in sorted(self.sealed_dir.glob("*.parquet")):
                table = pl.read_parquet(path)
                self._files[path] = set(table["key"])
                for k, u, p, shape, folder, tables in table.iter_rows():
                    self._index.setdefault(k, []).append((u, p, shape, folder, tables))
        for u, p, shape, folder, tables in self._index.get(key, []):
            found = self._tables(folder, tables)
            if found is None:
                continue
            pair, methods = json.loads(shape)
            lists = [_rows_of(found[t], (u, p), set(m), columnar) for t, m in zip(json.loads(tables), methods)]
            self.used[key] = [u, p, pair, methods]
            return tuple(lists) if pair else lists[0]
        return None

    def _tables(self, folder: str, tables: str) -> dict | None:
        """A sealed folder's tables, each with its rows' indices by (unit, polarity), or None when
        the folder is gone or changed. Read once per folder."""
        if (folder, tables) not in self._folders:
            import polars as pl
            import pyarrow.parquet as pq

            got, where = None, layout.located(self.root, folder)
            if is_complete(where):
                got = {}
                for name in json.loads(tables):
                    table = pq.read_table(where / name)
                    keys = pl.from_arrow(table.select(["unit", "polarity", "method"])).with_row_index("at")
                    groups = keys.group_by("unit", "polarity", maintain_order=True).agg("at", "method")
                    got[name] = (table, {(u, p): (np.asarray(at, np.int64), np.asarray(m, object))
                                         for u, p, at, m in groups.iter_rows()}, [])
            self._folders[(folder, tables)] = got
        return self._folders[(folder, tables)]


def _rows_of(found: tuple, unit: tuple[int, int], methods: set[str], columnar: bool):
    """A unit's rows of one sealed table, those of `methods`: as `TableRows`, or as dicts."""
    from autoexplain.rows import TableRows, table_rows

    table, groups, as_dicts = found
    at, method = groups.get(unit, (np.zeros(0, np.int64), np.zeros(0, object)))
    at = at[np.isin(method, list(methods))]
    if columnar:
        return TableRows(table, at)
    if not as_dicts:  # the whole table once: a stage reads back most of its units
        as_dicts.extend(table_rows(table))
    return [as_dicts[i] for i in at]
