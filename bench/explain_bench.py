"""Explain / simulate / score benchmark on the embedded default, and the planted-neuron self-check.

    python bench/explain_bench.py --units 4          # per-unit stage costs (units x 2 polarities)
    python bench/explain_bench.py --allatonce        # prefix-cached batch vs one pass per record
    python bench/explain_bench.py --planted          # planted neurons: true vs shuffled rule

Per-unit costs use layer 15 of SmolLM2 recorded over 200k tokens of the embedded corpus.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def _records(tokens: int = 200_000):
    from autoexplain.record import RecordConfig, build_windows, record_layers
    from autoexplain.subject import load_subject

    out = tempfile.mkdtemp(prefix="bench-explain-")
    subject = load_subject()
    windows = build_windows(subject, "default", out, 64, tokens, 0)
    return subject, record_layers(subject, windows, RecordConfig([15]), out), out


def stage_costs(n_units: int, k: int) -> dict:
    from autoexplain import pipeline
    from autoexplain.embedding import EmbeddingSimulator
    from autoexplain.layer import load_units
    from autoexplain.llm_local import LocalLLM

    subject, ref, _ = _records()
    units = load_units(ref.directory, 15, list(range(n_units)))
    llm = LocalLLM(subject=subject)
    sim = EmbeddingSimulator()
    sim.simulate("warm up", [["a", "b"]])

    with llm.track() as usage:
        t = time.perf_counter()
        explanations = pipeline.explain_stage(units, llm, pipeline.ExplainConfig(k=k))
        explain_s = time.perf_counter() - t
    t = time.perf_counter()
    chosen, sims = pipeline.simulate_stage(units, explanations, sim)
    simulate_s = time.perf_counter() - t
    t = time.perf_counter()
    scores = pipeline.score_stage(units, sims, chosen, n_boot=1000)
    score_s = time.perf_counter() - t
    n = len(units)
    llm_scores = [r["value"] for r in scores.to_pylist() if r["metric"] == "top_and_random" and r["method"] == "explainer"]
    return {
        "units": n, "k": k,
        "explain_s_per_unit": round(explain_s / n, 2),
        "explainer_prompt_tokens_per_unit": round(usage.prompt_tokens / n),
        "explainer_completion_tokens_per_unit": round(usage.completion_tokens / n),
        "simulate_s_per_unit": round(simulate_s / n, 3),
        "simulator_llm_tokens_per_unit": 0,
        "score_s_per_unit": round(score_s / n, 3),
        "mean_llm_top_and_random": round(sum(v for v in llm_scores if v is not None) / max(1, len(llm_scores)), 3),
        "example_explanations": [r["text"] for r in chosen.to_pylist() if r["method"] == "explainer"][:4],
    }


def allatonce(n_records: int = 20, repeats: int = 2) -> dict:
    from autoexplain.simulate import AllAtOnceSimulator

    subject, ref, _ = _records(60_000)
    from autoexplain.layer import load_units

    unit = load_units(ref.directory, 15, [0])[0]
    records = [r.tokens for r in unit.records[:n_records]]
    fast = AllAtOnceSimulator(subject, batch_size=n_records)
    slow = AllAtOnceSimulator(subject, batch_size=1, reuse_prefix=False)
    fast.simulate("warm up", records[:2])
    times = {}
    for name, sim in (("batched_prefix_cached", fast), ("one_pass_per_record", slow)):
        t = time.perf_counter()
        for _ in range(repeats):
            sim.simulate("words about God and the Lord", records)
        times[name] = (time.perf_counter() - t) / repeats
    return {"records": len(records), **{f"{k}_s": round(v, 2) for k, v in times.items()},
            "speedup": round(times["one_pass_per_record"] / times["batched_prefix_cached"], 1)}


def planted() -> dict:
    from autoexplain.embedding import EmbeddingSimulator
    from autoexplain.planted import self_check

    result = {}
    for split in ("valid", "test"):
        r = self_check(EmbeddingSimulator(), split=split)
        result[split] = {"mean_true": round(r["mean_true"], 3), "mean_shuffled": round(r["mean_shuffled"], 3),
                         "per_unit": {k: (round(v["true"], 3), round(v["shuffled"], 3))
                                      for k, v in r["units"].items()}}
    return result


def planted_explainer(k: int = 2, spec: str = "local") -> dict:
    """Does the explainer recover a planted rule? Its best-of-k explanation (chosen on valid) scored
    on test, against the true rule's score on the same records."""
    from autoexplain import scoring
    from autoexplain.embedding import EmbeddingSimulator
    from autoexplain.explain import LLMExplainer
    from autoexplain.llm_local import LocalLLM
    from autoexplain.registry import make_explainer
    from autoexplain.pipeline import shown_records
    from autoexplain.planted import corpus_windows, planted_records, planted_units
    from autoexplain.records import UnitId, UnitRecords

    explainer, sim = make_explainer(spec), EmbeddingSimulator()
    # A local LLM explainer's model is the subject too: its windows need no second load.
    local = isinstance(explainer, LLMExplainer) and isinstance(explainer.model, LocalLLM)
    windows = corpus_windows(subject=explainer.model.subject if local else None)

    def corr(text, recs):
        sims = sim.simulate(text, [r.tokens for r in recs])
        try:
            return scoring.correlation([r.activations for r in recs], [x.expected for x in sims])
        except scoring.UndefinedMetric:
            return float("nan")

    out = {}
    for unit in planted_units():
        records = planted_records(windows, unit)
        shown = shown_records(UnitRecords(UnitId.mlp(0, 0), records), 5)
        valid = [r for r in records if r.split == "valid"]
        test = [r for r in records if r.split == "test"]
        candidates = explainer.explain_records([shown], k)[0].candidates
        if isinstance(explainer, LLMExplainer):
            candidates = candidates or [""]
        best = max(candidates, key=lambda c: corr(c, valid))
        out[unit.name] = {"explanation": best, "score": round(corr(best, test), 3),
                          "true_rule_score": round(corr(unit.explanation, test), 3)}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=0)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--allatonce", action="store_true")
    ap.add_argument("--planted", action="store_true")
    ap.add_argument("--planted-explainer", action="store_true")
    ap.add_argument("--explainer", default="local", help="explainer spec for --planted-explainer")
    args = ap.parse_args()
    if args.units:
        print(json.dumps(stage_costs(args.units, args.k), indent=2))
    if args.allatonce:
        print(json.dumps(allatonce(), indent=2))
    if args.planted:
        print(json.dumps(planted(), indent=2))
    if args.planted_explainer:
        print(json.dumps(planted_explainer(args.k, args.explainer), indent=2))


if __name__ == "__main__":
    main()
