"""The `autoexplain` command line's stage commands (record, explain, simulate, score, then those of
`cli_tools`: export, import, view, publish, train-sae); `flows.cli` adds the commands that run whole flows and is the console script's entry point.
`python -m autoexplain.cli` runs the stage commands alone, without Prefect.

Every command has offline defaults: the embedded SmolLM2 subject, the embedded corpus and a middle
layer. A `UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from autoexplain import cli_tools, defaults, leave, preflight
from autoexplain.budget import set_budget
from autoexplain.cli_common import (BUDGET, CACHE, CONCURRENCY, N_RANDOM, RETRIES, RPM, SCORERS, TEXT_FIELD, TIMEOUT, TOP_K, TPM,
                                    WINDOW_LEN, records_layer)
from autoexplain.console import err, flat_command_list, print_llm_usage, print_summary, progress_bar, run_or_exit
from autoexplain.errors import UserError
from autoexplain.llm import set_limits
from autoexplain.llm_cache import set_cache


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
    text_field: str = TEXT_FIELD,
    source: str = typer.Option("mlp", "--source", help="Whose units: 'mlp' (MLP neurons), 'sae:PATH' or 'transcoder:PATH' (a local coder folder; --layers defaults to its layer)."),
):
    """Record unit activations (MLP neurons, or a sparse coder's latents): top, quantile and random exemplars per unit, plus statistics."""
    from autoexplain.model_plan import parse_layers
    from autoexplain.record import RecordConfig, build_windows, record_layers
    from autoexplain.subject import load_subject

    def go():
        preflight.check_recording(dict(tokens=tokens, window_len=window_len, top_k=top_k, n_random=n_random,
                                       quantile_per_bin=quantile_per_bin, reservoir=reservoir, batch_size=batch_size,
                                       seed=seed), preflight.cli_flag)
        preflight.check_out(str(out), preflight.cli_flag)
        preflight.check_corpus(corpus, preflight.cli_flag, text_field=text_field)
        shape = preflight.model_shape(model, preflight.cli_flag)
        preflight.check_window(shape, window_len, preflight.cli_flag)
        given = parse_layers(layers, shape.n_layers, preflight.cli_flag) if layers is not None else None
        if given is not None and len(given) > 1 and ":" in source:
            raise preflight.refuse(preflight.cli_flag, "layers", f"a coder reads one layer, this names {len(given)}",
                                   "pass one layer, or leave --layers out")
        unit_source = preflight.check_source(source, model, given[0] if given else None, preflight.cli_flag,
                                             layer_name="layers")
        chosen = given or ([unit_source.layer] if hasattr(unit_source, "layer") else [shape.middle_layer])
        for L in chosen:
            preflight.check_layer(shape, L, preflight.cli_flag, "layers")
        started = time.perf_counter()
        subject = load_subject(model)
        dtype = str(subject.model.dtype).removeprefix("torch.")
        err.print(f"subject {subject.name}: {subject.n_layers} layers x {subject.n_units} units "
                  f"on {subject.device} in {dtype}, loaded in {subject.load_seconds:.1f}s")
        subject.check_layers(chosen)
        windows = build_windows(subject, corpus, out, window_len, tokens, seed, text_field, preflight.cli_flag)
        if windows.notice:
            err.print(windows.notice, highlight=False, markup=False)
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
    timeout: Optional[float] = TIMEOUT,
    cache: bool = CACHE,
    budget: Optional[str] = BUDGET,
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Sample k candidate explanations per unit from its train records, plus the token-lookup baseline."""
    from autoexplain.indices import parse_units
    from autoexplain.layer import recorded_units, run_explain
    from autoexplain.pipeline import ExplainConfig

    def go():
        preflight.check_out(str(out), preflight.cli_flag)
        preflight.at_least(preflight.cli_flag, "k", k, 1)
        preflight.check_limits(concurrency, rpm, preflight.cli_flag, tpm, retries, timeout)
        L = records_layer(records, layer)
        try:
            parse_units(units, recorded_units(records, L))  # a unit the layer lacks is an error, not skipped
        except UserError as e:
            raise preflight.for_parameter(preflight.cli_flag, "units", e) from None
        chosen = parse_units(units)  # None (every unit) stays None: it is part of the stage's key
        preflight.check_explainer(explainer, preflight.cli_flag)
        limit = preflight.check_budget(budget, preflight.cli_flag, explainer=explainer)
        set_limits(concurrency, rpm, tpm, retries, timeout)
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
    simulator: str = typer.Option("embedding", "--simulator", "-s", help="'embedding' (offline default), 'all-at-once[:LLM]' or 'chat-json:LLM'; 'all-at-once/N:LLM' packs N records a request (default 1, the paper's format)."),
    concurrency: Optional[int] = CONCURRENCY,
    rpm: Optional[float] = RPM,
    tpm: Optional[float] = TPM,
    retries: Optional[int] = RETRIES,
    timeout: Optional[float] = TIMEOUT,
    cache: bool = CACHE,
    budget: Optional[str] = BUDGET,
    out: Path = typer.Option(Path("out"), "--out", "-o"),
):
    """Pick each unit's best candidate on the valid split, then simulate it and the baselines on held-out records."""
    from autoexplain.layer import StageRef, run_simulate

    def go():
        preflight.check_out(str(out), preflight.cli_flag)
        preflight.check_limits(concurrency, rpm, preflight.cli_flag, tpm, retries, timeout)
        x = StageRef.of(explanations, "explanations")
        records_layer(records, x.layer)
        preflight.check_simulator(simulator, preflight.cli_flag)
        limit = preflight.check_budget(budget, preflight.cli_flag, simulator=simulator)
        set_limits(concurrency, rpm, tpm, retries, timeout)
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
        records_layer(records, sims.layer)
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


# Commands beside the stages (`cli_tools`), listed after them.
for _name, _command in (("export", cli_tools.export_cmd), ("import", cli_tools.import_cmd), ("view", cli_tools.view),
                        ("publish", cli_tools.publish), ("train-sae", cli_tools.train_sae_cmd)):
    app.command(_name)(_command)


def main():  # pragma: no cover - the stage commands alone (`python -m autoexplain.cli`)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    flat_command_list(app)
    leave.run(lambda: app(prog_name="autoexplain"))


if __name__ == "__main__":  # pragma: no cover
    main()
