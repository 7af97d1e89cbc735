"""Throughput of the LLM path, end to end through the explain and simulate stages, against a
loopback server with a fixed latency (bench/llm_server.py, run in a process of its own so that its
CPU is not counted as the client's).

    python bench/llm_bench.py --latency 1 --concurrency 64 --sim-units 12 --explain-units 1280
    python bench/llm_bench.py --faults 0.2 ...     # 20 % of the answers are faults of every kind

Units are synthetic, shaped like a recording's: per unit and polarity 40 top windows dealt
train/calib/valid/test and 30 random windows dealt calib/valid/test, 64 tokens each, so the simulate
stage simulates k candidates on the 20 valid records (all of them, or by successive halving), then
2 texts on the 40 held-out records and 40 for the shuffled control, as echo requests of one or more
records whose replies carry the top-15 alternatives at every prompt position (about 180 kB per
record). The explain stage sends one request (n = k) per unit.

    python bench/llm_bench.py --latency 0 --sim-units 16 --explain-units 0 --k 4 --selection full
    python bench/llm_bench.py --latency 0 --sim-units 16 --explain-units 0 --k 4 --records-per-request 5

(the simulator's default is one record per request, the paper's format; `--records-per-request 5`
is the opt-in packing of `all-at-once/5:LLM`).

Reports requests per second against the ideal concurrency / latency, and the client's CPU time per
request (this process: user + system, all threads).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the of and to in is that for it with as was on be at by this from or cat dog house river blue red "
         "green seven twelve London Paris running jumped quickly slowly happy sad hand eye foot code data "
         "model train test value number Monday March").split()


def synthetic_units(n: int, seed: int = 0, train_only: bool = False):
    from autoexplain.records import ActivationRecord, UnitId, UnitRecords

    rng = random.Random(seed)
    units = []
    for i in range(n):
        favourite = set(rng.sample(WORDS, 4))
        records, wid = [], i * 1000
        top_splits = ["train", "calib", "valid", "test"] * 10
        random_splits = [] if train_only else ["calib", "valid", "test"] * 10
        for kind, splits in (("top", top_splits), ("random", random_splits)):
            for split in splits:
                if train_only and split != "train":
                    continue
                tokens = [" " + rng.choice(WORDS) for _ in range(64)]
                acts = [(8.0 if t.strip() in favourite and kind == "top" else 0.0) + rng.random() for t in tokens]
                records.append(ActivationRecord(tokens, acts, window_id=wid, kind=kind, split=split))
                wid += 1
        units.append(UnitRecords(UnitId.mlp(15, i // 2, 1 if i % 2 == 0 else -1), records))
    return units


def start_server(latency: float, faults: float, timeout_s: float) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "llm_server.py"), "--latency", str(latency),
                             "--port", str(port), "--fault-rate", str(faults),
                             "--timeout-s", str(timeout_s)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/models", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("bench server did not start")


def measure(label: str, fn, requests_of) -> dict:
    cpu0, t0, r0 = time.process_time(), time.perf_counter(), requests_of()
    result = fn()
    wall, cpu, n = time.perf_counter() - t0, time.process_time() - cpu0, requests_of() - r0
    return {"stage": label, "requests": n, "wall_s": round(wall, 2), "requests_per_s": round(n / wall, 1),
            "client_cpu_ms_per_request": round(1000 * cpu / max(1, n), 2), "client_cpu_cores": round(cpu / wall, 2),
            "result": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--sim-units", type=int, default=12, help="units (unit x polarity) through the simulate stage")
    ap.add_argument("--explain-units", type=int, default=1280, help="units through the explain stage")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--faults", type=float, default=0.0, help="fraction of answers that are faults")
    ap.add_argument("--max-retries", type=int, default=8)
    ap.add_argument("--selection", choices=("full", "halving"), default=None,
                    help="best-of-k on valid (default: the simulator's own, halving)")
    ap.add_argument("--records-per-request", type=int, default=None,
                    help="records packed into one simulator request, as 'all-at-once/N:LLM' packs them "
                         "(default: the simulator's own, 1: one record per request, the paper's format)")
    a = ap.parse_args()

    from autoexplain import pipeline
    from autoexplain.counters import COUNTS
    from autoexplain.llm import OpenAILLM
    from autoexplain.simulate import AllAtOnceSimulator

    timeout = 1.0 + 3 * a.latency  # the client's; a "timeout" fault answers a second after it
    proc, url = start_server(a.latency, a.faults, timeout + 1.0)
    try:
        llm = OpenAILLM("bench", url, api_key="bench", max_concurrency=a.concurrency, max_retries=a.max_retries,
                        backoff_base=0.5, backoff_cap=4.0, timeout=timeout)
        requests = lambda: COUNTS["llm_requests"]  # noqa: E731 (answered requests, retries not counted)
        ideal = a.concurrency / a.latency if a.latency > 0 else float("inf")
        out = {"latency_s": a.latency, "concurrency": a.concurrency, "k": a.k, "faults": a.faults,
               "ideal_requests_per_s": ideal, "cpu": os.cpu_count(), "load_avg_before": os.getloadavg()[0]}
        runs = []
        if a.explain_units:
            units = synthetic_units(a.explain_units, seed=1, train_only=True)
            cfg = pipeline.ExplainConfig(k=a.k)

            def explain():
                table = pipeline.explain_stage(units, llm, cfg).to_pylist()
                rows = [r for r in table if r["method"] == pipeline.EXPLAINER]
                return {"units": len(rows), "failed": sum(bool(r["failure"]) for r in rows)}

            runs.append(measure("explain", explain, requests))
        if a.sim_units:
            units = synthetic_units(a.sim_units, seed=2)
            before = llm.usage.total_tokens
            x = pipeline.explain_stage(units, llm, pipeline.ExplainConfig(k=a.k))
            sim = AllAtOnceSimulator(llm, records_per_request=a.records_per_request)
            if a.selection:
                sim.selection = a.selection
            out.update(selection=sim.selection, records_per_request=sim.records_per_request, simulator=sim.name)

            def simulate():
                chosen, sims = pipeline.simulate_stage(units, x, sim, seed=0)
                rows = sims.to_pylist()
                keys = [(r["unit"], r["polarity"], r["method"], r["window_id"]) for r in rows]
                failures = {}
                for r in rows:
                    if r["failure"]:
                        reason = r["failure"].split(":")[0] if "request failed" in r["failure"] else r["failure"][:40]
                        failures[reason] = failures.get(reason, 0) + 1
                tokens = llm.usage.total_tokens - before  # explain + simulate, valid records included
                return {"units": len(units), "records": len(rows), "tokens_per_unit": round(tokens / len(units)), "duplicated": len(keys) - len(set(keys)),
                        "expected_records": len(units) * 120, "failed": sum(1 for r in rows if r["failure"]),
                        "failures": failures}

            runs.append(measure("simulate", simulate, requests))
        for r in runs:
            r["fraction_of_ideal"] = round(r["requests_per_s"] / ideal, 3)
            if r["stage"] == "simulate":  # + the explain stage's one request per unit
                r["requests_per_unit"] = round(r["requests"] / r["result"]["units"] + 1, 1)
        out["runs"] = runs
        out["load_avg_after"] = os.getloadavg()[0]
        print(json.dumps(out, indent=1))
    finally:
        proc.terminate()
        proc.wait(5)


if __name__ == "__main__":
    main()
