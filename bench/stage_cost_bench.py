"""CPU and wall seconds of explain, simulate and score for a number of units of one layer, called
through `autoexplain.layer` as the flow's tasks call them, on records an earlier run wrote. Run it
from two checkouts alternately (PYTHONPATH=<checkout>) to compare commits on the same records.

    python bench/stage_cost_bench.py --records OUT/records/KEY --layer 15 --neurons 256 --out /tmp/cost

The word table is built on the first call for an --out (untimed, as is the records' contract check);
every later call removes the stage outputs and memos under --out and times the three stages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from autoexplain import layer as L


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", required=True, help="a records folder (OUT/records/KEY)")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--neurons", type=int, default=256, help="neurons 0..N-1, both polarities")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    records, out = Path(a.records), Path(a.out)
    L.load_units(records, a.layer, [0])  # the records' contract check, once, untimed
    if not (out / "word_vectors").exists():
        L.run_simulate(records, L.run_explain(records, a.layer, out, units=[0]), out)
    for stage in ("explanations", "simulations", "scores", "memo", "runs"):
        shutil.rmtree(out / stage, ignore_errors=True)
    times = [(time.time(), time.process_time())]
    explained = L.run_explain(records, a.layer, out, units=list(range(a.neurons)))
    times.append((time.time(), time.process_time()))
    simulated = L.run_simulate(records, explained, out)
    times.append((time.time(), time.process_time()))
    L.run_score(records, simulated, out)
    times.append((time.time(), time.process_time()))
    spans = {name: [round(times[i + 1][0] - times[i][0], 1), round(times[i + 1][1] - times[i][1], 1)]
             for i, name in enumerate(("explain", "simulate", "score"))}
    print(json.dumps({"units": 2 * a.neurons, "wall_s/cpu_s": spans,
                      "total_cpu_s": round(times[-1][1] - times[0][1], 1)}))


if __name__ == "__main__":
    main()
