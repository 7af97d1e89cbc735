"""The `autoexplain` command line: the stage commands of `autoexplain.cli` plus the commands that
run whole flows, `explain-layer`, `explain-model`, `rescore` and `revise` (the console script's entry point, `main`).

The flow commands live here, not in the library, because they import the flows and tasks, which
the library never does (`autoexplain.cli` alone runs the stage commands without Prefect). Each
checks every parameter first (one line and exit 2 on a bad one, before Prefect starts), then runs
the same flow as the deployments, with the stage bars, and ends with one summary table for the
layer and the paths of the site and the outputs.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable, Optional

import typer

from autoexplain import defaults, preflight, run_lookup
from autoexplain.cli import app
from autoexplain.cli_common import (BUDGET, CACHE, CONCURRENCY, N_RANDOM, RETRIES, RPM, SCORERS, TEXT_FIELD, TIMEOUT, TOP_K, TPM,
                                    WINDOW_LEN)
from autoexplain.console import (
    budget_stopped,
    err,
    flat_command_list,
    print_llm_usage,
    print_model_summary,
    print_summary,
    run_or_exit,
    stage_bars,
    unanswered_exit,
)
from autoexplain.errors import UserError
from autoexplain.llm import set_limits


SOURCE = typer.Option("mlp", "--source", help="Whose units: 'mlp' (the layer's MLP neurons, both polarities), "
                     "'sae:PATH' or 'transcoder:PATH' (a local SAELens, sparsify or GemmaScope folder).")
# The options explain-layer and explain-model share.
MODEL = typer.Option(defaults.SUBJECT, "--model", "-m", help="Subject model (see `record --help`).")
CORPUS = typer.Option(defaults.CORPUS, "--corpus", "-c", help="Corpus (see `record --help`).")
TOKENS = typer.Option(1_000_000, "--tokens", "-n", help="Corpus tokens to record (one pass for every layer).")
EXPLAINER = typer.Option("embedding", "--explainer", "-e", help="'embedding' (offline default, no LLM), 'local' (embedded SmolLM2), 'openai:MODEL' or 'openai:MODEL@URL'.")
SIMULATOR = typer.Option("embedding", "--simulator", "-s", help="'embedding', 'all-at-once[:LLM]' or 'chat-json:LLM'; 'all-at-once/N:LLM' packs N records a request (default 1, the paper's format).")
K = typer.Option(4, "--k", help="Candidate explanations per unit (best-of-k on the valid split).")
SHARD_SIZE = typer.Option(256, "--shard-size", help="Units per task.")
N_BOOT = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% CIs.")
OUT = typer.Option("out", "--out", "-o", help="Output folder, or an fsspec URL (s3://bucket/run, file:///mnt/share/out, ...) worked on through a local mirror.")
DASK = typer.Option(None, "--dask", help="Address of a running dask scheduler, e.g. tcp://10.0.0.5:8786: its workers run "
                    "the shards' tasks. Default: threads in this process.")
RESULTS = typer.Option(None, "--results", help="Folder or fsspec URL for Prefect's task results (its cache), e.g. s3://bucket/prefect-results. Default: Prefect's local storage.")

def explain_layer_cmd(
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="Layer to explain (SmolLM2 has 0-29; default: the model's middle layer, 15 for SmolLM2, or a coder's own layer)."),
    source: str = SOURCE,
    units: Optional[str] = typer.Option(None, "--units", "-u", help="Units, e.g. 0-99 (default: the whole layer, both polarities)."),
    model: str = MODEL,
    corpus: str = CORPUS,
    text_field: str = TEXT_FIELD,
    tokens: int = TOKENS,
    explainer: str = EXPLAINER,
    simulator: str = SIMULATOR,
    scorers: str = SCORERS,
    k: int = K,
    shard_size: int = SHARD_SIZE,
    n_boot: int = N_BOOT,
    window_len: int = WINDOW_LEN,
    top_k: int = TOP_K,
    n_random: int = N_RANDOM,
    concurrency: Optional[int] = CONCURRENCY,
    rpm: Optional[float] = RPM,
    tpm: Optional[float] = TPM,
    retries: Optional[int] = RETRIES,
    timeout: Optional[float] = TIMEOUT,
    cache: bool = CACHE,
    budget: Optional[str] = BUDGET,
    out: str = OUT,
    site: Optional[str] = typer.Option(None, "--site", help="The layer's site folder (default OUT/site/layer_L; 'none': no site)."),
    results: Optional[str] = RESULTS,
    dask: Optional[str] = DASK,
):
    """Record if needed, then explain, simulate and score a layer, as a Prefect flow (no server needed)."""
    params = dict(layer=layer, units=units, model=model, corpus=corpus, text_field=text_field, tokens=tokens, explainer=explainer,
                  simulator=simulator, scorers=scorers, k=k, shard_size=shard_size, n_boot=n_boot, window_len=window_len, top_k=top_k,
                  n_random=n_random, out=out, site=site, results=results, concurrency=concurrency, rpm=rpm, tpm=tpm, retries=retries,
                  timeout=timeout, cache=cache, budget=budget, source=source, dask=dask)
    run_or_exit(lambda: _run_flow("explain_layer", params, lambda: preflight.explain_layer(params, preflight.cli_flag)))


def explain_model_cmd(
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="Layers to explain, e.g. 3,15 or 0-29 (default: every layer; a coder's own layer for a coder alone)."),
    sources: list[str] = typer.Option(["mlp"], "--source", help="Whose units, repeatable: 'mlp' (every chosen layer's MLP neurons), "
                                      "'sae:PATH' or 'transcoder:PATH' (a coder's latents at its own layer)."),
    units: Optional[str] = typer.Option(None, "--units", "-u", help="Units of every layer, e.g. 0-15 (default: all)."),
    model: str = MODEL,
    corpus: str = CORPUS,
    text_field: str = TEXT_FIELD,
    tokens: int = TOKENS,
    explainer: str = EXPLAINER,
    simulator: str = SIMULATOR,
    scorers: str = SCORERS,
    k: int = K,
    shard_size: int = SHARD_SIZE,
    n_boot: int = N_BOOT,
    site: Optional[str] = typer.Option(None, "--site", help="The model's site folder (default OUT/site/model; 'none': no site)."),
    window_len: int = WINDOW_LEN,
    top_k: int = TOP_K,
    n_random: int = N_RANDOM,
    concurrency: Optional[int] = CONCURRENCY,
    rpm: Optional[float] = RPM,
    tpm: Optional[float] = TPM,
    retries: Optional[int] = RETRIES,
    timeout: Optional[float] = TIMEOUT,
    cache: bool = CACHE,
    budget: Optional[str] = BUDGET,
    out: str = OUT,
    results: Optional[str] = RESULTS,
    dask: Optional[str] = DASK,
):
    """Record every chosen layer in one pass, then explain, simulate and score them all: one site and one model report."""
    from autoexplain import model_plan

    params = dict(layers=layers, sources=sources, units=units, model=model, corpus=corpus, text_field=text_field, tokens=tokens,
                  explainer=explainer, simulator=simulator, scorers=scorers, k=k, shard_size=shard_size, n_boot=n_boot,
                  site=site, window_len=window_len, top_k=top_k, n_random=n_random, out=out, results=results,
                  concurrency=concurrency, rpm=rpm, tpm=tpm, retries=retries, timeout=timeout, cache=cache, budget=budget, dask=dask)
    spell = lambda name: "--source" if name == "sources" else preflight.cli_flag(name)  # noqa: E731
    run_or_exit(lambda: _run_flow("explain_model", params, lambda: model_plan.explain_model(params, spell), spell=spell))


# The options of the commands that work on a finished run.
RUN_OUT = typer.Option("out", "--out", "-o", help="Output root of an explain-layer run (folder or URL).")
RUN_SOURCE = typer.Option("mlp", "--source", help="Whose units' run: as given to explain-layer, or the kind its pages show (sae-res-16k).")
RUN_RESULTS = typer.Option(None, "--results", help="Folder or URL for Prefect's task results.")
RUN_LAYER = ("Layer whose latest run to {} (default: a coder's own layer, or the one layer with a run of "
             f"those units, or {defaults.LAYER}).")


def rescore_cmd(
    out: str = RUN_OUT,
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help=RUN_LAYER.format("re-score")),
    source: str = RUN_SOURCE,
    simulator: str = typer.Option("embedding", "--simulator", "-s", help="'embedding', 'all-at-once[:LLM]' or 'chat-json:LLM'; 'all-at-once/N:LLM' packs N records a request (default 1, the paper's format)."),
    scorers: str = SCORERS,
    n_boot: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% CIs."),
    results: Optional[str] = RUN_RESULTS,
    concurrency: Optional[int] = CONCURRENCY,
    rpm: Optional[float] = RPM,
    tpm: Optional[float] = TPM,
    retries: Optional[int] = RETRIES,
    timeout: Optional[float] = TIMEOUT,
    cache: bool = CACHE,
    budget: Optional[str] = BUDGET,
    dask: Optional[str] = DASK,
):
    """Re-simulate and re-score the latest run of a layer (the nightly job), and compare with its previous scores."""
    params = dict(out=out, layer=layer, simulator=simulator, scorers=scorers, n_boot=n_boot, results=results,
                  concurrency=concurrency, rpm=rpm, tpm=tpm, retries=retries, timeout=timeout, cache=cache, budget=budget, source=source,
                  dask=dask)

    def check():
        preflight.at_least(preflight.cli_flag, "n_boot", n_boot, 1)
        preflight.check_limits(concurrency, rpm, preflight.cli_flag, tpm, retries, timeout)
        preflight.check_results(results, preflight.cli_flag)
        preflight.check_dask(dask, preflight.cli_flag, budget=budget)
        preflight.check_simulator(simulator, preflight.cli_flag)
        preflight.check_scorers(scorers, preflight.cli_flag)
        preflight.check_budget(budget, preflight.cli_flag, simulator=simulator, scorers=scorers)
        run_lookup.rerun_of(out, layer, source, scorers, preflight.cli_flag)

    run_or_exit(lambda: _run_flow("rescore", params, check))


def revise_cmd(
    out: str = RUN_OUT,
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help=RUN_LAYER.format("revise")),
    source: str = RUN_SOURCE,
    unit: Optional[str] = typer.Option(None, "--unit", "-u", help="The unit to revise: UNIT or UNIT:POLARITY, e.g. 12:-1."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Its new explanation."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Several revisions: JSON {\"12:-1\": text}, JSON lines or CSV (unit, polarity, text)."),
    results: Optional[str] = RUN_RESULTS,
    concurrency: Optional[int] = CONCURRENCY,
    rpm: Optional[float] = RPM,
    tpm: Optional[float] = TPM,
    retries: Optional[int] = RETRIES,
    timeout: Optional[float] = TIMEOUT,
    cache: bool = CACHE,
    budget: Optional[str] = BUDGET,
    dask: Optional[str] = DASK,
):
    """Replace explanations by your own, re-simulate and re-score them with the run's simulator and
    scorers, and compare (nothing is recorded or explained again)."""
    from autoexplain import revise_plan

    def go():
        if (unit is None) != (text is None) or (unit is None and file is None):
            raise UserError("revise needs --unit with --text, or --file", 'e.g. --unit 12:-1 --text "years written in digits"')
        new = revise_plan.read_revisions(file) if file else {}
        if unit is not None:
            new[unit] = text
        params = dict(out=out, layer=layer, revisions=new, source=source, results=results, concurrency=concurrency,
                      rpm=rpm, tpm=tpm, retries=retries, timeout=timeout, cache=cache, budget=budget, dask=dask)
        uses: dict = {}

        def check():
            preflight.check_limits(concurrency, rpm, preflight.cli_flag, tpm, retries, timeout)
            preflight.check_results(results, preflight.cli_flag)
            preflight.check_dask(dask, preflight.cli_flag, budget=budget)
            planned = revise_plan.plan(out, layer, source, new, preflight.cli_flag, "file" if file else "unit", budget)
            uses.update(simulator=planned.simulator, scorers=planned.scorers)  # the run's: params name none

        _run_flow("revise", params, check, uses)

    run_or_exit(go)


def _run_flow(name: str, params: dict, check, uses: dict | None = None, spell=preflight.cli_flag) -> None:
    """Check every parameter here (one line and exit 2 on a bad one: nothing has started), then run
    the flow with the stage bars, and print the layer's summary and where everything went. `uses`:
    the components the run uses that `params` do not name, filled by `check` (revise: the run's
    simulator and scorers), for the simulator's warm-up and the LLM line. `spell`: this command's
    flags, for a parameter error the run itself finds."""
    check()
    serving = temporary_server()  # starts now, while the flow is imported and the simulator loads
    uses = {**params, **(uses or {})}
    import importlib

    from autoexplain import progress
    from autoexplain.tasks.stages import warm_up

    flow = getattr(importlib.import_module("autoexplain.flows.explain_model" if name == "explain_model" else "autoexplain.flows.explain_layer"), name)
    # The warm-up makes the simulator, and a server simulator's LLM keeps the limits it was made with.
    set_limits(*(params.get(k) for k in ("concurrency", "rpm", "tpm", "retries", "timeout")))
    warm_up(uses.get("simulator"))
    bars, listener = stage_bars()
    remove = progress.listen(listener)
    try:
        with serving(), bars:
            try:
                result = flow(**params)
            except UserError as e:
                raise preflight.respelled(e, spell) from None
    finally:
        remove()
    from autoexplain.registry import uses_server

    print_llm_usage(uses_server(uses.get("explainer"), uses.get("simulator"), uses.get("scorers")))
    if result.get("stopped"):
        budget_stopped(result["message"])
    if name == "explain_model":
        print_model_summary(result)
    else:
        print_summary([Path(ref["path"]) for ref in result["scores"]], result)
    if serving is not nullcontext:  # the temporary server's runs stay in the home's database
        from prefect.settings import PREFECT_HOME

        err.print(f"Prefect: the flow run stays in {PREFECT_HOME.value()}; `prefect server start` shows it at the "
                  "'View at' link above", highlight=False)
    unanswered_exit(result.get("unanswered", 0))  # counted by the flow (`flows.steps.finished`)


def temporary_server() -> Callable[[], AbstractContextManager]:
    """A context in which the flow runs report to Prefect's temporary server, one that a signal to
    the command does not stop (`flows.server`), when none is configured (no PREFECT_API_URL). The
    server starts at this call; entering the context waits until it answers."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    if PREFECT_API_URL.value():
        return nullcontext
    from autoexplain.flows import server

    answering = server.launch()
    # Prefect's "View at" line names the UI of a later `prefect server start` on the same database,
    # not this server's port, which is gone when the command ends.
    return lambda: temporary_settings({PREFECT_API_URL: answering(), PREFECT_UI_URL: server.later_ui()})


app.command("explain-layer")(explain_layer_cmd)
app.command("explain-model")(explain_model_cmd)
app.command("rescore")(rescore_cmd)
app.command("revise")(revise_cmd)
flat_command_list(app)


def main():  # pragma: no cover - console entry point
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        # A spawned child (the embedder's helper, `encode_helper`) imports the parent's main module
        # with the parent's argv: a console script written without the `__main__` guard would run
        # the whole command again in it (a second flow run, every log line twice).
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Prefect's ephemeral server needs longer than its 20 s default to start on a busy 2-core box,
    # and its telemetry would try to reach the internet.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_DATABASE_TIMEOUT", "60")
    os.environ.setdefault("PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT", "60")
    from autoexplain import leave

    leave.run(lambda: app(prog_name="autoexplain"))


if __name__ == "__main__":  # pragma: no cover
    main()
