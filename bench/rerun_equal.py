"""Are two reruns' outputs equal to the bit? The simulations, chosen-explanations and scores tables
of two runs (e.g. two commits on copies of the same output, after the same edit), each sorted by
unit, polarity, method and window/metric, compared with polars `DataFrame.equals`.

    python bench/rerun_equal.py SIMULATIONS_A SCORES_A SIMULATIONS_B SCORES_B
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl


def main() -> None:
    sims_a, scores_a, sims_b, scores_b = (Path(p) for p in sys.argv[1:5])
    pairs = [("simulations", sims_a, sims_b, "layer_*", ["unit", "polarity", "method", "window_id"]),
             ("chosen", sims_a, sims_b, "chosen.parquet", ["unit", "polarity", "method"]),
             ("scores", scores_a, scores_b, "layer_*", ["unit", "polarity", "method", "simulator", "metric"])]
    ok = True
    for name, a, b, pattern, by in pairs:
        ta, tb = (pl.read_parquet(next(f.glob(pattern))).sort(by, maintain_order=True) for f in (a, b))
        same = ta.equals(tb)
        ok &= same
        print(f"{name}: {ta.height} rows, {'equal' if same else 'DIFFERENT'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
