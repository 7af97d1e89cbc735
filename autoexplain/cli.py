"""The `autoexplain` command line's stage commands (record, explain, simulate, score, export, import,
view); `flows.cli` adds the commands that run whole flows and is the console script's entry point.
`python -m autoexplain.cli` runs the stage commands alone, without Prefect.

Every command has offline defaults: the embedded SmolLM2 subject, the embedded corpus and a middle
layer. A `UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

import typer

from autoexplain import defaults, preflight
from autoexplain.budget import set_budget
from autoexplain.console import err, flat_command_list, print_llm_usage, print_summary, progress_bar, run_or_exit
from autoexplain.errors import UserError
from autoexplain.llm import set_limits
from autoexplain.llm_cache import set_cache


# Options that several commands share, declared once (`flows.cli` uses them too).
WINDOW_LEN = typer.Option(64, "--window-len", help="Tokens per window (the reference uses 64).")
TOP_K = typer.Option(40, "--top-k", help="Top-activating windows kept per unit and polarity.")
N_RANDOM = typer.Option(30, "--random", help="Random windows kept per unit and polarity.")
CONCURRENCY = typer.Option(None, "--concurrency", help="LLM requests in flight at once, across units (default: 64 for a server URL, 8 for api.openai.com; each request that times out lowers it by one, down to 1, and quick answers raise it back). Results do not depend on it.")
RPM = typer.Option(None, "--rpm", help="At most this many LLM requests per minute (default: no limit).")
TPM = typer.Option(None, "--tpm", help="At most this many LLM tokens (prompt + completion) per minute; a request takes an estimate "
                   "before it is sent and the server's count once answered (default: no limit).")
RETRIES = typer.Option(None, "--retries", help="Times an LLM request is sent again after a timeout, a lost connection, a 429 or a 5xx, with backoff (default: 6); 0 fails it at once.")
BUDGET = typer.Option(None, "--budget", help="The most this run may spend on server LLMs: dollars ('$5', at the prices of "
                      "autoexplain/prices.json) or tokens ('2M tokens'). The run stops cleanly before the request that would pass it "
                      "(exit code 3); finished units are kept, and the same command with a larger budget goes on from there.")
CACHE = typer.Option(True, "--cache/--no-cache", help="Keep every LLM answer under <out>/llm_cache and never pay for the same request twice "
                     "($AUTOEXPLAIN_LLM_CACHE names another folder, or 'off'). --no-cache sends every request.")
SCORERS = typer.Option("simulation", "--scorers", help="Comma list of scorers: simulation (default), detection, fuzzing, "
                       "fuzzing-active, intruder (each optionally :LLM, default the embedded SmolLM2) and embedding (MiniLM), "
                       "e.g. simulation,detection:openai:MODEL@URL,embedding.")

app = typer.Typer(
    help="Explain what each neuron of a language model does: record activations, explain them with an "
    "LLM, simulate the neuron from the explanation, and score the simulation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root():
    """Record -> explain -> simulate -> score, on the embedded defaults unless told otherwise."""
    run_or_exit(defaults.check_environment)


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


@app.command()
def record(
    model: str = typer.Option(defaults.SUBJECT, "--model", "-m", help="Subject model: hub name, local folder, .gguf file, or 'smollm2' (embedded)."),
    corpus: str = typer.Option(defaults.CORPUS, "--corpus", "-c", help="Corpus: 'default' (embedded), a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][@SPLIT]."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="Layers to record: 15, 3,7, 10-12 or all. Default: the middle layer."),
    tokens: int = typer.Option(1_000_000, "--tokens", "-n", help="Corpus tokens to run through the model."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output root; each stage writes a content-addressed folder under it."),
    window_len: int = WINDOW_LEN,
    top_k: int = TOP_K,
    n_random: int = N_RANDOM,
    quantile_per_bin: int = typer.Option(5, "--per-quantile", help="Windows sampled from each activation-quantile bin."),
    reservoir: int = typer.Option(512, "--reservoir", help="Uniform window sample that random and quantile exemplars are drawn from."),
    batch_size: int = typer.Option(32, "--batch-size", help="Windows per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed for the window order and all sampling."),
    text_field: str = typer.Option("text", "--text-field", help="Text column of .jsonl/.parquet/hub corpora."),
    source: str = typer.Option("mlp", "--source", help="Whose units: 'mlp' (MLP neurons), 'sae:PATH' or 'transcoder:PATH' (a local coder folder; --layers defaults to its layer)."),
):
    """Record unit activations (MLP neurons, or a sparse coder's latents): top, quantile and random exemplars per unit, plus statistics."""
    from autoexplain.record import RecordConfig, build_windows, record_layers
    from autoexplain.subject import load_subject

    def go():
        preflight.check_recording(dict(tokens=tokens, window_len=window_len, top_k=top_k, n_random=n_random,
                                       quantile_per_bin=quantile_per_bin, reservoir=reservoir, batch_size=batch_size,
                                       seed=seed), preflight.cli_flag)
        preflight.check_out(str(out), preflight.cli_flag)
        preflight.check_corpus(corpus, preflight.cli_flag)
        shape = preflight.model_shape(model, preflight.cli_flag)
        given = parse_layers(layers, shape.n_layers) if layers is not None else None
        if given is not None and len(given) > 1 and ":" in source:
            raise UserError(f"a coder reads one layer, --layers names {len(given)}", "pass one layer, or leave --layers out")
        unit_source = preflight.check_source(source, model, given[0] if given else None, preflight.cli_flag)
        chosen = given or ([unit_source.layer] if hasattr(unit_source, "layer") else parse_layers(None, shape.n_layers))
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
            task = bar.add_task(f"record layers {','.join(map(str, chosen))}", total=windows.n_windows * window_len,
                                unit="tokens")
            ref = record_layers(subject, windows, cfg, out,
                                progress=lambda done, total: bar.update(task, completed=done, total=total),
                                source=unit_source)
        err.print(f"recorded {windows.n_windows:,} windows in {time.perf_counter() - started:.0f}s")
        typer.echo(str(ref.directory))

    run_or_exit(go)


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
    concurrency: Optional[int] = CONCURRENCY,
    rpm: Optional[float] = RPM,
    tpm: Optional[float] = TPM,
    retries: Optional[int] = RETRIES,
    cache: bool = CACHE,
    budget: Optional[str] = BUDGET,
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Sample k candidate explanations per unit from its train records, plus the token-lookup baseline."""
    from autoexplain.layer import parse_units, recorded_units, run_explain
    from autoexplain.pipeline import ExplainConfig

    def go():
        preflight.check_out(str(out), preflight.cli_flag)
        if k < 1:
            raise UserError(f"--k must be at least 1, got {k}", "pass --k 1 or more")
        preflight.check_limits(concurrency, rpm, preflight.cli_flag, tpm, retries)
        L = _records_layer(records, layer)
        parse_units(units, recorded_units(records, L))  # a unit the layer lacks is an error, not skipped
        chosen = parse_units(units)  # None (every unit) stays None: it is part of the stage's key
        preflight.check_explainer(explainer, preflight.cli_flag)
        limit = preflight.check_budget(budget, preflight.cli_flag, explainer=explainer)
        set_limits(concurrency, rpm, tpm, retries)
        set_cache(cache)
        set_budget(limit)
        ref = run_explain(records, L, out, chosen, explainer, ExplainConfig(k=k, chat=chat))
        print_llm_usage()
        typer.echo(str(ref.directory))

    run_or_exit(go)


@app.command()
def simulate(
    records: Path = typer.Option(..., "--records", "-r", help="The records folder the explanations came from."),
    explanations: Path = typer.Option(..., "--explanations", "-x", help="A folder printed by `autoexplain explain`."),
    simulator: str = typer.Option("embedding", "--simulator", "-s", help="'embedding' (offline default), 'all-at-once[:LLM]' or 'chat-json:LLM'."),
    concurrency: Optional[int] = CONCURRENCY,
    rpm: Optional[float] = RPM,
    tpm: Optional[float] = TPM,
    retries: Optional[int] = RETRIES,
    cache: bool = CACHE,
    budget: Optional[str] = BUDGET,
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Pick each unit's best candidate on the valid split, then simulate it and the baselines on held-out records."""
    from autoexplain.layer import StageRef, run_simulate

    def go():
        preflight.check_out(str(out), preflight.cli_flag)
        preflight.check_limits(concurrency, rpm, preflight.cli_flag, tpm, retries)
        x = StageRef.of(explanations, "explanations")
        _records_layer(records, x.layer)
        preflight.check_simulator(simulator, preflight.cli_flag)
        limit = preflight.check_budget(budget, preflight.cli_flag, simulator=simulator)
        set_limits(concurrency, rpm, tpm, retries)
        set_cache(cache)
        set_budget(limit)
        ref = run_simulate(records, x, out, simulator)
        print_llm_usage()
        typer.echo(str(ref.directory))

    run_or_exit(go)


@app.command()
def score(
    records: Path = typer.Option(..., "--records", "-r", help="The records folder the simulations came from."),
    simulations: Path = typer.Option(..., "--simulations", "-s", help="A folder printed by `autoexplain simulate`."),
    n_boot: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% CIs."),
    scorers: str = SCORERS,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The subject the records came from: classifier scorers then also use similar hard negatives."),
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Score simulations on the test split: correlations, calibrated R², detection AUC, with CIs
    (and, with --scorers, the classifier scorers' balanced accuracy, AUC and intruder accuracy)."""
    from autoexplain.layer import StageRef, run_score

    def go():
        preflight.at_least(preflight.cli_flag, "n_boot", n_boot, 1)
        specs = preflight.check_scorers(scorers, preflight.cli_flag)
        preflight.check_out(str(out), preflight.cli_flag)
        sims = StageRef.of(simulations, "simulations")
        _records_layer(records, sims.layer)
        ref = run_score(records, sims, out, n_boot) if "simulation" in specs else None
        if specs != ["simulation"]:
            from autoexplain.classify_stage import run_classify, run_scores, similar_negatives

            near = similar_negatives(records, sims, out, model)
            asked = [run_classify(records, sims, out, spec, negatives_dir=near) for spec in specs if spec != "simulation"]
            ref = run_scores(records, sims, asked, out, ref, n_boot)
            print_llm_usage()
        print_summary([ref.path])
        typer.echo(str(ref.directory))

    run_or_exit(go)


@app.command("export")
def export_cmd(
    records: Path = typer.Option(..., "--records", "-r", help="The records folder the scores came from."),
    scores: Path = typer.Option(..., "--scores", "-c", help="A folder printed by `autoexplain score`."),
    to: Path = typer.Option(..., "--to", help="Folder to write neurons/<layer>/<n>.json and explanations/<layer>/<n>.jsonl into."),
):
    """Export records, explanations and scored simulations in the reference dataset's JSON layout."""
    import pyarrow.parquet as pq

    from autoexplain.interop import export_layer
    from autoexplain import layout
    from autoexplain.layer import StageRef, load_units
    from autoexplain.storage import read_manifest, require_recording

    def go():
        preflight.check_out(str(to), preflight.cli_flag, "to")
        score_ref = StageRef.of(scores, "scores")
        _records_layer(records, score_ref.layer)
        require_recording(score_ref.directory, records)
        scored = read_manifest(score_ref.directory)["inputs"]["simulations"]
        sims_ref = StageRef.of(layout.input_of(score_ref.directory, scored))
        sims = pq.read_table(sims_ref.path)
        units = load_units(records, score_ref.layer, sorted(set(sims.column("unit").to_pylist())))
        n = export_layer(to, units, pq.read_table(sims_ref.directory / layout.CHOSEN), sims,
                         pq.read_table(score_ref.path))
        err.print(f"exported {n} units of layer {score_ref.layer}")
        typer.echo(str(to))

    run_or_exit(go)


@app.command("import")
def import_cmd(
    source: Path = typer.Option(..., "--from", help="A dataset `publish` wrote, or a folder in the reference layout (explanations/<layer>/<n>.jsonl)."),
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="Layer to import (required for the reference layout; default for a dataset: every layer)."),
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Import published explanations to re-simulate and re-score them. A dataset `publish` wrote comes
    back whole (records, explanations, its scores), as runs that `rescore --out OUT --layer L` re-scores."""
    from autoexplain import layout
    from autoexplain.interop import import_explanations
    from autoexplain.store import Stage

    def go():
        preflight.check_out(str(out), preflight.cli_flag)
        if (source / "data" / "explanations").is_dir():
            from autoexplain.dataset_import import import_dataset

            for L, kind in import_dataset(source, out, None if layer is None else [layer]):
                err.print(f"imported layer {L} ({kind}): re-score it with `autoexplain rescore --out {out} --layer {L}"
                          f"{'' if kind == 'mlp' else ' --source ' + kind}`", highlight=False, soft_wrap=True)
            typer.echo(str(out))
            return
        if layer is None:
            raise UserError("--layer is required for the reference layout", "pass --layer L")
        table = import_explanations(source, layer)
        # Keyed by the rows themselves: they are the output, whatever code parsed them.
        stage = Stage.open(out, "explanations", {"imported": table.to_pylist()})
        if not stage.done:
            stage.table(table, layout.table(stage.directory, layer).name, "explanations")
            stage.seal({"source": str(source)}, {"layer": layer})
        err.print(f"imported {table.num_rows} explanations for layer {layer}")
        typer.echo(str(stage.directory))

    run_or_exit(go)


@app.command()
def view(
    scores: Optional[list[str]] = typer.Option(None, "--scores", "-c", help="Scores folders printed by `autoexplain score` or explain-layer (or their URLs: file://, or under a URL --out): one per layer, or the shards of a layer. Optional with --serve when the site exists."),
    site: str = typer.Option("site", "--site", help="Folder or fsspec URL to write the static site into (or, with --serve alone, the folder to serve)."),
    records: Optional[str] = typer.Option(None, "--records", "-r", help="Records folder or URL (default: found through the manifests)."),
    serve: bool = typer.Option(False, "--serve", help="Serve the site over http on this machine until Ctrl-C, and print its URL: what a browser opens from an http page such as the Prefect UI, which does not follow file:// links."),
    port: Optional[int] = typer.Option(None, "--port", help="Port for --serve (default 8765, or a free port when 8765 is taken; 0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address for --serve (default loopback only: nothing outside this machine sees the site)."),
):
    """Write a static neuron viewer (no server needed: open index.html) from scored layers; --serve serves it."""
    def go():
        from autoexplain import remote, serve as serving
        from autoexplain.storage import local_folder
        from autoexplain.view import BUILT_WHOLE, build_site, site_folder

        if serve:
            serving.check_address(host, port)
        if scores:
            preflight.check_out(site, preflight.cli_flag, "site")
            index = build_site([local_folder(s) for s in scores], site_folder(site, True), records and local_folder(records))
            uploaded = remote.push(index.parent, prune=BUILT_WHOLE)  # a URL's site; None for a folder
            typer.echo(remote.uri(index) if uploaded else str(index))
        elif not serve:
            raise UserError("nothing to do: no --scores given", "pass --scores <scores folder>, or --serve to serve an existing --site")
        if not serve:
            return
        server = serving.start(site_folder(site, bool(scores)), host, port)
        typer.echo(server.url)
        err.print(f"serving {server.site} at {server.url} (Ctrl-C to stop)", highlight=False, soft_wrap=True)
        server.wait()

    run_or_exit(go)


@app.command()
def publish(
    out: str = typer.Option("out", "--out", "-o", help="Output root of explain-layer runs (folder or URL)."),
    to: str = typer.Option(..., "--to", help="Folder or fsspec URL to write the dataset into (new, empty, or an earlier publish, which is replaced)."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="Layers to publish: 15, 3,7 or 10-12 (default: every layer with a finished run)."),
    license_: Optional[str] = typer.Option(None, "--license", help="The dataset's license for the card (default: cc-by-sa-3.0 for the embedded corpus; required for any other corpus)."),
):
    """Publish the latest runs as a dataset: parquet tables by source and layer, and a dataset card (Hugging Face format)."""
    from autoexplain.publish import TABLES
    from autoexplain.publish import publish as publish_dataset

    def go():
        chosen = parse_layers(layers, 10**6) if layers not in (None, "all") else None
        preflight.check_root(out, preflight.cli_flag)
        preflight.check_out(to, preflight.cli_flag, "to")
        to_dir = publish_dataset(out, to, chosen, license_)
        err.print(f"published {', '.join(TABLES)} to {to_dir}", highlight=False)
        typer.echo(str(to_dir))

    run_or_exit(go)


@app.command("train-sae")
def train_sae_cmd(
    model: str = typer.Option(defaults.SUBJECT, "--model", "-m", help="Subject model: hub name, local folder, .gguf file, or 'smollm2' (embedded)."),
    corpus: str = typer.Option(defaults.CORPUS, "--corpus", "-c", help="Corpus whose tokens the SAE is trained on (as for record)."),
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="Layer of the hook point (default: the middle layer)."),
    hook: str = typer.Option("resid_post", "--hook", help="resid_pre, resid_post, mlp_in or mlp_out of that layer."),
    latents: int = typer.Option(4096, "--latents", help="Latents of the SAE."),
    k: int = typer.Option(32, "--k", help="Active latents per token (TopK)."),
    tokens: int = typer.Option(200_000, "--tokens", "-n", help="Corpus tokens to capture hidden states from (5 % held out)."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the captured tokens."),
    batch: int = typer.Option(1024, "--batch-tokens", help="Tokens per training step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default: scaled to --latents)."),
    seed: int = typer.Option(0, "--seed"),
    window_len: int = WINDOW_LEN,
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output root (the tokenised windows are cached under it)."),
    to: Optional[Path] = typer.Option(None, "--to", help="SAE folder to write (default: <out>/sae/layer_<L>_<hook>_<latents>)."),
):
    """Train a TopK SAE on one hook point's hidden states, on CPU, and save it in SAELens format
    (SAELens and `autoexplain.sae` read it back); prints its held-out fraction of variance explained and dead latents."""
    from autoexplain.record import build_windows
    from autoexplain.sae_coder import HookPoint
    from autoexplain.sae_train import TL_HOOKS, TrainConfig, train_sae
    from autoexplain.subject import load_subject

    def go():
        for name, value in (("--latents", latents), ("--k", k), ("--tokens", tokens), ("--epochs", epochs), ("--batch-tokens", batch)):
            preflight.at_least(preflight.cli_flag, name.lstrip("-").replace("-", "_"), value, 1)
        if k > latents:
            raise UserError(f"--k {k} is more than --latents {latents}", "pass --k at most --latents")
        if lr is not None and not lr > 0:
            raise UserError(f"--lr must be more than 0, got {lr}", "pass a positive learning rate, or leave --lr out")
        if tokens - tokens // 20 < batch:  # 5 % of the tokens are held out for the report
            raise UserError(f"--tokens {tokens:,} leave {tokens - tokens // 20:,} to train on, fewer than one batch of "
                            f"--batch-tokens {batch:,}", "pass more --tokens or a smaller --batch-tokens")
        if hook not in TL_HOOKS:
            raise UserError(f"unknown --hook '{hook}'", f"use one of {', '.join(TL_HOOKS)}")
        for flag, where in (("out", out), ("to", to)):
            if where is None:
                continue
            if re.match(r"[a-z][a-z0-9+.-]*:/", str(where)):  # a URL, which Path has folded to 'file:/...'
                raise UserError(f"--{flag} {where}: train-sae writes to a local folder, not a URL",
                                "pass a folder path (copy the SAE to the URL afterwards)")
            preflight.check_out(str(where), preflight.cli_flag, flag)
        preflight.check_corpus(corpus, preflight.cli_flag)
        shape = preflight.model_shape(model, preflight.cli_flag)
        point = HookPoint(shape.n_layers // 2 if layer is None else layer, hook)
        preflight.check_layer(shape, point.layer, preflight.cli_flag, "layer")
        subject = load_subject(model)
        windows = build_windows(subject, corpus, out, window_len, tokens, seed)
        folder = to or out / "sae" / f"layer_{point.layer}_{hook}_{latents}"
        with progress_bar() as bar:
            tasks = {}

            def progress(stage, done, total):
                if stage not in tasks:
                    tasks[stage] = bar.add_task(f"{stage} {point}", total=total, unit="steps" if stage == "train" else "tokens")
                bar.update(tasks[stage], completed=done, total=total)

            report = train_sae(subject, point, windows, folder, TrainConfig(latents, k, batch, epochs, lr, seed=seed), corpus, progress)
        err.print(f"SAE {latents} latents, k={k} on {point}: FVE {report.fve:.3f} ({report.fve_without_top_dim:.3f} without the "
                  f"highest-variance dimension), dead {report.dead_fraction:.1%} "
                  f"(held-out {report.tokens_eval:,} tokens); trained on {report.tokens_train:,} tokens, "
                  f"{report.steps} steps, capture {report.seconds_capture:.0f}s + train {report.seconds_train:.0f}s")
        typer.echo(str(folder))

    run_or_exit(go)


def main():  # pragma: no cover - the stage commands alone (`python -m autoexplain.cli`)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    flat_command_list(app)
    app(prog_name="autoexplain")


if __name__ == "__main__":  # pragma: no cover
    main()
