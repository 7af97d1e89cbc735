"""CPU time of one contract check of a shard-sized table: the polars fast path vs forced GX.

    python bench/contract_bench.py                 # 512 units, 5 repeats
    python bench/contract_bench.py --units 128 --repeats 3

A 512-unit shard's simulations table (per unit: 2 polarities x 7 scoring windows, 64 expected
values each, one failed simulation in 50) and its scores table (per unit and polarity: 2 methods x
the headline, calibrated and classifier metrics). Each is checked `--repeats` + 1 times each way, fast
path first; the median process CPU time of all but the first is shown, and the first check apart
(GX's first one in the process imports GX and builds its context; a later suite's first builds the
suite).
Both ways must pass (the fast path only certifies passes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import pyarrow as pa

from autoexplain.schemas import load_schema
from autoexplain.schemas.contracts import ENGINE_ENV, validate

WINDOW_LEN = 64


def simulations_table(units: int, rng: np.random.Generator) -> pa.Table:
    rows = []
    for unit in range(units):
        for polarity in (1, -1):
            for w in range(7):
                failed = rng.random() < 0.02
                rows.append({"layer": 12, "unit": unit, "polarity": polarity, "method": "explainer",
                             "simulator": "all-at-once:llm", "prompt_hash": "h", "window_id": 1000 * w + unit,
                             "kind": "top" if w < 4 else "random", "split": "test" if w % 2 else "calib",
                             "expected": None if failed else rng.uniform(0, 10, WINDOW_LEN).astype(np.float32),
                             "failure": "no digits" if failed else None, "tokens": 300, "dollars": None})
    return pa.Table.from_pylist(rows, schema=load_schema("simulations"))


def scores_table(units: int, rng: np.random.Generator) -> pa.Table:
    metrics = ["top_and_random", "random_only", "calibrated_r2", "calibrated_abs_dev_explained",
               "detection_auc@random", "fuzzing_auc@similar"]
    rows = []
    for unit in range(units):
        for polarity in (1, -1):
            for method in ("explainer", "token-lookup"):
                for metric in metrics:
                    value = float(rng.uniform(0, 1) if "@" in metric else rng.uniform(-0.5, 1.0))
                    undefined = metric == "calibrated_abs_dev_explained" and unit % 9 == 0
                    rows.append({"layer": 12, "unit": unit, "polarity": polarity, "method": method,
                                 "simulator": "all-at-once:llm", "split": "test", "metric": metric,
                                 "value": None if undefined else min(value, 1.0),
                                 "ci_low": None if undefined else min(value, 1.0) - 0.1,
                                 "ci_high": None if undefined else min(value, 1.0),
                                 "undefined_reason": "constant activations" if undefined else None,
                                 "n_records": 14, "n_failed": 0, "explainer_tokens": 900,
                                 "simulator_tokens": 4000, "dollars": None})
    return pa.Table.from_pylist(rows, schema=load_schema("scores"))


def cpu_seconds(table: pa.Table, suite: str, params: dict, engine: str, repeats: int) -> tuple[float, float]:
    """(the first check's CPU, the median of the next `repeats`)."""
    if engine == "gx":
        os.environ[ENGINE_ENV] = "gx"
    else:
        os.environ.pop(ENGINE_ENV, None)
    t = time.process_time()
    report = validate(table, suite, params)  # GX builds its context (once per process) and this suite here
    first = time.process_time() - t
    assert report.success, report.failures
    times = []
    for _ in range(repeats):
        t = time.process_time()
        validate(table, suite, params)
        times.append(time.process_time() - t)
    return first, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    tables = [("simulations", simulations_table(a.units, rng), {"window_len": WINDOW_LEN}),
              ("scores", scores_table(a.units, rng), {})]
    print(f"{'suite':<12} {'rows':>6} {'fast CPU s':>11} {'GX CPU s':>9} {'GX / fast':>10}   first check: fast, GX")
    for suite, table, params in tables:
        fast_first, fast = cpu_seconds(table, suite, params, "fast", a.repeats)
        gx_first, gx = cpu_seconds(table, suite, params, "gx", a.repeats)
        print(f"{suite:<12} {table.num_rows:>6} {fast:>11.4f} {gx:>9.3f} {gx / fast:>10.0f}"
              f"   {fast_first:.3f}, {gx_first:.3f}")


if __name__ == "__main__":
    main()
