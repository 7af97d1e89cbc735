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

from autoexplain import defaults, preflight
from autoexplain.llm import set_limits
from autoexplain.errors import UserError
from schemas.contracts import ContractViolation

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
                if int(b) < int(a):
                    raise UserError(f"--layers range '{part}' runs backwards", f"write it as {b}-{a}")
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
    except ContractViolation as e:  # an output the store refused to seal
        failed = "; ".join(e.report.failures)
        err.print(f"[bold red]error:[/] {getattr(e, 'path', '')} breaks its data contract '{e.report.suite}': {failed}",
                  highlight=False, soft_wrap=True)
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
        preflight.check_out(str(out), preflight.cli_flag)
        preflight.check_corpus(corpus, preflight.cli_flag)
        shape = preflight.model_shape(model, preflight.cli_flag)
        chosen = parse_layers(layers, shape.n_layers)
        for L in chosen:
            preflight.check_layer(shape, L, preflight.cli_flag, "layers")
        started = time.perf_counter()
        subject = load_subject(model)
        err.print(f"subject {subject.name}: {subject.n_layers} layers x {subject.n_units} units "
                  f"on {subject.device}, loaded in {subject.load_seconds:.1f}s")
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
    from autoexplain.storage import read_manifest, require_complete

    require_complete(records, "records", "pass --records, the folder printed by `autoexplain record`")
    recorded = read_manifest(records)["params"]["layers"]
    if layer is not None and layer not in recorded:
        raise UserError(f"--layer {layer} was not recorded in {records} (it has {recorded})", "pass a recorded layer")
    return recorded[0] if layer is None else layer


@app.command()
def explain(
    records: Path = typer.Option(..., "--records", "-r", help="A records folder printed by `autoexplain record`."),
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="Layer to explain (default: the first recorded)."),
    units: Optional[str] = typer.Option(None, "--units", "-u", help="Units, e.g. 0-99 or 3,7 (default: all)."),
    explainer: str = typer.Option("embedding", "--explainer", "-e", help="'embedding' (offline default: top words named with MiniLM, no LLM), 'local' (embedded SmolLM2), 'local:PATH', 'openai:MODEL' or 'openai:MODEL@URL'."),
    k: int = typer.Option(4, "--k", help="Candidate explanations sampled per unit (best-of-k on the valid split)."),
    chat: bool = typer.Option(False, "--chat", help="Use the chat API instead of completions."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="LLM requests in flight at once, across units (default: 64 for a server URL, 8 for api.openai.com). Results do not depend on it."),
    rpm: Optional[float] = typer.Option(None, "--rpm", help="At most this many LLM requests per minute (default: no limit)."),
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Sample k candidate explanations per unit from its train records, plus the token-lookup baseline."""
    from autoexplain.layer import parse_units, run_explain
    from autoexplain.pipeline import ExplainConfig

    def go():
        if k < 1:
            raise UserError(f"--k must be at least 1, got {k}", "pass --k 1 or more")
        preflight.check_limits(concurrency, rpm, preflight.cli_flag)
        L = _records_layer(records, layer)
        chosen = parse_units(units)
        preflight.check_explainer(explainer, preflight.cli_flag)
        set_limits(concurrency, rpm)
        ref = run_explain(records, L, out, chosen, explainer, ExplainConfig(k=k, chat=chat))
        typer.echo(str(ref.directory))

    _run(go)


@app.command()
def simulate(
    records: Path = typer.Option(..., "--records", "-r", help="The records folder the explanations came from."),
    explanations: Path = typer.Option(..., "--explanations", "-x", help="A folder printed by `autoexplain explain`."),
    simulator: str = typer.Option("embedding", "--simulator", "-s", help="'embedding' (offline default), 'all-at-once[:LLM]' or 'chat-json:LLM'."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="LLM requests in flight at once, across units (default: 64 for a server URL, 8 for api.openai.com). Results do not depend on it."),
    rpm: Optional[float] = typer.Option(None, "--rpm", help="At most this many LLM requests per minute (default: no limit)."),
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Pick each unit's best candidate on the valid split, then simulate it and the baselines on held-out records."""
    from autoexplain.layer import StageRef, run_simulate

    def go():
        preflight.check_limits(concurrency, rpm, preflight.cli_flag)
        x = StageRef.of(explanations)
        _records_layer(records, x.layer)
        preflight.check_simulator(simulator, preflight.cli_flag)
        set_limits(concurrency, rpm)
        typer.echo(str(run_simulate(records, x, out, simulator).directory))

    _run(go)


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
        preflight.at_least(preflight.cli_flag, "n_boot", n_boot, 1)
        sims = StageRef.of(simulations)
        _records_layer(records, sims.layer)
        ref = run_score(records, sims, out, n_boot)
        _print_summary([ref.path])
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
        _records_layer(records, score_ref.layer)
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
    n_boot: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% CIs."),
    window_len: int = typer.Option(64, "--window-len", help="Tokens per window (the reference uses 64)."),
    top_k: int = typer.Option(40, "--top-k", help="Top-activating windows kept per unit and polarity."),
    n_random: int = typer.Option(30, "--random", help="Random windows kept per unit and polarity."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="LLM requests in flight at once, across units (default: 64 for a server URL, 8 for api.openai.com). Results do not depend on it."),
    rpm: Optional[float] = typer.Option(None, "--rpm", help="At most this many LLM requests per minute (default: no limit)."),
    out: str = typer.Option("out", "--out", "-o", help="Output folder, or an fsspec URL (s3://bucket/run, file:///mnt/share/out, ...) worked on through a local mirror."),
    results: Optional[str] = typer.Option(None, "--results", help="Folder or fsspec URL for Prefect's task results (its cache), e.g. s3://bucket/prefect-results. Default: Prefect's local storage."),
):
    """Record if needed, then explain, simulate and score a layer, as a Prefect flow (no server needed)."""
    params = dict(layer=layer, units=units, model=model, corpus=corpus, tokens=tokens, explainer=explainer,
                  simulator=simulator, k=k, shard_size=shard_size, n_boot=n_boot, window_len=window_len, top_k=top_k,
                  n_random=n_random, out=out, results=results, concurrency=concurrency, rpm=rpm)
    _run(lambda: _run_flow("explain_layer", params, lambda: preflight.explain_layer(params, preflight.cli_flag)))


@app.command()
def rescore(
    out: str = typer.Option("out", "--out", "-o", help="Output root of an explain-layer run (folder or URL)."),
    layer: int = typer.Option(15, "--layer", "-l", help="Layer whose latest run to re-score."),
    simulator: str = typer.Option("embedding", "--simulator", "-s", help="'embedding', 'all-at-once[:LLM]' or 'chat-json:LLM'."),
    n_boot: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% CIs."),
    results: Optional[str] = typer.Option(None, "--results", help="Folder or URL for Prefect's task results."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="LLM requests in flight at once, across units (default: 64 for a server URL, 8 for api.openai.com). Results do not depend on it."),
    rpm: Optional[float] = typer.Option(None, "--rpm", help="At most this many LLM requests per minute (default: no limit)."),
):
    """Re-simulate and re-score the latest run of a layer (the nightly job), and compare with its previous scores."""
    from flows.explain_layer import find_run

    params = dict(out=out, layer=layer, simulator=simulator, n_boot=n_boot, results=results, concurrency=concurrency,
                  rpm=rpm)

    def check():
        preflight.at_least(preflight.cli_flag, "n_boot", n_boot, 1)
        preflight.check_limits(concurrency, rpm, preflight.cli_flag)
        preflight.check_simulator(simulator, preflight.cli_flag)
        _cli_spelling(lambda: find_run(out, layer))

    _run(lambda: _run_flow("rescore", params, check))


def _read_revisions(path: Path) -> dict[str, str]:
    """A JSON object {"UNIT[:POLARITY]": text}, or JSON lines / CSV with unit, polarity, text."""
    import csv
    import json

    if not path.is_file():
        raise UserError(f"--file {path} does not exist", "pass a JSON, JSON-lines or CSV file of revisions")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            rows = [{"unit": k, "text": v} for k, v in data.items()] if isinstance(data, dict) else data
        return {f"{r['unit']}:{r.get('polarity') or 1}" if ":" not in str(r["unit"]) else str(r["unit"]): r["text"]
                for r in rows}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read revisions from {path} ({type(e).__name__}: {e})",
                        'write {"12:-1": "text", ...}, JSON lines or CSV with unit, polarity, text') from None


@app.command()
def revise(
    out: str = typer.Option("out", "--out", "-o", help="Output root of an explain-layer run (folder or URL)."),
    layer: int = typer.Option(15, "--layer", "-l", help="Layer whose latest run to revise."),
    unit: Optional[str] = typer.Option(None, "--unit", "-u", help="The unit to revise: UNIT or UNIT:POLARITY, e.g. 12:-1."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Its new explanation."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Several revisions: JSON {\"12:-1\": text}, JSON lines or CSV (unit, polarity, text)."),
):
    """Replace explanations by your own and re-simulate and re-score them (the explain-layer flow with revisions)."""
    from flows.explain_layer import find_run

    def go():
        if (unit is None) != (text is None) or (unit is None and file is None):
            raise UserError("revise needs --unit with --text, or --file", 'e.g. --unit 12:-1 --text "years written in digits"')
        run = _cli_spelling(lambda: find_run(out, layer))
        new = _read_revisions(file) if file else {}
        if unit is not None:
            new[unit] = text
        base = {**run["params"], "out": out}
        plan = _cli_spelling(lambda: preflight.explain_layer({**base, "revisions": None}))
        merged = {**preflight.check_revisions(base.get("revisions"), None),
                  **preflight.check_revisions(new, plan.units, preflight.cli_flag, "file" if file else "unit")}
        params = {**base, "revisions": {f"{u}:{p:+d}": t for (u, p), t in sorted(merged.items())}}
        _run_flow("explain_layer", params, lambda: None)

    _run(go)


def _cli_spelling(fn):
    """A flow-level check run from the CLI: its 'parameter x' becomes the flag '--x'."""
    try:
        return fn()
    except UserError as e:
        problem = e.problem
        if problem.startswith("parameter "):
            name, _, rest = problem[len("parameter "):].partition(":")
            problem = f"{preflight.cli_flag(name)}:{rest}"
        raise UserError(problem, e.fix) from None


def _run_flow(name: str, params: dict, check) -> None:
    """Check every parameter here (one line and exit 2 on a bad one: nothing has started), then run
    the flow with the stage bars, and print the layer's summary and where everything went."""
    check()
    from autoexplain import progress
    from flows import explain_layer as flows
    from tasks.stages import warm_up

    warm_up(params.get("simulator"))
    bars, listener = stage_bars()
    remove = progress.listen(listener)
    try:
        with bars:
            result = getattr(flows, name)(**params)
    finally:
        remove()
    _print_summary([Path(ref["path"]) for ref in result["scores"]], result)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _print_summary(scores_paths: list[Path], result: dict | None = None) -> None:
    """One table for the layer (all shards), then the comparison, the site and the outputs."""
    import polars as pl
    from rich.table import Table

    from autoexplain.summary import compare_markdown, layer_summary

    scores = pl.concat([pl.read_parquet(p) for p in scores_paths])
    layers = ", ".join(str(v) for v in sorted(set(scores["layer"].to_list())))
    units = scores.select("unit", "polarity").unique().height
    table = Table(title=f"layer {layers}: test-split scores of {units} units (mean, 95% CI)")
    for col in ("method", "metric", "units", "mean", "95% CI", "beats token-lookup", "undefined"):
        table.add_column(col)
    for r in layer_summary(scores).iter_rows(named=True):
        share = "-" if r["beats_lookup"] is None else f"{100 * r['beats_lookup']:.0f}%"
        table.add_row(r["method"], r["metric"], str(r["units"]), _fmt(r["mean"]),
                      f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", share, str(r["undefined"]))
    err.print(table)
    if result is None:
        return
    if result.get("comparison"):
        err.print(compare_markdown(result["comparison"], "Change against the previous scores"), highlight=False)
    if result.get("site"):
        site = result["site"]
        err.print(f"viewer: {site.removeprefix('file://')}  (serve it: autoexplain view --serve --site "
                  f"{Path(site.removeprefix('file://')).parent})", highlight=False, soft_wrap=True)
    err.print(f"outputs: {result['out']}", highlight=False, soft_wrap=True)
    typer.echo(result["out"])


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
