"""One recording pass for several unit sources (explain-model with `--source mlp --source sae:PATH`)
against one pass per source, on the embedded SmolLM2: every layer's MLP neurons plus a 16,384-latent
TopK SAE on layer 15's residual stream (random weights: `sae_record_bench.write_sae`).

Each round records the same windows twice into fresh folders, in alternating order: once source by
source (`record_layers` per source: two passes of the subject) and once shared (`record_sources`:
one pass). Wall and CPU seconds per arrangement, the subject's forward passes counted, and whether
both arrangements wrote equal tables under equal keys.

    python bench/shared_pass_bench.py --tokens 100000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sae_record_bench import write_sae  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", default="0-29")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()

    from autoexplain.counters import since, snapshot
    from autoexplain.indices import parse_units
    from autoexplain.record import RecordConfig, build_windows, record_layers, record_sources
    from autoexplain.source_coder import open_unit_source
    from autoexplain.sources import MLP
    from autoexplain.subject import load_subject

    work = Path(a.work or tempfile.mkdtemp(prefix="bench-shared-"))
    subject = load_subject()
    sae = write_sae(work / "sae", subject.model.config.hidden_size)
    coder = open_unit_source(f"sae:{sae}", "smollm2")
    plans = [(MLP, RecordConfig(parse_units(a.layers))), (coder, RecordConfig([coder.layer]))]
    windows = build_windows(subject, "default", work / "windows", 64, a.tokens, 0)

    def separately(out: Path):
        return [record_layers(subject, windows, cfg, out, source=source) for source, cfg in plans]

    def shared(out: Path):
        return record_sources(subject, windows, plans, out)

    rounds = []
    for r in range(a.rounds):
        order = [("separate", separately), ("shared", shared)]
        row = {}
        for name, run in (order if r % 2 == 0 else order[::-1]):
            out = work / f"{name}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            before, t, c = snapshot(), time.perf_counter(), time.process_time()
            refs = run(out)
            row[name] = {"wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(time.process_time() - c, 1),
                         "forward_passes": since(before).get("subject_forward", 0), "refs": refs}
        same = all(x.key == y.key and all(
            pl.read_parquet(path).equals(pl.read_parquet(y.directory / path.name))
            for layer in x.layers for path in (x.records_path(layer), x.stats_path(layer)))
            for x, y in zip(row["separate"]["refs"], row["shared"]["refs"]))
        for v in row.values():
            v.pop("refs")
        row["shared_over_separate_wall"] = round(row["shared"]["wall_s"] / row["separate"]["wall_s"], 3)
        row["equal_tables_and_keys"] = same
        rounds.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"tokens": a.tokens, "layers": a.layers, "sae": "16,384 TopK k=32 at layer 15 resid_post",
                      "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
