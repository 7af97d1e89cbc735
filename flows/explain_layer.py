"""Flows: composition only. Every step is a task from `tasks/`.

- `record-activations`: record one or more layers.
- `explain-layer`: record if needed, then explain, simulate and score each shard of units, publish
  the outputs as assets, write the report and the layer's run pointer (`storage.run_file`).
- `rescore`: re-simulate and re-score the latest run of a layer under an output root (a new
  simulator, or the same one after a prompt edit), and compare the new scores with the previous
  ones. The nightly job.

Every flow checks all its parameters first (`autoexplain.preflight`): a bad one ends the run in its
first second, as a Failed state whose message is one line naming the parameter.

`out` is a folder or an fsspec URL (outputs pushed there, see `autoexplain.remote`); `results`, a
folder or URL where Prefect keeps the tasks' results (its cache), else Prefect's default storage.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from prefect import flow
from prefect.runtime import deployment
from prefect.states import Failed

from autoexplain import preflight, run_lookup
from autoexplain.budget import set_budget
from autoexplain.errors import UserError
from autoexplain.layer import dead_of_run
from autoexplain.registry import DEFAULT_SCORER, simulator_identity
from autoexplain.llm import set_limits
from autoexplain.llm_cache import set_cache
from autoexplain.remote import is_url
from autoexplain.sae import absolute_source
from autoexplain.sources import MLP
from autoexplain.storage import content_key, layer_name, open_root, write_run
from autoexplain.summary import compare_markdown
from autoexplain.flows.steps import (agreement, finish_layer, finished, gather, scale_out, score_shard, site_pages,
                                     submit_layer, unit_keys)
from autoexplain.schemas.contracts import ContractViolation
from autoexplain.tasks.compare import compare_task
from autoexplain.tasks.report import budget_stop, publish, publish_recording, report_task, view_task
from autoexplain.tasks.caching import with_results
from autoexplain.tasks.stages import record_task, revise_task, score_task, simulate_task


def out_path(out: str) -> str:
    """A folder made absolute (tasks may run elsewhere), or a URL as given."""
    return out if is_url(out) else str(Path(out).resolve())


def checked(check: Callable[[], object], ledger=None):
    """(the check's value, None), or (None, a Failed state carrying the one-line error). With the
    run's budget `ledger`: a run the budget stopped ends in a Completed state named BudgetReached,
    whatever error its last tasks raised (`tasks.report.budget_stop`)."""
    ends_with_run = preflight.PROCESS_ENDS_WITH_RUN.set(deployment.id is not None)
    try:
        return check(), None
    except Exception as e:
        if ledger is not None and ledger.stopped:
            return None, budget_stop(ledger)
        if not isinstance(e, (UserError, ContractViolation)):
            raise
        if isinstance(e, UserError):
            return None, Failed(message=str(e), data=e)
        return None, Failed(message=f"{getattr(e, 'path', '')} breaks its data contract: " + "; ".join(e.report.failures),
                            data=e)
    finally:
        preflight.PROCESS_ENDS_WITH_RUN.reset(ends_with_run)


class OneLineUserErrors(logging.Filter):
    """Prefect's engine logs the traceback of whatever ends a flow run, a `checked` Failed state's
    error included: in the run log a user's error (a bad parameter) is its one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, UserError):
            record.msg, record.args, record.exc_info, record.exc_text = f"{record.getMessage()}: {error}", (), None, None
        return True


# The engine's logger in a deployment's run process, which imports this module to load the flow.
logging.getLogger("prefect.flow_runs").addFilter(OneLineUserErrors())


@flow(name="record-activations", validate_parameters=True)
def record_activations(model: str = "smollm2", corpus: str = "default", layers: list[int] | None = None,
                       tokens: int = 1_000_000, out: str = "out", source: str = "mlp", text_field: str = "text") -> dict:
    """`source` and `text_field` as in explain_layer; a coder reads one layer, its own unless `layers` names it."""
    source = absolute_source(source)

    def check():
        preflight.at_least(preflight.flow_name, "tokens", tokens, 1)
        preflight.check_out(out)
        preflight.check_corpus(corpus, text_field=text_field)
        shape = preflight.model_shape(model)
        if shape.n_positions and shape.n_positions < 64:  # record_task's window, which this flow does not set
            raise preflight.refuse(preflight.flow_name, "model", f"its context of {shape.n_positions} positions is "
                                   "shorter than this flow's 64-token windows",
                                   "record it with explain-layer, whose parameter window_len sets the window")
        if layers and len(layers) > 1 and ":" in source:
            raise preflight.refuse(preflight.flow_name, "layers", f"a coder reads one layer, got {layers}",
                                   "set layers to one layer, or leave it out")
        unit_source = preflight.check_source(source, model, layers[0] if layers else None, layer_name="layers")
        chosen = layers or [getattr(unit_source, "layer", shape.middle_layer)]
        for layer in chosen:
            preflight.check_layer(shape, layer, name="layers")
        return chosen, content_key(unit_source.identity())

    def run():
        chosen, source_id = check()
        return record_task(model, corpus, chosen, tokens, out_path(out), source=source, source_id=source_id,
                           text_field=text_field)

    result, failed = checked(run)
    return failed or result


@flow(name="explain-layer", validate_parameters=True)
def explain_layer(
    layer: int | None = None,
    units: str | int | None = None,
    model: str = "smollm2",
    corpus: str = "default",
    text_field: str = "text",
    tokens: int = 1_000_000,
    explainer: str = "embedding",
    simulator: str = "embedding",
    scorers: str = DEFAULT_SCORER,
    k: int = 4,
    shard_size: int = 256,
    n_boot: int = 1000,
    out: str = "out",
    revisions: dict[str, str] | None = None,
    site: str | None = None,
    window_len: int = 64,
    top_k: int = 40,
    n_random: int = 30,
    results: str | None = None,
    concurrency: int | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
    retries: int | None = None,
    timeout: float | None = None,
    cache: bool = True,
    budget: str | None = None,
    source: str = "mlp",
    dask: str | None = None,
) -> dict:
    """Explain every unit of one layer, or a unit range like '0-99'.

    `source`: whose units, 'mlp' (the layer's MLP neurons, both polarities) or a sparse coder's
    latents, 'sae:PATH' / 'transcoder:PATH' (a local SAELens, sparsify or GemmaScope folder). `layer`
    defaults to the coder's own layer, and for 'mlp' to the model's middle layer (15 of SmolLM2's 0-29).
    `text_field`: the field (column) that holds the text in a .jsonl, .parquet or hub corpus.

    `concurrency` (LLM requests in flight at once, across the units and shards of this process;
    default 64 for a server URL, 8 for api.openai.com), `rpm` (requests per minute), `tpm` (tokens
    per minute), `retries` (times a request is sent again after a timeout, a 429 or a 5xx; default
    6), `timeout` (seconds a request waits for its answer; default 120), `cache` (keep every LLM answer under `out`/llm_cache and never pay twice, see
    `autoexplain.llm_cache`) and `budget` (the most this run may spend, '$5' or '2M tokens'; see
    `autoexplain.budget`) are no part of a cache key or of the run's recorded parameters, nor is
    `dask`: the address of a running dask scheduler ('tcp://HOST:8786') whose workers run the
    shards' tasks (default: threads in the flow's process; see `flows.steps.scale_out`)."""
    source = absolute_source(source)  # the run pointer keeps it, for commands run from anywhere
    params = dict(layer=layer, units=units, model=model, corpus=corpus, text_field=text_field, tokens=tokens, explainer=explainer,
                  simulator=simulator, scorers=scorers, k=k, shard_size=shard_size, n_boot=n_boot, revisions=revisions,
                  site=site, window_len=window_len, top_k=top_k, n_random=n_random, source=source)
    plan, failed = checked(lambda: preflight.explain_layer({**params, "out": out, "concurrency": concurrency,
                                                             "rpm": rpm, "tpm": tpm, "retries": retries, "timeout": timeout, "budget": budget,
                                                             "results": results, "dask": dask}))
    if failed:
        return failed
    params["layer"] = plan.layer
    set_limits(concurrency, rpm, tpm, retries, timeout)
    set_cache(cache)
    ledger = set_budget(plan.budget)
    result, failed = checked(lambda: scale_out(dask, lambda: _explain_layer(plan, out_path(out), results, params,
                                                                         **params)), ledger)
    return failed or finished(result)


def _explain_layer(plan: preflight.LayerPlan, out: str, results: str | None, params: dict, *, layer, units, model,
                   corpus, text_field, tokens, explainer, simulator, scorers, k, shard_size, n_boot, revisions, site,
                   window_len, top_k, n_random, source) -> dict:
    record = with_results(results, record_task)[0]
    # As a state: called in the flow's thread, a task whose body ends in a Failed state (a one-line
    # error) would hand back that state as its value; `result()` raises its error instead.
    records = record(model, corpus, [layer], tokens, out, window_len, top_k, n_random, 0, source, plan.source_id,
                     text_field, return_state=True).result()
    publish_recording(records)
    work = submit_layer(records, layer, plan.source.kind, plan.units, plan.revisions, explainer=explainer,
                        simulator=simulator, scorers=scorers, model=model, k=k, shard_size=shard_size, n_boot=n_boot,
                        out=out, results=results, source=source)
    gather([work], "scored")
    scores = work.in_order(work.scores)
    # Several shards of one layer are one layer to the viewer: it reads every shard's scores.
    site_dir = None if site == "none" else site or f"{out.rstrip('/')}/site/{layer_name(layer, plan.source.kind)}"
    site_uri = view_task(scores, site_dir, records, site_pages(scorers), [work.never_fired()]) if site_dir else None
    report = finish_layer(work, "explain-layer", {**params, "revisions": unit_keys(plan.revisions)}, out, site_dir,
                          site_uri, scorers)
    return {"records": records, "scores": scores, "report": report, "site": site_uri, "out": out,
            "never_fired": [{k: v for k, v in work.never_fired().items() if k != "records"}]}


@flow(name="rescore", validate_parameters=True)
def rescore(out: str = "out", layer: int | None = None, simulator: str = "embedding", scorers: str = DEFAULT_SCORER,
            n_boot: int = 1000,
            results: str | None = None, concurrency: int | None = None, rpm: float | None = None,
            tpm: float | None = None, retries: int | None = None, timeout: float | None = None, cache: bool = True, budget: str | None = None,
            source: str = "mlp", dask: str | None = None) -> dict:
    """Re-simulate and re-score the latest explain-layer run of `layer` under `out`, and compare.
    `source`: whose units, as given to explain-layer ('mlp', 'sae:PATH') or by the kind its pages
    show ('sae-res-16k'). `layer` defaults to the coder's own, or the one layer with a run of those
    units, or 15 (`run_lookup.run_of`). `concurrency`, `rpm`, `tpm`, `retries`, `timeout`, `cache`, `budget` and
    `dask` as in explain_layer."""
    source = absolute_source(source)  # the hard negatives' tasks read the coder, maybe elsewhere
    limit = []

    def check():
        preflight.at_least(preflight.flow_name, "n_boot", n_boot, 1)
        preflight.check_limits(concurrency, rpm, tpm=tpm, retries=retries, timeout=timeout)
        preflight.check_results(results)
        preflight.check_dask(dask, budget=budget)
        if layer is not None:
            preflight.at_least(preflight.flow_name, "layer", layer, 0)
        preflight.check_simulator(simulator)
        preflight.check_scorers(scorers)
        limit.append(preflight.check_budget(budget, simulator=simulator, scorers=scorers))
        if not is_url(out) and not Path(out).is_dir():
            raise UserError(f"parameter out: {Path(out).absolute()} does not exist",
                            "set out to the output root of an explain-layer run")
        return run_lookup.rerun_of(out, layer, source, scorers)

    run, failed = checked(check)
    if failed:
        return failed
    set_limits(concurrency, rpm, tpm, retries, timeout)
    set_cache(cache)
    ledger = set_budget(limit[0])
    kind, layer = run["records"].get("source", MLP.kind), run["params"]["layer"]
    title = f"Re-score of layer {layer}: {run['params']['simulator']} -> {simulator}"
    changed = {"simulator": simulator, "scorers": scorers, "n_boot": n_boot}
    result, failed = checked(lambda: scale_out(dask, lambda: _rescore(run, out_path(out), layer, simulator, n_boot, results,
                                                                      kind, scorers, title, changed, source=source)), ledger)
    return failed or finished(result)


@flow(name="revise", validate_parameters=True)
def revise(out: str = "out", layer: int | None = None, revisions: dict[str, str] | None = None, source: str = "mlp",
           results: str | None = None, concurrency: int | None = None, rpm: float | None = None,
           tpm: float | None = None, retries: int | None = None, timeout: float | None = None, cache: bool = True, budget: str | None = None,
           dask: str | None = None) -> dict:
    """Replace some units' explanations in the latest run of `layer` under `out` by your own
    (`revisions`: 'UNIT[:POLARITY]' -> text), re-simulate and re-score the shards that hold them with
    the run's simulator and scorers, and compare (`autoexplain.revise_plan`). Nothing is recorded or
    explained again. `source`, `concurrency`, `rpm`, `tpm`, `retries`, `timeout`, `cache`, `budget` and `dask` as
    in rescore."""
    from autoexplain import revise_plan

    source = absolute_source(source)

    def check():
        preflight.check_limits(concurrency, rpm, tpm=tpm, retries=retries, timeout=timeout)
        preflight.check_results(results)
        preflight.check_dask(dask, budget=budget)
        return revise_plan.plan(out, layer, source, revisions, budget=budget)

    plan, failed = checked(check)
    if failed:
        return failed
    set_limits(concurrency, rpm, tpm, retries, timeout)
    set_cache(cache)
    ledger = set_budget(plan.budget)
    run, kind, layer = plan.run, plan.run["records"].get("source", MLP.kind), plan.run["params"]["layer"]
    title = f"Revision of layer {layer}: {', '.join(k for shard in plan.shards for k in shard)}"
    result, failed = checked(lambda: scale_out(dask, lambda: _rescore(
        run, out_path(out), layer, plan.simulator, plan.n_boot, results, kind, plan.scorers, title,
        {"revisions": plan.merged}, plan.shards, "revise", source)), ledger)
    return failed or finished(result)


def _rescore(run: dict, out: str, layer: int, simulator: str, n_boot: int, results: str | None, kind: str,
             scorers: str, title: str, changed: dict, revisions: list[dict[str, str]] | None = None,
             flow_name: str = "rescore", source: str | None = None) -> dict:
    """Simulate and score the run's explanations again (`revisions`: per explanations output, the
    texts that replace some of its units' first), compare, and point the layer at the new outputs."""
    revise, simulate, score = with_results(results, revise_task, simulate_task, score_task)
    records, sim_id = run["records"], simulator_identity(simulator)
    pairs = []
    for before, mine in zip(run["explanations"], revisions or [{}] * len(run["explanations"])):
        x = revise.submit(before, mine, out) if mine else before
        s = simulate.submit(records, x, simulator, sim_id, out)
        pairs.append((before, x, s, *score_shard(records, s, scorers, run["params"].get("model"), n_boot, out, score,
                                                 results, source)))
    outputs, explained, simulated, scores = [], [], [], []
    for before, x, s, c, asked in pairs:
        if x is not before:  # revised here
            x = x.result()
            publish(x, [before])
            outputs.append(x)
        sr = s.result()
        for a in asked:
            a.result()
        cr = c.result()
        publish(sr, [records, x])
        publish(cr, [sr])
        outputs += [sr, cr]
        explained.append(x)
        simulated.append(sr)
        scores.append(cr)
    comparison = compare_task(run["scores"], scores, title)
    dead = dead_of_run(run)
    never = {"layer": layer, "kind": kind, "records": records, "units": dead}
    site_uri = view_task(scores, run["site_dir"], records, site_pages(scorers), [never]) if run.get("site_dir") else None
    report = report_task(records, outputs, scores, site_uri, layer, dead)
    agreement(scorers, scores, out, layer, run.get("site_dir"), kind)
    write_run(open_root(out), layer, {
        **run, "flow": flow_name, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": {**run["params"], **changed}, "explanations": explained, "simulations": simulated, "scores": scores, "previous_scores": run["scores"], "site": site_uri},
        compare_markdown(comparison, title), kind=kind)
    return {"records": records, "scores": scores, "previous_scores": run["scores"], "comparison": comparison,
            "report": report, "site": site_uri, "out": out}
