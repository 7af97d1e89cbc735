"""The library in a few calls, for a notebook: no Prefect, no files, no schemas.

`score(simulator, explanation, unit_records)` simulates one explanation on a unit's held-out
records (top and random windows of the calib and test splits, as the simulate stage does) and
scores the simulations as the score stage does. The simulator and scorer are components or spec
strings for the registry, so `score("embedding", ...)` and `score(MySimulator(), ...)` both work.
"""

from __future__ import annotations

from typing import Sequence

from autoexplain.components import Scorer, Simulator
from autoexplain.records import ActivationRecord, UnitRecords, held_out
from autoexplain.registry import DEFAULT_SCORER, make_scorer, make_simulator
from autoexplain.scoring import Score


def score(simulator: Simulator | str, explanation: str, unit_records: UnitRecords | Sequence[ActivationRecord], *,
          scorer: Scorer | str = DEFAULT_SCORER, n_boot: int = 1000, seed: int = 0) -> dict[str, Score]:
    """One `Score` per metric, by name: for the default scorer 'top_and_random' (the headline
    correlation), 'random_only', 'calibrated_r2', 'calibrated_abs_dev_explained' and 'detection_auc',
    on the test split. They are the score stage's values for the same records and explanation, to
    the bit where the simulator's predictions are float32 numbers (the simulations table stores them
    as float32, so the stage scores them rounded)."""
    sim = make_simulator(simulator) if isinstance(simulator, str) else simulator
    judge = make_scorer(scorer) if isinstance(scorer, str) else scorer
    records = unit_records.records if isinstance(unit_records, UnitRecords) else list(unit_records)
    scored = held_out(records)
    sims = sim.simulate_many([explanation], [r.tokens for r in scored])[0] if judge.needs_simulations else None
    return judge.score(explanation, scored, sims, n_boot=n_boot, seed=seed)
