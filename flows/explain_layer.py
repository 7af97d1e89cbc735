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

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.states import Failed

from autoexplain import defaults, preflight, progress
from autoexplain.budget import set_budget
from autoexplain.errors import UserError
from autoexplain.layer import dead_units, parse_units
from autoexplain.registry import DEFAULT_SCORER, parse_scorers, simulator_identity
from autoexplain.llm import set_limits
from autoexplain.llm_cache import set_cache
from autoexplain.remote import is_url
from autoexplain.sources import MLP
from autoexplain.storage import content_key, layer_name, local_ref, open_root, write_run
from autoexplain.summary import compare_markdown
from schemas.contracts import ContractViolation
from tasks.classify import agreement_task, classify_task, negatives_task, scores_task
from tasks.compare import compare_task
from tasks.report import budget_stop, publish, publish_recording, report_task, view_task
from tasks.stages import (
    explain_task,
    record_task,
    revise_task,
    score_task,
    simulate_task,
    with_results,
)


def _out(out: str) -> str:
    """A folder made absolute (tasks may run elsewhere), or a URL as given."""
    return out if is_url(out) else str(Path(out).resolve())


def _checked(check: Callable[[], object], ledger=None):
    """(the check's value, None), or (None, a Failed state carrying the one-line error). With the
    run's budget `ledger`: a run the budget stopped ends in a Completed state named BudgetReached,
    whatever error its last tasks raised (`tasks.report.budget_stop`)."""
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


@flow(name="record-activations", validate_parameters=True)
def record_activations(model: str = "smollm2", corpus: str = "default", layers: list[int] | None = None,
                       tokens: int = 1_000_000, out: str = "out", source: str = "mlp") -> dict:
    """`source` as in explain_layer; a coder reads one layer, its own unless `layers` names it."""

    def check():
        preflight.at_least(preflight.flow_name, "tokens", tokens, 1)
        preflight.check_out(out)
        preflight.check_corpus(corpus)
        shape = preflight.model_shape(model)
        if layers and len(layers) > 1 and ":" in source:
            raise UserError(f"parameter layers: a coder reads one layer, got {layers}", "set layers to one layer, or leave it out")
        unit_source = preflight.check_source(source, model, layers[0] if layers else None)
        chosen = layers or [getattr(unit_source, "layer", defaults.LAYER)]
        for layer in chosen:
            preflight.check_layer(shape, layer, name="layers")
        return chosen, content_key(unit_source.identity())

    def run():
        chosen, source_id = check()
        return record_task(model, corpus, chosen, tokens, _out(out), source=source, source_id=source_id)

    result, failed = _checked(run)
    return failed or result


def _unit_keys(revisions: dict[tuple[int, int], str]) -> dict[str, str]:
    return {f"{u}:{p:+d}": text for (u, p), text in sorted(revisions.items())}


@flow(name="explain-layer", validate_parameters=True)
def explain_layer(
    layer: int | None = None,
    units: str | None = None,
    model: str = "smollm2",
    corpus: str = "default",
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
    cache: bool = True,
    budget: str | None = None,
    source: str = "mlp",
) -> dict:
    """Explain every unit of one layer, or a unit range like '0-99'.

    `source`: whose units, 'mlp' (the layer's MLP neurons, both polarities) or a sparse coder's
    latents, 'sae:PATH' / 'transcoder:PATH' (a local SAELens, sparsify or GemmaScope folder). `layer`
    defaults to the coder's own layer, and to 15 for 'mlp'.

    `concurrency` (LLM requests in flight at once, across the units and shards of this process;
    default 64 for a server URL, 8 for api.openai.com), `rpm` (requests per minute), `tpm` (tokens
    per minute), `cache` (keep every LLM answer under `out`/llm_cache and never pay twice, see
    `autoexplain.llm_cache`) and `budget` (the most this run may spend, '$5' or '2M tokens'; see
    `autoexplain.budget`) are no part of a cache key or of the run's recorded parameters."""
    params = dict(layer=layer, units=units, model=model, corpus=corpus, tokens=tokens, explainer=explainer,
                  simulator=simulator, scorers=scorers, k=k, shard_size=shard_size, n_boot=n_boot, revisions=revisions,
                  site=site, window_len=window_len, top_k=top_k, n_random=n_random, source=source)
    plan, failed = _checked(lambda: preflight.explain_layer({**params, "out": out, "concurrency": concurrency,
                                                             "rpm": rpm, "tpm": tpm, "budget": budget}))
    if failed:
        return failed
    params["layer"] = plan.layer
    set_limits(concurrency, rpm, tpm)
    set_cache(cache)
    ledger = set_budget(plan.budget)
    result, failed = _checked(lambda: _explain_layer(plan, _out(out), results, params, **params), ledger)
    return failed or result


def _explain_layer(plan: preflight.LayerPlan, out: str, results: str | None, params: dict, *, layer, units, model,
                   corpus, tokens, explainer, simulator, scorers, k, shard_size, n_boot, revisions, site, window_len, top_k,
                   n_random, source) -> dict:
    log = get_run_logger()
    record, explain, revise, simulate, score = with_results(results, record_task, explain_task, revise_task,
                                                            simulate_task, score_task)
    records = record(model, corpus, [layer], tokens, out, window_len, top_k, n_random, 0, source, plan.source_id)
    kind = plan.source.kind
    publish_recording(records)
    chosen = plan.units if plan.units is not None else parse_units(None, records["n_units"])
    dead = set(dead_units(local_ref(records)["path"], layer)) & set(chosen)
    if dead:  # latents that never fired: their statistics say so, and there is nothing to explain
        log.info(f"{len(dead)} of {len(chosen)} units never fired in the recorded tokens and are not explained")
        chosen = [u for u in chosen if u not in dead]
    shards = [chosen[i : i + shard_size] for i in range(0, len(chosen), shard_size)]
    sim_id = simulator_identity(simulator)

    started, futures = time.perf_counter(), []
    for shard in shards:
        x = explain.submit(records, layer, shard, explainer, k, out)
        mine = {key: text for key, text in plan.revisions.items() if key[0] in shard}
        if mine:
            x = revise.submit(x, _unit_keys(mine), out)
        s = simulate.submit(records, x, simulator, sim_id, out)
        futures.append((shard, x, s, *_score_shard(records, s, scorers, model, n_boot, out, score, results)))

    done_units, outputs, by_future = 0, [], {f[3]: f for f in futures}
    explained, simulated, scores = {}, {}, {}
    for fut in as_completed([f[3] for f in futures]):
        shard, x, s, c, asked = by_future[fut]
        xr, sr = x.result(), s.result()  # a failed shard raises here, before it counts as done
        for a in asked:  # a failed scorer raises its one line here, not the gathering's wait
            a.result()
        cr = c.result()
        done_units += len(shard)
        elapsed = time.perf_counter() - started
        eta = elapsed / done_units * (len(chosen) - done_units)
        log.info(f"units {done_units}/{len(chosen)} done (shard {shard[0]}-{shard[-1]}); ETA {eta:.0f}s")
        progress.report("scored", done_units, len(chosen))
        publish(xr, [records])
        publish(sr, [records, xr])
        publish(cr, [sr])
        outputs += [xr, sr, cr]
        explained[shard[0]], simulated[shard[0]], scores[shard[0]] = xr, sr, cr
    in_order = lambda d: [d[k] for k in sorted(d)]  # noqa: E731 - shard order, not finishing order
    # Several shards of one layer are one layer to the viewer: it reads every shard's scores.
    site_dir = site or f"{out.rstrip('/')}/site/{layer_name(layer, kind)}"
    site_uri = view_task(in_order(scores), site_dir, records) if site != "none" else None
    report = report_task(records, outputs, in_order(scores), site_uri)
    _agreement(scorers, in_order(scores), out, layer, None if site == "none" else site_dir)
    run = {"flow": "explain-layer", "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "params": {**params, "revisions": _unit_keys(plan.revisions)}, "records": records,
           "explanations": in_order(explained), "simulations": in_order(simulated), "scores": in_order(scores),
           "site_dir": None if site == "none" else site_dir, "site": site_uri}
    write_run(open_root(out), layer, run, kind=kind)
    return {"records": records, "scores": in_order(scores), "report": report, "site": site_uri, "out": out}


def _score_shard(records, s, scorers: str, model: str | None, n_boot: int, out: str, score, results):
    """A shard's score future: the simulation scorer's alone (the default, as it always was), or
    every scorer asked for gathered into one scores output (`classify_stage.run_scores`); and the
    futures it waits for."""
    specs = [p.spec for p in parse_scorers(scorers)]
    if specs == [DEFAULT_SCORER]:
        return score.submit(records, s, n_boot, out), []
    from autoexplain.classify_stage import scorer_identity

    negatives, classify, gather = with_results(results, negatives_task, classify_task, scores_task)
    sim_scores = score.submit(records, s, n_boot, out) if DEFAULT_SCORER in specs else None
    near = negatives.submit(records, s, model, out)
    asked = [classify.submit(records, s, spec, scorer_identity(spec), near, out) for spec in specs if spec != DEFAULT_SCORER]
    return gather.submit(records, s, asked, sim_scores, n_boot, out), asked + ([sim_scores] if sim_scores else [])


def _agreement(scorers: str, scores: list[dict], out: str, layer: int, site_dir: str | None) -> None:
    """The agreement between scorers when any but the default ran: an artifact, and a page with the
    scatter plot in the layer's site folder (or under `out`/agreement without a local site)."""
    if [p.spec for p in parse_scorers(scorers)] == [DEFAULT_SCORER]:
        return
    folder = site_dir if site_dir and not is_url(site_dir) else None
    if folder is None and not is_url(out):
        folder = str(Path(out) / "agreement" / f"layer_{layer}")
    if folder is not None:
        agreement_task(scores, folder)


@flow(name="rescore", validate_parameters=True)
def rescore(out: str = "out", layer: int = 15, simulator: str = "embedding", scorers: str = DEFAULT_SCORER,
            n_boot: int = 1000,
            results: str | None = None, concurrency: int | None = None, rpm: float | None = None,
            tpm: float | None = None, cache: bool = True, budget: str | None = None, source: str = "mlp") -> dict:
    """Re-simulate and re-score the latest explain-layer run of `layer` under `out`, and compare.
    `source`: whose units, as given to explain-layer ('mlp', 'sae:PATH') or by the kind its pages
    show ('sae-res-16k'). `concurrency`, `rpm`, `tpm`, `cache` and `budget` as in explain_layer."""
    limit = []

    def check():
        preflight.at_least(preflight.flow_name, "n_boot", n_boot, 1)
        preflight.check_limits(concurrency, rpm, tpm=tpm)
        preflight.at_least(preflight.flow_name, "layer", layer, 0)
        preflight.check_simulator(simulator)
        preflight.check_scorers(scorers)
        limit.append(preflight.check_budget(budget, simulator=simulator, scorers=scorers))
        if not is_url(out) and not Path(out).is_dir():
            raise UserError(f"parameter out: {Path(out).absolute()} does not exist",
                            "set out to the output root of an explain-layer run")
        return preflight.find_run(out, layer, kind=preflight.source_kind(source))

    run, failed = _checked(check)
    if failed:
        return failed
    set_limits(concurrency, rpm, tpm)
    set_cache(cache)
    ledger = set_budget(limit[0])
    kind = run["records"].get("source", MLP.kind)
    result, failed = _checked(lambda: _rescore(run, _out(out), layer, simulator, n_boot, results, kind, scorers), ledger)
    return failed or result


def _rescore(run: dict, out: str, layer: int, simulator: str, n_boot: int, results: str | None, kind: str,
             scorers: str = DEFAULT_SCORER) -> dict:
    simulate, score = with_results(results, simulate_task, score_task)
    records, sim_id = run["records"], simulator_identity(simulator)
    pairs = []
    for x in run["explanations"]:
        s = simulate.submit(records, x, simulator, sim_id, out)
        pairs.append((x, s, *_score_shard(records, s, scorers, run["params"].get("model"), n_boot, out, score, results)))
    outputs, simulated, scores = [], [], []
    for x, s, c, asked in pairs:
        sr = s.result()
        for a in asked:
            a.result()
        cr = c.result()
        publish(sr, [records, x])
        publish(cr, [sr])
        outputs += [sr, cr]
        simulated.append(sr)
        scores.append(cr)
    title = f"Re-score of layer {layer}: {run['params']['simulator']} -> {simulator}"
    comparison = compare_task(run["scores"], scores, title)
    site_uri = view_task(scores, run["site_dir"], records) if run.get("site_dir") else None
    report = report_task(records, outputs, scores, site_uri)
    _agreement(scorers, scores, out, layer, run.get("site_dir"))
    write_run(open_root(out), layer, {
        **run, "flow": "rescore", "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": {**run["params"], "simulator": simulator, "scorers": scorers, "n_boot": n_boot},
        "simulations": simulated, "scores": scores, "previous_scores": run["scores"], "site": site_uri},
        compare_markdown(comparison, title), kind=kind)
    return {"records": records, "scores": scores, "previous_scores": run["scores"], "comparison": comparison,
            "report": report, "site": site_uri, "out": out}
