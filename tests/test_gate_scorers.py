"""Contracts at the boundaries that classifier scorers and the viewer add: hard negatives ->
classify, classifications -> scores, records -> view (`schemas.gate`; the other boundaries are in
`test_gate`).

A finished run (the flow on the tiny Llama with the `embedding` classifier scorer, so with hard
negatives from the subject) gets one rule broken in an upstream table, sealed as a writer that
never checked would (right digests, no contract versions). Then:
- a stage handed the breaking folder stops with one line naming the file, the broken rule and the
  command to rerun, and writes nothing. The viewer is handed records by the CLI (`view`); the
  negatives and classifications are handed over only inside `score` (which writes them itself), so
  their readers, `run_classify` and `run_scores`, are called with the folder directly;
- `autoexplain score` and the flow treat the breaking folder as unfinished and recompute it:
  the upstream folder is rebuilt (sealed through its contract) and the scores are the clean run's.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from autoexplain import layout
from autoexplain.storage import read_manifest, read_run
from tests.test_gate import _cli, _one_line, _unchecked_seal

pytestmark = pytest.mark.slow


@pytest.fixture
def finished(prefect_results, tiny_llama_dir, prose_corpus, tmp_path):
    from autoexplain.flows.explain_layer import explain_layer

    params = dict(layer=1, units="0-3", model=tiny_llama_dir, corpus=str(prose_corpus), tokens=60_000,
                  explainer="embedding", simulator="embedding", scorers="simulation,embedding", k=2, shard_size=4,
                  n_boot=50, out=str(tmp_path / "out"), window_len=8, top_k=8, n_random=6, site="none")
    explain_layer(**params)
    run = read_run(tmp_path / "out", 1)
    return tmp_path / "out", run, lambda **kw: explain_layer(**{**params, **kw})


BOUNDARIES = {
    # upstream>its reader: (upstream table, how to break it, the broken rule's words)
    "negatives>classify": ("negatives", lambda df: df.with_columns(
        pl.when(pl.col("rank") == 0).then(pl.lit("nearby")).otherwise(pl.col("kind")).alias("kind")),
        "kind is similar or cofiring"),
    "classifications>scores": ("classifications", lambda df: df.with_columns(
        pl.when(pl.col("prompt") == 0).then(-1).otherwise(pl.col("label")).cast(df["label"].dtype).alias("label")),
        "a label is 0, 1 or an intruder's position"),
    "records>view": ("records", lambda df: df.with_columns(
        pl.when(pl.col("rank") == 0).then(pl.col("activations").list.eval(pl.element() * float("nan")))
        .otherwise(pl.col("activations")).alias("activations")), "activations are finite"),
}


def _path(run: dict, stage: str) -> Path:
    if stage == "records":
        return Path(run["records"]["path"]) / "layer_1.records.parquet"
    scores = Path(run["scores"][0]["path"]).parent
    classified = layout.input_of(scores, read_manifest(scores)["inputs"]["classifications"][0])
    folder = classified if stage == "classifications" else layout.input_of(classified, read_manifest(classified)["inputs"]["negatives"])
    return folder / "layer_1.parquet"


def _break(run: dict, case: str) -> tuple[Path, bytes]:
    """Break the case's upstream table; returns its path and its broken bytes."""
    upstream, breaks, _ = BOUNDARIES[case]
    path = _path(run, upstream)
    broken = breaks(pl.read_parquet(path))
    assert broken.height and not broken.equals(pl.read_parquet(path)), "the run has rows to break"
    _unchecked_seal(path, broken)
    return path, path.read_bytes()


def _recomputed(path: Path, broken: bytes) -> None:
    """The folder was rebuilt and sealed through its contract. Not compared to the clean bytes: the
    subject's activations on the negatives' pool may move in their last bits between processes
    (another torch thread count), and a co-firing share at the threshold with them."""
    from autoexplain.storage import is_complete

    assert path.read_bytes() != broken and is_complete(path.parent), "the breaking folder was recomputed"
    assert read_manifest(path.parent)["contract_versions"], "and checked before its seal"


def _stops(call, path: Path, words: str, command: str) -> None:
    from autoexplain.errors import UserError

    with pytest.raises(UserError) as info:
        call()
    line = str(info.value)
    assert "\n" not in line and f"{path} breaks its data contract" in line and words in line, line
    assert "rerun the stage" in line and command in line, line


def test_the_stage_reading_a_breaking_folder_stops(finished, tmp_path):
    from autoexplain.classify_stage import run_classify, run_scores
    from autoexplain.layer import StageRef

    out, run, _ = finished
    records, o2 = run["records"]["path"], tmp_path / "o2"
    sims = StageRef.of(Path(run["simulations"][0]["path"]).parent)
    for case in ("negatives>classify", "classifications>scores"):
        path, _ = _break(run, case)
        if case == "negatives>classify":
            _stops(lambda: run_classify(records, sims, o2, "embedding", negatives_dir=path.parent), path,
                   BOUNDARIES[case][2], "`autoexplain score --model`")
        else:
            ref = StageRef(path.parent, read_manifest(path.parent)["key"], 1)
            _stops(lambda: run_scores(records, sims, [ref], o2, None, n_boot=20), path, BOUNDARIES[case][2],
                   "`autoexplain score --scorers`")
    assert not any(o2.rglob("manifest.json")), "nothing downstream is written"

    path, _ = _break(run, "records>view")
    line = _one_line(_cli("view", "--scores", str(Path(run["scores"][0]["path"]).parent), "--site", str(o2 / "site")))
    assert f"{path} breaks its data contract" in line and BOUNDARIES["records>view"][2] in line, line
    assert "rerun the stage" in line and "`autoexplain record`" in line, line
    assert not (o2 / "site").exists(), "no site is written"


@pytest.mark.parametrize("case", ["negatives>classify", "classifications>scores"])
def test_the_score_command_recomputes_a_breaking_folder_it_writes(finished, tiny_llama_dir, case):
    out, run, _ = finished
    path, broken = _break(run, case)
    scores = Path(run["scores"][0]["path"])
    before = scores.read_bytes()
    proc = _cli("score", "--records", run["records"]["path"], "--simulations", str(Path(run["simulations"][0]["path"]).parent),
                "--scorers", "simulation,embedding", "--model", tiny_llama_dir, "--bootstrap", "50", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _recomputed(path, broken)
    assert Path(proc.stdout.strip().splitlines()[-1]).resolve() == scores.parent.resolve()
    assert scores.read_bytes() == before, "the scores are the clean run's"


@pytest.mark.parametrize("case", list(BOUNDARIES))
def test_the_flow_recomputes_a_breaking_folder(finished, tmp_path, case):
    out, run, again = finished
    path, broken = _break(run, case)
    scores = {Path(s["path"]).read_bytes() for s in run["scores"]}
    site = {"site": str(tmp_path / "site")} if case == "records>view" else {}
    result = again(**site)
    _recomputed(path, broken)
    assert {Path(s["path"]).read_bytes() for s in result["scores"]} == scores
    if site:
        assert (tmp_path / "site" / "index.html").is_file()
