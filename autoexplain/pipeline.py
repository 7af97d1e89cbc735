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
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from autoexplain import best_of_k, prices, scoring
from autoexplain.counters import COUNTS
from autoexplain.explain import as_explainer, shuffled_explanations, token_lookup_explanation
from autoexplain.records import UnitRecords
from autoexplain.rendezvous import GatheredSimulator
from autoexplain.simulate import Simulation
from schemas import load_schema

EXPLAINER, LOOKUP, SHUFFLED = "explainer", "token-lookup", "shuffled"
SCORED_KINDS = ("top", "random")


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


def _concurrency(model) -> int:
    """How many requests the model takes at once: its LLM's max_concurrency when it is thread safe
    (a server), else 1 (a local model runs one call at a time)."""
    if not getattr(model, "thread_safe", False):
        return 1
    llm = getattr(model, "llm", model)
    return max(1, int(getattr(llm, "max_concurrency", 1)))


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


def explain_stage(units: Sequence[UnitRecords], llm, cfg: ExplainConfig) -> pa.Table:
    """`llm`: an Explainer, or an LLM (explained with by the LLM explainer)."""
    explainer = as_explainer(llm)
    size = units_per_batch(explainer, cfg)
    batches = [units[start : start + size] for start in range(0, len(units), size)]

    def explain_batch(batch):
        shown = [shown_records(u, cfg.n_shown) for u in batch]
        return shown, explainer.explain_records(shown, cfg.k, cfg.temperature, cfg.max_tokens, cfg.chat)

    rows = []
    # Enough batches at once to keep the LLM's concurrency busy with as many requests again waiting
    # (a batch sends one request per unit, or k when the server ignores `n`, and ends with its slowest).
    workers = explain_workers(explainer, cfg)
    for batch, (shown, explained) in zip(batches, _in_order(explain_batch, batches, workers)):
        for unit, recs, exp in zip(batch, shown, explained):
            rows.append(_explanation_row(unit, EXPLAINER, exp.explainer, exp.prompt_hash, exp.text, exp.candidates,
                                         exp.prompt_tokens, exp.completion_tokens,
                                         failure=getattr(exp, "failure", None),
                                         dollars=explainer.dollars(exp.prompt_tokens, exp.completion_tokens)))
            lookup = token_lookup_explanation(recs)
            rows.append(_explanation_row(unit, LOOKUP, "token-lookup", "", lookup, [lookup], 0, 0))
    return rows_to_table(rows, "explanations")


def units_per_batch(explainer, cfg: ExplainConfig) -> int:
    """Units per explainer call: `cfg.batch_units`, or for a local model as many as fill its forward
    pass (k samples each), so that one generate call serves many units. The samples do not depend
    on the grouping (each prompt has its own generator), so neither does any result."""
    return max(cfg.batch_units, explainer.units_per_call(cfg.k) or 0)


def explain_workers(llm, cfg: ExplainConfig) -> int:
    """How many batches of units to explain at once: 1 for a local model; for a server, enough to
    keep its concurrency busy with as many requests again waiting."""
    return max(1, math.ceil(4 * _concurrency(llm) / cfg.batch_units)) if _concurrency(llm) > 1 else 1


def _explanation_row(unit, method, explainer, phash, text, candidates, p_tok, c_tok, cand_scores=None, failure=None,
                     dollars: float | None = 0.0):
    """`dollars`: the explainer's requests; `selection_*`: best-of-k's simulations on valid, filled
    in by the simulate stage for the chosen row."""
    n = unit.neuron
    return {"layer": n.layer, "unit": n.index, "polarity": n.polarity, "method": method, "explainer": explainer,
            "prompt_hash": phash, "text": text, "candidates": list(candidates),
            "candidate_valid_scores": list(cand_scores or []), "prompt_tokens": p_tok, "completion_tokens": c_tok,
            "failure": failure, "dollars": dollars, "selection_tokens": 0, "selection_dollars": 0.0}


def _scoring_records(unit: UnitRecords, split: str):
    return [r for r in unit.records if r.split == split and r.kind in SCORED_KINDS]


def _simulate(simulator, text: str, records) -> list[Simulation]:
    return _simulate_texts(simulator, [text], records)[0]


def _simulate_texts(simulator, texts: list[str], records) -> list[list[Simulation]]:
    """Each text simulated on the records, in one `simulate_many` call (batched where the simulator
    batches)."""
    COUNTS["simulate"] += len(texts)
    return simulator.simulate_many(texts, [r.tokens for r in records])


def _sim_rows(unit: UnitRecords, method: str, simulator, records, sims) -> list[dict]:
    n = unit.neuron
    name, phash = simulator.name, simulator.prompt_hash
    return [{"layer": n.layer, "unit": n.index, "polarity": n.polarity, "method": method, "simulator": name,
             "prompt_hash": phash, "window_id": r.window_id, "kind": r.kind, "split": r.split,
             "expected": s.expected, "failure": s.failure, "tokens": s.prompt_tokens + s.completion_tokens,
             "dollars": simulator.dollars(s.prompt_tokens, s.completion_tokens)}
            for r, s in zip(records, sims)]


def _held_out(unit: UnitRecords):
    return [r for r in unit.records if r.kind in SCORED_KINDS and r.split in ("calib", "test")]


def simulate_unit(unit: UnitRecords, llm_row: dict, lookup_row: dict | None, simulator) -> tuple[list, list]:
    """Best-of-k on valid, then the chosen explanation and the token-lookup baseline on calib/test.
    Returns (chosen explanation rows, simulation rows)."""
    valid = _scoring_records(unit, "valid")
    spent: list[Simulation] = []

    def simulate_many(texts, recs):
        out = _simulate_texts(simulator, texts, recs)
        spent.extend(s for sims in out for s in sims)
        return out

    choice = best_of_k.choose(llm_row["candidates"], valid, simulate_many, simulator.selection)
    best = llm_row["candidates"][choice.index] if choice.index >= 0 else ""
    chosen = {**llm_row, "text": best, "candidate_valid_scores": choice.valid_scores,
              "selection_tokens": sum(s.prompt_tokens + s.completion_tokens for s in spent),
              "selection_dollars": prices.add(*(simulator.dollars(s.prompt_tokens, s.completion_tokens) for s in spent))}
    # Imported explanation sets carry no baseline: derive it from the same train records.
    if lookup_row is None:
        text = token_lookup_explanation(shown_records(unit, 5))
        lookup_row = _explanation_row(unit, LOOKUP, "token-lookup", "", text, [text], 0, 0)
    held_out = _held_out(unit)
    rows = []
    simulated = _simulate_texts(simulator, [best, lookup_row["text"]], held_out)
    for method, sims in zip((EXPLAINER, LOOKUP), simulated):
        rows += _sim_rows(unit, method, simulator, held_out, sims)
    return [chosen, lookup_row], rows


def simulate_control(unit: UnitRecords, text: str, simulator) -> tuple[list, list]:
    """The shuffled control: another unit's explanation, simulated on this unit's held-out records."""
    held_out = _held_out(unit)
    row = _explanation_row(unit, SHUFFLED, "shuffled", "", text, [text], 0, 0)
    return [row], _sim_rows(unit, SHUFFLED, simulator, held_out, _simulate(simulator, text, held_out))


def _compute(unit: UnitRecords, inputs: dict, compute: Callable[[], tuple]) -> tuple:
    return compute()


def simulate_stage(units: Sequence[UnitRecords], explanations: pa.Table, simulator, seed: int = 0,
                   remember: Callable = _compute, progress: Callable[[int, int], None] | None = None):
    """Returns (chosen explanations table, simulations table).

    `remember(unit, inputs, compute)` may return a stored result for a unit whose `inputs` it has
    seen (a per-unit memo: a crashed shard resumes, a revised unit alone is recomputed); by default
    everything is computed. Progress counts the units and then their shuffled controls."""
    by_key = {(r["unit"], r["polarity"], r["method"]): r for r in explanations.to_pylist()}
    texts = [t for r in by_key.values() for t in (r["candidates"] or [r["text"]])]
    warmed, warming = [], threading.Lock()

    def computing(fn):
        def run():
            with warming:  # e.g. embed every text of the stage in one batch (`Simulator.warm`)
                if not warmed:
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

    def unit_result(unit):
        key = (unit.neuron.index, unit.neuron.polarity)
        row, lookup = by_key[(*key, EXPLAINER)], by_key.get((*key, LOOKUP))
        inputs = {"explanation": row["candidates"], "lookup": lookup and lookup["text"]}
        return remember(unit, inputs, computing(lambda: simulate_unit(unit, row, lookup, used)))

    chosen, sims = [], []
    total = 2 * len(units) if len(units) > 1 else len(units)
    for i, (c, s) in enumerate(in_order(unit_result, list(units), workers)):
        chosen += c
        sims += s
        if progress:
            progress(i + 1, total)
    if len(units) > 1:
        best = [r["text"] for r in chosen if r["method"] == EXPLAINER]

        def control_result(pair):
            unit, text = pair
            return remember(unit, {"control": text}, computing(lambda: simulate_control(unit, text, used)))

        pairs = list(zip(units, shuffled_explanations(best, seed=seed)))
        for i, (c, s) in enumerate(in_order(control_result, pairs, workers)):
            chosen += c
            sims += s
            if progress:
                progress(len(units) + i + 1, total)
    return rows_to_table(chosen, "explanations"), rows_to_table(sims, "simulations")


def score_stage(units: Sequence[UnitRecords], simulations: pa.Table, explanations: pa.Table | None = None,
                n_boot: int = 1000, seed: int = 0) -> pa.Table:
    chosen = explanations.to_pylist() if explanations is not None else None
    return rows_to_table(score_rows(units, simulations.to_pylist(), chosen, n_boot, seed), "scores")


def score_rows(units: Sequence[UnitRecords], simulations: list[dict], explanations: list[dict] | None = None,
               n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """`score_stage` on rows: simulation rows in, score rows out."""
    sims_of: dict[tuple, dict[int, dict]] = {}
    sim_cost: dict[tuple, int] = {}
    sim_dollars: dict[tuple, float | None] = {}
    for row in simulations:
        key = (row["unit"], row["polarity"], row["method"], row["simulator"])
        sims_of.setdefault(key, {})[row["window_id"]] = row
        sim_cost[key] = sim_cost.get(key, 0) + row["tokens"]
        sim_dollars[key] = prices.add(sim_dollars.get(key, 0.0), row["dollars"])
    # Per explanation: the explainer's tokens and dollars, and (for the chosen explanation) those of
    # best-of-k's simulations on valid, which the simulation rows (calib and test only) do not hold.
    cost, dollars, selection = {}, {}, {}
    if explanations is not None:
        for row in explanations:
            key = (row["unit"], row["polarity"], row["method"])
            cost[key] = row["prompt_tokens"] + row["completion_tokens"]
            dollars[key] = row["dollars"]
            selection[key] = (row["selection_tokens"], row["selection_dollars"])
    out = []
    for unit in units:
        n = unit.neuron
        COUNTS["score_units"] += 1
        for (u, pol, method, sim_name), by_window in sims_of.items():
            if (u, pol) != (n.index, n.polarity):
                continue
            chose_tokens, chose_dollars = selection.get((u, pol, method), (0, 0.0))
            recs = [r for r in unit.records if r.window_id in by_window]
            srecs = []
            for r in recs:
                row = by_window[r.window_id]
                expected = row["expected"]
                srecs.append(scoring.ScoringRecord(np.asarray(r.activations, dtype=float),
                                                   None if expected is None else np.asarray(expected, dtype=float),
                                                   r.kind, r.split))
            metrics = scoring.score_unit(srecs, split="test", calib_split="calib", n_boot=n_boot, seed=seed)
            metrics["detection_auc"] = _detection(srecs)
            for metric, s in metrics.items():
                out.append({"layer": n.layer, "unit": n.index, "polarity": n.polarity, "method": method,
                            "simulator": sim_name, "split": "test", "metric": metric, "value": s.value,
                            "ci_low": s.ci_low, "ci_high": s.ci_high, "undefined_reason": s.undefined_reason,
                            "n_records": s.n_records, "n_failed": s.n_failed,
                            "explainer_tokens": cost.get((u, pol, method), 0),
                            "simulator_tokens": sim_cost[(u, pol, method, sim_name)] + chose_tokens,
                            "dollars": prices.add(dollars.get((u, pol, method), 0.0), chose_dollars,
                                                  sim_dollars[(u, pol, method, sim_name)])})
    return out


def _detection(srecs) -> scoring.Score:
    """AUC of telling top (activating) from random windows by the simulation's window maximum."""
    ok = [r for r in srecs if r.split == "test" and r.expected is not None]
    pos = [float(np.max(r.expected)) for r in ok if r.kind == "top"]
    neg = [float(np.max(r.expected)) for r in ok if r.kind == "random"]
    failed = sum(r.expected is None for r in srecs if r.split == "test")
    if not pos or not neg:
        return scoring.Score(None, None, None, "no activating or no non-activating windows", len(ok), failed)
    return scoring.Score(scoring.detection_auc(pos, neg), None, None, None, len(ok), failed)


def rows_to_table(rows: list[dict], schema_name: str) -> pa.Table:
    schema = load_schema(schema_name)
    if not rows:
        return schema.empty_table()
    return pa.Table.from_pylist(rows, schema=schema)
