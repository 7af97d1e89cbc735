"""What a classifier scorer does on a few units of a finished run: how many of its replies parse,
seconds and tokens per unit, and its per-unit scores, without writing a stage output.

    python bench/classify_bench.py --records OUT/records/KEY --simulations OUT/simulations/KEY \\
        --scorer detection:local --units 4

For the embedded SmolLM2 as the classifier (`detection:local`, the offline default), which is what
a user without a server gets; any scorer spec works (`fuzzing:openai:M@URL`, `embedding`).
"""

from __future__ import annotations

import argparse
import time

import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", required=True)
    ap.add_argument("--simulations", required=True)
    ap.add_argument("--scorer", default="detection:local")
    ap.add_argument("--units", type=int, default=4, help="the first N units (a unit: a neuron and a polarity) of the run")
    ap.add_argument("--n-boot", type=int, default=200)
    a = ap.parse_args()

    from autoexplain.classify import Trial
    from autoexplain.classify_metrics import metrics
    from autoexplain.classify_stage import classify_unit
    from autoexplain.layer import StageRef, load_units
    from autoexplain.registry import make_scorer

    sims = StageRef.of(a.simulations)
    chosen = pq.read_table(sims.directory / "chosen.parquet").to_pylist()
    wanted = sorted({r["unit"] for r in chosen})[: a.units]
    units = load_units(a.records, sims.layer, wanted)[: a.units]
    texts = {}
    for r in chosen:
        texts.setdefault((r["unit"], r["polarity"]), {})[r["method"]] = r["text"]
    t0 = time.perf_counter()
    scorer = make_scorer(a.scorer)
    loaded = time.perf_counter() - t0
    rows, started = [], time.perf_counter()
    for unit in units:
        rows += classify_unit(unit, texts[(unit.id.index, unit.id.polarity)], scorer, None)
    spent = time.perf_counter() - started
    failed = sum(r["prediction"] is None and r["p_one"] is None for r in rows)
    print(f"scorer {a.scorer}: {len(units)} units, {len(rows)} trials, load {loaded:.1f} s, "
          f"{spent / len(units):.1f} s and {sum(r['tokens'] for r in rows) / len(units):,.0f} tokens per unit, "
          f"{failed} trials failed ({failed / max(1, len(rows)):.0%})")
    reasons = sorted({r["failure"] for r in rows if r["failure"]})[:3]
    if reasons:
        print("failures, e.g.:", *reasons, sep="\n  ")
    for unit in units:
        mine = [Trial.of_row(r)
                for r in rows if (r["unit"], r["polarity"], r["method"]) == (unit.id.index, unit.id.polarity, "explainer")]
        got = metrics(scorer.metric, mine, a.n_boot, 0, scorer.metric_prefix)
        print(unit.id, {k: (None if s.value is None else round(s.value, 3), s.n_failed) for k, s in got.items()})


if __name__ == "__main__":
    main()
