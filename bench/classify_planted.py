"""The classifier scorers on the planted suite (`autoexplain.planted`): each planted unit scored with
its true rule and with the next unit's rule (a wrong one), by the simulation scorer (the embedding
simulator) and each classifier scorer; then per scorer the pairwise accuracy (true above wrong) and
the Spearman correlation across units between instruments, on the true rules.

    python bench/classify_planted.py --windows 1500 [--scorers detection:openai:M@URL,...]

Without --scorers it asks bench/llm_server.py's keyword rule (started in this process) for
detection, fuzzing and intruder, and MiniLM for embedding.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=1500)
    ap.add_argument("--scorers", default=None)
    ap.add_argument("--n-boot", type=int, default=200)
    a = ap.parse_args()

    from autoexplain.agreement import spearman
    from autoexplain.api import score
    from autoexplain.planted import corpus_windows, planted_records, planted_units
    from autoexplain.registry import make_scorer, make_simulator

    server = None
    if a.scorers is None:
        from bench.llm_server import BenchServer

        server = BenchServer(latency=0.0)
        url = server.base_url
        a.scorers = f"detection:openai:bench@{url},fuzzing:openai:bench@{url},intruder:openai:bench@{url},embedding"
    specs = a.scorers.split(",")
    headline = {"detection": "detection_balanced_accuracy@random", "fuzzing": "fuzzing_balanced_accuracy@random",
                "intruder": "intruder_accuracy@random", "embedding": "embedding_auc@random"}
    windows = corpus_windows(a.windows)
    units = planted_units()
    sim = make_simulator("embedding")
    scorers = {spec: make_scorer(spec) for spec in specs}
    table: dict[str, dict[str, list]] = {"simulation": {"true": [], "wrong": []}}
    table.update({spec: {"true": [], "wrong": []} for spec in specs})
    for i, unit in enumerate(units):
        recs = planted_records(windows, unit)
        wrong = units[(i + 1) % len(units)].explanation
        for which, text in (("true", unit.explanation), ("wrong", wrong)):
            s = score(sim, text, recs, n_boot=a.n_boot)["top_and_random"]
            table["simulation"][which].append(s.value)
            for spec, scorer in scorers.items():
                got = scorer.score(text, recs, n_boot=a.n_boot)
                found = got.get(headline[spec.partition(":")[0]])  # none: every random window fires
                table[spec][which].append(found.value if found else None)
        print(unit.name, {k: [None if v is None else round(v, 3) for v in (t["true"][-1], t["wrong"][-1])]
                          for k, t in table.items()}, flush=True)
    print("\n| instrument | mean, true rules | mean, wrong rules | pairwise accuracy (true > wrong) |")
    print("|---|---|---|---|")
    for name, t in table.items():
        pairs = [(x, y) for x, y in zip(t["true"], t["wrong"]) if x is not None and y is not None]
        acc = np.mean([x > y for x, y in pairs]) if pairs else float("nan")
        mean = lambda v: np.mean([x for x in v if x is not None]) if any(x is not None for x in v) else float("nan")  # noqa: E731
        print(f"| {name.split('@')[0]} | {mean(t['true']):.3f} | {mean(t['wrong']):.3f} | {acc:.2f} ({len(pairs)} pairs) |")
    print("\n| instruments (true rules, across units) | Spearman rho |\n|---|---|")
    names = list(table)
    for x in names:
        for y in names[names.index(x) + 1:]:
            both = [(p, q) for p, q in zip(table[x]["true"], table[y]["true"]) if p is not None and q is not None]
            rho = spearman([p for p, _ in both], [q for _, q in both]) if both else None
            print(f"| {x.split('@')[0]} vs {y.split('@')[0]} | {'n/a' if rho is None else f'{rho:.3f}'} |")
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
