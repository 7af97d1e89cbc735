"""Parquet on disk: tables and manifests written atomically, and what a stage may read.

Stage outputs are content-addressed folders, written only through `autoexplain.store`; this module
has what reading them needs: whether a folder is finished and whole (`is_complete`,
`require_complete`: digests, then contracts), its manifest, and the atomic table and JSON writers
the store and the caches use. A root may also be an fsspec URL, worked on through a local mirror
(`open_root`, `autoexplain.remote`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from autoexplain import files, layout, remote
from autoexplain.layout import MANIFEST
from autoexplain.records import KIND
from autoexplain.sources import MLP


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


def open_root(out: str | os.PathLike, create: bool = True) -> Path:
    """The local folder for an output root: `out` itself, or the local mirror of a URL (`remote`);
    `create` False for a command that only reads it."""
    return remote.open_root(out, create)


def is_complete(directory: Path) -> bool:
    """A stage folder counts only once its manifest exists (it is written last), every file it
    lists still has the digest it was sealed with, and its tables keep their contracts
    (`schemas.gate`): a changed, truncated or contract-breaking folder is unfinished, so it is
    recomputed rather than read."""
    from autoexplain.schemas.contracts import ContractViolation

    if damaged(directory) is not None or not (Path(directory) / MANIFEST).is_file():
        return False
    try:
        check_contracts(Path(directory), read_manifest(directory))
    except ContractViolation:
        return False
    return True


def check_contracts(directory: Path, manifest: dict) -> dict[str, str]:
    """{file: version of the suite it passed} for a folder's tables (`schemas.gate`); raises
    `ContractViolation` for the first that breaks its contract."""
    from autoexplain.schemas.gate import check_folder

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


def remember_digest(path: Path, digest: str) -> None:
    """Note a file's digest, known without reading it (a file the store just moved)."""
    st = path.stat()
    _DIGESTS[(str(path), st.st_size, st.st_mtime_ns)] = digest


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


ANY_STAGE = "stage output"


def require_complete(directory: str | os.PathLike, what: str, fix: str, rerun: str | None = None) -> Path:
    """A finished, undamaged stage folder of stage `what` (any stage for ANY_STAGE), or a UserError
    that names the folder or the file. `rerun` is the advice for a damaged folder where the caller
    knows what wrote it (a run pointer's flow); else the folder's stage names a command."""
    from autoexplain.errors import UserError

    from autoexplain.schemas.contracts import ContractViolation

    directory = Path(directory)
    bad = damaged(directory)
    if bad is not None:
        raise UserError(f"{directory / bad} does not match its manifest (changed or truncated)", rerun or _rerun(directory))
    if not (directory / MANIFEST).is_file():
        inside = _finished_inside(directory, what)
        if inside:  # the stage's root (out/records) given for one of its folders (out/records/KEY)
            more = f" (or another of the {len(inside)} there)" if len(inside) > 1 else ""
            fix = f"pass the {what} folder inside it: {inside[-1]}{more}"
        raise UserError(f"{directory} is not a finished {what} folder (no {MANIFEST})", fix)
    made = read_manifest(directory).get("stage")
    if what != ANY_STAGE and made is not None and made != what:
        raise UserError(f"{directory} holds {made}, not {what}", fix)
    try:
        check_contracts(directory, read_manifest(directory))
    except ContractViolation as e:
        failed = "; ".join(e.report.failures) or e.report.summary()
        raise UserError(f"{e.path} breaks its data contract '{e.report.suite}': {failed}", rerun or _rerun(directory)) from None
    return directory


def _finished_inside(directory: Path, what: str) -> list[Path]:
    """The finished folders of stage `what` directly inside `directory`, newest last."""
    try:
        children = [c for c in directory.iterdir() if (c / MANIFEST).is_file()]
    except OSError:
        return []
    return sorted((c for c in children if what == ANY_STAGE or _stage_of(c) in (what, None)),
                  key=lambda c: (c / MANIFEST).stat().st_mtime)


def _stage_of(directory: Path) -> str | None:
    try:
        return read_manifest(directory).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


def _rerun(directory: Path) -> str:
    """What to do about a broken stage folder: rerun the command that wrote it."""
    try:
        command = layout.WRITTEN_BY.get(read_manifest(directory).get("stage"))
    except (OSError, ValueError, AttributeError):
        command = None
    how = f"{command} with the flags that wrote it" if command else "the same autoexplain command"
    return f"delete {directory} and rerun the stage that wrote it: {how}"


def write_json(data: Any, path: str | os.PathLike) -> Path:
    return files.write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def read_manifest(directory: str | os.PathLike) -> dict:
    return json.loads((Path(directory) / MANIFEST).read_text())


# A manifest's count of rows whose LLM request failed for good (its retries ran out: a server down
# or overloaded). Such an output is sealed, so the run goes on and shows what it has, but it is not
# final: it is made again on the next run, which asks only those (the answered units are memoised).
UNANSWERED = "unanswered"


def unanswered(directory: str | os.PathLike) -> int:
    """Rows with no LLM answer behind a sealed stage output: its own, and those of the
    inputs it was made from (0 for an unsealed folder)."""
    try:
        return int(read_manifest(directory).get(UNANSWERED, 0))
    except (OSError, ValueError):
        return 0


def count_unanswered(table: pa.Table) -> int:
    if "failure" not in table.column_names:
        return 0
    import pyarrow.compute as pc

    from autoexplain.errors import NO_ANSWER

    return int(pc.sum(pc.starts_with(table.column("failure"), NO_ANSWER)).as_py() or 0)


def recording_of(stage_folder: str | os.PathLike) -> str | None:
    """The key of the recording a stage output was made from, by the inputs its manifest names:
    directly, or through the explanations a revision revised or the simulations a score scored.
    None where they do not say (an imported output) or the folder above is not under this root."""
    inputs = read_manifest(stage_folder).get("inputs", {})
    if "records" in inputs:
        return layout.key_of(inputs["records"])
    for stage in ("explanations", "simulations"):
        if stage in inputs:
            above = layout.sibling(stage_folder, stage, layout.key_of(inputs[stage]))
            return recording_of(above) if (above / MANIFEST).is_file() else None
    return None


def require_recording(stage_folder: str | os.PathLike, records_dir: str | os.PathLike) -> None:
    """A UserError unless `stage_folder` was made from the recording in `records_dir`: read with
    another recording's windows and activations, its units would be scored, shown or exported
    against exemplars they were never explained or simulated on."""
    from autoexplain.errors import UserError

    made_from, given = recording_of(stage_folder), read_manifest(records_dir)["key"]
    if made_from is not None and made_from != given:
        raise UserError(f"{stage_folder} was made from the recording {made_from}, not from {records_dir}",
                        f"pass --records {layout.sibling(stage_folder, 'records', made_from)}")


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
    """(layer, source kind) of every run pointer under an output root (under a URL root, those at
    the URL, pulled into the mirror: this machine may never have run there)."""
    runs = run_file(root, 0).parent
    remote.pull_files(runs)
    found = []
    for p in runs.glob("layer_*.json"):
        m = _LAYER_NAME.fullmatch(p.stem)
        if m:
            found.append((int(m.group(1)), m.group(2) or MLP.kind))
    return sorted(found)


def run_layers(root: str | os.PathLike, kind: str = MLP.kind) -> list[int]:
    """The layers with a run pointer for units of this source under an output root."""
    return [layer for layer, k in run_sources(root) if k == kind]


def write_run(root: str | os.PathLike, layer: int, run: dict, report: str | None = None, kind: str = MLP.kind) -> Path:
    """Point the layer's units of source `kind` at a finished run; `report` (markdown, e.g. a
    re-score's comparison) goes beside the pointer as `<layer name>.<flow>.md`. What the run names
    inside the root is stored relative to it, and `read_run` reads it against the root it is given:
    a root moved or copied whole keeps its runs."""
    path = write_json(_run_as(run, Path(root).resolve(), _stored_ref, _stored_place), run_file(root, layer, kind))
    remote.push_file(path)
    if report is not None:
        md = files.write_text(path.with_name(f"{path.stem}.{run['flow']}.md"), report)
        remote.push_file(md)
    return path


def read_run(root: str | os.PathLike, layer: int, kind: str = MLP.kind) -> dict | None:
    """The layer's run pointer (None where there is none), or a UserError for one that is no longer
    JSON: cut short or edited by hand."""
    from autoexplain.errors import UserError

    path = run_file(root, layer, kind)
    if not remote.pull_file(path):
        return None
    try:
        run = json.loads(path.read_text())
    except ValueError:  # a JSONDecodeError, or bytes cut inside a character
        run = None
    if not isinstance(run, dict):
        raise UserError(f"{path} is not a readable run pointer (changed or truncated)",
                        "delete it and rerun the explain-layer command that made the run, which writes it (what "
                        "the run finished is reused)")
    return _run_as(run, Path(root).resolve(), _read_ref, _read_place)


def require_outputs(run: dict, stages: tuple[str, ...]) -> None:
    """Every output of `stages` that a run pointer names (a recording with its windows), here (pulled
    from its URL) and whole, or the UserError of the first that is not (`require_complete`): a
    command that reads a run checks it before any work, not when a task trips over it."""
    for stage in stages:
        refs = run.get(stage) or []
        for ref in refs if isinstance(refs, list) else [refs]:
            ref = local_ref(ref)
            folders = [(stage, Path(ref["path"]))] if "layers" in ref else [(stage, Path(ref["path"]).parent)]
            folders += [("windows", Path(ref["windows"]).parent)] if "windows" in ref else []
            for what, folder in folders:
                require_complete(folder, what, "delete it and rerun the command that made the run (explain-layer, "
                                 "rescore or revise): what it finished is reused", _rerun_run(run))


def _rerun_run(run: dict) -> str:
    """Advice for a damaged folder of a run, from the command its pointer records (`flow`): the folder's
    stage command, with its default flags, would write another key while the pointer names this one."""
    flow = run.get("flow", "explain-layer")
    if flow in ("rescore", "revise"):
        return f"rerun the explain-layer command this {flow} started from (it rebuilds the damaged folder), then the {flow}"
    return f"rerun the {flow} command that made this run (it rebuilds the damaged folder)"


# A run's fields that name a place, besides its outputs' references: the site's folder (a path, or
# a URL under a URL root), the model's site folder of an explain-model run, and the site's index URI.
_PLACES = ("site_dir", "model_site_dir", "site")
_REF_PATHS = ("path", "windows")  # a reference's table (a records reference: its folder) and windows


def _run_as(run: dict, root: Path, ref, place) -> dict:
    """`run` with each output reference (alone or in a list) and each place converted."""
    return {name: place(root, name, value) if name in _PLACES else
            [ref(root, v) for v in value] if isinstance(value, list) else ref(root, value)
            for name, value in run.items()}


def _stored_ref(root: Path, ref):
    if not (isinstance(ref, dict) and "path" in ref):
        return ref
    stored = {k: layout.within(root, v) if k in _REF_PATHS else v for k, v in ref.items()}
    if Path(stored["path"]).is_absolute():  # not in this root (made on another machine): its URI says where
        return ref
    return {k: v for k, v in stored.items() if k != "uri"}  # the root it is read from gives it


def _read_ref(root: Path, ref):
    if not (isinstance(ref, dict) and "path" in ref):
        return ref
    read = {k: str(layout.located(root, v)) if k in _REF_PATHS else v for k, v in ref.items()}
    if read["path"] != ref["path"] or "uri" not in ref:  # stored relative, or found under this root
        path = Path(read["path"])
        read["uri"] = remote.uri(path if "layers" in ref else path.parent)
    return read


def _stored_place(root: Path, name: str, place):
    if not isinstance(place, str):
        return place
    if remote.is_url(place):  # under a URL root, or a local root's file:// URI
        base = remote.uri(root).rstrip("/") + "/"
        return place.removeprefix(base)
    return layout.within(root, place)


def _read_place(root: Path, name: str, place):
    if not isinstance(place, str) or remote.is_url(place):
        return place
    path = layout.located(root, place)
    if name == "site":
        return remote.uri(path)
    where = remote.location(path)  # a folder under a URL root is named by its URL
    return where[0] if where else str(path)


def local_ref(output: dict) -> dict:
    """A task reference with its paths on this machine. One made on another dask worker, or restored
    from Prefect's result cache after the mirror was cleared, may name a folder that is not here: it
    is pulled from its URL. A records reference names its folder (and windows), the others a table."""
    from autoexplain.errors import UserError

    path = Path(output["path"])
    folder = path if "layers" in output else path.parent
    if is_complete(folder):
        # a cached task's output, reused from the mirror: the URL may lack it (see `Stage.done`)
        remote.push(folder)
        if "layers" in output:
            remote.push(Path(output["windows"]).parent)
        return output
    if output["uri"] == folder.resolve().as_uri():  # under a local root: nowhere else to look
        if not folder.is_dir():
            raise UserError(f"{folder} does not exist", "rerun the command that made it, with --out naming the "
                            "output root where it is now")
        return output
    local = remote.fetch(output["uri"])
    if "layers" not in output:
        return {**output, "path": str(local / path.name)}
    root = layout.split_folder_url(output["uri"])[0]
    windows = remote.fetch(layout.folder_url(root, "windows", read_manifest(local)["inputs"]["windows"]))
    return {**output, "path": str(local), "windows": str(windows / layout.WINDOWS)}


# What a reader of a stage folder follows it to, by the input its manifest names (a scores folder's
# viewer reads its simulations, their records and the records' windows).
_FOLLOWS = {"scores": "simulations", "simulations": "records", "records": "windows"}


def local_folder(text: str) -> Path:
    """A stage folder named on a command line, on this machine: a path as it is, a file:// URL's
    folder, or a folder at a URL root (`<root>/<stage>/<key>`) pulled into its mirror with the
    folders its readers follow it to (`_FOLLOWS`)."""
    if not remote.is_url(text):
        return Path(text)
    if text.startswith("file://"):
        return remote.local_path(text)
    root, stage, _key = layout.split_folder_url(text)
    first = folder = remote.fetch(text)
    while stage in _FOLLOWS:
        stage, named = _FOLLOWS[stage], read_manifest(folder).get("inputs", {}).get(_FOLLOWS[stage])
        if not named:
            break
        folder = remote.fetch(layout.folder_url(root, stage, Path(named).name))
    return first
