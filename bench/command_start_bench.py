"""How long a flow command waits, from its parameters checked to its flow starting, with Prefect's
temporary server started before or after the command imports its flow.

    python bench/command_start_bench.py            # 5 rounds, each order once a round

A command with no PREFECT_API_URL starts Prefect's temporary server (`flows.server.launch`), imports
its flow module and loads its simulator, then waits for the server to answer. Before commit 6d9a9f0
it imported the flow first and then started the server and waited for it ("after"); now the server
starts first and comes up while the flow is imported ("overlapped"). Each measurement is a fresh
process with a fresh Prefect home seeded with a migrated database (as the tests' homes are), so
the import is a cold one as in a command; the two orders alternate, and the ratio of their medians
is the figure to compare across machines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = {
    "after": "import autoexplain.flows.explain_layer\nwait = server.launch()\nwait()",
    "overlapped": "wait = server.launch()\nimport autoexplain.flows.explain_layer\nwait()",
}


def one(order: str, home: Path) -> float:
    code = ("import time\nstarted = time.perf_counter()\nfrom autoexplain.flows import server\n" + CHILD[order]
            + "\nprint(time.perf_counter() - started)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=300)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.prefect_homes import prefect_home

    times: dict[str, list[float]] = {order: [] for order in CHILD}
    with tempfile.TemporaryDirectory(prefix="command-start-") as tmp:
        for r in range(args.rounds):
            for order in (CHILD if r % 2 == 0 else reversed(list(CHILD))):
                home = Path(tmp) / f"home-{r}-{order}"
                times[order].append(one(order, Path(prefect_home(home))))
                shutil.rmtree(home, ignore_errors=True)
    for order, ts in times.items():
        print(f"{order:>10}: median {statistics.median(ts):.2f} s  ({', '.join(f'{t:.2f}' for t in ts)})")
    after, overlapped = (statistics.median(times[o]) for o in ("after", "overlapped"))
    print(f"overlapped / after: {overlapped / after:.2f}  (saved {after - overlapped:.2f} s a command)")


if __name__ == "__main__":
    main()
