"""How long a flow command takes from its last line of output to the end of its process, when it
leaves by `autoexplain.leave` (the console script now) or by the interpreter's own ending (before).

    python bench/command_end_bench.py            # 5 rounds, each way once a round

Each measurement is a fresh `explain-layer` process on a tiny Llama built from a config, a fully
cached rerun of the same command in a Prefect home seeded with a migrated database, timed from its
"outputs:" line on stderr to its exit. The "before" process runs the same typer app without
`leave.run` (so Python tears every object down after the exit handlers); the two ways alternate,
and the ratio of their medians is the figure to compare across machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAYS = {
    "leave": ["-m", "autoexplain.flows.cli"],
    "interpreter": ["-c", "import sys, autoexplain.flows.cli as c; sys.argv[0] = 'autoexplain'; c.app(prog_name='autoexplain')"],
}


def one(way: str, args: list[str], env: dict) -> tuple[float, float]:
    """(seconds from the last line to the exit, seconds in all) of one command."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *WAYS[way], *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env, cwd=ROOT)
    ended: list[float] = []
    waiter = threading.Thread(target=lambda: (proc.wait(), ended.append(time.perf_counter())))
    waiter.start()
    last = None
    for line in proc.stderr:
        if line.startswith("outputs: "):
            last = time.perf_counter()
    waiter.join()
    if proc.returncode != 0 or last is None:
        raise SystemExit(f"{way}: the command failed (exit {proc.returncode})")
    return ended[0] - last, ended[0] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from autoexplain.subject import load_tokenizer
    from tests.conftest import write_prose
    from tests.prefect_homes import prefect_home

    with tempfile.TemporaryDirectory(prefix="command-end-") as tmp:
        tmp = Path(tmp)
        tokenizer = load_tokenizer("smollm2")
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256))
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        write_prose(tmp / "prose.txt")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(HF_HUB_OFFLINE="1", PREFECT_HOME=prefect_home(tmp / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        command = ["explain-layer", "--model", str(tmp / "model"), "--corpus", str(tmp / "prose.txt"), "--units", "0-3",
                   "--tokens", "20000", "--k", "1", "--shard-size", "2", "--bootstrap", "50", "--window-len", "8",
                   "--top-k", "8", "--random", "6", "--out", str(tmp / "out")]
        one("leave", command, env)  # the first run records and explains; the rounds below rerun it from caches
        ends: dict[str, list[float]] = {way: [] for way in WAYS}
        totals: dict[str, list[float]] = {way: [] for way in WAYS}
        for r in range(args.rounds):
            for way in (WAYS if r % 2 == 0 else reversed(list(WAYS))):
                end, total = one(way, command, env)
                ends[way].append(end)
                totals[way].append(total)
    for way in WAYS:
        print(f"{way:>12}: last line to exit, median {statistics.median(ends[way]):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in ends[way])}); whole command {statistics.median(totals[way]):.2f} s")
    before, now = (statistics.median(totals[w]) for w in ("interpreter", "leave"))
    print(f"whole command, leave / interpreter: {now / before:.2f}  (saved {before - now:.2f} s a command)")


if __name__ == "__main__":
    main()
