"""Contracts at every boundary, on every path: the store checks a table before it seals it and
before a stage reads it (`schemas.gate`).

Each case takes a finished run (the flow on the tiny Llama, default embedding explainer and
simulator), breaks one rule in an upstream table and seals it as a writer that never checked would
(right digests, no contract versions). Then:
- the downstream stage command stops with one line naming the file and the broken rule, and writes
  nothing;
- the flow treats the folder as unfinished and recomputes it: downstream gets the clean bytes;
- sealing a breaking table through the store itself is refused, and the folder stays unsealed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from autoexplain.storage import file_digest, read_manifest, read_run

pytestmark = pytest.mark.slow


@pytest.fixture
def finished(prefect_results, tiny_llama_dir, prose_corpus, tmp_path):
    from autoexplain.flows.explain_layer import explain_layer

    params = dict(layer=1, units="0-3", model=tiny_llama_dir, corpus=str(prose_corpus), tokens=60_000,
                  explainer="embedding", simulator="embedding", k=2, shard_size=4, n_boot=50,
                  out=str(tmp_path / "out"), window_len=8, top_k=8, n_random=6, site="none")
    result = explain_layer(**params)
    run = read_run(tmp_path / "out", 1)
    return tmp_path / "out", run, lambda: explain_layer(**params)


def _unchecked_seal(path: Path, table: pl.DataFrame) -> None:
    """Write a table and a manifest with its right digest, as a writer that checks nothing would."""
    table.write_parquet(path)
    manifest = read_manifest(path.parent)
    manifest["outputs"][path.name] = file_digest(path)
    manifest.pop("contract_versions", None)
    (path.parent / "manifest.json").write_text(json.dumps(manifest))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoexplain.cli", *args], capture_output=True, text=True)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


BOUNDARIES = {
    # upstream>the command that reads it: (upstream file, how to break it, the broken rule's words)
    "windows>explain": ("windows", lambda df: df.with_columns(pl.col("doc_id") * 0 - 1), "document ids are non-negative"),
    "records>explain": ("records", lambda df: df.with_columns(
        pl.when(pl.col("rank") == 0).then(pl.col("activations").list.eval(pl.element() * float("nan")))
        .otherwise(pl.col("activations")).alias("activations")), "activations are finite"),
    "explanations>simulate": ("explanations", lambda df: df.with_columns(pl.lit("  ").alias("text")), "not empty or blank"),
    "simulations>score": ("simulations", lambda df: df.with_columns(pl.col("expected").list.eval(pl.element() * 0 + 42.0)),
              "expected values are in"),
    "simulations>view": ("simulations", lambda df: df.with_columns(pl.col("expected").list.eval(pl.element() * 0 + 42.0)),
                         "expected values are in"),
    "scores>view": ("scores", lambda df: df.with_columns(pl.lit(2).cast(df["polarity"].dtype).alias("polarity")),
                    "polarity is +1 or -1"),
}


def _path(run: dict, stage: str) -> Path:
    if stage == "windows":
        return Path(run["records"]["windows"])
    if stage == "records":
        return Path(run["records"]["path"]) / "layer_1.records.parquet"
    return Path(run[stage][0]["path"])


@pytest.mark.parametrize("case", list(BOUNDARIES))
def test_a_breaking_input_stops_the_stage_command(finished, tmp_path, case):
    out, run, _ = finished
    upstream, breaks, words = BOUNDARIES[case]
    path = _path(run, upstream)
    _unchecked_seal(path, breaks(pl.read_parquet(path)))
    records, o2 = run["records"]["path"], tmp_path / "o2"
    explain = ["explain", "--records", records, "--layer", "1", "--units", "0-3", "--out", str(o2)]
    args = {"windows>explain": explain, "records>explain": explain,
            "explanations>simulate": ["simulate", "--records", records, "--explanations", str(path.parent), "--out", str(o2)],
            "simulations>score": ["score", "--records", records, "--simulations", str(path.parent), "--bootstrap", "20",
                                  "--out", str(o2)],
            "simulations>view": ["view", "--scores", str(Path(run["scores"][0]["path"]).parent), "--site", str(o2 / "site")],
            "scores>view": ["view", "--scores", str(path.parent), "--site", str(o2 / "site")]}[case]
    line = _one_line(_cli(*args))
    assert f"{path} breaks its data contract" in line and words in line and "rerun the stage" in line, line
    assert not any(o2.rglob("manifest.json")) and not (o2 / "site").exists(), "nothing downstream is written"


@pytest.mark.parametrize("case", list(BOUNDARIES))
def test_the_flow_recomputes_a_breaking_input(finished, case):
    out, run, again = finished
    upstream, breaks, _ = BOUNDARIES[case]
    path = _path(run, upstream)
    clean = path.read_bytes()
    scores = {Path(s["path"]).read_bytes() for s in run["scores"]}
    _unchecked_seal(path, breaks(pl.read_parquet(path)))
    result = again()
    assert path.read_bytes() == clean, "the breaking folder was recomputed"
    assert {Path(s["path"]).read_bytes() for s in result["scores"]} == scores


def test_the_store_refuses_to_seal_a_breaking_output(finished):
    from autoexplain.storage import is_complete
    from autoexplain.store import Stage
    from autoexplain.schemas.contracts import ContractViolation

    out, run, _ = finished
    path = _path(run, "explanations")
    before = sorted(p.name for p in (out / "explanations").iterdir())
    stage = Stage.open(out, "explanations", {"broken": True})
    stage.table(pl.read_parquet(path).with_columns(pl.lit("").alias("text")).to_arrow(), path.name)
    with pytest.raises(ContractViolation, match="not empty or blank"):
        stage.seal({}, {"layer": 1})
    assert not stage.directory.exists() and not is_complete(stage.directory)
    assert sorted(p.name for p in (out / "explanations").iterdir()) == before, "nor a temporary folder left"
