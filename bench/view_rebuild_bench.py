"""The viewer's rebuild after a rerun: the time to build a layer's site again when its scores and
simulations changed and its explanations, records and windows did not (a simulator-prompt edit).

Builds the site of `--first` scores folders with an empty cache folder (as a first run does: the
records are read, the explanations embedded), keeps that cache, then `--repeat` times builds the
site of `--rerun` from a copy of it. Each build runs in a fresh process, as a flow's task may (a
model that an earlier build loaded is not loaded already); reported per build and per unit: the
process's wall and CPU seconds (all its threads, imports included) and `build_seconds`, the wall
time inside `build_site` that the site itself records. Without `--first`, the first build is of `--rerun` too (a rebuild
with nothing changed). `--rerun` defaults to the latest run of `--layer` under `--out`. The sites
are left in `--work` (site-first, site-rerun) to compare with another commit's.

    PYTHONPATH=. python bench/view_rebuild_bench.py --out OUT --layer 15 --first OUT/scores/a OUT/scores/b ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BUILD = "import sys; from pathlib import Path; from autoexplain.view import build_site; " \
        "build_site([Path(d) for d in sys.argv[3:]], Path(sys.argv[1]), cache_dir=Path(sys.argv[2]))"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_build(scores: list[Path], site: Path, cache: Path) -> dict:
    wall, cpu = time.perf_counter(), _children_cpu()
    subprocess.run([sys.executable, "-c", BUILD, str(site), str(cache), *map(str, scores)], check=True)
    meta = json.loads((site / "data" / "site.js").read_text().split("]=", 1)[1].rstrip(";\n"))
    return {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(_children_cpu() - cpu, 2),
            "build_seconds": meta["build_seconds"], "load": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output root of a finished explain-layer run")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--first", nargs="*", default=None, help="scores folders of the first run (default: the rerun's)")
    ap.add_argument("--rerun", nargs="*", default=None, help="scores folders of the rerun (default: the latest run's)")
    ap.add_argument("--work", default="/tmp/view-rebuild-bench")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    run = json.loads((Path(args.out) / "runs" / f"layer_{args.layer}.json").read_text())
    rerun = [Path(d) for d in args.rerun] if args.rerun else [Path(s["path"]).parent for s in run["scores"]]
    first = [Path(d) for d in args.first] if args.first else rerun

    cache, kept = work / "cache", work / "cache-after-first"
    report = {"first": timed_build(first, work / "site-first", cache)}
    shutil.copytree(cache, kept)
    builds = []
    for _ in range(args.repeat):
        shutil.rmtree(cache)
        shutil.copytree(kept, cache)
        builds.append(timed_build(rerun, work / "site-rerun", cache))
    units = sum(1 for _ in (work / "site-rerun" / "data").rglob("u/*.js"))
    report["rerun"] = builds
    report["units"] = units
    report["rerun_median"] = {k: statistics.median(b[k] for b in builds) for k in ("wall_s", "cpu_s", "build_seconds")}
    report["rerun_ms_per_unit"] = {k: round(1000 * v / units, 2) for k, v in report["rerun_median"].items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
