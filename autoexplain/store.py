"""The store: the one owner of stage outputs. Every stage writes its output through `Stage`:

1. key: `stage_key` hashes what the output depends on (inputs' keys, parameters, prompts) with the
   code identity of the functions that compute it. Prefect's task cache keys call it too;
2. path: `<root>/<stage>/<key>/` (`layout`);
3. reuse: a folder that is sealed, undamaged and keeps its contracts is returned as it is (first
   pulled from the URL, under a URL root), and nothing is computed;
4. write: the tables go into a temporary folder beside it (`Stage.path`), so nothing half-written
   is ever at the output's path; those a killed writer left are swept first (`files.sweep_stale`);
5. check, then seal: every table against its contract (`schemas.gate`), then the manifest (each
   file's digest and the version of the suite it passed), then the folder moves into place. A
   failing output is never sealed: the temporary folder goes and the `ContractViolation` is raised;
6. push: to the URL, under a URL root;
7. memo: the stage's per-unit results (`Memo`) are compacted into an index of the sealed tables.

A stage verifies its inputs before it reads them (`storage.require_complete`, or `is_complete` for a
folder it may recompute): the digests match, the contracts pass (remembered by digest).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import weakref
from pathlib import Path
from typing import Callable

import pyarrow as pa

from autoexplain import files, layout, remote
from autoexplain.identity import code_identity
from autoexplain.storage import (
    TableWriter,
    check_contracts,
    content_key,
    file_digest,
    is_complete,
    remember_digest,
    write_json,
    write_table,
)
from schemas.contract_report import ContractViolation


def stage_key(fields: dict, *code: str | Callable) -> str:
    """The content key of a stage output (or of a task's cached result): `fields` with the code
    identity of the functions that compute it (none: the fields are the content itself)."""
    return content_key({**fields, "code": code_identity(*code)} if code else fields)


class Stage:
    """One stage output being found or written. Used as

        stage = Stage.open(out, "scores", {"simulations": key, **params}, run_score)
        if stage.done:
            return ...                       # sealed earlier: reused
        ...compute...
        stage.table(rows, "layer_3.parquet", "scores")
        stage.seal(inputs, params, memo)

    A stage that is never sealed (an error on the way, a contract its output broke) leaves nothing
    at the output's path, and its temporary folder goes with it (when the seal fails, or when the
    `Stage` is dropped; a killed process leaves a hidden folder that nothing reads, and the next
    write of the stage sweeps it: `files.sweep_stale`).
    """

    def __init__(self, root: str | os.PathLike, stage: str, key: str):
        self.stage, self.key = stage, key
        self.directory = layout.folder(root, stage, key)
        self._tmp: Path | None = None
        self._written: list[str] = []
        self._discard: weakref.finalize | None = None

    @classmethod
    def open(cls, root: str | os.PathLike, stage: str, fields: dict, *code: str | Callable) -> "Stage":
        return cls(root, stage, stage_key(fields, *code))

    @property
    def done(self) -> bool:
        """Whether the output is sealed and whole (pulled first when it is at the URL only)."""
        if is_complete(self.directory):
            return True
        return remote.pull(self.directory) and is_complete(self.directory)

    def path(self, name: str) -> Path:
        """Where to write the output file `name`: in the temporary folder, until the seal."""
        if self._tmp is None:
            files.sweep_stale(self.directory.parent)  # what killed writers of this stage left
            self._tmp = files.temporary_folder_beside(self.directory)
            self._discard = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        if name not in self._written:
            self._written.append(name)
        return self._tmp / name

    def table(self, table: pa.Table, name: str, schema_name: str | None = None) -> Path:
        return write_table(table, self.path(name), schema_name)

    def writer(self, name: str, schema_name: str) -> TableWriter:
        """A table streamed in batches (`storage.TableWriter`)."""
        return TableWriter(self.path(name), schema_name)

    def seal(self, inputs: dict, params: dict, memo: "Memo | None" = None,
             memo_tables: list[str] | None = None) -> Path:
        """Check, seal, move into place, push; then compact `memo`, whose results are rows of
        `memo_tables` (default: the tables written, in order). Returns the folder."""
        if self._tmp is None:
            raise RuntimeError(f"the {self.stage} output {self.key} has no files to seal")
        try:
            digests = seal_folder(self._tmp, self.stage, self.key, inputs, params, self._written, push=False)
            ours = _move_into_place(self._tmp, self.directory)
        except ContractViolation as e:  # named by the output's path: the temporary folder goes now
            e.path = self.directory / Path(e.path).name
            raise
        finally:
            self._discard()  # a no-op once the folder has moved
            self._tmp = None
        for name, digest in digests.items() if ours else ():  # moved, not changed: not hashed again
            remember_digest(self.directory / name, digest)
        remote.push(self.directory)  # a no-op outside the mirror of a URL root
        if memo is not None:
            memo.seal(self.directory, memo_tables or self._written)
        return self.directory


def seal_folder(directory: Path, stage: str, key: str, inputs: dict, params: dict, outputs: list[str],
                push: bool = True) -> dict[str, str]:
    """Check every table of a folder against its contract, then write its manifest (last); push it
    under a URL root. `Stage.seal` does this in its temporary folder; called directly, it seals a
    folder assembled in place (a test's fixture). Returns {file: digest}. A table that breaks its
    contract raises `ContractViolation`, and the folder stays unsealed."""
    digests = {name: file_digest(directory / name) for name in outputs}
    manifest = {"stage": stage, "key": key, "inputs": inputs, "params": params, "outputs": digests}
    manifest["contract_versions"] = check_contracts(directory, manifest)
    write_json(manifest, directory / layout.MANIFEST)
    if push:
        remote.push(directory)
    return digests


def _move_into_place(tmp: Path, directory: Path) -> bool:
    """Rename the sealed temporary folder to the output's path; False when another writer sealed the
    same key meanwhile (the same content): theirs stays. An unfinished or damaged folder there is
    set aside first."""
    try:
        os.rename(tmp, directory)
        return True
    except OSError:
        if is_complete(directory):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    old = files.aside(directory)
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return True


class Memo:
    """Per-unit results inside a stage, keyed by content: a rerun after a crash, or after an edit
    that touches a few units, recomputes only the units whose inputs changed.

    While a stage runs, each unit's result is a pickle (a crash keeps what finished). Once the
    stage's output is sealed, `seal` compacts them: a unit's result is rows of the sealed tables
    (its rows, with the methods it produced), so the memo keeps only an index from each unit key to
    (folder, unit, polarity, methods) under `memo/<stage>/sealed/`, a few dozen bytes a unit, and
    the pickles go. A later run reads a compacted result back from the folder's tables; a folder
    since deleted or changed (not `is_complete`) answers nothing, and the unit is recomputed.

    Local only, also under a URL root: they only speed up a rerun on the same machine, and pushing
    thousands of small files would cost more than the units they save. Stored as pickles while a
    stage runs: a unit's simulations are thousands of floats, which JSON encoded and decoded slower
    than the embedding simulator computes them. Like any cache under `out`, they are trusted as
    this user's own files."""

    def __init__(self, root: str | os.PathLike, stage: str):
        self.dir = layout.memo(root, stage)
        self.used: dict[str, list] = {}  # key -> its rows' shape, for `seal`
        self._index: dict[str, list[tuple]] | None = None
        self._folders: dict[tuple[str, str], dict | None] = {}
        self._lock = threading.Lock()  # a stage's unit threads look results up at once

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.pkl"

    def get(self, key: str):
        path = self._path(key)
        try:
            value = pickle.loads(path.read_bytes())
        except FileNotFoundError:
            value = self._sealed(key)
        if value is not None:
            self._remember(key, value)
        return value

    def put(self, key: str, value) -> None:
        files.write_bytes(self._path(key), pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        self._remember(key, value)

    def get_or_compute(self, key: str, compute: Callable, keep: Callable | None = None):
        """The remembered value, computing and storing it first if needed (unless `keep(value)` says no)."""
        value = self.get(key)
        if value is None:
            value = compute()
            if keep is None or keep(value):
                self.put(key, value)
        return value

    # ------------------------------------------------------------ compaction

    def _remember(self, key: str, value) -> None:
        """Note the shape of a result that is rows of one unit: a list of rows, or a tuple of lists
        (one per table). Anything else stays a pickle."""
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
        `tables` (in the order of a result's lists): index them, and remove their pickles."""
        if not self.used:
            return
        import polars as pl

        keys = sorted(self.used)
        index = pl.DataFrame({"key": keys, "unit": [self.used[k][0] for k in keys],
                              "polarity": [self.used[k][1] for k in keys],
                              "shape": [json.dumps([self.used[k][2], self.used[k][3]]) for k in keys]})
        index = index.with_columns(folder=pl.lit(str(Path(directory).resolve())), tables=pl.lit(json.dumps(tables)))
        write_table(index.to_arrow(), self.dir / "sealed" / f"{Path(directory).name}.parquet")
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        for sub in self.dir.glob("??"):
            try:
                sub.rmdir()  # only when empty
            except OSError:
                pass
        self._index = None

    def _sealed(self, key: str):
        with self._lock:
            return self._sealed_locked(key)

    def _sealed_locked(self, key: str):
        if self._index is None:
            import polars as pl

            self._index = {}
            for path in sorted((self.dir / "sealed").glob("*.parquet")):
                for k, u, p, shape, folder, tables in pl.read_parquet(path).iter_rows():
                    self._index.setdefault(k, []).append((u, p, shape, folder, tables))
        for u, p, shape, folder, tables in self._index.get(key, []):
            rows = self._rows(folder, tables)
            if rows is None:
                continue
            pair, methods = json.loads(shape)
            lists = [[r for r in rows[t].get((u, p), []) if r["method"] in set(m)]
                     for t, m in zip(json.loads(tables), methods)]
            return tuple(lists) if pair else lists[0]
        return None

    def _rows(self, folder: str, tables: str) -> dict | None:
        """A sealed folder's tables, each as {(unit, polarity): rows}, or None when the folder is
        gone or changed. Read once per folder."""
        if (folder, tables) not in self._folders:
            import polars as pl

            got = None
            if is_complete(Path(folder)):
                got = {}
                for name in json.loads(tables):
                    df = pl.read_parquet(Path(folder) / name)
                    got[name] = {k: part.to_dicts() for k, part in
                                 df.partition_by(["unit", "polarity"], as_dict=True, maintain_order=True).items()}
            self._folders[(folder, tables)] = got
        return self._folders[(folder, tables)]
