"""The library in a few calls, for a notebook: no Prefect, no files, no schemas.

`score(simulator, explanation, unit_records)` simulates one explanation on a unit's held-out
records (top and random windows of the calib and test splits, as the simulate stage does) and
scores the simulations as the score stage does. The simulator and scorer are components or spec
strings for the registry, so `score("embedding", ...)` and `score(MySimulator(), ...)` both work.
"""

from __future__ import annotations

from typing import Sequence

from autoexplain.components import Scorer, Simulator
from autoexplain.errors import UserError
from autoexplain.records import HELD_OUT, SCORED_KINDS, ActivationRecord, UnitRecords, held_out
from autoexplain.registry import DEFAULT_SCORER, make_scorer, make_simulator
from autoexplain.scoring import Score


def score(simulator: Simulator | str, explanation: str, unit_records: UnitRecords | Sequence[ActivationRecord], *,
          scorer: Scorer | str = DEFAULT_SCORER, n_boot: int = 1000, seed: int = 0) -> dict[str, Score]:
    """One `Score` per metric, by name: for the default scorer 'top_and_random' (the headline
    correlation), 'random_only', 'calibrated_r2', 'calibrated_abs_dev_explained' and 'detection_auc',
    on the test split. They are the score stage's values for the same records and explanation, to
    the bit where the simulator's predictions are float32 numbers (the simulations table stores them
    as float32, so the stage scores them rounded)."""
    records = _checked(unit_records, n_boot)
    sim = make_simulator(simulator) if isinstance(simulator, str) else simulator
    judge = make_scorer(scorer) if isinstance(scorer, str) else scorer
    scored = held_out(records)
    sims = sim.simulate_many([explanation], [r.tokens for r in scored])[0] if judge.needs_simulations else None
    return judge.score(explanation, scored, sims, n_boot=n_boot, seed=seed)


def _checked(unit_records, n_boot: int) -> list[ActivationRecord]:
    """The records to score, or one line saying what is wrong with the call: before any simulation."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise UserError(f"n_boot must be a whole number of at least 1 (got {n_boot!r})",
                        "give the number of bootstrap resamples for the CIs, e.g. n_boot=1000")
    records = unit_records.records if isinstance(unit_records, UnitRecords) else list(unit_records)
    if any(isinstance(r, UnitRecords) for r in records):
        raise UserError(f"score takes one unit's records, and was given a list of {len(records)} units",
                        "score one unit at a time: score(simulator, text, units[i])")
    for r in records:
        if len(r.tokens) != len(r.activations):
            raise UserError(f"record of window {r.window_id} has {len(r.tokens)} tokens and {len(r.activations)} "
                            "activations", "give one activation per token")
    if records and not held_out(records):
        found = sorted({(r.kind, r.split) for r in records})
        raise UserError(f"none of the {len(records)} records is held out for scoring (kind, split: {found})",
                        f"score on the unit's records of kind {' or '.join(SCORED_KINDS)} in the "
                        f"{' and '.join(HELD_OUT)} splits, as `layer.load_units` returns them")
    return records
