"""The held-out suite of synthetic neurons (`autoexplain.suite`): pairwise accuracy of each offline
simulator, per half, rule family and kind of false explanation; and the planted suite's true-rule mean.

    python bench/suite_bench.py                       # default simulator, its predecessor, the naive baseline
    python bench/suite_bench.py --half dev            # tune on this half only
    python bench/suite_bench.py --simulators all-at-once --half heldout --records 8   # SmolLM2 (slow)

Each rule is scored on its calib + valid + test records (never train) built from 4,000 windows of the
embedded corpus, as planted units are (`--records` top windows and as many random ones, 3/4 of the
top ones and all random ones scored).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from autoexplain.components import Simulator
from autoexplain.records import Simulation


class NaiveContextSimilarity(Simulator):
    """The naive baseline: MiniLM cosine between the explanation and each token with two tokens of
    context either side. No scale, no channels; batches are not fixed (bench only)."""

    kind = "naive-context"

    def __init__(self, context: int = 2):
        from sentence_transformers import SentenceTransformer

        from autoexplain import defaults

        self.name = f"naive-context:{context}"
        self.context = context
        self.model = SentenceTransformer(str(defaults.embedder_path()), device="cpu")
        self.cache: dict[str, np.ndarray] = {}

    def _vectors(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            vecs = self.model.encode(new, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
            self.cache.update(zip(new, vecs))
        return np.stack([self.cache[t] for t in texts])

    def simulate(self, explanation, records):
        return self.simulate_many([explanation], records)[0]

    def simulate_many(self, explanations, records):
        k = self.context
        texts = ["".join(r[max(0, i - k) : i + k + 1]).strip() or "." for r in records for i in range(len(r))]
        cos = self._vectors(texts) @ self._vectors(list(explanations)).T  # (tokens, U)
        ends = np.cumsum([len(r) for r in records]).tolist()
        starts = [0, *ends[:-1]]
        return [[Simulation(expected=cos[s:e, u].tolist()) for s, e in zip(starts, ends)] for u in range(len(explanations))]


def make(name: str):
    from autoexplain.embedding import EmbeddingSimulator

    if name == "default":
        return EmbeddingSimulator()
    if name == "before":  # the default as it was before the suite: no relation channel
        return EmbeddingSimulator(relations=False)
    if name == "naive":
        return NaiveContextSimilarity()
    if name == "all-at-once":
        from autoexplain.registry import make_simulator

        return make_simulator("all-at-once")
    raise SystemExit(f"unknown simulator {name!r}: use default, before, naive or all-at-once")


def suite_table(simulators: list[str], half: str | None, n_records: int, rules: list[str] | None = None) -> dict:
    from autoexplain.planted import corpus_windows
    from autoexplain.suite import FALSE_KINDS, rule_records, score_rule, suite_rules

    windows = corpus_windows(n_windows=4000, seed=0)
    chosen = [r for r in suite_rules(half) if not rules or r.name in rules]
    records = {r.name: rule_records(windows, r, n_top=n_records, n_random=n_records) for r in chosen}
    out = {}
    for name in simulators:
        sim = make(name)
        t = time.perf_counter()
        per_rule = {r.name: {**score_rule(sim, r, records[r.name]), "half": r.half, "family": r.family} for r in chosen}
        seconds = time.perf_counter() - t

        def mean(rows, key="accuracy"):
            return round(float(np.mean([row[key] for row in rows])), 3) if rows else None

        rows = list(per_rule.values())
        summary = {"seconds": round(seconds, 1), "rules": len(rows)}
        for h in ("dev", "heldout"):
            summary[h] = mean([r for r in rows if r["half"] == h])
        for fam in ("lexical", "semantic", "surface", "context"):
            summary[fam] = mean([r for r in rows if r["family"] == fam])
        for kind in FALSE_KINDS:
            wins = [float(r["true"] > r["false"][kind]) if np.isfinite(r["false"][kind]) else float(np.isfinite(r["true"]))
                    for r in rows if kind in r["false"] and np.isfinite(r["true"])]
            summary[f"vs_{kind}"] = round(float(np.mean(wins)), 3) if wins else None
        summary["mean_true"] = round(float(np.nanmean([r["true"] for r in rows])), 3)
        out[name] = {"summary": summary, "rules": per_rule}
    return out


def planted_means(simulators: list[str]) -> dict:
    from autoexplain.planted import corpus_windows, self_check

    windows = corpus_windows(n_windows=4000, seed=0)
    return {name: {split: round(self_check(make(name), windows, split=split)["mean_true"], 3) for split in ("valid", "test")}
            for name in simulators if name != "all-at-once"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--simulators", default="default,before,naive")
    p.add_argument("--half", choices=["dev", "heldout"], default=None)
    p.add_argument("--records", type=int, default=24, help="top windows per rule (and as many random)")
    p.add_argument("--rules", default="", help="comma-separated rule names (default: all of the half)")
    p.add_argument("--per-rule", action="store_true")
    p.add_argument("--no-planted", action="store_true")
    p.add_argument("--json", default="")
    args = p.parse_args()
    sims = [s for s in args.simulators.split(",") if s]
    result = {"suite": suite_table(sims, args.half, args.records, [r for r in args.rules.split(",") if r])}
    if not args.no_planted:
        result["planted_mean_true"] = planted_means(sims)
    cols = ["dev", "heldout", "lexical", "semantic", "surface", "context", "vs_list", "vs_category", "vs_context",
            "vs_surface", "mean_true", "seconds"]
    print(f"{'simulator':12s} " + " ".join(f"{c:>11s}" for c in cols))
    for name, r in result["suite"].items():
        print(f"{name:12s} " + " ".join(f"{str(r['summary'][c]):>11s}" for c in cols))
    if args.per_rule:
        for name, r in result["suite"].items():
            print(f"\n{name}")
            for rule, row in r["rules"].items():
                f = " ".join(f"{k}={v:.2f}" for k, v in row["false"].items())
                print(f"  {rule:20s} {row['half']:8s} acc={row['accuracy']:.2f} true={row['true']:.2f} {f}")
    if "planted_mean_true" in result:
        print("planted suite, mean true-rule correlation:", json.dumps(result["planted_mean_true"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
    main()
