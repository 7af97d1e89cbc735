"""LLM judges on a sample of a finished layer: the classifier scorers asked through a server, next to
the run's own simulation scores (issue 15, items 3 and 5).

    python bench/judge_bench.py --run OUT/runs/layer_15.json --units 24 \\
        --scorers detection:openai:M@URL,fuzzing:openai:M@URL,intruder:openai:M@URL \\
        --baselines detection --save /tmp/judge

It finds the run's simulations made with the simulator prompt the code ships now (a run whose
prompt was edited afterwards keeps both in its store), samples units (a seeded draw among those
with a defined simulation score), and asks each scorer about each sampled unit's test windows with
random negatives. Scorers named in --baselines also score the token-lookup baseline and the
shuffled control, which is the independence check: a judge that shares nothing with the embedding
explainer. It prints the mean per method with a 95 % bootstrap CI over units, the Spearman rho
between instruments (simulation = the run's top-and-random correlation), and each scorer's
seconds, tokens and failed trials per unit; --save writes the per-unit table and a scatter plot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl

BASELINES = ("token-lookup", "shuffled")


def shipped_outputs(run: dict) -> tuple[list[Path], list[Path]]:
    """The run's simulations and scores folders made with today's simulator prompt."""
    from autoexplain.layout import MANIFEST
    from autoexplain.registry import make_simulator
    from autoexplain.storage import read_manifest

    out = Path(run["records"]["path"]).parents[1]
    prompt = make_simulator(run["params"]["simulator"]).prompt_hash
    wanted = {str(Path(e["path"]).parent) for e in run["explanations"]}
    manifests = {d: read_manifest(d) for stage in ("simulations", "scores")
                 for d in (out / stage).iterdir() if (d / MANIFEST).is_file()}
    sims = [d for d, m in manifests.items() if m["stage"] == "simulations" and m["params"]["prompt"] == prompt
            and m["inputs"]["explanations"] in wanted and m["params"]["layer"] == run["params"]["layer"]]
    scores = [d for d, m in manifests.items() if m["stage"] == "scores"
              and m["inputs"].get("simulations") in {str(s) for s in sims}]
    if len(sims) != len(wanted) or len(scores) != len(sims):
        raise SystemExit(f"found {len(sims)} simulations and {len(scores)} scores for {len(wanted)} explanation "
                         f"shards with simulator prompt {prompt}: rerun the layer with the code as it is")
    return sims, scores


def mean_ci(values: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return float(v.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="OUT/runs/layer_L.json of a finished explain-layer/explain-model run")
    ap.add_argument("--units", type=int, default=24, help="units (a neuron and a polarity) to sample")
    ap.add_argument("--scorers", required=True)
    ap.add_argument("--baselines", default="detection", help="scorer kinds that also score the baselines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--save", default="")
    a = ap.parse_args()

    from autoexplain.agreement import HEADLINE, agreement, scatter
    from autoexplain.classify import Trial
    from autoexplain.classify_metrics import metrics
    from autoexplain.classify_stage import classify_unit
    from autoexplain.layer import load_units
    from autoexplain.registry import make_scorer

    run = json.loads(Path(a.run).read_text())
    layer = run["params"]["layer"]
    sims, scores = shipped_outputs(run)
    texts: dict[tuple[int, int], dict[str, str]] = {}
    for d in sims:
        for r in pl.read_parquet(d / "chosen.parquet").iter_rows(named=True):
            texts.setdefault((r["unit"], r["polarity"]), {})[r["method"]] = r["text"]
    sim = (pl.concat([pl.read_parquet(d / f"layer_{layer}.parquet") for d in scores], how="vertical_relaxed")
           .filter((pl.col("metric") == HEADLINE["simulation"]) & pl.col("value").is_not_null()))
    defined = sim.filter(pl.col("method") == "explainer").sort("unit", "polarity")
    pick = np.random.default_rng(a.seed).choice(defined.height, size=min(a.units, defined.height), replace=False)
    picked = sorted((defined["unit"][int(i)], defined["polarity"][int(i)]) for i in pick)
    units = [u for u in load_units(run["records"]["path"], layer, sorted({i for i, _ in picked}))
             if (u.id.index, u.id.polarity) in set(picked)]
    print(f"layer {layer}: {len(units)} units sampled (seed {a.seed}) from {defined.height} with a simulation score")

    values: dict[tuple[str, str], dict[tuple[int, int], float | None]] = {}
    for (method,), g in sim.group_by(["method"]):
        values[("simulation", method)] = {(r["unit"], r["polarity"]): r["value"] for r in g.iter_rows(named=True)}
    cost = {}
    for spec in a.scorers.split(","):
        scorer = make_scorer(spec)
        kind = spec.partition(":")[0]
        methods = ("explainer", *BASELINES) if kind in a.baselines.split(",") else ("explainer",)
        started, tokens, failed, trials = time.perf_counter(), 0, 0, 0
        for unit in units:
            key = (unit.id.index, unit.id.polarity)
            rows = classify_unit(unit, {m: texts[key][m] for m in methods}, scorer, None, a.seed)
            tokens += sum(r["tokens"] for r in rows)
            failed += sum(r["failure"] is not None for r in rows)
            trials += len(rows)
            for method in methods:
                mine = [Trial.of_row(r) for r in rows if r["method"] == method]
                got = metrics(scorer.metric, mine, a.n_boot, a.seed, scorer.metric_prefix).get(HEADLINE[kind])
                values.setdefault((kind, method), {})[key] = None if got is None else got.value
            print(spec.split("@")[0], key, {m: values[(kind, m)][key] for m in methods}, flush=True)
        cost[kind] = ((time.perf_counter() - started) / len(units), tokens / len(units), failed, trials)

    keys = [(u.id.index, u.id.polarity) for u in units]
    instruments = sorted({k for k, _ in values}, key=list(HEADLINE).index)
    print("\n| instrument | method | mean over units [95 % CI] | units defined |\n|---|---|---|---|")
    for kind in instruments:
        for method in ("explainer", *BASELINES):
            got = [values.get((kind, method), {}).get(k) for k in keys]
            got = [v for v in got if v is not None]
            if got and (kind == "simulation" or (kind, method) in values):
                m, lo, hi = mean_ci(got)
                print(f"| {kind} | {method} | {m:.3f} [{lo:.3f}, {hi:.3f}] | {len(got)} |")
    table = pl.DataFrame({"layer": [layer] * len(keys), "unit": [k[0] for k in keys], "polarity": [k[1] for k in keys],
                          **{kind: [values[(kind, "explainer")].get(k) for k in keys] for kind in instruments}},
                         schema_overrides={kind: pl.Float64 for kind in instruments})
    print("\n| instruments | Spearman rho | units |\n|---|---|---|")
    for x, y, rho, n in agreement(table):
        print(f"| {x} vs {y} | {'n/a' if rho is None else f'{rho:.3f}'} | {n} |")
    print("\n| scorer | seconds per unit | tokens per unit | failed trials |\n|---|---|---|---|")
    for kind, (s, t, f, n) in cost.items():
        print(f"| {kind} | {s:.1f} | {t:,.0f} | {f} of {n} |")
    if a.save:
        Path(a.save).mkdir(parents=True, exist_ok=True)
        table.write_parquet(Path(a.save) / "per_unit.parquet")
        print("scatter plot:", scatter(table, Path(a.save) / "agreement.png"))


if __name__ == "__main__":
    main()
