"""Parquet on disk: content-addressed stage outputs, written atomically.

Every stage writes into `<root>/<stage>/<key>/`, where `key` hashes everything the output depends on
(inputs' hashes, parameters, code version). Two runs that would compute the same thing therefore
share a folder, and a finished folder is never rewritten. Files are written to a temporary name in
the same folder and renamed, so a crash leaves either the old state or the whole new file. A root
may also be an fsspec URL, worked on through a local mirror (`open_root`, `autoexplain.remote`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import pickle
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from autoexplain import remote
from autoexplain.remote import MANIFEST
from autoexplain.records import KIND
from autoexplain.sources import MLP
from schemas import conform, load_schema


def content_key(payload: Any, length: int = 16) -> str:
    """A stable hash of JSON-able data (dict keys sorted)."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def stage_dir(root: str | os.PathLike, stage: str, key: str) -> Path:
    directory = Path(root) / stage / key
    if not is_complete(directory):
        # Under the mirror of a URL root (`open_root`), a folder finished elsewhere is downloaded,
        # not recomputed.
        remote.pull(directory)
    return directory


def open_root(out: str | os.PathLike) -> Path:
    """The local folder for an output root: `out` itself, or the local mirror of a URL (`remote`)."""
    return remote.open_root(out)


def is_complete(directory: Path) -> bool:
    """A stage folder counts only once its manifest exists (it is written last), every file it
    lists still has the digest it was sealed with, and its tables keep their contracts
    (`schemas.gate`): a changed, truncated or contract-breaking folder is unfinished, so it is
    recomputed rather than read."""
    from schemas.contracts import ContractViolation

    if damaged(directory) is not None or not (Path(directory) / MANIFEST).is_file():
        return False
    try:
        _gate(Path(directory), read_manifest(directory))
    except ContractViolation:
        return False
    return True


def _gate(directory: Path, manifest: dict) -> dict[str, str]:
    from schemas.gate import check_folder

    return check_folder(manifest["stage"], directory, manifest)


# (path, size, mtime_ns) -> digest: a file is hashed once per process until it changes.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _digest_once(path: Path, length: int) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path, length)
    return _DIGESTS[key]


def damaged(directory: str | os.PathLike) -> str | None:
    """The first file of a sealed folder that is missing or differs from its manifest, else None
    (also None for a folder with no manifest: that is unfinished, not damaged)."""
    directory = Path(directory)
    try:
        outputs = json.loads((directory / MANIFEST).read_text()).get("outputs", {})
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:
        return MANIFEST
    for name, digest in outputs.items():
        if _digest_once(directory / name, len(digest)) != digest:
            return name
    return None


def require_complete(directory: str | os.PathLike, what: str, fix: str) -> Path:
    """A finished, undamaged stage folder, or a UserError that names the folder or the file."""
    from autoexplain.errors import UserError

    from schemas.contracts import ContractViolation

    directory = Path(directory)
    bad = damaged(directory)
    if bad is not None:
        raise UserError(f"{directory / bad} does not match its manifest (changed or truncated)",
                        f"delete {directory} and rerun the stage that wrote it")
    if not (directory / MANIFEST).is_file():
        raise UserError(f"{directory} is not a finished {what} folder (no {MANIFEST})", fix)
    try:
        _gate(directory, read_manifest(directory))
    except ContractViolation as e:
        failed = "; ".join(e.report.failures) or e.report.summary()
        raise UserError(f"{e.path} breaks its data contract '{e.report.suite}': {failed}",
                        f"delete {directory} and rerun the stage that wrote it (the same autoexplain command)") from None
    return directory


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_table(table: pa.Table, path: str | os.PathLike, schema_name: str | None = None) -> Path:
    """Write a parquet file atomically, cast to the named schema when one is given."""
    path = Path(path)
    if schema_name is not None:
        table = conform(table, schema_name)
    tmp = _atomic_target(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class TableWriter:
    """Streams record batches into one parquet file; the file appears only on `close()`."""

    def __init__(self, path: str | os.PathLike, schema_name: str):
        self.path = Path(path)
        self.schema = load_schema(schema_name)
        self._tmp = _atomic_target(self.path)
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")

    def write(self, columns: dict[str, Iterable]) -> None:
        batch = pa.Table.from_pydict(dict(columns), schema=self.schema)
        self._writer.write_table(batch)

    def write_table(self, table: pa.Table) -> None:
        self._writer.write_table(table.cast(self.schema))

    def close(self) -> Path:
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_json(data: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_manifest(directory: Path, stage: str, key: str, inputs: dict, params: dict, outputs: list[str]) -> Path:
    """Seal a stage folder. Written last, so its presence means every output is whole."""
    digests = {name: file_digest(directory / name) for name in outputs}
    manifest = {"stage": stage, "key": key, "inputs": inputs, "params": params, "outputs": digests}
    # Check, then seal: a table that breaks its contract raises here, and the folder stays unsealed.
    manifest["contract_versions"] = _gate(directory, manifest)
    path = write_json(manifest, directory / MANIFEST)
    remote.push(directory)  # a no-op outside the mirror of a URL root
    return path


def read_manifest(directory: str | os.PathLike) -> dict:
    return json.loads((Path(directory) / MANIFEST).read_text())


def layer_name(layer: int, kind: str = MLP.kind) -> str:
    """A layer's units of one source, as a file or folder name: 'layer_15' for its MLP neurons (the
    name every run had before sources), 'layer_15.sae-res-16k' for a coder's latents."""
    return f"layer_{layer}" if kind == MLP.kind else f"layer_{layer}.{kind}"


_LAYER_NAME = re.compile(rf"layer_(\d+)(?:\.({KIND}))?")


def run_file(root: str | os.PathLike, layer: int, kind: str = MLP.kind) -> Path:
    """The pointer to the latest finished run of a layer's units of one source under an output
    root: its flow parameters and the references of its outputs. What `rescore` and `revise` start
    from, so a user names a run by its output root, layer and source, never by internal keys.
    Mutable, unlike the stage folders."""
    return Path(root) / "runs" / f"{layer_name(layer, kind)}.json"


def run_sources(root: str | os.PathLike) -> list[tuple[int, str]]:
    """(layer, source kind) of every run pointer under a local output root."""
    found = []
    for p in run_file(root, 0).parent.glob("layer_*.json"):
        m = _LAYER_NAME.fullmatch(p.stem)
        if m:
            found.append((int(m.group(1)), m.group(2) or MLP.kind))
    return sorted(found)


def run_layers(root: str | os.PathLike, kind: str = MLP.kind) -> list[int]:
    """The layers with a run pointer for units of this source under a local output root."""
    return [layer for layer, k in run_sources(root) if k == kind]


def write_run(root: str | os.PathLike, layer: int, run: dict, report: str | None = None, kind: str = MLP.kind) -> Path:
    """Point the layer's units of source `kind` at a finished run; `report` (markdown, e.g. a
    re-score's comparison) goes beside the pointer as `<layer name>.<flow>.md`."""
    path = write_json(run, run_file(root, layer, kind))
    remote.push_file(path)
    if report is not None:
        md = path.with_name(f"{path.stem}.{run['flow']}.md")
        tmp = _atomic_target(md)
        tmp.write_text(report)
        os.replace(tmp, md)
        remote.push_file(md)
    return path


def read_run(root: str | os.PathLike, layer: int, kind: str = MLP.kind) -> dict | None:
    path = run_file(root, layer, kind)
    if not remote.pull_file(path):
        return None
    return json.loads(path.read_text())


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
        self.dir = Path(root) / "memo" / stage
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
        path = self._path(key)
        tmp = _atomic_target(path)
        try:
            tmp.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._remember(key, value)

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


def local_ref(output: dict) -> dict:
    """A task reference with its paths on this machine. One made on another dask worker, or restored
    from Prefect's result cache after the mirror was cleared, may name a folder that is not here: it
    is pulled from its URL. A records reference names its folder (and windows), the others a table."""
    path = Path(output["path"])
    folder = path if "layers" in output else path.parent
    if is_complete(folder) or output["uri"] == folder.resolve().as_uri():
        return output
    local = remote.fetch(output["uri"])
    if "layers" not in output:
        return {**output, "path": str(local / path.name)}
    root = output["uri"].rsplit("/", 2)[0]
    windows = remote.fetch(f"{root}/windows/{read_manifest(local)['inputs']['windows']}")
    return {**output, "path": str(local), "windows": str(windows / "windows.parquet")}
