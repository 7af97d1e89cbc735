"""Prefect tasks of the classifier scorers (`autoexplain.classify_stage`): classify one shard with
one scorer, gather a shard's scores over several scorers, and the agreement report of a layer.

Thin wrappers as in `tasks.stages`: content cache keys with the code identity, retries, one-line
failures, and a local model's calls under the process's one models lock (a server scorer's shards
overlap instead, sharing its concurrency limit through one LLM object per process).
"""

from __future__ import annotations

import functools
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from autoexplain import classify_stage, registry
from autoexplain.layer import StageRef
from autoexplain.storage import local_ref, open_root
from autoexplain.tasks.caching import RETRY, cache_key
from autoexplain.tasks.stages import in_run_settings, load_once, one_at_a_time, one_line_failures, ref, stage_progress


@functools.partial(load_once, limited=lambda spec: registry.uses_server(scorers=spec), maxsize=8, locked=False)
def scorer_for(spec: str):
    """One scorer (and LLM) per spec and process: its server's concurrency limit is shared by the
    shards, and a local model is loaded once (`load_once`: a server's again when the limits change)."""
    return registry.make_scorer(spec)


@task(name="negatives", cache_key_fn=cache_key("negatives", (classify_stage.similar_negatives,)), **RETRY)
@one_line_failures
@one_at_a_time
def negatives_task(records: dict, simulations: dict, model: str | None, out: str = "out",
                   source: str | None = None) -> str | None:
    """A shard's similar negatives (the subject runs on held-out windows), under the models lock:
    loading and running a model is not safe beside another thread's."""
    records, simulations, out = local_ref(records), local_ref(simulations), open_root(out)
    found = classify_stage.similar_negatives(records["path"], StageRef.of(Path(simulations["path"]).parent), out, model,
                                              source)
    return str(found) if found else None


def _classify(records: dict, simulations: dict, scorer: str, negatives: str | None, out: str) -> dict:
    records, simulations, out = local_ref(records), local_ref(simulations), open_root(out)
    sims = StageRef.of(Path(simulations["path"]).parent)
    result = classify_stage.run_classify(records["path"], sims, out, scorer, scorer_for(scorer),
                                         Path(negatives) if negatives else None,
                                         progress=stage_progress("classify", f"{scorer} {sims.key[:8]}"))
    get_run_logger().info(f"classified {sims.directory.name} with {scorer}")
    return ref(result)


_serial = one_at_a_time(_classify)


@task(name="classify", cache_key_fn=cache_key("classify", (classify_stage.run_classify,)), **RETRY)
@one_line_failures
@in_run_settings
def classify_task(records: dict, simulations: dict, scorer: str, scorer_id: dict, negatives: str | None,
                  out: str = "out") -> dict:
    """`scorer_id` (`classify_stage.scorer_identity`) puts the prompt and weights in the cache key.
    A server scorer's shards run beside the other tasks; a local one's under the models lock."""
    if registry.parse_scorer(scorer).llm is not None and scorer_for(scorer).thread_safe:
        return _classify(records, simulations, scorer, negatives, out)
    return _serial(records, simulations, scorer, negatives, out)


@task(name="scores", cache_key_fn=cache_key("scores", (classify_stage.run_scores,)), **RETRY)
@one_line_failures
def scores_task(records: dict, simulations: dict, classifications: list[dict], scores: dict | None,
                n_boot: int = 1000, out: str = "out") -> dict:
    records, simulations, out = local_ref(records), local_ref(simulations), open_root(out)
    refs = [StageRef.of(Path(local_ref(c)["path"]).parent) for c in classifications]
    sim_scores = StageRef.of(Path(local_ref(scores)["path"]).parent) if scores else None
    result = classify_stage.run_scores(records["path"], StageRef.of(Path(simulations["path"]).parent), refs, out,
                                       sim_scores, n_boot)
    return ref(result)


@task(name="agreement")
def agreement_task(scores: list[dict], folder: str) -> str | None:
    """The layer's agreement between scorers (Spearman across units), pooled classifier scores and
    scorer tokens per unit: a markdown artifact, and `agreement.md`, `agreement.html` and the
    scatter plot `agreement.png` in `folder` (the layer's site folder: a page beside the viewer's)."""
    from autoexplain.agreement import agreement_markdown, write_page

    text = agreement_markdown([Path(local_ref(s)["path"]) for s in scores], Path(folder) / "agreement.png")
    if text:
        write_page(text, Path(folder))
        create_markdown_artifact(text, key="scorer-agreement", description="agreement between scorers")
    return text
