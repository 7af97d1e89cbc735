"""The store is the truth: Prefect's task cache never answers with an output that is not there.

Each case deletes or damages something a finished run wrote, runs the same flow again, and checks
that it succeeds and writes the very same bytes: the whole output root, one stage's folder,
Prefect's own result storage, a parquet file cut in half. Runs use the default embedding explainer
and simulator, on the tiny Llama.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
STAGES = ("windows", "records", "explanations", "simulations", "scores")


@pytest.fixture
def run(prefect_results, tiny_llama_dir, prose_corpus, tmp_path):
    from autoexplain.flows.explain_layer import explain_layer

    params = dict(layer=1, units="0-3", model=tiny_llama_dir, corpus=str(prose_corpus), tokens=60_000,
                  explainer="embedding", simulator="embedding", k=2, shard_size=2, n_boot=50,
                  out=str(tmp_path / "out"), window_len=8, top_k=8, n_random=6, site="none")
    return lambda: explain_layer(**params)


def _files(out: Path) -> dict[str, bytes]:
    """Every file of every stage folder, by its path under the root."""
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for stage in STAGES for p in sorted((out / stage).rglob("*")) if p.is_file()}


@pytest.fixture
def first(run, tmp_path):
    result = run()
    out = tmp_path / "out"
    files = _files(out)
    assert {k.split("/")[0] for k in files} == set(STAGES)
    return out, files, result


def test_deleting_the_whole_output_root_then_rerunning(first, run):
    out, files, _ = first
    shutil.rmtree(out)
    run()
    assert _files(out) == files


@pytest.mark.parametrize("stage", STAGES)
def test_deleting_one_stage_folder_then_rerunning(first, run, stage):
    out, files, _ = first
    for folder in (out / stage).iterdir():
        shutil.rmtree(folder)
        break
    run()
    assert _files(out) == files


def test_deleting_prefects_storage_then_rerunning(first, run, prefect_results):
    out, files, _ = first
    for item in prefect_results.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    run()
    assert _files(out) == files


def test_a_truncated_parquet_file_is_recomputed(first, run):
    out, files, result = first
    records = Path(result["records"]["path"]) / "layer_1.records.parquet"
    data = records.read_bytes()
    records.write_bytes(data[: len(data) // 2])
    run()
    assert _files(out) == files


def test_stage_commands_name_a_damaged_file(first, tmp_path):
    out, _, result = first
    records = Path(result["records"]["path"])
    table = records / "layer_1.records.parquet"
    table.write_bytes(table.read_bytes()[:1000])
    scores = Path(result["scores"][0]["path"]).parent
    from autoexplain.layout import input_of
    from autoexplain.storage import read_manifest

    sims = str(input_of(scores, read_manifest(scores)["inputs"]["simulations"]))
    proc = subprocess.run([sys.executable, "-m", "autoexplain.cli", "score", "--records", str(records),
                           "--simulations", sims, "--out", str(tmp_path / "o2")], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"{table} does not match its manifest" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o2").exists()
