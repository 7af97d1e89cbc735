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
from autoexplain.suite import FALSE_KINDS, pairwise_accuracy


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
    from autoexplain.suite import rule_records, score_rule, suite_rules

    windows = corpus_windows(n_windows=4000, seed=0)
    chosen = [r for r in suite_rules(half) if not rules or r.name in rules]
    records = {r.name: rule_records(windows, r, n_top=n_records, n_random=n_records) for r in chosen}
    out = {}
    for name in simulators:
        sim = make(name)
        t = time.perf_counter()
        per_rule = {r.name: {**score_rule(sim, r, records[r.name]), "half": r.half, "family": r.family} for r in chosen}
        seconds = time.perf_counter() - t
        out[name] = {"summary": summarise(list(per_rule.values()), seconds), "rules": per_rule}
    return out


FAMILIES = ("lexical", "semantic", "surface", "context")
COLUMNS = ["dev", "heldout", *FAMILIES, *(f"vs_{k}" for k in FALSE_KINDS), "mean_true", "seconds"]


def summarise(rows: list[dict], seconds: float) -> dict:
    """Pairwise accuracy per half, family and kind of false explanation, for simulators and classifier
    scorers alike: every column counts ties and undefined scores as `suite.pairwise_accuracy` does."""
    def mean(values):
        return round(float(np.mean(values)), 3) if values else None

    out = {"seconds": round(seconds, 1), "rules": len(rows)}
    for h in ("dev", "heldout"):
        out[h] = mean([r["accuracy"] for r in rows if r["half"] == h])
    for fam in FAMILIES:
        out[fam] = mean([r["accuracy"] for r in rows if r["family"] == fam])
    for kind in FALSE_KINDS:
        out[f"vs_{kind}"] = mean([pairwise_accuracy(r["true"], [r["false"][kind]]) for r in rows if kind in r["false"]])
    out["mean_true"] = round(float(np.nanmean([r["true"] for r in rows])), 3)
    return out


def print_table(label: str, summaries: dict[str, dict]) -> None:
    print(f"{label:12s} " + " ".join(f"{c:>11s}" for c in COLUMNS))
    for name, summary in summaries.items():
        print(f"{name:12s} " + " ".join(f"{str(summary[c]):>11s}" for c in COLUMNS))


def planted_means(simulators: list[str]) -> dict:
    from autoexplain.planted import corpus_windows, self_check

    windows = corpus_windows(n_windows=4000, seed=0)
    return {name: {split: round(self_check(make(name), windows, split=split)["mean_true"], 3) for split in ("valid", "test")}
            for name in simulators if name != "all-at-once"}


def _layer_units(tokens: int, n_units: int, layer: int = 15, records: str = ""):
    """Units 0..n_units-1 (both polarities) of a layer of the embedded SmolLM2, recorded over `tokens`
    tokens of the embedded corpus (or read from a records folder recorded so), with the subject."""
    import tempfile

    from autoexplain.layer import load_units
    from autoexplain.record import RecordConfig, build_windows, record_layers
    from autoexplain.subject import load_subject

    subject = load_subject()
    if not records:
        out = tempfile.mkdtemp(prefix="bench-suite-")
        windows = build_windows(subject, "default", out, 64, tokens, 0)
        records = str(record_layers(subject, windows, RecordConfig([layer]), out).directory)
    print("records:", records)
    return subject, load_units(records, layer, list(range(n_units)))


def layer_timing(units, repeats: int = 2) -> dict:
    """Seconds per unit of the simulate stage (best-of-k on valid, then calib/test and the controls)
    with the default embedding simulator before and after the relation channel, alternated in one
    process, each warmed up first; and the mean test score of each method under each."""
    from autoexplain import pipeline
    from autoexplain.registry import make_explainer

    explanations = pipeline.explain_stage(units, make_explainer("embedding"), pipeline.ExplainConfig(k=4))
    sims = {"before": make("before"), "default": make("default")}
    for sim in sims.values():
        sim.simulate("warm up", [[" a", " b"]])
    seconds = {k: [] for k in sims}
    scores = {}
    for rep in range(max(1, repeats)):
        for name, sim in (sims.items() if rep % 2 == 0 else reversed(sims.items())):  # alternate the order
            fresh = sim.fresh()  # empty caches: every repeat embeds its windows again
            t = time.perf_counter()
            chosen, simulated = pipeline.simulate_stage(units, explanations, fresh)
            seconds[name].append((time.perf_counter() - t) / len(units))
            rows = pipeline.score_stage(units, simulated, chosen, n_boot=10).to_pylist()
            scores[name] = {m: round(float(np.mean([r["value"] for r in rows if r["method"] == m
                                                    and r["metric"] == "top_and_random" and r["value"] is not None])), 3)
                            for m in ("explainer", "token-lookup", "shuffled")}
    per_unit = {k: round(min(v), 3) for k, v in seconds.items()}
    return {"units": len(units), "s_per_unit": per_unit, "ratio": round(per_unit["default"] / per_unit["before"], 2),
            "test_top_and_random": scores, "chosen": chosen}


def micro_timing(rounds: int = 6, n_units: int = 10) -> dict:
    """Seconds per unit of `simulate_many` alone, before and after, alternated `rounds` times in one
    process, the windows' words already embedded (a layer's word table): each unit is 4 candidates in the embedding explainer's phrasings on 20
    windows of the embedded corpus (the minimum over rounds)."""
    from autoexplain.planted import corpus_windows

    windows = corpus_windows(n_windows=20 * n_units, seed=1)
    words = ["water", "king", "gold", "said", "three", "Israel", "light", "house", "death", "people"]
    units = [(windows[20 * i : 20 * i + 20],
              [f'the words "{words[i % 10]}", "{words[(i + 1) % 10]}" and "{words[(i + 2) % 10]}"',
               f"words related to {words[i % 10]}, {words[(i + 3) % 10]}",
               f'"{words[i % 10]}" and other words related to {words[(i + 4) % 10]}', "numbers written in digits"])
             for i in range(n_units)]
    sims = {"before": make("before"), "default": make("default")}
    for sim in sims.values():  # every word of the windows embedded once, as a layer's word table gives them
        for recs, texts in units:
            sim.simulate_many(texts, recs)
    seconds = {k: [] for k in sims}
    for rep in range(rounds):
        for name, sim in (sims.items() if rep % 2 == 0 else reversed(sims.items())):
            sim._explained.clear()  # each unit's explanations are new to the simulator, as in a stage
            sim._scaled.clear()
            t = time.perf_counter()
            for recs, texts in units:
                sim.simulate_many(texts, recs)
            seconds[name].append((time.perf_counter() - t) / n_units)
    best = {k: round(min(v), 4) for k, v in seconds.items()}
    return {"s_per_unit_min": best, "ratio": round(best["default"] / best["before"], 3),
            "all": {k: [round(x, 4) for x in v] for k, v in seconds.items()}}


def independence(subject, units, chosen, n_records: int) -> dict:
    """The default pipeline's chosen explanations (and its baselines) scored on the same test records
    by the default embedding simulator and by the all-at-once SmolLM2 simulator, which shares no
    embedder, prompt or code path with the embedding explainer."""
    from autoexplain.llm_local import LocalLLM
    from autoexplain.scoring import UndefinedMetric, correlation
    from autoexplain.simulate import AllAtOnceSimulator

    from autoexplain.rows import ExplanationRow, from_table

    texts = {}
    for r in from_table(ExplanationRow, chosen):
        texts.setdefault(r.unit, {})[r.method] = r.text
    simulators = {"embedding (default)": make("default"), "all-at-once SmolLM2": AllAtOnceSimulator(LocalLLM(subject=subject))}
    out = {name: {m: [] for m in ("explainer", "token-lookup", "shuffled")} for name in simulators}
    seconds = dict.fromkeys(simulators, 0.0)
    for unit in units:
        test = [r for r in unit.records if r.split == "test"]
        records = [r for r in test if r.kind == "top"][: n_records // 2] + [r for r in test if r.kind == "random"][: n_records // 2]
        methods = [m for m in out["embedding (default)"] if texts.get(unit.id, {}).get(m)]
        for name, sim in simulators.items():
            t = time.perf_counter()
            batches = sim.simulate_many([texts[unit.id][m] for m in methods], [r.tokens for r in records])
            seconds[name] += time.perf_counter() - t
            for m, simulations in zip(methods, batches):
                try:
                    ok = all(s.ok for s in simulations)
                    value = correlation([r.activations for r in records], [s.expected for s in simulations]) if ok else None
                except UndefinedMetric:
                    value = None
                out[name][m].append(value)
    summary = {name: {m: {"mean": round(float(np.mean([v for v in vals if v is not None])), 3) if any(v is not None for v in vals) else None,
                          "defined": sum(v is not None for v in vals)} for m, vals in methods_.items()}
               for name, methods_ in out.items()}
    ranks = {}
    try:
        from scipy.stats import spearmanr

        a, b = out["embedding (default)"]["explainer"], out["all-at-once SmolLM2"]["explainer"]
        pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        ranks["spearman_explainer_scores"] = round(float(spearmanr(*zip(*pairs)).statistic), 3) if len(pairs) > 2 else None
    except ImportError:
        pass
    return {"units": len(units), "records_per_unit": n_records, "summary": summary, **ranks,
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--simulators", default="default,before,naive")
    p.add_argument("--half", choices=["dev", "heldout"], default=None)
    p.add_argument("--records", type=int, default=24, help="top windows per rule (and as many random)")
    p.add_argument("--rules", default="", help="comma-separated rule names (default: all of the half)")
    p.add_argument("--per-rule", action="store_true")
    p.add_argument("--no-planted", action="store_true")
    p.add_argument("--json", default="")
    p.add_argument("--layer", action="store_true", help="time per unit on a layer, and the independence check")
    p.add_argument("--tokens", type=int, default=40_000)
    p.add_argument("--units", type=int, default=16, help="unit indices (x2 polarities)")
    p.add_argument("--independence-records", type=int, default=10, help="test records per unit for SmolLM2; 0: skip")
    p.add_argument("--repeats", type=int, default=2, help="timing repeats per simulator")
    p.add_argument("--records-dir", default="", help="a records folder recorded before (skips recording)")
    p.add_argument("--micro-timing", action="store_true", help="simulate_many alone, before vs now, alternated")
    args = p.parse_args()
    if args.micro_timing:
        print(json.dumps(micro_timing()))
        return
    if args.layer:
        subject, units = _layer_units(args.tokens, args.units, records=args.records_dir)
        timing = layer_timing(units, args.repeats)
        chosen = timing.pop("chosen")
        print("layer 15, simulate stage:", json.dumps(timing))
        result = {"layer": timing}
        if args.independence_records:
            result["independence"] = independence(subject, units, chosen, args.independence_records)
            print("independence:", json.dumps(result["independence"], indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=float)
        return
    sims = [s for s in args.simulators.split(",") if s]
    result = {"suite": suite_table(sims, args.half, args.records, [r for r in args.rules.split(",") if r])}
    if not args.no_planted:
        result["planted_mean_true"] = planted_means(sims)
    print_table("simulator", {name: r["summary"] for name, r in result["suite"].items()})
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
