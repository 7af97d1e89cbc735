"""explain-model from the command line: several layers recorded in one pass, explained and scored,
one site and one model report; rescore of one of its layers; bad input in one line before any
work; and a run killed half-way that a rerun finishes without redoing what was sealed.

Each command runs as a real process with Prefect's ephemeral server in its own PREFECT_HOME."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from autoexplain.storage import read_run
from tests.test_cli import _one_error_line
# The fixtures are imported, not put in conftest, so that they stay module-scoped here.
from tests.viewer_fixtures import Watched, browser, chromium, file_url  # noqa: F401
from tests.prefect_homes import command_env

pytestmark = pytest.mark.slow
EXE = [sys.executable, "-m", "autoexplain.flows.cli"]
SMALL = ["--tokens", "20000", "--k", "1", "--bootstrap", "50", "--window-len", "8", "--top-k", "8", "--random", "6"]


def _env(home: Path) -> dict:
    return command_env(home)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, env=_env(home))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def modelled(home, tiny_llama_dir, prose_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("model-run") / "out"
    result = cli(home, "explain-model", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layers", "0,2",
                 "--units", "0-3", "--shard-size", "2", *SMALL, "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def _table_of(run: dict, stage: str) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(r["path"]) for r in run[stage]])


def _scores(run: dict) -> pl.DataFrame:
    return _table_of(run, "scores")


def test_one_recording_pass_for_every_layer(modelled):
    out, _ = modelled
    recordings = list((out / "records").iterdir())
    assert len(recordings) == 1 and len(list((out / "windows").iterdir())) == 1
    manifest = json.loads((recordings[0] / "manifest.json").read_text())
    assert manifest["params"]["layers"] == [0, 2]
    for layer in (0, 2):
        run = read_run(out, layer)
        assert run["flow"] == "explain-model" and run["params"]["layer"] == layer
        assert run["records"]["path"] == str(recordings[0].resolve())
        scores = _scores(run)
        assert set(scores["layer"]) == {layer} and scores.select("unit", "polarity").unique().height == 8


def test_the_model_report_matches_the_scores(modelled):
    out, result = modelled
    err = result.stderr
    assert "Model report" in err and "over 2 layers and 1 source(s) (mlp)" in err and "Traceback" not in err
    assert result.stdout.strip() == str(out.resolve())
    assert "model " in err and "units, all layers" in err, "one bar for the whole model"
    bars = {line.split()[0]: line.split()[2] for line in err.splitlines() if line.split()[:1] in (["explain"], ["simulate"])}
    # 2 layers x 4 units x 2 polarities, no shard counted over another; each simulated twice (its
    # explanation, then its shuffled control)
    assert bars == {"explain": "16/16", "simulate": "32/32"}
    page = (out / "site" / "model" / "report.html").read_text()
    for layer in (0, 2):
        scores = _scores(read_run(out, layer))
        for method in ("explainer", "shuffled"):  # the control too: the explanation's mean means little alone
            mine = scores.filter((pl.col("metric") == "top_and_random") & (pl.col("method") == method))["value"].drop_nulls()
            row = f"<td>mlp</td><td>{layer}</td><td>{method}</td><td>{len(mine)}</td><td>{mine.mean():.3f}</td>"
            assert row in page, f"layer {layer}'s {method} row, computed here from its scores"
            share = f"{100 * float((mine > 0.8).mean()):.1f} %"
            assert page.split(row, 1)[1].split("</tr>", 1)[0].count(share) == 1


def test_the_model_site_links_the_report(modelled, browser):
    out, _ = modelled
    site = out / "site" / "model"
    w = Watched(browser, file_url(site))
    page = w.open("index.html")
    assert page.locator("#layers tbody tr").count() == 2
    page.click("#pages a")
    page.wait_for_url("**/report.html")
    assert page.locator("#model-table tbody tr").count() == 2 * 4  # layers x (explanation, two baselines, shuffled)
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=out / "report.png", full_page=True)
    w.close()


def stage_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoexplain.cli", *args], capture_output=True, text=True, env=_env(home))


def test_publish_a_model_run_then_import_and_rescore_it(home, modelled, tmp_path):
    """The published dataset, by layer; read back by `import` as runs that `rescore` re-scores: with
    the same simulator, every score of the explanation and its baselines comes back as published (the
    shuffled control draws another unit's explanation from its shard, and the shards differ)."""
    out, _ = modelled
    dataset, again = tmp_path / "dataset", tmp_path / "imported"
    result = stage_cli(home, "publish", "--out", str(out), "--to", str(dataset), "--license", "other")
    assert result.returncode == 0, result.stderr[-3000:]
    for table in ("units", "exemplars", "explanations", "scores", "simulations"):
        for layer in (0, 2):
            rows = pl.read_parquet(dataset / "data" / table / "mlp" / f"layer_{layer}.parquet")
            assert rows.height and set(rows["layer"]) == {layer}, f"{table} of layer {layer}"

    result = stage_cli(home, "import", "--from", str(dataset), "--out", str(again))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"rescore --out {again} --layer 2" in result.stderr
    assert sorted(p.name for p in (again / "runs").iterdir()) == ["layer_0.json", "layer_2.json"]
    assert stage_cli(home, "import", "--from", str(dataset), "--out", str(again)).returncode == 0, "the same again"
    # an imported run, not yet re-scored (no simulations), publishes its explanations and scores again
    second = tmp_path / "republished"
    result = stage_cli(home, "publish", "--out", str(again), "--to", str(second), "--license", "other")
    assert result.returncode == 0, result.stderr[-3000:]
    mine, theirs = (pl.read_parquet(d / "data" / "scores" / "mlp" / "layer_2.parquet") for d in (dataset, second))
    assert mine.height == theirs.height > 0
    mine, theirs = (pl.read_parquet(d / "data" / "explanations" / "mlp" / "layer_2.parquet") for d in (dataset, second))
    assert sorted(theirs["text"]) == sorted(mine.filter(pl.col("method") == "explainer")["text"]), "import keeps those"
    mine = (out / "runs" / "layer_2.json").read_bytes()
    over = stage_cli(home, "import", "--from", str(dataset), "--out", str(out))
    assert "already holds runs of layer_0, layer_2" in _one_error_line(over) and "new --out" in over.stderr
    assert (out / "runs" / "layer_2.json").read_bytes() == mine, "the user's own run is still the latest"
    rescored = cli(home, "rescore", "--out", str(again), "--layer", "2", "--bootstrap", "50")
    assert rescored.returncode == 0, rescored.stderr[-4000:]
    assert "mean change: +0.000" in rescored.stderr
    keys = ["unit", "polarity", "method", "metric"]
    kept = pl.col("method") != "shuffled"
    published = pl.read_parquet(dataset / "data" / "scores" / "mlp" / "layer_2.parquet").filter(kept).sort(keys)
    after = _scores(read_run(again, 2)).filter(kept).sort(keys)
    assert after.height == published.height > 0
    assert after.select(*keys, "value").equals(published.select(*keys, "value"))

    # revised on top of the imported explanations: no recording (the corpus is not here), no explaining
    folders = {stage: sorted(p.name for p in (again / stage).iterdir()) for stage in ("windows", "records", "explanations")}
    unit = int(after["unit"][0])
    revised = cli(home, "revise", "--out", str(again), "--layer", "2", "--unit", f"{unit}:{int(after['polarity'][0]):+d}",
                  "--text", "my own words")
    assert revised.returncode == 0, revised.stderr[-4000:]
    now = {stage: sorted(p.name for p in (again / stage).iterdir()) for stage in folders}
    assert now["windows"] == folders["windows"] and now["records"] == folders["records"]
    assert len(now["explanations"]) == len(folders["explanations"]) + 1, "one shard revised, nothing explained"
    assert "my own words" in set(_table_of(read_run(again, 2), "explanations")["text"])

    exemplars = dataset / "data" / "exemplars" / "mlp" / "layer_0.parquet"
    pl.read_parquet(exemplars).drop("token_ids").write_parquet(exemplars)  # as published before ids were kept
    old = stage_cli(home, "import", "--from", str(dataset), "--out", str(tmp_path / "old"), "--layer", "0")
    assert "lack ['token_ids']" in _one_error_line(old) and "publish the run again" in old.stderr
    assert not (tmp_path / "old" / "runs").exists()

    # Recorded when splits were of windows: one window in train for one unit, test for another.
    # Refused in one line, with nothing written.
    path = dataset / "data" / "exemplars" / "mlp" / "layer_2.parquet"
    rows = pl.read_parquet(path).with_row_index("i")
    shared = rows.group_by("window_id").agg(pl.col("i").max(), pl.col("split").first(), pl.len()).filter(pl.col("len") > 1)
    w, i, split = shared.sort("window_id").select("window_id", "i", "split").row(0)  # one row of a window held twice
    rows.with_columns(split=pl.when(pl.col("i") == i).then(pl.lit("valid" if split == "test" else "test"))
                      .otherwise(pl.col("split"))).drop("i").write_parquet(path)
    mixed = stage_cli(home, "import", "--from", str(dataset), "--out", str(tmp_path / "mixed"), "--layer", "2")
    line = _one_error_line(mixed)
    assert f"put window {w} in more than one split" in line and "before splits were of documents" in line, line
    assert not (tmp_path / "mixed").exists()


def test_rescore_one_layer_of_a_model_run(home, modelled):
    out, _ = modelled
    result = cli(home, "rescore", "--out", str(out), "--layer", "2", "--bootstrap", "50")
    assert result.returncode == 0, result.stderr[-4000:]
    run = read_run(out, 2)
    assert run["flow"] == "rescore" and "mean change" in result.stderr


@pytest.mark.parametrize("args, says", [
    (["--layers", "0,7"], "--layers: layer 7 is out of range"),
    (["--layers", "2-0"], "--layers: the layer range '2-0' runs backwards"),
    (["--layers", ""], "--layers: '' names no layer"),  # an unset shell variable: not every layer
    (["--source", "mlp", "--source", "mlp"], "--source: ['mlp', 'mlp'] names a source twice"),
    (["--units", "0-999"], "--units: unit 48 is out of range"),
    (["--simulator", "nonsense"], "--simulator"),
    (["--source", "sae:/nonexistent/sae"], "--source: SAE path /nonexistent/sae does not exist"),
])
def test_bad_input_is_one_line_before_any_work(home, tiny_llama_dir, prose_corpus, tmp_path, args, says):
    out = tmp_path / "out"
    result = cli(home, "explain-model", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), *SMALL, *args,
                 "--out", str(out))
    assert result.returncode == 2
    assert says in _one_error_line(result)
    assert not out.exists(), "nothing written"


def test_a_killed_run_resumes_without_redoing_sealed_work(home, tiny_llama_dir, prose_corpus, tmp_path):
    out = tmp_path / "out"
    args = ["explain-model", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layers", "0-2",
            "--units", "0-15", "--shard-size", "2", *SMALL, "--out", str(out)]
    proc = subprocess.Popen([*EXE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env(home), start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(out.glob("scores/*/manifest.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its children (its scoring worker, if it started one), mid-run
    proc.wait()
    sealed = {p: p.stat().st_mtime_ns for p in out.glob("*/*/manifest.json")}
    n_scores = len(list(out.glob("scores/*/manifest.json")))
    assert 1 <= n_scores < 24, f"killed after {n_scores} of 24 shards were scored (3 layers x 8 shards)"
    assert not (out / "runs").exists(), "no layer was finished"

    again = cli(home, *args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert len(list(out.glob("scores/*/manifest.json"))) == 24 and len(list((out / "runs").iterdir())) == 3
    assert {p: p.stat().st_mtime_ns for p in sealed} == sealed, "every output sealed before the kill was reused"


def test_bad_import_input_is_one_line(home, tmp_path):
    """A folder shaped like a dataset but with no card that publish wrote, and the reference layout
    without --layer: one line each, exit 2, nothing written."""
    fake = tmp_path / "fake"
    (fake / "data" / "explanations").mkdir(parents=True)
    (fake / "README.md").write_text("# some other dataset\n")
    line = _one_error_line(stage_cli(home, "import", "--from", str(fake), "--out", str(tmp_path / "o1")))
    assert "is no dataset that `autoexplain publish` wrote" in line
    (tmp_path / "ref" / "explanations").mkdir(parents=True)
    line = _one_error_line(stage_cli(home, "import", "--from", str(tmp_path / "ref"), "--out", str(tmp_path / "o2")))
    assert "--layer is required" in line
    for missing, says in ((tmp_path / "nope", "does not exist"), (tmp_path / "fake" / "README.md", "is not a folder")):
        line = _one_error_line(stage_cli(home, "import", "--from", str(missing), "--layer", "3", "--out", str(tmp_path / "o3")))
        assert line.startswith(f"error: --from: {missing} {says}"), line
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_a_layer_of_the_model_run_is_not_recorded_again(modelled, home, tiny_llama_dir, prose_corpus):
    """`explain-layer` (and so `revise`) of a layer the model run recorded reuses its recording."""
    out, _ = modelled
    before = sorted(p.name for p in (out / "records").iterdir())
    result = cli(home, "explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layer", "2",
                 "--units", "0-1", "--shard-size", "2", *SMALL, "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in (out / "records").iterdir()) == before, "a second recording"
    run = read_run(out, 2)
    assert run["flow"] == "explain-layer" and run["records"]["path"] == str((out / "records" / before[0]).resolve())
    assert run["records"]["layers"] == [0, 2]
