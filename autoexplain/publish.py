"""Publish an output root as a dataset others can load: parquet tables plus a dataset card.

`publish(out, to)` takes the latest finished run of every layer under `out` (their pointers,
`storage.run_file`) and writes, under `to`:

    data/<table>/<source>/layer_<L>.parquet     units, exemplars, explanations, scores, simulations
    neuronpedia/explanations/batch-<N>.jsonl.gz  the explanations in Neuronpedia's import format
    README.md                                    the card: Hugging Face YAML header, then prose

(The reference dataset's JSON layout stays `autoexplain export`'s.)

Each table is one Hugging Face config (`datasets.load_dataset(to, "scores")`), and each table's
folder loads alone as parquet (`load_dataset("parquet", data_dir=f"{to}/data/scores")`,
`polars.scan_parquet(f"{to}/data/scores/**/*.parquet")`). Every file keeps its `source` and `layer`
as columns, so no reader has to parse folder names. The folder is built next to `to` and renamed
into place: a failed publish leaves nothing half-written, and a republish replaces the whole set.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from autoexplain import defaults, files, layout, remote
from autoexplain.errors import UserError
from autoexplain.layer import dead_of_run
from autoexplain.registry import public_spec
from autoexplain.rows import rows_to_table
from autoexplain.sources import MLP
from autoexplain.summary import dead_line
from autoexplain.storage import local_ref, open_root, read_manifest, read_run, require_outputs, run_sources
from autoexplain.schemas import HERE as SCHEMAS

TABLES = {  # table -> (the stage schema its columns come from, what a row is)
    "units": ("unit_stats", "one unit and polarity: its activation statistics"),
    "exemplars": ("records", "one exemplar window of a unit, with its tokens and activations"),
    "explanations": ("explanations", "one unit, polarity and method: the chosen explanation and its candidates"),
    "scores": ("scores", "one unit, polarity, method and metric on the test split, with its 95% CI"),
    "simulations": ("simulations", "one unit, polarity, method and scoring window: the simulated activations"),
}
CARD_MARK = "autoexplain-dataset"  # in the card's YAML: `to` was written by publish, and may be replaced
SUBJECT_KEY = "subject_key"  # beside a run's parameters on the card: its subject's fingerprint (`made_by`)
CORPUS_LICENSE = {defaults.CORPUS: "cc-by-sa-3.0"}  # Wikipedia text (CC BY-SA 3.0) with the public-domain KJV


def dataset_file(root: str | Path, table: str, kind: str, layer: int) -> Path:
    """Where a published dataset keeps one table of one source and layer."""
    return Path(root) / "data" / table / kind / f"layer_{layer}.parquet"


def _concat(paths: list[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")


def _with_source(table: pa.Table, kind: str) -> pa.Table:
    """`source` first in every table (stage tables of latents already carry it, last)."""
    if "source" in table.column_names:
        table = table.drop_columns(["source"])
    return table.add_column(0, "source", pa.array([kind] * table.num_rows, pa.string()))


def _exemplars(records: dict, layer: int) -> pa.Table:
    """The layer's records with each window's tokens, so that an exemplar reads without the windows
    (a recording of a whole model holds every layer: the run's own is read)."""
    recs = pq.read_table(layout.records_table(records["path"], layer))
    windows = pq.read_table(records["windows"], columns=["window_id", "doc_id", "token_ids", "tokens"])
    at = pc.index_in(recs.column("window_id"), value_set=windows.column("window_id"))
    for name in ("tokens", "token_ids", "doc_id"):  # ids too: `import` rebuilds the windows from them
        recs = recs.append_column(name, pc.take(windows.column(name), at))
    return recs


def layer_tables(run: dict) -> dict[str, pa.Table]:
    """The tables of one layer's run (its pointer's references, pulled here when the root is a URL).
    The units asked for that never fired are in `units` alone (their statistics say they are dead);
    a run whose units all never fired has that table only: an empty file of another table would
    carry a schema of its own into a config whose other files agree."""
    records = local_ref(run["records"])
    layer = run["params"]["layer"]
    stage = lambda name: [Path(local_ref(r)["path"]) for r in run[name]]  # noqa: E731 - the run's shards
    units = pq.read_table(layout.stats_table(records["path"], layer))
    dead = pa.array(dead_of_run(run), pa.int64())
    if not run["scores"]:
        return {"units": units.filter(pc.is_in(units.column("unit").cast(pa.int64()), value_set=dead))}
    simulated = stage("simulations")
    # An imported run (`import`) holds the explanations chosen, and no simulations until re-scored.
    chosen = [p.parent / layout.CHOSEN for p in simulated] if simulated else stage("explanations")
    scores = _concat(stage("scores"))
    scored = pc.unique(scores.column("unit")).cast(pa.int64())  # a run may explain only some units

    def of_scored(table: pa.Table, also: pa.Array = pa.array([], pa.int64())) -> pa.Table:
        return table.filter(pc.is_in(table.column("unit").cast(pa.int64()), value_set=pa.concat_arrays([scored, also])))

    return {"units": of_scored(units, dead), "exemplars": of_scored(_exemplars(records, layer)),
            "explanations": _concat(chosen), "scores": scores,
            "simulations": _concat(simulated) if simulated else rows_to_table([], "simulations")}


def _asked(run: dict) -> int:
    """How many units the run was asked for (its `units`, every unit of the layer when none)."""
    from autoexplain.indices import parse_units

    return len(parse_units(run["params"].get("units"), local_ref(run["records"])["n_units"]))


NEURONPEDIA_BATCH = 1024  # rows per file, as Neuronpedia's importer takes them


def neuronpedia_rows(explanations: pa.Table, model: str, kind: str = MLP.kind) -> list[dict]:
    """Neuronpedia's explanation rows for the explainer's explanations of positive polarity (a
    Neuronpedia neuron has no polarity; the negated unit's explanation stays in the parquet tables).
    `layer` is the source id, `<layer>-<kind>` (`15-mlp`, `15-sae-res-16k`); `modelId` the subject's name."""
    model_id = Path(model.rstrip("/")).name.removesuffix(".gguf").lower()
    return [{"modelId": model_id, "layer": f"{r['layer']}-{kind}", "index": str(r["unit"]),
             "description": r["text"], "explanationModelName": r["explainer"], "typeName": "autoexplain"}
            for r in explanations.to_pylist() if r["method"] == "explainer" and r["polarity"] == 1 and r["text"]]


def _write_neuronpedia(rows: list[dict], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(0, max(1, len(rows)), NEURONPEDIA_BATCH):
        with gzip.open(folder / f"batch-{n // NEURONPEDIA_BATCH}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[n : n + NEURONPEDIA_BATCH])


def _recorded_tokens(run: dict) -> int:
    """The tokens the run's recording read (its statistics' `n_tokens`), which is fewer than the
    `tokens` asked where the corpus is shorter or the windows do not divide them."""
    stats = pq.read_table(layout.stats_table(local_ref(run["records"])["path"], run["params"]["layer"]),
                          columns=["n_tokens"])
    return int(pc.max(stats.column("n_tokens")).as_py() or 0)


def _corpus(params: dict, recorded: list[int]) -> str:
    """What the card says of the corpus (`params` as `public_params` gives them; `recorded`: the tokens
    of each run's recording): the embedded one by its sources and their licenses; a user's by its
    file name only (their folders are nobody's business; its license is theirs to add)."""
    low, high = min(recorded), max(recorded)
    tokens = f"{low:,} tokens" if low == high else f"{low:,} to {high:,} tokens (by layer)"
    if low != params["tokens"] or high != params["tokens"]:
        tokens += f" recorded ({params['tokens']:,} asked)"
    if params["corpus"] == defaults.CORPUS:
        return (f"the embedded default, {tokens}: English Wikipedia articles (CC BY-SA 3.0) and the King James "
                "Bible (public domain)")
    return f"`{params['corpus']}`, {tokens} (the run's own corpus)"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"autoexplain {version('autoexplain')} (not a git checkout)"


def _columns(table: str, schema: pa.Schema, latents: bool = False) -> str:
    """The column list of a table for the card: name, type and the description kept in `schemas/`
    (written for neurons: with `latents` published, `unit` and `polarity` say what they mean for both)."""
    stage, row = TABLES[table]
    spec = json.loads((SCHEMAS / f"{stage}.json").read_text())
    docs = {f["name"]: f.get("doc", "") for f in spec["fields"]}
    if latents:
        docs.update(unit="the unit's index in its source: a neuron's in the layer's MLP (`mlp`), a latent's in "
                         "its sparse coder (other sources)",
                    polarity="+1: the unit as is; -1 (neurons only): the neuron negated. A latent has +1 alone")
    docs["source"] = ("the unit source: `mlp` (a layer's MLP neurons, both polarities) or a sparse coder's latents, "
                      "named by the coder (`sae-res-16k`: a 16,384-latent residual SAE; one polarity)")
    # the window's columns that `_exemplars` joins in; a stage's own column of that name (`tokens`
    # of simulations: a count) keeps its own description
    for name, doc in (("tokens", "the window's tokens, each decoded alone"), ("token_ids", "the window's token ids"),
                      ("doc_id", "the corpus document the window was cut from")):
        docs.setdefault(name, doc)
    lines = [f"### `{table}`: {row}\n", spec["doc"], "", "| column | type | description |", "|---|---|---|"]
    lines += [f"| `{f.name}` | {f.type} | {docs.get(f.name, '')} |" for f in schema]
    return "\n".join(lines) + "\n"


def public_model(model: str) -> str:
    """The subject as a published dataset names it: an alias or hub id as given; a local folder or
    file by its name (where it lies is the user's own), a Hugging Face cache snapshot by its repository."""
    path = Path(model).expanduser()
    if model in defaults.MODEL_ALIASES or not (path.is_absolute() or path.exists()):
        return model
    path = path.resolve()
    repo = next((part for part in reversed(path.parts) if part.startswith("models--")), None)
    return repo.removeprefix("models--").replace("--", "/") if repo else path.name


_PRIVATE = ("site", "out", "results", "dask")  # where the run wrote and ran: nothing a reader can use


def public_params(params: dict) -> dict:
    """A run's parameters as its dataset shows them: no local path, server address or key variable."""
    public = {k: v for k, v in params.items() if k not in _PRIVATE}
    if isinstance(params.get("model"), str):
        public["model"] = public_model(params["model"])
    if params.get("corpus") not in (None, defaults.CORPUS):
        public["corpus"] = Path(str(params["corpus"])).name
    for k in ("explainer", "simulator", "scorers", "source"):
        if isinstance(params.get(k), str):
            public[k] = public_spec(params[k])
    return public


def _public_columns(table: pa.Table) -> pa.Table:
    """The tables' spec columns (`explainer`, `simulator`) as `public_spec` writes them."""
    for name in ("explainer", "simulator"):
        if name in table.column_names:
            column = table.column(name)
            values = column.unique().to_pylist()
            shown = pa.array([public_spec(v) if v is not None else None for v in values], column.type)
            table = table.set_column(table.column_names.index(name), name,
                                     pc.take(shown, pc.index_in(column, pa.array(values, column.type))))
    return table


def made_by(run: dict) -> dict:
    """A run's parameters as the card records them (`public_params`), with the fingerprint of the
    subject its records came from (`SUBJECT_KEY`): `import` gives it to the records it rebuilds, so
    that work that runs the model on them again (hard negatives) can check the model is that one."""
    subject = read_manifest(Path(local_ref(run["records"])["path"]))["inputs"].get("subject")
    return {**public_params(run["params"]), **({SUBJECT_KEY: subject} if subject else {})}


def card(runs: dict[tuple[int, str], dict], schemas: dict[str, pa.Schema], license_: str, sizes: dict[str, int]) -> str:
    params = public_params(next(iter(runs.values()))["params"])
    configs = "".join(f"  - config_name: {t}\n    data_files: \"data/{t}/**/*.parquet\"\n"
                      + ("    default: true\n" if t == "scores" else "") for t in TABLES)
    header = (f"---\nlicense: {license_}\npretty_name: \"autoexplain: {params['model']} neurons, explained\"\n"
              f"tags:\n  - interpretability\n  - {CARD_MARK}\nconfigs:\n{configs}---\n")
    layers = ", ".join(str(L) for L in sorted({L for L, _ in runs}))
    kinds = sorted({kind for _, kind in runs})
    # `import` reads these lines back as runs: a run with no unit explained has no tables to import
    how = "\n".join(f"- layer {L}, `{kind}`: `{json.dumps(made_by(r), sort_keys=True)}` (finished {r.get('finished', '?')})"
                    for (L, kind), r in sorted(runs.items()) if r["scores"])
    dead = {key: dead_of_run(r) for key, r in sorted(runs.items())}
    never = "; ".join(f"layer {L} `{kind}`: {dead_line(_asked(runs[L, kind]), d)}" for (L, kind), d in dead.items() if d)
    never = (f"- **Units that never fired** on the recorded tokens (in `units` with their statistics, which say so; "
             f"not explained): {never}.\n" if never else "")
    latents = any(kind != MLP.kind for kind in kinds)
    counts = ", ".join(f"{t} {n:,} rows" for t, n in sizes.items())
    return header + f"""
# Explained neurons of {params['model']}

Automated explanations of the units of **{params['model']}** (layers {layers}; sources
{", ".join(f"`{k}`" for k in kinds)}: `mlp` is a layer's MLP neurons, other sources a sparse coder's
latents), made with
autoexplain by the method of Bills et al. (2023), "Language models can explain
neurons in language models": record where each unit fires on a corpus, have an explainer write a
one-sentence explanation from its top-activating windows, have a simulator predict the unit's
activations on held-out windows from that explanation alone, and score how well the prediction
matches. Each neuron is explained per polarity (+1: the neuron as is, -1: negated); a latent has
one. The `units` table says what each unit writes: the tokens its output direction promotes and
suppresses most. Files are partitioned by source and layer: `data/<table>/<source>/layer_<L>.parquet`.

- **Subject model:** `{params['model']}`
- **Corpus:** {_corpus(params, [_recorded_tokens(r) for r in runs.values()])}. License of this dataset: `{license_}`.
- **Explainer:** `{params['explainer']}`, best of k = {params['k']} candidates on the valid split;
  **simulator:** `{params['simulator']}`.
- **Splits** are of documents: every window is in its document's split (train, calib, valid, test),
  so the documents the explainer read are never the ones its explanation is scored on.
- **Metrics** (test split only, never shown to the explainer): correlation of simulated and true
  activations on top-and-random windows (the headline, `top_and_random`), on random windows alone,
  calibrated R², and detection AUC, each with a 95% bootstrap CI; baselines `token-lookup` (the
  tokens the unit fires on most), `output-lookup` (the tokens it promotes most) and `shuffled`
  (another unit's explanation) are scored alike.
- **Size:** {counts}.
{never}- **Made by:** autoexplain at commit `{_commit()}`, one `explain-layer` run per layer:
{how}

## Loading

```python
import datasets, polars as pl
scores = datasets.load_dataset("path/to/this/folder", "scores")        # one config per table
scores = datasets.load_dataset("parquet", data_dir="path/to/this/folder/data/scores")
scores = pl.scan_parquet("path/to/this/folder/data/scores/**/*.parquet")
```

## Other formats

- `neuronpedia/explanations/batch-<N>.jsonl.gz`: the explanations of positive polarity in
  Neuronpedia's import format (`modelId`, `layer` as `<layer>-<source>`, `index`, `description`,
  `explanationModelName`, `typeName`), {NEURONPEDIA_BATCH:,} rows a file.
- `autoexplain import --from <this folder> --out OUT` reads the dataset back as an output root
  (windows, records, explanations, and these scores as the previous ones, per layer and source):
  `autoexplain rescore --out OUT --layer L` then re-simulates and re-scores it and compares.

## Tables

""" + "\n".join(_columns(t, schemas[t], latents) for t in TABLES if t in schemas)


def publish(out: str, to: str | Path, layers: list[int] | None = None, license_: str | None = None) -> Path | str:
    """Write the dataset of `out`'s latest runs (of `layers`, default all) to the folder `to`, or to a
    URL: built in its local mirror, then uploaded in place of what was there. Returns where it is."""
    root = open_root(out, create=False)
    found = run_sources(root)
    have = sorted({L for L, _ in found})
    if not have:
        raise UserError(f"{out} holds no finished explain-layer run", "run explain-layer there first, then publish")
    missing = sorted(set(layers or []) - set(have))
    if missing:
        raise UserError(f"{out} holds no finished run of layer(s) {missing} (it has {have})", "publish layers it has")
    url = str(to) if remote.is_url(to) else None
    to = open_root(to)
    there, readme = remote.files_there(to), to / "README.md"
    if there is not None:  # at a URL: what is there decides, not this machine's copy of it
        occupied = bool(there)
        ours = "README.md" in there and remote.pull_file(readme) and CARD_MARK in readme.read_text(errors="replace")
    else:
        occupied = to.exists() and (not to.is_dir() or any(to.iterdir()))
        ours = readme.is_file() and CARD_MARK in readme.read_text(errors="replace")
    if occupied and not ours:
        raise UserError(f"{url or to} is not empty and holds no dataset that publish wrote", "choose an empty or new folder")
    runs = {(L, kind): read_run(root, L, kind) for L, kind in found if L in (layers or have)}
    for run in runs.values():  # every table is read whole before anything is written
        require_outputs(run, ("records", "explanations", "simulations", "scores"))
    corpus = next(iter(runs.values()))["params"]["corpus"]
    license_ = license_ or CORPUS_LICENSE.get(corpus)
    if not license_:
        raise UserError(f"the license of the corpus '{corpus}' is unknown, and the exemplars carry its text",
                        "pass --license (an SPDX-style id as the Hugging Face card takes it, e.g. cc-by-4.0 or other)")
    build = files.temporary_folder_beside(to)
    try:
        schemas, sizes, pedia = {}, dict.fromkeys(TABLES, 0), []
        for (L, kind), run in sorted(runs.items()):
            tables = {name: _public_columns(table) for name, table in layer_tables(run).items()}
            pedia += neuronpedia_rows(tables["explanations"], run["params"]["model"], kind) if "explanations" in tables else []
            for name, table in tables.items():
                table = _with_source(table, kind)
                path = dataset_file(build, name, kind, L)
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, path, compression="zstd")
                schemas[name], sizes[name] = table.schema, sizes[name] + table.num_rows
        _write_neuronpedia(pedia, build / "neuronpedia" / "explanations")
        (build / "README.md").write_text(card(runs, schemas, license_, sizes), encoding="utf-8")
        if to.exists():
            shutil.rmtree(to)
        build.rename(to)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    remote.push(to, replace=True)  # a URL's earlier dataset goes whole; a no-op for a folder
    return url or to

