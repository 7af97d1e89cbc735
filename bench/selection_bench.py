"""Does successive halving pick the candidate that full evaluation picks? (issue 13, item 6)

Best-of-k chooses on the valid split. `halving` (`autoexplain.best_of_k`) simulates fewer
(candidate, record) pairs; this measures, per unit, whether it picks the same candidate as `full`,
and what the pick scores on the test split either way. The simulator is the embedding one (offline,
deterministic), so the only difference between the two columns is the selection.

- planted units (`autoexplain.planted`): candidates are the embedding explainer's k - 1 best plus
  the true rule, in a fixed shuffled order;
- a real layer: layer 15 of the embedded SmolLM2 recorded over `--tokens` of the embedded corpus,
  the embedding explainer's k candidates for the first `--units` units (both polarities).

    python bench/selection_bench.py --units 300 --tokens 200000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compare(units_candidates, sim) -> dict:
    """units_candidates: [(records, candidates)]. Same pick rate, simulations spent, and the test
    correlation of the picks."""
    from autoexplain.best_of_k import choose, correlation

    def simulate_many(texts, recs):
        spent[0] += len(texts) * len(recs)
        return sim.simulate_many(texts, [r.tokens for r in recs])

    same, spent_by, test_by, n = 0, {"full": 0, "halving": 0}, {"full": [], "halving": []}, 0
    for records, candidates in units_candidates:
        valid = [r for r in records if r.split == "valid" and r.kind in ("top", "random")]
        test = [r for r in records if r.split == "test" and r.kind in ("top", "random")]
        picks = {}
        for selection in ("full", "halving"):
            spent = [0]
            picks[selection] = choose(candidates, valid, simulate_many, selection).index
            spent_by[selection] += spent[0]
            score = correlation(test, sim.simulate(candidates[picks[selection]], [r.tokens for r in test]))
            test_by[selection].append(score if score != float("-inf") else 0.0)
        same += picks["full"] == picks["halving"]
        n += 1
    return {"units": n, "same_pick": round(same / n, 3),
            "simulations_per_unit": {s: round(v / n, 1) for s, v in spent_by.items()},
            "mean_test_correlation_of_pick": {s: round(sum(v) / n, 4) for s, v in test_by.items()}}


def planted(k: int, explainer, sim) -> dict:
    from autoexplain.pipeline import shown_records
    from autoexplain.planted import corpus_windows, planted_records, planted_units
    from autoexplain.records import UnitId, UnitRecords

    windows = corpus_windows()
    rng = random.Random(k)
    pairs = []
    for unit in planted_units():
        records = planted_records(windows, unit)
        shown = shown_records(UnitRecords(UnitId.mlp(0, 0), records), 5)
        candidates = explainer.explain_records([shown], k - 1)[0].candidates + [unit.explanation]
        rng.shuffle(candidates)
        pairs.append((records, candidates))
    return compare(pairs, sim)


def real_layer(k: int, explainer, sim, records_dir: str, units: int) -> dict:
    from autoexplain.layer import load_units
    from autoexplain.pipeline import shown_records

    loaded = load_units(records_dir, 15, list(range(units)))
    explained = explainer.explain_records([shown_records(u, 5) for u in loaded], k)
    pairs = [(u.records, e.candidates) for u, e in zip(loaded, explained) if len(e.candidates) > 1]
    out = compare(pairs, sim)
    out["units_with_one_candidate_skipped"] = len(loaded) - len(pairs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--k", type=int, nargs="*", default=[4, 8])
    a = ap.parse_args()

    from autoexplain.embedding import EmbeddingSimulator
    from autoexplain.explain_embedding import EmbeddingExplainer
    from autoexplain.record import RecordConfig, build_windows, record_layers
    from autoexplain.subject import load_subject

    t0 = time.perf_counter()
    out = tempfile.mkdtemp(prefix="bench-selection-")
    subject = load_subject()
    windows = build_windows(subject, "default", out, 64, a.tokens, 0)
    records_dir = record_layers(subject, windows, RecordConfig([15]), out).directory
    explainer, sim = EmbeddingExplainer(), EmbeddingSimulator()
    result = {"tokens": a.tokens, "layer": 15}
    for k in a.k:
        result[f"planted_k{k}"] = planted(k, explainer, sim)
        result[f"layer15_k{k}"] = real_layer(k, explainer, sim, str(records_dir), a.units)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
