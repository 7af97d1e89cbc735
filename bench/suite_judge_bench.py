"""Classifier scorers on the suite of synthetic neurons (`autoexplain.suite`): each rule's true
explanation and its four false ones scored by a scorer on the rule's test windows, then the pairwise
accuracy (true above each false one), per half, family and kind of false explanation, with
bench/suite_bench.py's summary and table for simulators (issue 15, item 4: "every simulator and scorer").

    python bench/suite_judge_bench.py --half heldout --scorers detection:openai:M@URL

The rules' records are built as suite_bench builds them (4,000 windows of the embedded corpus,
`--records` top windows and as many random ones); a classifier asks about the test split only. A
score that is undefined (every reply failed to parse, or no non-firing window) loses to a defined one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scorers", required=True)
    ap.add_argument("--half", choices=["dev", "heldout"], default="heldout")
    ap.add_argument("--records", type=int, default=24, help="top windows per rule (and as many random)")
    ap.add_argument("--n-boot", type=int, default=50)
    ap.add_argument("--every", type=int, default=1, help="every N-th rule of the half only (a slow judge)")
    a = ap.parse_args()

    from autoexplain.agreement import HEADLINE
    from autoexplain.planted import corpus_windows
    from autoexplain.registry import make_scorer
    from autoexplain.suite import pairwise_accuracy, rule_records, suite_rules
    from bench.suite_bench import print_table, summarise

    windows = corpus_windows(n_windows=4000, seed=0)
    rules = suite_rules(a.half)[:: a.every]
    records = {r.name: rule_records(windows, r, n_top=a.records, n_random=a.records) for r in rules}
    print(f"{len(rules)} {a.half} rules" + (f" (one in {a.every})" if a.every > 1 else ""))
    summaries = {}
    for spec in a.scorers.split(","):
        scorer, kind = make_scorer(spec), spec.partition(":")[0]
        started, rows = time.perf_counter(), []
        for rule in rules:
            got = []
            for text in (rule.true, *rule.false.values()):
                s = scorer.score(text, records[rule.name], n_boot=a.n_boot).get(HEADLINE[kind])
                got.append(float("nan") if s is None or s.value is None else s.value)
            false = dict(zip(rule.false, got[1:]))
            rows.append({"rule": rule.name, "half": rule.half, "family": rule.family, "true": got[0], "false": false,
                         "accuracy": pairwise_accuracy(got[0], list(false.values()))})
            print(f"  {rule.name:22s} {rule.family:9s} acc={rows[-1]['accuracy']:.2f} true={got[0]:.2f} "
                  + " ".join(f"{k}={v:.2f}" for k, v in false.items()), flush=True)
        summaries[spec.split("@")[0]] = summarise(rows, time.perf_counter() - started)
    print()
    print_table("scorer", summaries)


if __name__ == "__main__":
    main()
