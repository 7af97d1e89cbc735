"""Best-of-k: which of a unit's k candidate explanations goes on to be scored.

The choice is made on the *valid* split only, by the correlation between the unit's true
activations and each candidate's simulation (reporting happens later, on test). Two ways:

- `full`: every candidate simulated on every valid record (k x n simulations). Right when
  simulations are cheap (the embedding simulator does them all in one batch).
- `halving`: successive halving, for simulators that pay per request. Candidates are first
  simulated on a prefix of the valid records, the better half (by correlation on the records seen
  so far) goes on to a longer prefix, and so on; the last two are compared on all n records. At
  k = 4 that is 4 x n/2 + 2 x n/2 = 3n simulations instead of 4n, at k = 8 4n instead of 8n, and a
  lone candidate needs none. The records are ordered so that every prefix mixes top and random
  windows in the split's own proportion: a prefix of only top windows would rank candidates by
  how well they order strong activations, not by whether they tell firing from silence.

Each candidate's reported valid score is its correlation on the records it was simulated on
(all n for the final two; a prefix for the ones dropped earlier; NaN for a lone candidate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from autoexplain import scoring

SELECTIONS = ("full", "halving")


@dataclass
class Choice:
    index: int  # the chosen candidate
    valid_scores: list[float]  # per candidate, NaN where undefined or never simulated
    simulated: list[int]  # per candidate, how many valid records it was simulated on


def interleaved(records: Sequence) -> list:
    """The records in an order whose every prefix mixes the kinds in proportion: record i of a kind
    with m records sits at fraction (i + 0.5) / m, and the order is by that fraction (then kind,
    then the records' own order), so it is fixed by the records alone."""
    by_kind: dict[str, list] = {}
    for r in records:
        by_kind.setdefault(r.kind, []).append(r)
    keyed = [((i + 0.5) / len(rs), kind, i, r) for kind, rs in by_kind.items() for i, r in enumerate(rs)]
    return [k[-1] for k in sorted(keyed, key=lambda k: k[:3])]


def correlation(records: Sequence, sims: Sequence) -> float:
    """Correlation of true and simulated activations over the records that simulated; -inf when
    undefined, so that such a candidate is never preferred."""
    pairs = [(r.activations, s.expected) for r, s in zip(records, sims) if s.ok]
    trues, preds = [p[0] for p in pairs], [p[1] for p in pairs]
    try:  # pooled once (the values of concatenating them record by record)
        r = scoring.correlation(scoring.pool(trues, sum(map(len, trues))), scoring.pool(preds, sum(map(len, preds))))
    except scoring.UndefinedMetric:
        return float("-inf")
    return r if math.isfinite(r) else float("-inf")


def prefix_sizes(k: int, n: int) -> list[int]:
    """Records seen after each round of halving: the last round sees all n, each earlier one half
    of the next (at least one record). k = 4, n = 20: [10, 20]; k = 8: [5, 10, 20]."""
    rounds = max(1, math.ceil(math.log2(k)))
    return [max(1, math.ceil(n / 2 ** (rounds - 1 - r))) for r in range(rounds)]


def _ranked(scores: list[float], alive: list[int]) -> list[int]:
    """Best first; ties keep the earlier candidate (the order the explainer gave them)."""
    return sorted(alive, key=lambda c: (-scores[c], c))


def choose(candidates: Sequence[str], records: Sequence, simulate_many: Callable, selection: str = "full") -> Choice:
    """Pick a candidate. `simulate_many(texts, records)` returns, per text, one Simulation per
    record (`Simulator.simulate_many`)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, not {selection!r}")
    k = len(candidates)
    if k == 0:
        return Choice(-1, [], [])
    scores, seen = [float("-inf")] * k, [0] * k
    if selection == "full" or not records:
        for c, sims in enumerate(simulate_many(list(candidates), list(records))):
            scores[c], seen[c] = correlation(records, sims), len(records)
        best = _ranked(scores, list(range(k)))[0]
    elif k == 1:
        best = 0
    else:
        ordered = interleaved(records)
        sims_of: list[list] = [[] for _ in range(k)]
        alive = list(range(k))
        for size in prefix_sizes(k, len(ordered)):
            todo = [c for c in alive if seen[c] < size]
            new = ordered[seen[todo[0]]:size] if todo else []  # survivors have all seen the same prefix
            if new:
                for c, sims in zip(todo, simulate_many([candidates[c] for c in todo], new)):
                    sims_of[c] += sims
                    seen[c] = size
                    scores[c] = correlation(ordered[:size], sims_of[c])
            alive = _ranked(scores, alive)[: max(1, math.ceil(len(alive) / 2))]
        best = alive[0]  # never one dropped earlier: its score is on fewer records
    reported = [s if seen[c] and math.isfinite(s) else float("nan") for c, s in enumerate(scores)]
    return Choice(best, reported, seen)
