"""The `simulation` scorer: the reference's scoring of a simulator's predictions against the truth.

On the test split: the correlation of predictions with true activations over top-and-random and
random-only records, the calibrated R² and absolute deviation explained (calibrated on the calib
split), each with a bootstrap CI over records (`scoring.score_unit`), and the detection AUC of
telling top windows from random ones by the predicted window maximum.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from autoexplain import scoring
from autoexplain.components import Scorer
from autoexplain.records import ActivationRecord, Simulation

DETECTION_AUC = "detection_auc"


class SimulationScorer(Scorer):
    kind = "simulation"
    split = "test"  # the reported split; best-of-k chose on 'valid', so the two never meet
    calib_split = "calib"
    settings = {"split": split, "calib_split": calib_split}

    def __init__(self):
        self.name = self.kind

    def score(self, explanation: str | None, records: Sequence[ActivationRecord],
              simulations: Sequence[Simulation] | None, *, n_boot: int = 1000,
              seed: int = 0) -> dict[str, scoring.Score]:
        if simulations is None or len(simulations) != len(records):
            raise ValueError("the simulation scorer needs one simulation per record")
        # as they are (lists): `scoring` pools each selection's values once
        srecs = [scoring.ScoringRecord(r.activations, s.expected, r.kind, r.split) for r, s in zip(records, simulations)]
        metrics = scoring.score_unit(srecs, split=self.split, calib_split=self.calib_split, n_boot=n_boot, seed=seed)
        metrics[DETECTION_AUC] = self.detection(srecs)
        return metrics

    def detection(self, srecs: Sequence[scoring.ScoringRecord]) -> scoring.Score:
        """AUC of telling top (activating) from random windows by the simulation's window maximum.
        A top record that never fires (recorded before top records had to) is not activating: with
        no activating record the AUC is undefined, not the 0.5 of telling zeros from zeros."""
        ok = [r for r in srecs if r.split == self.split and r.expected is not None]
        pos = _window_max([r.expected for r in ok if r.kind == "top" and max(r.true, default=0) > 0])
        neg = _window_max([r.expected for r in ok if r.kind == "random"])
        failed = sum(r.expected is None for r in srecs if r.split == self.split)
        if not len(pos) or not len(neg):
            return scoring.Score(None, None, None, "no activating or no non-activating windows", len(ok), failed)
        return scoring.Score(scoring.detection_auc(pos, neg), None, None, None, len(ok), failed)


def _window_max(expected: list) -> np.ndarray:
    """Each window's largest expected value (np.max of each), taken on all of them pooled at once."""
    sizes = [len(e) for e in expected]
    if not expected or min(sizes) == 0:
        return np.array([float(np.max(e)) for e in expected])  # an empty one raises, as np.max does
    return np.maximum.reduceat(scoring.pool(expected, sum(sizes)), np.cumsum(sizes) - sizes)
