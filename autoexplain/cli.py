"""The `autoexplain` command line.

Every command has offline defaults: the embedded SmolLM2 subject, the embedded corpus and a middle
layer. A `UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from autoexplain import defaults
from autoexplain.errors import UserError

app = typer.Typer(
    help="Explain what each neuron of a language model does: record activations, explain them with an "
    "LLM, simulate the neuron from the explanation, and score the simulation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


@app.callback()
def _root():
    """Record -> explain -> simulate -> score, on the embedded defaults unless told otherwise."""


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """'15', '3,7', '10-12' or 'all'; None means the middle layer."""
    if text is None:
        return [n_layers // 2]
    if text.strip() == "all":
        return list(range(n_layers))
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                layers += list(range(int(a), int(b) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise UserError(f"cannot read --layers '{text}'", "use a number, a list like 3,7, a range like 10-12, or 'all'") from None
    return sorted(set(layers))


class _TokenRate(TextColumn):
    def __init__(self):
        super().__init__("")

    def render(self, task):
        rate = task.completed / task.elapsed if task.elapsed else 0.0
        return f"{rate:,.0f} tok/s"


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tokens"),
        _TokenRate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


class _Rate(TextColumn):
    def __init__(self):
        super().__init__("")

    def render(self, task):
        rate = task.completed / task.elapsed if task.elapsed else 0.0
        return f"{rate:,.1f} {task.fields.get('unit', '')}/s"


def stage_bars():
    """Bars for a whole explain-layer run, fed by `autoexplain.progress` events from its tasks.

    Tasks of several shards report side by side; each stage's bar adds up the latest count of
    every shard that has started (so its total grows as shards start), and the "scored" bar is the
    flow's count of neurons (both polarities) finished through scoring. Returns (rich Progress, listener)."""
    bars = Progress(
        TextColumn("[bold]{task.description:<9}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} {task.fields[unit]}"),
        _Rate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=err,
    )
    ids: dict[str, int] = {}
    parts: dict[str, dict[str, tuple[int, int]]] = {}

    def listener(stage: str, key: str, done: int, total: int) -> None:
        parts.setdefault(stage, {})[key] = (done, total)
        done_all = sum(d for d, _ in parts[stage].values())
        total_all = sum(t for _, t in parts[stage].values())
        if stage not in ids:
            unit = {"record": "tokens", "scored": "neurons"}.get(stage, "units")
            ids[stage] = bars.add_task(stage, total=total_all, unit=unit)
        bars.update(ids[stage], completed=done_all, total=max(total_all, bars.tasks[ids[stage]].total or 0))

    return bars, listener


def _run(fn):
    """Call fn, turning a UserError into one clear line and a non-zero exit."""
    try:
        return fn()
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


@app.command()
def record(
    model: str = typer.Option(defaults.SUBJECT, "--model", "-m", help="Subject model: hub name, local folder, .gguf file, or 'smollm2' (embedded)."),
    corpus: str = typer.Option(defaults.CORPUS, "--corpus", "-c", help="Corpus: 'default' (embedded), a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][@SPLIT]."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="Layers to record: 15, 3,7, 10-12 or all. Default: the middle layer."),
    tokens: int = typer.Option(1_000_000, "--tokens", "-n", help="Corpus tokens to run through the model."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output root; each stage writes a content-addressed folder under it."),
    window_len: int = typer.Option(64, "--window-len", help="Tokens per window (the reference uses 64)."),
    top_k: int = typer.Option(40, "--top-k", help="Top-activating windows kept per unit and polarity."),
    n_random: int = typer.Option(30, "--random", help="Random windows kept per unit and polarity."),
    quantile_per_bin: int = typer.Option(5, "--per-quantile", help="Windows sampled from each activation-quantile bin."),
    reservoir: int = typer.Option(512, "--reservoir", help="Uniform window sample that random and quantile exemplars are drawn from."),
    batch_size: int = typer.Option(32, "--batch-size", help="Windows per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed for the window order and all sampling."),
    text_field: str = typer.Option("text", "--text-field", help="Text column of .jsonl/.parquet/hub corpora."),
):
    """Record MLP neuron activations: top, quantile and random exemplars per unit, plus statistics."""
    from autoexplain.record import RecordConfig, build_windows, record_layers
    from autoexplain.subject import load_subject

    def go():
        for name, value in (("--tokens", tokens), ("--top-k", top_k), ("--batch-size", batch_size), ("--reservoir", reservoir)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}", f"pass a positive {name}")
        for name, value in (("--random", n_random), ("--per-quantile", quantile_per_bin)):
            if value < 0:
                raise UserError(f"{name} must not be negative, got {value}", f"pass {name} 0 or more")
        started = time.perf_counter()
        subject = load_subject(model)
        err.print(f"subject {subject.name}: {subject.n_layers} layers x {subject.n_units} units "
                  f"on {subject.device}, loaded in {subject.load_seconds:.1f}s")
        chosen = parse_layers(layers, subject.n_layers)
        subject.check_layers(chosen)
        windows = build_windows(subject, corpus, out, window_len, tokens, seed, text_field)
        cfg = RecordConfig(chosen, top_k, n_random, quantile_per_bin, reservoir, batch_size, seed)
        with progress_bar() as bar:
            task = bar.add_task(f"record layers {','.join(map(str, chosen))}", total=windows.n_windows * window_len)
            ref = record_layers(subject, windows, cfg, out,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
        err.print(f"recorded {windows.n_windows:,} windows in {time.perf_counter() - started:.0f}s")
        typer.echo(str(ref.directory))

    _run(go)


def _records_layer(records: Path, layer: Optional[int]) -> int:
    from autoexplain.storage import is_complete, read_manifest

    if not is_complete(records):
        raise UserError(f"{records} is not a finished records folder", "pass the folder printed by `autoexplain record`")
    recorded = read_manifest(records)["params"]["layers"]
    return recorded[0] if layer is None else layer


@app.command()
def explain(
    records: Path = typer.Option(..., "--records", "-r", help="A records folder printed by `autoexplain record`."),
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="Layer to explain (default: the first recorded)."),
    units: Optional[str] = typer.Option(None, "--units", "-u", help="Units, e.g. 0-99 or 3,7 (default: all)."),
    explainer: str = typer.Option("embedding", "--explainer", "-e", help="'embedding' (offline default: top words named with MiniLM, no LLM), 'local' (embedded SmolLM2), 'local:PATH', 'openai:MODEL' or 'openai:MODEL@URL'."),
    k: int = typer.Option(4, "--k", help="Candidate explanations sampled per unit (best-of-k on the valid split)."),
    chat: bool = typer.Option(False, "--chat", help="Use the chat API instead of completions."),
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Sample k candidate explanations per unit from its train records, plus the token-lookup baseline."""
    from autoexplain.layer import parse_units, run_explain
    from autoexplain.pipeline import ExplainConfig

    def go():
        if k < 1:
            raise UserError(f"--k must be at least 1, got {k}", "pass --k 1 or more")
        L = _records_layer(records, layer)
        ref = run_explain(records, L, out, parse_units(units), explainer, ExplainConfig(k=k, chat=chat))
        typer.echo(str(ref.directory))

    _run(go)


@app.command()
def simulate(
    records: Path = typer.Option(..., "--records", "-r", help="The records folder the explanations came from."),
    explanations: Path = typer.Option(..., "--explanations", "-x", help="A folder printed by `autoexplain explain`."),
    simulator: str = typer.Option("embedding", "--simulator", "-s", help="'embedding' (offline default), 'all-at-once[:LLM]' or 'chat-json:LLM'."),
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Pick each unit's best candidate on the valid split, then simulate it and the baselines on held-out records."""
    from autoexplain.layer import StageRef, run_simulate

    _run(lambda: typer.echo(str(run_simulate(records, StageRef.of(explanations), out, simulator).directory)))


@app.command()
def score(
    records: Path = typer.Option(..., "--records", "-r", help="The records folder the simulations came from."),
    simulations: Path = typer.Option(..., "--simulations", "-s", help="A folder printed by `autoexplain simulate`."),
    n_boot: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% CIs."),
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Score simulations on the test split: correlations, calibrated R², detection AUC, with CIs."""
    from autoexplain.layer import StageRef, run_score

    def go():
        ref = run_score(records, StageRef.of(simulations), out, n_boot)
        _print_summary(ref.path)
        typer.echo(str(ref.directory))

    _run(go)


@app.command("export")
def export_cmd(
    records: Path = typer.Option(..., "--records", "-r", help="The records folder the scores came from."),
    scores: Path = typer.Option(..., "--scores", "-c", help="A folder printed by `autoexplain score`."),
    to: Path = typer.Option(..., "--to", help="Folder to write neurons/<layer>/<n>.json and explanations/<layer>/<n>.jsonl into."),
):
    """Export records, explanations and scored simulations in the reference dataset's JSON layout."""
    import pyarrow.parquet as pq

    from autoexplain.interop import export_layer
    from autoexplain.layer import StageRef, load_units
    from autoexplain.storage import read_manifest

    def go():
        score_ref = StageRef.of(scores)
        sims_ref = StageRef.of(read_manifest(score_ref.directory)["inputs"]["simulations"])
        sims = pq.read_table(sims_ref.path)
        units = load_units(records, score_ref.layer, sorted(set(sims.column("unit").to_pylist())))
        n = export_layer(to, units, pq.read_table(sims_ref.directory / "chosen.parquet"), sims,
                         pq.read_table(score_ref.path))
        err.print(f"exported {n} units of layer {score_ref.layer}")
        typer.echo(str(to))

    _run(go)


@app.command("import")
def import_cmd(
    source: Path = typer.Option(..., "--from", help="A folder in the reference layout (explanations/<layer>/<n>.jsonl)."),
    layer: int = typer.Option(..., "--layer", "-l", help="Layer whose explanations to import."),
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Import published explanations as an explanations stage, to re-simulate and re-score them."""
    from autoexplain.interop import import_explanations
    from autoexplain.storage import content_key, stage_dir, write_manifest, write_table

    def go():
        table = import_explanations(source, layer)
        key = content_key({"imported": [r for r in table.to_pylist()]})
        directory = stage_dir(out, "explanations", key)
        path = write_table(table, directory / f"layer_{layer}.parquet", "explanations")
        write_manifest(directory, "explanations", key, {"source": str(source)}, {"layer": layer}, [path.name])
        err.print(f"imported {table.num_rows} explanations for layer {layer}")
        typer.echo(str(directory))

    _run(go)


@app.command()
def view(
    scores: Optional[list[Path]] = typer.Option(None, "--scores", "-c", help="Scores folders printed by `autoexplain score` or explain-layer: one per layer, or the shards of a layer. Optional with --serve when the site exists."),
    site: Path = typer.Option(Path("site"), "--site", help="Folder to write the static site into (or, with --serve alone, to serve)."),
    records: Optional[Path] = typer.Option(None, "--records", "-r", help="Records folder (default: found through the manifests)."),
    serve: bool = typer.Option(False, "--serve", help="Serve the site over http on this machine until Ctrl-C, and print its URL: what a browser opens from an http page such as the Prefect UI, which does not follow file:// links."),
    port: Optional[int] = typer.Option(None, "--port", help="Port for --serve (default 8765, or a free port when 8765 is taken; 0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address for --serve (default loopback only: nothing outside this machine sees the site)."),
):
    """Write a static neuron viewer (no server needed: open index.html) from scored layers; --serve serves it."""
    def go():
        from autoexplain import serve as serving
        from autoexplain.view import build_site

        if scores:
            typer.echo(str(build_site(scores, site, records)))
        elif not serve:
            raise UserError("nothing to do: no --scores given", "pass --scores <scores folder>, or --serve to serve an existing --site")
        if not serve:
            return
        server = serving.start(site, host, port)
        typer.echo(server.url)
        err.print(f"serving {server.site} at {server.url} (Ctrl-C to stop)", highlight=False, soft_wrap=True)
        server.wait()

    _run(go)


@app.command("explain-layer")
def explain_layer_cmd(
    layer: int = typer.Option(15, "--layer", "-l", help="Layer to explain (SmolLM2 has 0-29)."),
    units: Optional[str] = typer.Option(None, "--units", "-u", help="Units, e.g. 0-99 (default: the whole layer, both polarities)."),
    model: str = typer.Option(defaults.SUBJECT, "--model", "-m", help="Subject model (see `record --help`)."),
    corpus: str = typer.Option(defaults.CORPUS, "--corpus", "-c", help="Corpus (see `record --help`)."),
    tokens: int = typer.Option(1_000_000, "--tokens", "-n", help="Corpus tokens to record."),
    explainer: str = typer.Option("embedding", "--explainer", "-e", help="'embedding' (offline default, no LLM), 'local' (embedded SmolLM2), 'openai:MODEL' or 'openai:MODEL@URL'."),
    simulator: str = typer.Option("embedding", "--simulator", "-s", help="'embedding', 'all-at-once[:LLM]' or 'chat-json:LLM'."),
    k: int = typer.Option(4, "--k", help="Candidate explanations per unit (best-of-k on the valid split)."),
    shard_size: int = typer.Option(256, "--shard-size", help="Units per task."),
    out: str = typer.Option("out", "--out", "-o", help="Output folder, or an fsspec URL (s3://bucket/run, file:///mnt/share/out, ...) worked on through a local mirror."),
    results: Optional[str] = typer.Option(None, "--results", help="Folder or fsspec URL for Prefect's task results (its cache), e.g. s3://bucket/prefect-results. Default: Prefect's local storage."),
):
    """Record if needed, then explain, simulate and score a layer, as a Prefect flow (no server needed)."""
    def go():
        from autoexplain import progress
        from autoexplain.remote import is_url
        from flows.explain_layer import explain_layer
        from tasks.stages import warm_up

        warm_up(simulator)
        bars, listener = stage_bars()
        remove = progress.listen(listener)
        try:
            with bars:
                result = explain_layer(layer=layer, units=units, model=model, corpus=corpus, tokens=tokens,
                                       explainer=explainer, simulator=simulator, k=k, shard_size=shard_size,
                                       out=out, results=results)
        finally:
            remove()
        for ref in result["scores"]:
            _print_summary(Path(ref["path"]))
        records = result["records"]
        typer.echo(records["uri"] if is_url(out) else str(Path(records["path"])))

    _run(go)


def _print_summary(scores_path: Path) -> None:
    import polars as pl
    from rich.table import Table

    scores = pl.read_parquet(scores_path)
    table = Table(title=f"test-split scores ({scores_path.parent.name})")
    for col in ("method", "metric", "units", "mean", "undefined"):
        table.add_column(col)
    summary = (scores.group_by("method", "metric")
               .agg(pl.len().alias("n"), pl.col("value").mean().alias("mean"), pl.col("value").null_count().alias("undef"))
               .sort("metric", "method"))
    for row in summary.iter_rows(named=True):
        mean = "-" if row["mean"] is None else f"{row['mean']:.3f}"
        table.add_row(row["method"], row["metric"], str(row["n"]), mean, str(row["undef"]))
    err.print(table)


def main():  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Prefect's ephemeral server needs longer than its 20 s default to start on a busy 2-core box,
    # and its telemetry would try to reach the internet.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_DATABASE_TIMEOUT", "60")
    os.environ.setdefault("PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT", "60")
    app(prog_name="autoexplain")


if __name__ == "__main__":  # pragma: no cover
    main()
