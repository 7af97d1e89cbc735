"""A published dataset read back as an output root, so that `rescore` re-scores it.

`publish` writes, per source and layer, the units' statistics, their exemplars (records with each
window's tokens and token ids), the chosen explanations with their candidates, and the scores.
`import_dataset` turns each (layer, source) back into the stages a run leaves: windows (the
exemplar windows only: a dataset holds no other text), records with their statistics, the
explanations, and the published scores as the run's previous scores; then the layer's run pointer,
with the parameters the card recorded. `rescore --out OUT --layer L [--source KIND]` then works as
after explain-layer, and compares its new scores with the published ones.

Keys come from the dataset's files (sha256), so importing the same dataset twice reuses every folder.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from autoexplain import remote
from autoexplain.errors import UserError
from autoexplain.interop import import_explanations
from autoexplain.layer import recorded_units
from autoexplain.publish import CARD_MARK, SUBJECT_KEY, dataset_file
from autoexplain.sources import MLP
from autoexplain import layout
from autoexplain.storage import file_digest, layer_name, read_run, write_run
from autoexplain.store import Stage

# The card's "Made by" lines: "- layer 15, `mlp`: `{...params...}` (finished ...)".
_RUN_LINE = re.compile(r"^- layer (\d+), `([^`]+)`: `(\{.*\})`", re.M)
WINDOW_COLUMNS = ("window_id", "doc_id", "token_ids", "tokens")


def published_runs(folder: Path) -> dict[tuple[int, str], dict]:
    """(layer, source kind) -> the run parameters that the dataset's card recorded."""
    card = folder / "README.md"
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    if CARD_MARK not in text:
        raise UserError(f"{folder} is no dataset that `autoexplain publish` wrote (no card with '{CARD_MARK}')",
                        "point --from at the folder publish wrote (it holds README.md and data/)")
    return {(int(m[1]), m[2]): json.loads(m[3]) for m in _RUN_LINE.finditer(text)}


def _table(folder: Path, name: str, kind: str, layer: int, columns: list[str] | None = None) -> pa.Table:
    path = dataset_file(folder, name, kind, layer)
    if not path.is_file():
        raise UserError(f"{path} is missing from the dataset", "publish the layer again, or import another layer")
    return pq.read_table(path, columns=columns)


def _stage(out: Path, stage: str, inputs: dict, params: dict, tables: dict[str, tuple[pa.Table, str]]) -> tuple[Path, str]:
    """A content-addressed stage folder holding `tables` (file name -> (table, schema)), sealed."""
    made = Stage.open(out, stage, {"imported": inputs, "params": params})
    if not made.done:
        for name, (table, schema) in tables.items():
            made.table(table, name, schema)
        made.seal(inputs, params)
    return made.directory, made.key


def _of_source(table: pa.Table, kind: str) -> pa.Table:
    """`table` with the `source` column a run's tables carry: the kind on every row of a sparse
    coder's latents (what later stages read a unit's source from), none on a layer's neurons."""
    table = table.drop_columns(["source"]) if "source" in table.column_names else table
    return table if kind == MLP.kind else table.append_column("source", pa.array([kind] * table.num_rows, pa.string()))


def _here(model: str, chosen: dict[tuple[int, str], dict]) -> str:
    """`model` as the runs' parameter: checked against each subject fingerprint the card gives."""
    from autoexplain.subject import made_records

    here = Path(model).expanduser()
    model = str(here.resolve()) if here.exists() else model
    named = {params[SUBJECT_KEY]: params["model"] for params in chosen.values() if params.get(SUBJECT_KEY)}
    for subject, name in named.items():
        try:
            same = made_records(subject, model)
        except UserError as e:
            raise UserError(f"--model: {e.problem}", e.fix) from None
        if not same:
            raise UserError(f"--model: {model} is not the model the dataset was recorded with ({name})",
                            "pass the dataset's subject model as it is on this machine")
    return model


def _check_document_splits(exemplars: pa.Table, layer: int, kind: str) -> None:
    """A dataset recorded when splits were of windows has windows in two splits (for two units):
    its scores were measured on text beside what the explainer read. Refused, not mixed in."""
    pairs = exemplars.select(["window_id", "split"]).group_by(["window_id", "split"]).aggregate([])
    ids, counts = np.unique(pairs.column("window_id").to_numpy(), return_counts=True)
    twice = ids[counts > 1]
    if len(twice):
        raise UserError(f"the exemplars of layer {layer} ({kind}) put window {int(twice[0])} in more than one split: the "
                        "dataset was recorded before splits were of documents", "record and publish it again with this version")


def import_layer(folder: Path, out: Path, layer: int, kind: str, params: dict) -> Path:
    """One (layer, source) of the dataset as windows, records, explanations and scores stages, and
    its run pointer (returned)."""
    exemplars = _table(folder, "exemplars", kind, layer)
    missing = [c for c in WINDOW_COLUMNS if c not in exemplars.column_names]
    if missing:
        raise UserError(f"the exemplars of layer {layer} ({kind}) lack {missing}: the dataset was published before "
                        "they were kept", "publish the run again with this version, then import it")
    digest = {name: file_digest(dataset_file(folder, name, kind, layer))
              for name in ("units", "exemplars", "explanations", "scores")}
    _, first = np.unique(exemplars.column("window_id").to_numpy(), return_index=True)  # sorted by window id
    windows = exemplars.select(list(WINDOW_COLUMNS)).take(pa.array(first))
    window_len = len(windows.column("tokens")[0]) if windows.num_rows else 0
    windows_dir, windows_key = _stage(out, "windows", {"dataset": digest["exemplars"]}, {"window_len": window_len},
                                      {layout.WINDOWS: (windows, "windows")})

    records = exemplars.drop_columns([c for c in ("source", "tokens", "token_ids", "doc_id") if c in exemplars.column_names])
    stats = _table(folder, "units", kind, layer)
    stats = stats.drop_columns(["source"]) if "source" in stats.column_names else stats
    named = {} if kind == MLP.kind else {"source": kind, "source_spec": params.get("source", kind),
                                        "source_id": f"imported:{digest['units']}"}
    # The subject's fingerprint as the card gives it; a card without one (published before) leaves it
    # unknown, so that nothing compares the model named with the records: the name is no fingerprint.
    params, subject = {k: v for k, v in params.items() if k != SUBJECT_KEY}, params.get(SUBJECT_KEY, "")
    records_dir, records_key = _stage(
        out, "records", {"windows": windows_key, "subject": subject},
        {"layers": [layer], "top_k": params["top_k"], "n_random": params["n_random"], "dataset": digest, **named},
        {layout.records_table(".", layer).name: (records, "records"), layout.stats_table(".", layer).name: (stats, "unit_stats")})

    explained = _of_source(import_explanations(folder, layer, kind), kind)
    expl_dir, expl_key = _stage(out, "explanations", {"dataset": digest["explanations"]}, {"layer": layer},
                                {layout.table(".", layer).name: (explained, "explanations")})
    scores = _of_source(_table(folder, "scores", kind, layer), kind)
    scores_dir, scores_key = _stage(out, "scores", {"dataset": digest["scores"]}, {"layer": layer},
                                    {layout.table(".", layer).name: (scores, "scores")})

    ref = lambda d, key: {"uri": remote.uri(d), "path": str(layout.table(d, layer).resolve()), "key": key,  # noqa: E731
                          "layer": layer}
    n_units = recorded_units(records_dir, layer)
    run = {"flow": "import", "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "params": {**params, "layer": layer}, "dataset": str(folder.resolve()),
           "records": {"uri": remote.uri(records_dir), "path": str(records_dir.resolve()), "key": records_key,
                       "layers": [layer], "n_units": n_units, "source": kind,
                       "windows": str((windows_dir / layout.WINDOWS).resolve()), "window_len": window_len},
           "explanations": [ref(expl_dir, expl_key)], "simulations": [], "scores": [ref(scores_dir, scores_key)],
           "site_dir": None, "site": None}
    return write_run(out, layer, run, kind=kind)


def import_dataset(folder: str | Path, out: str | Path, layers: list[int] | None = None,
                   model: str | None = None) -> list[tuple[int, str]]:
    """Every (layer, source kind) of the dataset (or of `layers`), each with its run pointer; returns them.
    `model`: where the subject is on this machine (the card names it without its place), checked
    against the card's fingerprint, for the scorers that run it again (hard negatives)."""
    folder, out = Path(folder), Path(out)
    runs = published_runs(folder)
    chosen = {k: v for k, v in runs.items() if layers is None or k[0] in layers}
    if not chosen:
        raise UserError(f"{folder} holds no run of layer(s) {layers} (it has {sorted({L for L, _ in runs})})",
                        "pass layers the dataset has")
    if model is not None:
        here = _here(model, chosen)
        chosen = {key: {**params, "model": here} for key, params in chosen.items()}
    # A run pointer is the user's handle on their latest run: importing over one would silently swap
    # their own run for the dataset's. Importing the same dataset again is fine (same folders).
    taken = [layer_name(L, kind) for L, kind in sorted(chosen) if (run := read_run(out, L, kind)) is not None
             and run.get("dataset") != str(folder.resolve())]
    if taken:
        raise UserError(f"{out} already holds runs of {', '.join(taken)} that importing would replace",
                        "import into a new --out folder")
    for layer, kind in sorted(chosen):  # every layer before any is written
        _check_document_splits(_table(folder, "exemplars", kind, layer, ["window_id", "split"]), layer, kind)
    for (layer, kind), params in sorted(chosen.items()):
        import_layer(folder, out, layer, kind, params)
    return sorted(chosen)
