"""CPU seconds of a rerun after a simulator-prompt edit: simulate + score of one explanations output
(one shard), in a warm process, each rerun after a fresh edit of the embedding simulator's class
descriptions (so the per-unit memos miss, as after a real edit). Run it from two checkouts
alternately (PYTHONPATH=<checkout>) on copies of the same explain-layer output to compare commits.

    python bench/rerun_cost_bench.py --out /tmp/rs/fb2 --explanations KEY --tag a1 [--reps 2] [--profile F]

Every rerun's edit string is `<tag>-<rep>`: use a new tag per call (a seen edit is answered by the
memo). The first rerun warms the process (model, word table, text vectors) and is not counted; each
later one prints its CPU and wall seconds and the folders it wrote (for `rerun_equal.py`).

With `--edit TEXT`, the first run is on the prompt as shipped (printed too: at a new commit its
memos miss, so it is the shard's full run at that commit) and the rerun sets the description to
TEXT, as `flow_bench.py` does on the whole model (to time it again at the same commit, remove that
rerun's simulations and scores folders first: the memos still hold the other units' results). Each
run's simulator is a set-up twin, as a flow's shard gets it.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def edit_prompt(folder: str, text: str) -> None:
    path = os.path.join(folder, "embedding_simulator.json")
    with open(path) as f:
        prompt = json.load(f)
    prompt["classes"]["digit"] = text
    with open(path, "w") as f:
        json.dump(prompt, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="an explain-layer output folder (a copy: this writes into it)")
    ap.add_argument("--explanations", required=True, help="the key of one explanations output in it")
    ap.add_argument("--records", help="its records folder (default: the one under --out/records)")
    ap.add_argument("--tag", required=True, help="a new string per call: the edits are <tag>-<rep>")
    ap.add_argument("--reps", type=int, default=2, help="reruns, the first untimed")
    ap.add_argument("--profile", help="write a cProfile of the last rerun here")
    ap.add_argument("--edit", help="the timed rerun's 'digit' description (with --reps 2)")
    a = ap.parse_args()
    prompts = tempfile.mkdtemp(prefix="rerun-prompts-")
    from autoexplain.explain import PACKAGE_PROMPTS

    shutil.copytree(PACKAGE_PROMPTS, prompts, dirs_exist_ok=True)
    os.environ["AUTOEXPLAIN_PROMPTS"] = prompts
    from autoexplain import layer as L
    from autoexplain.counters import since, snapshot
    from autoexplain.registry import make_simulator

    out = Path(a.out)
    ex = L.StageRef.of(out / "explanations" / a.explanations)
    # the copy's own records (its manifests name the folder it was copied from)
    records = Path(a.records) if a.records else next((out / "records").iterdir())
    L.load_units(records, ex.layer, [0])
    for rep in range(a.reps):
        if a.edit is None or rep:
            edit_prompt(prompts, a.edit if a.edit else f"{a.tag}-{rep}")
        # As a flow's shard gets it: a twin of the run's simulator, which has loaded its model and
        # the corpus's word table (`tasks.stages`).
        shared = make_simulator(None)
        L.use_word_table(records, out, shared)
        shared.warm([""])  # its model's once-a-process check (`wordvecs._batch_safe`)
        sim = shared.fresh()
        prof = cProfile.Profile() if a.profile and rep == a.reps - 1 else None
        t0, c0, counted = time.time(), time.process_time(), snapshot()
        if prof:
            prof.enable()
        s = L.run_simulate(records, ex, out, sim=sim)
        t1, c1 = time.time(), time.process_time()
        sc = L.run_score(records, s, out)
        t2, c2 = time.time(), time.process_time()
        if prof:
            prof.disable()
            prof.dump_stats(a.profile)
        if rep or a.edit:  # with --edit, the first run is the full run at this commit (memos of another miss)
            n = 2 * len(json.loads((ex.directory / "manifest.json").read_text())["params"]["units"])
            edit = (a.edit if rep else "as shipped") if a.edit else f"{a.tag}-{rep}"
            print(json.dumps({"edit": edit, "units": n, "load": os.getloadavg()[0],
                              "simulate_cpu_s": round(c1 - c0, 2), "score_cpu_s": round(c2 - c1, 2),
                              "simulate_wall_s": round(t1 - t0, 2), "score_wall_s": round(t2 - t1, 2),
                              "cpu_ms_per_unit": round(1000 * (c2 - c0) / n, 2), "counts": since(counted),
                              "simulations": str(s.directory), "scores": str(sc.directory)}), flush=True)


if __name__ == "__main__":
    main()
