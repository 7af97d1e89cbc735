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
7. memo: the stage's per-unit results (`memo.Memo`) are compacted into an index of the sealed tables.

A stage verifies its inputs before it reads them (`storage.require_complete`, or `is_complete` for a
folder it may recompute): the digests match, the contracts pass (remembered by digest).
"""

from __future__ import annotations

import os
import shutil
import weakref
from pathlib import Path
from typing import Callable

import pyarrow as pa

from autoexplain import files, layout, remote
from autoexplain.identity import code_identity
from autoexplain.storage import (
    UNANSWERED,
    check_contracts,
    content_key,
    count_unanswered,
    file_digest,
    is_complete,
    remember_digest,
    unanswered,
    write_json,
)
from autoexplain.tables import TableWriter, write_table
from autoexplain.schemas.contract_report import ContractViolation


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
        self._unanswered = 0
        self._replace_remote = False

    @classmethod
    def open(cls, root: str | os.PathLike, stage: str, fields: dict, *code: str | Callable) -> "Stage":
        return cls(root, stage, stage_key(fields, *code))

    @property
    def done(self) -> bool:
        """Whether the output is sealed, whole (pulled first when it is at the URL only, pushed when it
        is in the mirror only) and final:
        one with rows whose LLM request got no answer is made again (`storage.UNANSWERED`)."""
        if is_complete(self.directory):
            # reused from the mirror: the URL may lack it (a push that failed, a URL emptied since),
            # and a run that ends well must leave at the URL every folder it names
            remote.push(self.directory)
        elif remote.pull(self.directory):
            if not is_complete(self.directory):
                self._replace_remote = True  # damaged at the URL: the copy made now must replace it
                return False
        else:
            return False
        if unanswered(self.directory):
            self._replace_remote = True  # not final: the copy made now is, and replaces it at the URL
            return False
        return True

    def path(self, name: str) -> Path:
        """Where to write the output file `name`: in the temporary folder, until the seal."""
        if self._tmp is None:
            files.sweep_stale(self.directory.parent)  # what killed writers of this stage left
            self._tmp = files.temporary_folder_beside(self.directory)
            self._discard = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        if name not in self._written:
            self._written.append(name)
        return self._tmp / name

    def table(self, table: pa.Table, name: str, schema_name: str | None = None, counted: bool = True) -> Path:
        """`counted=False`: a table whose unanswered rows are another's, already counted (a copy of
        an input's rows), so that a result without an answer is counted once."""
        if counted:
            self._unanswered += count_unanswered(table)
        return write_table(table, self.path(name), schema_name)

    def writer(self, name: str, schema_name: str) -> TableWriter:
        """A table streamed in batches (`tables.TableWriter`)."""
        return TableWriter(self.path(name), schema_name)

    def seal(self, inputs: dict, params: dict, memo: "Memo | None" = None,
             memo_tables: list[str] | None = None) -> Path:
        """Check, seal, move into place, push; then compact `memo`, whose results are rows of
        `memo_tables` (default: the tables written, in order). Returns the folder."""
        if self._tmp is None:
            raise RuntimeError(f"the {self.stage} output {self.key} has no files to seal")
        try:
            # made from an input that is not final (its key stays when it is made again), this is not final either
            inherited = sum(unanswered(v) for v in inputs.values() if isinstance(v, (str, os.PathLike)))
            digests = seal_folder(self._tmp, self.stage, self.key, inputs, params, self._written, push=False,
                                  unanswered=self._unanswered + inherited)
            ours = _move_into_place(self._tmp, self.directory)
        except ContractViolation as e:  # named by the output's path: the temporary folder goes now
            e.path = self.directory / Path(e.path).name
            raise
        finally:
            self._discard()  # a no-op once the folder has moved
            self._tmp = None
        for name, digest in digests.items() if ours else ():  # moved, not changed: not hashed again
            remember_digest(self.directory / name, digest)
        remote.push(self.directory, replace=self._replace_remote)  # a no-op outside the mirror of a URL root
        if memo is not None:
            memo.seal(self.directory, memo_tables or self._written)
        return self.directory


def seal_folder(directory: Path, stage: str, key: str, inputs: dict, params: dict, outputs: list[str],
                push: bool = True, unanswered: int = 0) -> dict[str, str]:
    """Check every table of a folder against its contract, then write its manifest (last); push it
    under a URL root. `Stage.seal` does this in its temporary folder; called directly, it seals a
    folder assembled in place (a test's fixture). Returns {file: digest}. A table that breaks its
    contract raises `ContractViolation`, and the folder stays unsealed."""
    digests = {name: file_digest(directory / name) for name in outputs}
    inputs = {name: _stored(layout.root_of(directory), value) for name, value in inputs.items()}
    manifest = {"stage": stage, "key": key, "inputs": inputs, "params": params, "outputs": digests,
                **({UNANSWERED: unanswered} if unanswered else {})}
    manifest["contract_versions"] = check_contracts(directory, manifest)
    write_json(manifest, directory / layout.MANIFEST)
    if push:
        remote.push(directory)
    return digests


def _stored(root: Path, value):
    """A manifest's input as stored: a folder (given as a path object) relative to the root when it is
    inside it (`layout.within`); keys, digests and names as they are."""
    if isinstance(value, list):
        return [_stored(root, v) for v in value]
    return layout.within(root, value) if isinstance(value, os.PathLike) else value


def _move_into_place(tmp: Path, directory: Path) -> bool:
    """Rename the sealed temporary folder to the output's path; False when another writer sealed the
    same key meanwhile (the same content): theirs stays. An unfinished or damaged folder there is
    set aside first."""
    try:
        os.rename(tmp, directory)
        return True
    except OSError:
        if is_complete(directory) and not unanswered(directory):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    old = files.aside(directory)
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return True
