"""The classify stage and the scores of several scorers, as content-addressed outputs.

- `run_classify`: one classifier scorer (`classify`) asks about the chosen explanations of a
  simulate output (the explainer's, the token-lookup baseline and the shuffled control) on each
  unit's test windows, with random, similar and co-firing negatives (`negatives`). Writes the raw trials,
  `classifications/<key>/layer_<L>.parquet`. The key holds the chosen explanations' key, the scorer's
  spec, prompt hash, settings and LLM weights, the negatives and the code; each unit is memoised
  alike, except a unit with a request that failed for good, which is asked again on a rerun.
- `run_scores`: the score stage over several scorers: the `simulation` scorer's output
  (`layer.run_score`, unchanged) and the metrics of each classification output, per unit with CIs,
  in one scores table (`simulator` holds the scorer's spec). With the default scorers alone the
  pipeline never calls it, so the default outputs and their keys are what they were.

Requests go through the scorer's LLM: its concurrency (units in flight at once for a server), its
retries, the response cache under `out` (`llm_cache`), and the run's budget (`budget`, charged by
the LLM itself). Tokens and dollars are kept per trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from autoexplain import layout, llm_cache, prices
from autoexplain.classify import ClassifierScorer, random_negatives
from autoexplain.counters import COUNTS
from autoexplain.errors import NO_ANSWER
from autoexplain.identity import code_identity
from autoexplain.layer import StageRef, load_units, memo_scope, records_inputs, unit_key
from autoexplain.registry import component_identity, keyed_spec, llm_weights, make_scorer, parse_scorer
from autoexplain.rows import rows_to_table
from autoexplain.storage import read_manifest, require_complete
from autoexplain.memo import Memo
from autoexplain.store import Stage, stage_key

Progress = Callable[[int, int], None]


def scorer_identity(spec: str) -> dict:
    """What a scorer's trials depend on besides their inputs, loading no model."""
    p = parse_scorer(spec)
    ident = component_identity(p.cls)
    weights = llm_weights(p.llm) if p.llm is not None else ""
    return {"scorer": keyed_spec(p), "prompt": ident["prompt"], "settings": ident["settings"],
            **({"weights": weights} if weights else {})}


def _trial_rows(unit, method: str, scorer: ClassifierScorer, trials) -> list[dict]:
    u = unit.id
    return [{"layer": u.layer, "unit": u.index, "polarity": u.polarity, "method": method, "scorer": scorer.name,
             "negatives": t.negatives, "prompt": t.prompt, "window_id": t.window_id, "label": t.label,
             "prediction": t.prediction, "p_one": t.p_one, "failure": t.failure,
             "tokens": t.prompt_tokens + t.completion_tokens,
             "dollars": scorer.dollars(t.prompt_tokens, t.completion_tokens, t.cached_tokens)} for t in trials]


def classify_unit(unit, texts: dict[str, str], scorer: ClassifierScorer, hard: dict | None, seed: int = 0) -> list[dict]:
    """One unit's trials for each explanation method (the intruder, which needs no explanation,
    once, under 'explainer'). `hard`: its hard negatives by kind ('similar', 'cofiring')."""
    COUNTS["classify_units"] += 1
    negatives = {"random": random_negatives(unit.records), **(hard or {})}
    rows = []
    for method, text in texts.items():
        if not scorer.needs_explanation and method != "explainer":
            continue
        rows += _trial_rows(unit, method, scorer, scorer.trials(text, unit.records, negatives, seed))
    return rows


def _asked_ok(rows: list[dict]) -> bool:
    return not any((r["failure"] or "").startswith(NO_ANSWER) for r in rows)


def takes_hard_negatives(scorer_spec: str) -> bool:
    """Whether a classifier scorer asks about hard negatives (`negatives`), which run the subject."""
    return bool({"similar", "cofiring"} & set(getattr(parse_scorer(scorer_spec).cls, "negative_kinds", ())))


def similar_negatives(records_dir, simulations: StageRef, out, model: str | None,
                      source: str | None = None) -> Path | None:
    """The hard negatives (`negatives`: similar and co-firing) of the units of `simulations`, from
    the subject `model` the records came from; None without a model (random negatives only). It
    loads the subject: a caller with other models in other threads runs it under its models lock.
    `source`: a coder's spec where it is now (`source_coder.recorded_source`)."""
    from autoexplain.negatives import run_negatives

    if not model:
        return None
    chosen = pq.read_table(simulations.directory / layout.CHOSEN, columns=["unit", "polarity"]).to_pylist()
    pairs = sorted({(r["unit"], r["polarity"]) for r in chosen})
    return run_negatives(records_dir, simulations.layer, out, model, pairs, source=source)


def run_classify(records_dir, simulations: StageRef, out, scorer_spec: str, scorer=None,
                 negatives_dir: Path | None = None, seed: int = 0, progress: Progress | None = None) -> StageRef:
    """Ask one classifier scorer about the chosen explanations of `simulations` (see the module
    docstring). `negatives_dir`: `similar_negatives`' output (None: random negatives only)."""
    from autoexplain.negatives import read_negatives
    from autoexplain.pipeline import in_order

    records_dir, layer = Path(records_dir), simulations.layer
    _, windows_path, records_key = records_inputs(records_dir, layer)
    chosen = pq.read_table(simulations.directory / layout.CHOSEN).to_pylist()
    unit_ids = sorted({r["unit"] for r in chosen})
    ident = scorer_identity(scorer_spec)
    if not takes_hard_negatives(scorer_spec):
        negatives_dir = None
    if negatives_dir:
        require_complete(negatives_dir, "negatives", "rerun the classify command with --model, which writes them")
    negatives_key = read_manifest(Path(negatives_dir))["key"] if negatives_dir else None
    params = {"layer": layer, **ident, "seed": seed, "negatives": negatives_key}
    code = code_identity(run_classify)
    stage = Stage.open(out, "classifications", {"simulations": simulations.key, **params}, run_classify)
    ref = StageRef.of_stage(stage, layer)
    if stage.done:
        return ref
    units = load_units(records_dir, layer, unit_ids)
    similar = read_negatives(negatives_dir, layer, windows_path) if negatives_dir else {}
    texts_of: dict = {}
    for r in chosen:
        texts_of.setdefault((r["unit"], r["polarity"]), {})[r["method"]] = r["text"]
    scorer = scorer or make_scorer(scorer_spec)
    llm_cache.attach(scorer, out)
    memo = Memo(out, "classify", memo_scope(records_key, layer))

    def unit_rows(unit):
        pair = (unit.id.index, unit.id.polarity)
        texts, near = texts_of.get(pair, {}), similar.get(pair, {})
        ukey = unit_key(records_key, unit, texts=texts, seed=seed, code=code, **ident,
                        hard={k: [r.window_id for r in v] for k, v in sorted(near.items())})
        return memo.get_or_compute(ukey, lambda: classify_unit(unit, texts, scorer, near, seed), _asked_ok)

    workers = int(scorer.llm.concurrency_given) if scorer.thread_safe else 1  # as `pipeline` sizes its stages
    rows = []
    for i, got in enumerate(in_order(unit_rows, units, workers)):
        rows += got
        if progress:
            progress(i + 1, len(units))
    stage.table(rows_to_table(rows, "classifications"), ref.path.name, "classifications")
    stage.seal({"records": records_dir, "simulations": simulations.directory,
                **({"negatives": Path(negatives_dir)} if negatives_dir else {})},
               {**params, "scorer": parse_scorer(scorer_spec).spec})  # as written, for `run_scores` and people
    return ref


# ---- scores of several scorers --------------------------------------------------------------------

def classifier_score_rows(trials: list[dict], chosen: list[dict], spec: str, n_boot: int = 1000,
                          seed: int = 0) -> list[dict]:
    """Score rows (the scores schema) of one classification output's trials (scorer `spec`): per
    unit, method and metric, for every chosen explanation the scorer applies to, asked about or not
    (one with no trials is undefined, not missing). `explainer_tokens` is the explanation's, as on
    the simulation rows; `simulator_tokens` and `dollars` are the scorer's own requests for this
    unit and method (every kind of negatives), so a run's cost (`summary.run_cost`, once per unit,
    method and scorer) adds each scorer once."""
    from autoexplain.classify import Trial
    from autoexplain.classify_metrics import metrics

    cls = parse_scorer(spec).cls
    groups: dict = {(e["layer"], e["unit"], e["polarity"], e["method"]): [] for e in chosen
                    if cls.needs_explanation or e["method"] == "explainer"}
    for t in trials:
        groups.setdefault((t["layer"], t["unit"], t["polarity"], t["method"]), []).append(t)
    explained = {(r["unit"], r["polarity"], r["method"]): r for r in chosen}
    # the first kind always (random: a unit too dense to ask about is undefined); a hard-negative kind
    # wherever any unit of the layer has some, so the units without are undefined, not missing
    present = {t["negatives"] for t in trials}
    kinds = [k for i, k in enumerate(cls.negative_kinds) if i == 0 or k in present]
    out = []
    for (layer, unit, polarity, method), rows in groups.items():
        typed = [Trial.of_row(r) for r in rows]
        e = explained.get((unit, polarity, method)) or {}
        cost = (e.get("prompt_tokens") or 0) + (e.get("completion_tokens") or 0)
        tokens, dollars = sum(r["tokens"] for r in rows), prices.add(*(r["dollars"] for r in rows))
        # a coder's latents say their source, as the simulation scorer's rows beside them do (`rows_to_table`)
        source = e.get("source") or next((r["source"] for r in rows if r.get("source")), None)
        named = {"source": source} if source else {}
        for name, s in metrics(cls.metric, typed, n_boot, seed, cls.metric_prefix, kinds).items():
            out.append({"layer": layer, "unit": unit, "polarity": polarity, "method": method, "simulator": spec,
                        "split": "test", "metric": name, "value": s.value, "ci_low": s.ci_low, "ci_high": s.ci_high,
                        "undefined_reason": s.undefined_reason, "n_records": s.n_records, "n_failed": s.n_failed,
                        "explainer_tokens": cost, "simulator_tokens": tokens, "dollars": dollars, **named})
    return out


def run_scores(records_dir, simulations: StageRef, classifications: list[StageRef], out, scores: StageRef | None,
               n_boot: int = 1000, seed: int = 0) -> StageRef:
    """One scores output: the simulation scorer's rows (`scores`, or none when it was not asked
    for) and every classification output's metrics."""
    layer = simulations.layer
    for c in classifications:  # verified before they are read (remembered by digest: cheap when just sealed)
        require_complete(c.directory, "classifications", f"rerun {layout.WRITTEN_BY['classifications']}")
    if scores is not None:
        require_complete(scores.directory, "scores", f"rerun {layout.WRITTEN_BY['scores']}")
    params = {"layer": layer, "n_boot": n_boot, "seed": seed,
              "scorers": ([read_manifest(scores.directory)["key"]] if scores else []) + [c.key for c in classifications]}
    stage = Stage.open(out, "scores", {"simulations": simulations.key, **params}, run_scores)
    ref = StageRef.of_stage(stage, layer)
    if stage.done:
        return ref
    rows = pq.read_table(scores.path).to_pylist() if scores else []
    chosen = pq.read_table(simulations.directory / layout.CHOSEN).to_pylist()
    memo = Memo(out, "score_classify")
    for c in classifications:
        trials = pq.read_table(c.path)
        ckey = stage_key({"classifications": c.key, "n_boot": n_boot, "seed": seed}, classifier_score_rows)
        spec = read_manifest(c.directory)["params"]["scorer"]
        rows += memo.get_or_compute(ckey, lambda: classifier_score_rows(trials.to_pylist(), chosen, spec, n_boot, seed))
    stage.table(rows_to_table(rows, "scores"), ref.path.name, "scores")
    stage.seal({"simulations": simulations.directory, **({"scores": scores.directory} if scores else {}),
                "classifications": [c.directory for c in classifications]}, params)
    return ref


def read_trials(scores_dir: Path) -> pa.Table | None:
    """Every trial behind a scores output (None for one without classifier scorers)."""
    dirs = read_manifest(Path(scores_dir))["inputs"].get("classifications") or []
    dirs = [require_complete(layout.input_of(scores_dir, d), "classifications", f"rerun {layout.WRITTEN_BY['classifications']}") for d in dirs]
    tables = [pq.read_table(next(d.glob("layer_*.parquet"))) for d in dirs]
    return pa.concat_tables(tables) if tables else None
