"""How close to its limit a budget stops a server run (issue 13, item 5).

    python bench/budget_bench.py [--latency 1.0] [--concurrency 64]

Explainer-sized prompts (about 340 tokens, n = 4, max_tokens 60) against bench/llm_server.py's server,
priced as gpt-4o-mini, under a dollar and a token budget: requests answered, what was spent, and the
wall time until the stop. A run must never pass its budget; how far below it stops is what the
estimates held by the requests in flight cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoexplain.budget import BudgetReached, set_budget  # noqa: E402
from autoexplain.llm import OpenAILLM  # noqa: E402
from bench.llm_server import BenchServer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--budgets", default="$0.05,200k tokens")
    a = ap.parse_args()
    srv = BenchServer(latency=a.latency)
    prompts = [f"Neuron {i}: " + "some words of a long explainer prompt " * 60 for i in range(5000)]
    print("| budget | requests answered | dollars | tokens | wall until the stop |\n|---|---|---|---|---|")
    for limit in a.budgets.split(","):
        llm = OpenAILLM("gpt-4o-mini", srv.base_url, api_key="bench", max_concurrency=a.concurrency)
        ledger = set_budget(limit)
        started = time.perf_counter()
        try:
            llm.complete(prompts, n=4, max_tokens=60)
        except BudgetReached:
            pass
        stopped = time.perf_counter() - started
        time.sleep(a.latency + 0.5)  # the requests in flight at the stop are answered and charged
        print(f"| `{limit}` | {llm.usage.requests} | ${ledger.dollars:.5f} | {ledger.tokens:,} | {stopped:.1f} s |",
              flush=True)
        llm.close()
    srv.stop()


if __name__ == "__main__":
    main()
