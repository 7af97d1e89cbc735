"""Explain -> simulate -> score for a batch of units, as three stages with table outputs.

The stages are split where their inputs differ, so that a cache in front of each reruns only what
an edit touches:
- `explain_stage` depends on the records' train split and the explainer (model + prompt). It
  samples k candidates per unit and adds the token-lookup baseline.
- `simulate_stage` depends on the candidates and the simulator. It picks the best candidate by its
  correlation on the *valid* split, then simulates the chosen explanation, the baselines and a
  shuffled control on the calib and test splits.
- `score_stage` turns simulations into metrics on the *test* split, with bootstrap CIs.
Selection (valid) and reporting (test) never share a split.

Per unit, the functions take and return typed rows (`rows.ExplanationRow`, `SimulationRow`,
`ScoreRow`): `explain_units` (one batch, as an explainer answers), `simulate_unit`,
`simulate_control` and `score_unit`, which measures with a `components.Scorer` (the `simulation`
scorer by default). The `*_stage` functions turn them into tables through `rows`, the one codec.

Concurrency: with a server LLM (an object whose `thread_safe` is true), the explain stage sends
several batches of units and the simulate stage several units at once, so that the LLM's requests
from many units, candidates and records are in flight together up to its `max_concurrency`. Each
unit's prompts, seeds and results are the same as one after another, and results come back in
order: the tables do not depend on the concurrency. With a local model, the explain stage gives
each call as many units as fill a forward pass (`units_per_batch`), and the simulate stage gathers
the calls of `units_at_once` units into one (`rendezvous`): a unit's results are then the same as
alone up to float noise (padding and batch shape change summation order), and its samples the same.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import pyarrow as pa

from autoexplain import best_of_k, prices
from autoexplain.components import Explainer, Scorer, Simulator
from autoexplain.counters import COUNTS
from autoexplain.errors import NO_ANSWER
from autoexplain.explain import (
    as_explainer, output_line, output_lookup_explanation, shuffled_explanations, token_lookup_explanation,
)
from autoexplain.records import SCORED_KINDS, Explanation, Simulation, UnitRecords, held_out
from autoexplain.rows import (
    ExplanationRow,
    ScoreRow,
    SimulationRow,
    assemble,
    from_rows,
    from_table,
    part_values,
    rows_to_table,
    to_rows,
    to_table,
)
from autoexplain.score_simulation import SimulationScorer
from autoexplain.rendezvous import GatheredSimulator

EXPLAINER, LOOKUP, SHUFFLED = "explainer", "token-lookup", "shuffled"
OUTPUT_LOOKUP = "output-lookup"  # the token-lookup's output-side twin: what the unit promotes
BASELINES = (LOOKUP, OUTPUT_LOOKUP)  # derived from the unit alone, simulated beside the explanation
METHODS = (EXPLAINER, *BASELINES, SHUFFLED)  # every method a layer is scored with, in the order reports show them


# Why a unit has no explanation when no train record shows it firing (`explain_units`).
NOTHING_SHOWN = "it fires in no window of the train documents"


@dataclass
class ExplainConfig:
    k: int = 4  # candidates sampled per unit
    n_shown: int = 5  # train records shown to the explainer, strongest first (the reference shows 5)
    temperature: float = 1.0
    max_tokens: int = 60
    chat: bool = False
    batch_units: int = 8  # units per explainer request batch


def shown_records(unit: UnitRecords, n: int):
    """The explainer sees only train records: top ones first, then quantile ones."""
    train = unit.select(split="train")
    return sorted(train, key=lambda r: (r.kind != "top", -r.max_activation))[:n]


def _concurrency(component: Explainer | Simulator) -> int:
    """How many requests the component takes at once: the concurrency its LLM was given when it is
    thread safe (a server), else 1 (a local model runs one call at a time). Not the limit now, which
    timeouts may have lowered: the workers of a stage that started then would cap it after it climbs back."""
    if not component.thread_safe or component.llm is None:
        return 1
    return max(1, int(component.llm.concurrency_given))


def _in_order(fn, items, workers: int):
    """fn(item) for each item, `workers` at a time, yielding results in the items' order."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="units") as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for f in futures:
                yield f.result()
        finally:
            for f in futures:
                f.cancel()


in_order = _in_order  # for the stages of other modules (`classify_stage`)


def explain_units(units: Sequence[UnitRecords], explainer: Explainer, cfg: ExplainConfig) -> list[ExplanationRow]:
    """One batch of units (an explainer answers a batch in one call): per unit, its explainer row
    with k candidates, then its token-lookup baseline."""
    shown = [shown_records(u, cfg.n_shown) for u in units]
    # A unit whose firing windows all sit in scoring documents has nothing to be explained from:
    # asking anyway would pay for a guess, and score it.
    asked = [i for i, recs in enumerate(shown) if recs]
    extra = {"outputs": [output_line(units[i].stats) for i in asked]} if explainer.uses_outputs else {}
    answers = explainer.explain_records([shown[i] for i in asked], cfg.k, cfg.temperature, cfg.max_tokens, cfg.chat,
                                        **extra) if asked else []
    explained = dict(zip(asked, answers))
    rows = []
    for i, (unit, recs) in enumerate(zip(units, shown)):
        exp = explained.get(i) or Explanation("", [], "", explainer.name, failure=NOTHING_SHOWN)
        rows.append(ExplanationRow(unit.id, EXPLAINER, exp.explainer, exp.prompt_hash, exp.text, list(exp.candidates),
                                   [], exp.prompt_tokens, exp.completion_tokens, failure=exp.failure,
                                   dollars=explainer.dollars(exp.prompt_tokens, exp.completion_tokens, exp.cached_tokens)))
        rows += _baseline_rows(unit, recs)
    return rows


def explain_stage(units: Sequence[UnitRecords], llm, cfg: ExplainConfig) -> pa.Table:
    """`llm`: an Explainer, or an LLM (explained with by the LLM explainer)."""
    explainer = as_explainer(llm)
    size = units_per_batch(explainer, cfg)
    batches = [units[start : start + size] for start in range(0, len(units), size)]
    # Enough batches at once to keep the LLM's concurrency busy with as many requests again waiting
    # (a batch sends one request per unit, or k when the server ignores `n`, and ends with its slowest).
    workers = explain_workers(explainer, cfg)
    rows = [r for batch in _in_order(lambda b: explain_units(b, explainer, cfg), batches, workers) for r in batch]
    return to_table(ExplanationRow, rows)


def units_per_batch(explainer, cfg: ExplainConfig) -> int:
    """Units per explainer call: `cfg.batch_units`, or for a local model as many as fill its forward
    pass (k samples each), so that one generate call serves many units. The samples do not depend
    on the grouping (each prompt has its own generator), so neither does any result."""
    return max(cfg.batch_units, explainer.units_per_call(cfg.k) or 0)


def explain_workers(llm, cfg: ExplainConfig) -> int:
    """How many batches of units to explain at once: 1 for a local model; for a server, enough to
    keep its concurrency busy with as many requests again waiting."""
    return max(1, math.ceil(4 * _concurrency(llm) / cfg.batch_units)) if _concurrency(llm) > 1 else 1


def _baseline_rows(unit: UnitRecords, shown) -> list[ExplanationRow]:
    """The token-lookup baseline from the shown records, and its output-side twin where the unit's
    statistics say what it promotes (recordings before the output side have no twin)."""
    if shown:
        text = token_lookup_explanation(shown)
        rows = [ExplanationRow(unit.id, LOOKUP, LOOKUP, "", text, [text])]
    else:
        rows = [ExplanationRow(unit.id, LOOKUP, LOOKUP, "", "", [], failure=NOTHING_SHOWN)]
    promotes = unit.stats.promotes if unit.stats is not None else None
    if promotes:
        text = output_lookup_explanation(promotes)
        rows.append(ExplanationRow(unit.id, OUTPUT_LOOKUP, OUTPUT_LOOKUP, "", text, [text]))
    return rows


def _scoring_records(unit: UnitRecords, split: str):
    return [r for r in unit.records if r.split == split and r.kind in SCORED_KINDS]


def _simulate(simulator, text: str, records) -> list[Simulation]:
    return _simulate_texts(simulator, [text], records)[0]


def _simulate_texts(simulator, texts: list[str], records) -> list[list[Simulation]]:
    """Each text simulated on the records, in one `simulate_many` call (batched where the simulator
    batches)."""
    COUNTS["simulate"] += len(texts)
    return simulator.simulate_many(texts, [r.tokens for r in records])


def _sim_rows(unit: UnitRecords, method: str, simulator, records, sims) -> list[SimulationRow]:
    name, phash = simulator.name, simulator.prompt_hash
    return [SimulationRow(unit.id, method, name, phash, r.window_id, r.kind, r.split, s.expected, s.failure,
                          s.prompt_tokens + s.completion_tokens,
                          simulator.dollars(s.prompt_tokens, s.completion_tokens, s.cached_tokens))
            for r, s in zip(records, sims)]


def _unsimulated_rows(unit: UnitRecords, method: str, simulator, records, failure: str) -> list[SimulationRow]:
    """A method's rows with nothing simulated, each saying why (`failure`): an explanation that
    failed is not simulated (an empty text would be paid for and scored as an explanation), and its
    unit's scores are undefined with the reason (`score_unit`)."""
    return [SimulationRow(unit.id, method, simulator.name, simulator.prompt_hash, r.window_id, r.kind, r.split, None,
                          failure, 0, 0.0) for r in records]


def failed_explanation(row: ExplanationRow) -> str | None:
    """Why an explanation row has no text to simulate, or None when it has one."""
    if row.failure:
        return f"the explanation failed ({row.failure})"
    return None if row.candidates or row.text.strip() else "the explainer gave no candidate"


def simulate_unit(unit: UnitRecords, explained: ExplanationRow, baselines: list[ExplanationRow],
                  simulator: Simulator) -> tuple[list[ExplanationRow], list[SimulationRow]]:
    """Best-of-k on valid, then the chosen explanation and the baselines on calib/test.
    Returns (the chosen explanation and the baselines, their simulations)."""
    # Imported explanation sets carry no baselines: derive them from the same train records.
    if not baselines:
        baselines = _baseline_rows(unit, shown_records(unit, 5))
    scored = held_out(unit.records)
    why = failed_explanation(explained)
    if why is not None:  # the baselines are still simulated, as for every unit: they need no LLM answer
        return ([replace(explained, text="", candidate_valid_scores=[]), *baselines],
                _baselines_alone(unit, baselines, simulator, scored, f"not simulated: {why}"))
    valid = _scoring_records(unit, "valid")
    spent: list[Simulation] = []

    def simulate_many(texts, recs):
        out = _simulate_texts(simulator, texts, recs)
        spent.extend(s for sims in out for s in sims)
        return out

    choice = best_of_k.choose(explained.candidates, valid, simulate_many, simulator.selection)
    best = explained.candidates[choice.index] if choice.index >= 0 else ""
    chosen = replace(explained, text=best, candidate_valid_scores=choice.valid_scores,
                     selection_tokens=sum(s.prompt_tokens + s.completion_tokens for s in spent),
                     selection_dollars=prices.add(*(simulator.dollars(s.prompt_tokens, s.completion_tokens, s.cached_tokens)
                                                    for s in spent)))
    lost = sum((s.failure or "").startswith(NO_ANSWER) for s in spent)
    if lost:
        # Ranked on the answers that came: which candidate wins would depend on the server's faults.
        # The explanation waits, unscored, for a rerun that asks the rest (`_unscored`); the rows say
        # so as results without an answer, so that the unit is not kept (`layer._no_request_failed`).
        unsure = (f"{NO_ANSWER}: best-of-{len(explained.candidates)} got no answer for {lost} of its {len(spent)} "
                  "checks on the valid split, so the candidate ranked first on the rest is not simulated or scored "
                  "yet; a rerun asks them again")
        return [chosen, *baselines], _baselines_alone(unit, baselines, simulator, scored, unsure)
    rows = []
    simulated = _simulate_texts(simulator, [best] + [b.text for b in baselines], scored)
    for method, sims in zip([EXPLAINER] + [b.method for b in baselines], simulated):
        rows += _sim_rows(unit, method, simulator, scored, sims)
    return [chosen, *baselines], rows


def _baselines_alone(unit: UnitRecords, baselines: list[ExplanationRow], simulator, scored,
                     failure: str) -> list[SimulationRow]:
    """The rows of a unit whose explanation is not simulated (`failure` says why): the baselines
    are, as for every unit (they need no LLM answer)."""
    rows = _unsimulated_rows(unit, EXPLAINER, simulator, scored, failure)
    for b, sims in zip(baselines, _simulate_texts(simulator, [b.text for b in baselines], scored)):
        rows += _sim_rows(unit, b.method, simulator, scored, sims)
    return rows


def simulate_control(unit: UnitRecords, text: str, simulator: Simulator) -> tuple[list[ExplanationRow], list[SimulationRow]]:
    """The shuffled control: another unit's explanation, simulated on this unit's held-out records.
    An empty `text` is a failed explanation's: the control has none either, and fails with it."""
    scored = held_out(unit.records)
    if not text.strip():
        why = "the explanation it borrows from another unit failed"
        return ([ExplanationRow(unit.id, SHUFFLED, "shuffled", "", "", [], failure=why)],
                _unsimulated_rows(unit, SHUFFLED, simulator, scored, f"not simulated: {why}"))
    row = ExplanationRow(unit.id, SHUFFLED, "shuffled", "", text, [text])
    return [row], _sim_rows(unit, SHUFFLED, simulator, scored, _simulate(simulator, text, scored))


def _encoded(result: tuple[list, list]) -> tuple[list[dict], list[dict]]:
    return to_rows(result[0]), to_rows(result[1])


def _compute(unit: UnitRecords, inputs: dict, compute: Callable[[], tuple]) -> tuple:
    return compute()


def simulate_stage(units: Sequence[UnitRecords], explanations: pa.Table, simulator, seed: int = 0,
                   remember: Callable = _compute, progress: Callable[[int, int], None] | None = None,
                   known: Callable[[UnitRecords, dict], bool] | None = None,
                   load: Callable[[list[UnitRecords]], list[UnitRecords]] | None = None):
    """Returns (chosen explanations table, simulations table).

    `remember(unit, inputs, compute)` may return a stored result for a unit whose `inputs` it has
    seen (a per-unit memo: a crashed shard resumes, a revised unit alone is recomputed); by default
    everything is computed. `known(unit, inputs)` says beforehand whether it holds one: then only
    the units it does not hold are warmed and, with `load`, read (`units` are then ids without
    records, and `load` gives the records of those it is passed). Progress counts the units and
    then their shuffled controls."""
    by_key = {(r.unit, r.method): r for r in from_table(ExplanationRow, explanations)}
    units = list(units)

    def rows_of(unit) -> tuple[ExplanationRow, list[ExplanationRow]]:
        return by_key[(unit.id, EXPLAINER)], [by_key[(unit.id, m)] for m in BASELINES if (unit.id, m) in by_key]

    def inputs_of(unit):
        row, baselines = rows_of(unit)
        return {"explanation": row.candidates, "lookup": baselines[0].text if baselines else None,
                **({"outputs": baselines[1].text} if len(baselines) > 1 else {})}

    full: dict = {}  # id -> the unit with its records, for the units computed

    def needed(pairs: list[tuple]) -> list:
        todo = [u for u, inputs in pairs if known is None or not known(u, inputs)]
        if load is not None and todo:
            full.update((u.id, u) for u in load([u for u in todo if u.id not in full]))
        return todo

    todo = needed([(u, inputs_of(u)) for u in units])
    texts = []
    for u in todo:
        row, baselines = rows_of(u)
        texts += [t for r in (row, *baselines) for t in (r.candidates or [r.text])]
    warmed, warming = [], threading.Lock()

    def computing(fn):
        def run():
            with warming:  # e.g. embed every text of the stage in one batch (`Simulator.warm`)
                if not warmed:
                    if texts:  # none when every unit was read back and a control or two is computed
                        simulator.warm(texts)
                    warmed.append(True)
            return fn()
        return run

    # Units at once: as many as the LLM's concurrency. A unit's phases (k candidates x valid
    # records, then 2 texts x held-out records, about 80 requests each at k = 4) each wait for their
    # slowest request (a retry, a timeout); meanwhile the other units' requests keep the slots busy.
    # A local model takes `units_at_once` units, each in a thread whose simulations wait to share
    # one batched call with the other units', run in this thread (`rendezvous`).
    workers, gathered = _concurrency(simulator), None
    if simulator.units_at_once > 1 and len(units) > 1:
        gathered = GatheredSimulator(simulator)
        workers = simulator.units_at_once
    used = gathered or simulator
    in_order = gathered.rendezvous.in_order if gathered else _in_order
    if gathered:  # here, not in a unit thread: a caller may hold the model's lock in this thread
        computing(lambda: None)()

    def unit_result(unit):
        row, baselines = rows_of(unit)
        return remember(unit, inputs_of(unit),
                        computing(lambda: _encoded(simulate_unit(full.get(unit.id, unit), row, baselines, used))))

    chosen, sims = [], []  # per unit, its rows: dicts, or `TableRows` where `remember` read them back
    total = 2 * len(units) if len(units) > 1 else len(units)
    for i, (c, s) in enumerate(in_order(unit_result, units, workers)):
        chosen.append(c)
        sims.append(s)
        if progress:
            progress(i + 1, total)
    if len(units) > 1:
        best = [t for t, m in zip(part_values(chosen, "text"), part_values(chosen, "method")) if m == EXPLAINER]

        def control_result(pair):
            unit, text = pair
            return remember(unit, {"control": text},
                            computing(lambda: _encoded(simulate_control(full.get(unit.id, unit), text, used))))

        pairs = list(zip(units, shuffled_explanations(best, seed=seed)))
        needed([(u, {"control": t}) for u, t in pairs])
        for i, (c, s) in enumerate(in_order(control_result, pairs, workers)):
            chosen.append(c)
            sims.append(s)
            if progress:
                progress(len(units) + i + 1, total)
    return assemble(chosen, "explanations"), assemble(sims, "simulations")


def score_stage(units: Sequence[UnitRecords], simulations: pa.Table, explanations: pa.Table | None = None,
                n_boot: int = 1000, seed: int = 0) -> pa.Table:
    chosen = explanations.to_pylist() if explanations is not None else None
    return rows_to_table(score_rows(units, simulations.to_pylist(), chosen, n_boot, seed), "scores")


def score_rows(units: Sequence[UnitRecords], simulations: list[dict], explanations: list[dict] | None = None,
               n_boot: int = 1000, seed: int = 0, scorer: Scorer | None = None) -> list[dict]:
    """`score_stage` on rows: simulation rows in, score rows out. `scorer`: the `simulation` scorer
    unless given (the stage reaches no LLM code through the registry until a scorer needs one)."""
    scorer = scorer or SimulationScorer()
    sims, chosen = from_rows(SimulationRow, simulations), from_rows(ExplanationRow, explanations or [])
    sims_of: dict = {}
    chosen_of: dict = {}
    for r in sims:
        sims_of.setdefault(r.unit, []).append(r)
    for r in chosen:
        chosen_of.setdefault(r.unit, []).append(r)
    return to_rows([s for unit in units for s in score_unit(unit, sims_of.get(unit.id, []), chosen_of.get(unit.id, []),
                                                            scorer, n_boot, seed)])


def score_unit(unit: UnitRecords, simulations: Sequence[SimulationRow], explanations: Sequence[ExplanationRow],
               scorer: Scorer, n_boot: int = 1000, seed: int = 0) -> list[ScoreRow]:
    """One unit's scores, per explanation method and simulator, with what each cost: the
    explanation, best-of-k's simulations on valid (which the simulation rows, calib and test only,
    do not hold) and the simulations scored."""
    COUNTS["score_units"] += 1
    by_window: dict[tuple[str, str], dict[int, SimulationRow]] = {}
    sim_tokens: dict[tuple[str, str], int] = {}
    sim_dollars: dict[tuple[str, str], float | None] = {}
    for row in simulations:
        key = (row.method, row.simulator)
        by_window.setdefault(key, {})[row.window_id] = row
        sim_tokens[key] = sim_tokens.get(key, 0) + row.tokens
        sim_dollars[key] = prices.plus(sim_dollars.get(key, 0.0), row.dollars)
    explained = {row.method: row for row in explanations}
    out = []
    for (method, sim_name), rows in by_window.items():
        e = explained.get(method)
        cost, dollars = (e.prompt_tokens + e.completion_tokens, e.dollars) if e else (0, 0.0)
        chose_tokens, chose_dollars = (e.selection_tokens, e.selection_dollars) if e else (0, 0.0)
        recs = [r for r in unit.records if r.window_id in rows]
        sims = [Simulation(rows[r.window_id].expected) for r in recs]
        metrics = scorer.score(e and e.text, recs, sims if scorer.needs_simulations else None, n_boot=n_boot, seed=seed)
        why = _unscored(e, rows.values()) if scorer.needs_simulations else None
        if why is not None:
            metrics = {m: _undefined(s, why) for m, s in metrics.items()}
        for metric, s in metrics.items():
            out.append(ScoreRow(unit.id, method, sim_name, "test", metric, s.value, s.ci_low, s.ci_high,
                                s.undefined_reason, s.n_records, s.n_failed, cost,
                                sim_tokens[(method, sim_name)] + chose_tokens,
                                prices.add(dollars, chose_dollars, sim_dollars[(method, sim_name)])))
    return out


def _unscored(explanation: ExplanationRow | None, simulations) -> str | None:
    """Why a method's simulations must not be scored, or None. Not "all simulations failed" for a
    failed explanation: nothing was simulated, and this says why. Records whose request got no
    answer are not left out as a parse failure is: which they are depends on the server's timing, a
    request's whole group of records at once (top windows together), so what is left is a biased
    sample; and a rerun asks them again, so the method waits for it."""
    if explanation is not None and explanation.failure:
        return f"no explanation: {explanation.failure}"
    sims = list(simulations)
    lost = sum((r.failure or "").startswith(NO_ANSWER) for r in sims)
    return f"{lost} of {len(sims)} simulations got no LLM answer (a rerun asks them again)" if lost else None


def _undefined(score, reason: str):
    return replace(score, value=None, ci_low=None, ci_high=None, undefined_reason=reason)
