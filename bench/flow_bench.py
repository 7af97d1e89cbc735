"""explain-layer (or explain-model) flow benchmark on the embedded default: wall time, per-stage
task time, orchestration overhead, and the rerun after a simulator-prompt edit. The flow is started
as the CLI starts it: `tasks.stages.warm_up` first, then the flow (wall times include both).

    python bench/flow_bench.py                      # the whole of layer 15 on the embedded defaults
    python bench/flow_bench.py --units 0-7 --explainer local --simulator all-at-once
    python bench/flow_bench.py --layers 0-29 --units 0-63   # explain-model: every layer, one recording pass

Orchestration overhead = the part of the flow's wall time during which no task was running (flow
start, scheduling, result handling between tasks), over the wall time. Task runs of different
shards overlap in Prefect's thread pool, so per-task times are summed over shards and can add up to
more than the wall time. The rerun edits a copy of the simulator's prompt file (AUTOEXPLAIN_PROMPTS; for the embedding
simulator its class descriptions) and runs the same flow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict

home = tempfile.mkdtemp(prefix="bench-prefect-")
os.environ.setdefault("PREFECT_HOME", home)
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", f"{home}/results")
os.environ.setdefault("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{home}/prefect.db")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def task_times(flow_run_id) -> tuple[dict[str, float], float]:
    """Summed run time per task name, and the time during which at least one task was running
    (the union of the task runs' intervals: shards run side by side in Prefect's thread pool)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs, page = [], 200  # the server answers at most a page of task runs a call: a model run has thousands
    with get_client(sync_client=True) as client:
        while True:
            got = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                        limit=page, offset=len(runs))
            runs += got
            if len(got) < page:
                break
    out: dict[str, float] = defaultdict(float)
    spans = []
    for r in runs:
        out[r.name.rsplit("-", 1)[0]] += r.total_run_time.total_seconds()
        if r.start_time and r.end_time:
            spans.append((r.start_time.timestamp(), r.end_time.timestamp()))
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return dict(out), busy


def run_once(**params):
    """One run of explain-model when `params` name `layers`, else of explain-layer."""
    from prefect.context import get_run_context  # noqa: F401
    from prefect import flow

    from autoexplain.counters import since, snapshot
    from autoexplain.flows.explain_layer import explain_layer
    from autoexplain.flows.explain_model import explain_model

    from autoexplain.tasks.stages import warm_up

    before = snapshot()
    t = time.perf_counter()
    warm_up(params["simulator"])  # as `autoexplain explain-layer` does before it starts the flow
    run = explain_model if "layers" in params else explain_layer
    state = run(**params, return_state=True)
    wall = time.perf_counter() - t
    state.result()
    times, busy = task_times(state.state_details.flow_run_id)
    return {"wall_s": round(wall, 1), "task_s_summed": {k: round(v, 1) for k, v in times.items()},
            "some_task_running_s": round(busy, 1),
            "orchestration_overhead_pct": round(100 * max(wall - busy, 0) / wall, 1), "calls": since(before)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", default=None, help="default: every unit of the layer")
    ap.add_argument("--layers", default=None, help="explain-model over these layers (e.g. 0-29), not explain-layer of layer 15")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--explainer", default="embedding")
    ap.add_argument("--simulator", default="embedding")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="bench-flow-out-"))
    ap.add_argument("--rerun-only", type=float, metavar="FULL_WALL_S",
                    help="skip the full run (its outputs are in --out, its Prefect home in $PREFECT_HOME) "
                         "and give its wall time for the fraction")
    ap.add_argument("--edit", default="a number, a year or a date written in digits",
                    help="the embedding simulator's new 'digit' description (a rerun of the same edit is cached)")
    args = ap.parse_args()
    where = dict(layers=args.layers) if args.layers else dict(layer=15)
    params = dict(**where, units=args.units, tokens=args.tokens, explainer=args.explainer,
                  simulator=args.simulator, k=args.k, shard_size=args.shard_size, out=args.out)
    if args.rerun_only:
        full = {"wall_s": args.rerun_only}
        print(f"PREFECT_HOME={os.environ['PREFECT_HOME']}", flush=True)
    else:
        full = run_once(**params)
        print(json.dumps({"full": full}, indent=2), flush=True)

    from autoexplain.explain import PACKAGE_PROMPTS

    prompts = tempfile.mkdtemp(prefix="bench-prompts-")
    shutil.copytree(PACKAGE_PROMPTS, prompts, dirs_exist_ok=True)
    if args.simulator.startswith("embedding"):
        path = os.path.join(prompts, "embedding_simulator.json")
        prompt = json.load(open(path))
        prompt["classes"]["digit"] = args.edit
        json.dump(prompt, open(path, "w"), indent=2)
    else:
        with open(os.path.join(prompts, "simulator_system.txt"), "a") as f:
            f.write(" Think about each token in its context.")
    os.environ["AUTOEXPLAIN_PROMPTS"] = prompts
    rerun = run_once(**params)
    rerun["fraction_of_full"] = round(rerun["wall_s"] / full["wall_s"], 3)
    print(json.dumps({"rerun_after_simulator_prompt_edit": rerun}, indent=2))


if __name__ == "__main__":
    main()
