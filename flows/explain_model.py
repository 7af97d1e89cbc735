"""Flow `explain-model`: every chosen layer and source of a model, recorded once, explained, published.

One recording pass reads every source and layer at once (the MLP neurons of every layer, and each
sparse coder at its own layer, from one forward pass per batch of windows). Every shard of every layer is then submitted before
any is awaited, so the task runner (threads, or dask workers) stays busy across layers, and one
count ("model": units done of the total, with rate and ETA) covers the whole run. Each layer gets
its report artifact and run pointer (`rescore` and `revise` work per layer as after explain-layer);
the model gets one site with every layer and the model report (artifact `model-report`, page
`report.html`). A rerun, or a run resumed after a crash, reuses every finished shard: the stages
are content-addressed and memoised per unit.
"""

from __future__ import annotations

from prefect import flow

from autoexplain import model_plan
from autoexplain.budget import set_budget
from autoexplain.llm import set_limits
from autoexplain.llm_cache import set_cache
from autoexplain.model_report import PAGE
from autoexplain.registry import DEFAULT_SCORER
from autoexplain.storage import local_ref
from autoexplain.flows.explain_layer import checked, out_path
from autoexplain.flows.steps import finish_layer, finished, gather, scale_out, submit_layer
from autoexplain.tasks.report import model_report_task, publish_recording, view_task
from autoexplain.tasks.caching import with_results
from autoexplain.tasks.stages import record_sources_task


@flow(name="explain-model", validate_parameters=True)
def explain_model(
    layers: list[int] | int | str | None = None,
    sources: list[str] | None = None,
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
    dask: str | None = None,
) -> dict:
    """Explain the units of several layers, or all (`layers` None), of each unit source in `sources`
    ('mlp', the default; 'sae:PATH' / 'transcoder:PATH' at the coder's own layer). `units` (e.g.
    '0-15') applies to every layer. `site`: the model's site folder (default `out`/site/model;
    'none': no site). The other parameters are explain-layer's."""
    params = dict(layers=layers, sources=sources or ["mlp"], units=units, model=model, corpus=corpus, text_field=text_field,
                  tokens=tokens,
                  explainer=explainer, simulator=simulator, scorers=scorers, k=k, shard_size=shard_size,
                  n_boot=n_boot, site=site, window_len=window_len, top_k=top_k, n_random=n_random)
    plan, failed = checked(lambda: model_plan.explain_model({**params, "out": out, "concurrency": concurrency,
                                                             "rpm": rpm, "tpm": tpm, "retries": retries, "timeout": timeout, "budget": budget,
                                                             "results": results, "dask": dask}))
    if failed:
        return failed
    set_limits(concurrency, rpm, tpm, retries, timeout)
    set_cache(cache)
    ledger = set_budget(plan.budget)
    result, failed = checked(lambda: scale_out(dask, lambda: _explain_model(plan, out_path(out), results, params)), ledger)
    return failed or finished(result)


def _explain_model(plan: model_plan.ModelPlan, out: str, results: str | None, p: dict) -> dict:
    record = with_results(results, record_sources_task)[0]
    stage = dict(explainer=p["explainer"], simulator=p["simulator"], scorers=p["scorers"], model=p["model"], k=p["k"],
                 shard_size=p["shard_size"], n_boot=p["n_boot"], out=out, results=results)
    # Every source's layers from one pass of the subject: a folder per source, as each alone would write.
    recordings = record(p["model"], p["corpus"], [(spec, [part.layer for part in parts], parts[0].source_id)
                                                   for spec, parts in plan.sources],
                        p["tokens"], out, p["window_len"], p["top_k"], p["n_random"], 0, p["text_field"],
                        return_state=True).result()  # its one-line error raised, not returned: see explain_layer
    works = []
    for (spec, parts), records in zip(plan.sources, recordings):
        publish_recording(records)
        works += [(spec, submit_layer(records, part.layer, part.source.kind, part.units, {}, **stage,
                                         source=spec)) for part in parts]
    gather([w for _, w in works], "model")

    for records in recordings:  # under a URL root: every recording the site reads, in the local mirror
        local_ref(records)
    scores = [s for _, w in works for s in w.in_order(w.scores)]
    site_dir = None if p["site"] == "none" else p["site"] or f"{out.rstrip('/')}/site/model"
    never = [w.never_fired() for _, w in works]
    site_uri = view_task(scores, site_dir, recordings[0], [(PAGE, "Model report")], never) if site_dir else None
    layers = {}
    for spec, work in works:
        # The layer's own parameters, as explain-layer would have recorded them: a later explain-layer
        # of this layer with them reuses the model run's outputs.
        own = {**{k: v for k, v in p.items() if k not in ("layers", "sources", "site")}, "layer": work.layer,
               "source": spec, "revisions": {}}
        report = finish_layer(work, "explain-model", own, out, None, site_uri, p["scorers"], {"model_site_dir": site_dir})
        layers[f"{work.layer}/{work.kind}"] = {"explained": len(work.chosen), "dead": len(work.dead), "report": report}
    parts = [{"kind": w.kind, "layer": w.layer, "scores": w.in_order(w.scores), "dead": len(w.dead)} for _, w in works]
    report = model_report_task(parts, site_dir)
    return {"records": recordings, "scores": scores, "layers": layers, "report": report, "site": site_uri, "out": out}
