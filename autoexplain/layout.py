"""Where every output lives under an output root: the one module that knows the layout.

    <root>/<stage>/<key>/              one stage output, sealed by its manifest (`store.Stage`)
        windows.parquet                  windows: the corpus cut into token windows
        layer_<L>.records.parquet        records: each unit's exemplar windows, and beside them
        layer_<L>.stats.parquet            the units' statistics
        layer_<L>.parquet                explanations, simulations, scores, classifications, negatives
        chosen.parquet                   simulations: the explanation each method chose
        word_vectors.parquet             word_vectors: the corpus's words, embedded
    <root>/memo/<name>/                caches that only speed up a rerun on this machine
    <root>/runs/                       pointers to each layer's latest run (`storage.run_file`)

An output root is self-contained: what it stores about another thing inside it (a run pointer's
outputs, a manifest's inputs, a memo's folders) is a path relative to the root (`within`), read back
against the root it is read from (`located`), so a root can be moved or copied whole.

A name that starts with a dot is a write in progress (a temporary file or folder): readers, the
mirror's transfers and the viewer's discovery pass over it. The store writes this layout, the
stages and the viewer find their inputs through it, and the contract gate (`schemas.gate`)
follows a records folder to its windows with it; none of them spells a path itself.
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "manifest.json"  # written last: a folder with one is complete, here and at a URL
WINDOWS = "windows.parquet"
CHOSEN = "chosen.parquet"
WORD_VECTORS = "word_vectors.parquet"

# The command that writes each stage's output, for the line that asks to rerun it (every one of
# them is also rerun by `autoexplain explain-layer` with the run's flags).
WRITTEN_BY = {"windows": "`autoexplain record`", "records": "`autoexplain record`",
              "explanations": "`autoexplain explain` (or `revise`, `import`)", "simulations": "`autoexplain simulate`",
              "scores": "`autoexplain score`", "classifications": "`autoexplain score --scorers`",
              "negatives": "`autoexplain score --model`", "word_vectors": "`autoexplain explain` or `simulate`"}


# What an output root holds at its top that others point at: stage outputs and sites.
TOP = (*WRITTEN_BY, "site")


def folder(root: str | os.PathLike, stage: str, key: str) -> Path:
    """A stage output's folder."""
    return Path(root) / stage / key


def folder_url(root_url: str, stage: str, key: str) -> str:
    """A stage output's folder under a URL root (a `Path` would fold the `//` of `s3://`)."""
    return f"{root_url.rstrip('/')}/{stage}/{key}"


def split_folder_url(url: str) -> tuple[str, str, str]:
    """(root URL, stage, key) of a stage output's folder URL (`folder_url` read back)."""
    root, stage, key = url.rstrip("/").rsplit("/", 2)
    return root, stage, key


def root_of(stage_folder: str | os.PathLike) -> Path:
    """The output root a stage folder is under."""
    return Path(stage_folder).parent.parent


def key_of(stage_folder: str | os.PathLike) -> str:
    """A stage output's key: its folder's name (what `folder` made it from)."""
    return Path(stage_folder).name


def sibling(stage_folder: str | os.PathLike, stage: str, key: str) -> Path:
    """Another stage output under the same root (a records folder's windows: `sibling(r, "windows", k)`)."""
    return folder(root_of(stage_folder), stage, key)


def table(stage_folder: str | os.PathLike, layer: int) -> Path:
    """A layer's table in an explanations, simulations, scores, classifications or negatives folder."""
    return Path(stage_folder) / f"layer_{layer}.parquet"


def records_table(stage_folder: str | os.PathLike, layer: int) -> Path:
    return Path(stage_folder) / f"layer_{layer}.records.parquet"


def stats_table(stage_folder: str | os.PathLike, layer: int) -> Path:
    return Path(stage_folder) / f"layer_{layer}.stats.parquet"


def is_records_table(name: str) -> bool:
    return name.startswith("layer_") and name.endswith(".records.parquet")


def is_stats_table(name: str) -> bool:
    return name.startswith("layer_") and name.endswith(".stats.parquet")


def within(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """How an output root stores a path: relative to the root when inside it, so the root can be
    moved or copied whole; outside it (a corpus, a model, another root) absolute."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def located(root: str | os.PathLike, stored: str | os.PathLike) -> Path:
    """A path an output root stored (`within`), read against the root it is read from. Roots
    written before stored absolute paths: one that names a stage output or site that this root
    holds too is taken here (the same content: the root was moved or copied), any other as written."""
    path = Path(stored)
    if not path.is_absolute():
        return Path(root) / path
    for i in range(len(path.parts) - 1, 0, -1):  # the last part that names a top-level folder
        if path.parts[i] in TOP:
            here = Path(root).joinpath(*path.parts[i:])
            return here if here.exists() else path
    return path


def input_of(stage_folder: str | os.PathLike, stored: str | os.PathLike) -> Path:
    """The folder a stage output's manifest names as one of its inputs."""
    return located(root_of(stage_folder), stored)


def memo(root: str | os.PathLike, name: str) -> Path:
    """A cache folder under an output root (a stage's per-unit results, text vectors, the viewer's)."""
    return Path(root) / "memo" / name


def in_progress(name: str) -> bool:
    """Whether a file or folder name (or a relative path's part) is a write in progress."""
    return name.startswith(".")
