"""The viewer's rebuild after a rerun: the time to build a layer's site again when its scores and
simulations changed and its records and windows did not (a simulator-prompt edit: the explanations
are the same, but best-of-k picks a few units' explanations anew, as the simulator scores them).

Builds the site of `--first` scores folders with an empty cache folder (as a first run does: the
records are read, the explanations embedded), keeps that cache, then `--repeat` times builds the
site of `--rerun` from a copy of it. Without `--first`, the first build is of `--rerun` too (a
rebuild with nothing changed); `--rerun` defaults to the latest run of `--layer` under `--out`.

Each build runs in a process of its own, in two ways: a bare one ("fresh") and one that has
imported what a flow's process holds after an embedding simulator ran ("imported": torch,
sentence-transformers, matplotlib; seconds on two cores). Reported per build and per unit: the
wall and CPU seconds of `build_site` (CPU of all the process's threads) and of the whole process.
The sites are left in `--work` (site-first, site-rerun) to compare with another commit's.

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

BUILD = ("import json, sys, time; from pathlib import Path; from autoexplain.view import build_site; "
         "w, c = time.perf_counter(), time.process_time(); "
         "build_site([Path(d) for d in sys.argv[3:]], Path(sys.argv[1]), cache_dir=Path(sys.argv[2])); "
         "print(json.dumps({'build_wall_s': round(time.perf_counter() - w, 2), 'build_cpu_s': round(time.process_time() - c, 2)}))")
# What a flow's process has imported by the time its view task runs, when its simulator was the
# embedding one: the embedder's libraries and the plots'. Their import is seconds on two cores.
IMPORTED = "import torch, sentence_transformers, matplotlib.pyplot; "


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_build(scores: list[Path], site: Path, cache: Path, imported: bool = False) -> dict:
    wall, cpu = time.perf_counter(), _children_cpu()
    code = (IMPORTED if imported else "") + BUILD
    done = subprocess.run([sys.executable, "-c", code, str(site), str(cache), *map(str, scores)], check=True,
                          stdout=subprocess.PIPE, text=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_wall_s": round(time.perf_counter() - wall, 2),
            "process_cpu_s": round(_children_cpu() - cpu, 2), "load": round(os.getloadavg()[0], 2)}


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
    from autoexplain.storage import read_run

    run = read_run(Path(args.out), args.layer)
    rerun = [Path(d) for d in args.rerun] if args.rerun else [Path(s["path"]).parent for s in run["scores"]]
    first = [Path(d) for d in args.first] if args.first else rerun

    cache, kept = work / "cache", work / "cache-after-first"
    report = {"first": timed_build(first, work / "site-first", cache)}
    shutil.copytree(cache, kept)
    builds = {"fresh": [], "imported": []}
    for _ in range(args.repeat):
        for mode, runs in builds.items():
            shutil.rmtree(cache)
            shutil.copytree(kept, cache)
            runs.append(timed_build(rerun, work / "site-rerun", cache, imported=mode == "imported"))
    units = sum(1 for _ in (work / "site-rerun" / "data").rglob("u/*.js"))
    report["units"] = units
    for mode, runs in builds.items():
        median = {k: statistics.median(b[k] for b in runs) for k in ("build_wall_s", "build_cpu_s", "process_wall_s", "process_cpu_s")}
        report[f"rerun_{mode}"] = {"builds": runs, "median": median,
                                   "ms_per_unit": {k: round(1000 * v / units, 2) for k, v in median.items()}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
