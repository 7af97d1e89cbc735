"""The classify stage on a real recording of a tiny model, asked through the loopback server: no
window it scores was shown to the explainer, similar negatives lie outside every record of the
scored units, and the stage is content-addressed; then `--scorers` end to end from the command line, and a
bad value caught with one line before any work."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import polars as pl
import pytest

from autoexplain.storage import read_run
from tests.test_cli import _one_error_line
from tests.test_cli_runs import EXE, cli
from tests.prefect_homes import prefect_home


@pytest.fixture(scope="module")
def layer_run(tiny_llama_dir, tmp_path_factory):
    """Layer 1 of the tiny Llama over a corpus large enough to leave windows outside the records,
    explained and simulated for units 0-3."""
    from autoexplain import layer as L
    from autoexplain.record import RecordConfig, build_windows, record_layers
    from autoexplain.subject import load_subject
    from tests.conftest import PROSE

    tmp = tmp_path_factory.mktemp("classify")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(f"{PROSE} Chapter {i}, page {3 * i}." for i in range(120)), encoding="utf-8")
    out = tmp / "out"
    subject = load_subject(tiny_llama_dir)
    windows = build_windows(subject, str(corpus), out, window_len=8, seed=0)
    records = record_layers(subject, windows, RecordConfig([1], top_k=12, n_random=9, quantile_per_bin=1,
                                                             reservoir=64), out).directory
    x = L.run_explain(records, 1, out, [0, 1, 2, 3])
    return records, out, L.run_simulate(records, x, out)


def test_no_scoring_window_was_shown_to_the_explainer(layer_run, bench_server, tiny_llama_dir):
    from autoexplain.classify_stage import run_classify, similar_negatives
    from autoexplain.layer import load_units
    from autoexplain.pipeline import shown_records

    records, out, sims = layer_run
    near = similar_negatives(records, sims, out, tiny_llama_dir)
    ref = run_classify(records, sims, out, f"detection:openai:bench@{bench_server.base_url}", negatives_dir=near)
    trials = pl.read_parquet(ref.path)
    units = {(u.id.index, u.id.polarity): u for u in load_units(records, 1, [0, 1, 2, 3])}
    recorded = pl.read_parquet(Path(records) / "layer_1.records.parquet")
    all_records = recorded.filter(pl.col("unit").is_in([0, 1, 2, 3]))["window_id"].to_list()
    assert set(trials["negatives"]) == {"random", "similar", "cofiring"}
    assert set(trials["method"]) == {"explainer", "token-lookup", "output-lookup", "shuffled"}
    for row in trials.iter_rows(named=True):
        unit = units[(row["unit"], row["polarity"])]
        shown = {r.window_id for r in shown_records(unit, 100)}
        train = {r.window_id for r in unit.records if r.split == "train"}
        assert row["window_id"] not in shown | train
        if row["label"] == 1:
            assert any(r.window_id == row["window_id"] and r.split == "test" and r.kind == "top" for r in unit.records)
        if row["negatives"] in ("similar", "cofiring") and row["label"] == 0:
            assert row["window_id"] not in all_records  # outside every record of the scored units
    assert trials["failure"].null_count() == trials.height and (trials["tokens"] > 0).all()
    # content-addressed: asked again, nothing is sent
    from autoexplain.counters import COUNTS

    before = COUNTS["llm_requests"]
    assert run_classify(records, sims, out, f"detection:openai:bench@{bench_server.base_url}", negatives_dir=near).key == ref.key
    assert COUNTS["llm_requests"] == before


def test_the_scores_stage_gathers_every_scorer_with_baselines_and_costs(layer_run, bench_server, tiny_llama_dir):
    from autoexplain.classify_stage import run_classify, run_scores, similar_negatives
    from autoexplain.layer import run_score

    records, out, sims = layer_run
    url = bench_server.base_url
    near = similar_negatives(records, sims, out, tiny_llama_dir)
    asked = [run_classify(records, sims, out, spec, negatives_dir=near)
             for spec in (f"fuzzing:openai:bench@{url}", f"fuzzing-active:openai:bench@{url}",
                          f"intruder:openai:bench@{url}", "embedding")]
    ref = run_scores(records, sims, asked, out, run_score(records, sims, out, n_boot=50), n_boot=50)
    scores = pl.read_parquet(ref.path)
    metrics = set(scores["metric"])
    assert {"top_and_random", "fuzzing_balanced_accuracy@random", "fuzzing_balanced_accuracy@similar",
            "fuzzing_auc@similar", "fuzzing_balanced_accuracy@active", "intruder_accuracy@random",
            "embedding_auc@similar"} <= metrics
    fuzz = scores.filter(pl.col("metric") == "fuzzing_balanced_accuracy@random")
    assert set(fuzz["method"]) == {"explainer", "token-lookup", "output-lookup", "shuffled"}  # the baselines are scored too
    assert (fuzz["simulator_tokens"] > 0).all()
    assert set(scores.filter(pl.col("metric").str.starts_with("intruder"))["method"]) == {"explainer"}


def test_the_classifier_pays_within_the_budget_and_keeps_its_answers(layer_run, bench_server, tmp_path):
    """The scorer's requests are charged to the run's budget, and answered from the response cache
    under `out` when asked again in a new output (nothing sent twice)."""
    from autoexplain.budget import BudgetReached, set_budget
    from autoexplain.classify_stage import run_classify
    from autoexplain.counters import COUNTS

    records, out, sims = layer_run
    spec = f"detection:openai:bench@{bench_server.base_url}"
    try:
        set_budget("300 tokens")
        with pytest.raises(BudgetReached):
            run_classify(records, sims, tmp_path / "poor", spec)
    finally:
        set_budget(None)
    first = run_classify(records, sims, tmp_path / "a", spec)
    sent = COUNTS["llm_requests"]
    import shutil

    shutil.rmtree(tmp_path / "a" / "classifications")
    shutil.rmtree(tmp_path / "a" / "memo")
    again = run_classify(records, sims, tmp_path / "a", spec)  # no stage output, no memo: only the LLM cache
    assert COUNTS["llm_requests"] == sent and COUNTS["llm_cache_hits"] > 0
    assert pl.read_parquet(again.path).equals(pl.read_parquet(first.path))


def test_the_score_command_takes_scorers(layer_run, bench_server, tiny_llama_dir):
    import os
    import sys

    records, out, sims = layer_run
    result = subprocess.run([sys.executable, "-m", "autoexplain.cli", "score", "--records", str(records),
                             "--simulations", str(sims.directory), "--bootstrap", "30", "--out", str(out),
                             "--model", tiny_llama_dir,
                             "--scorers", f"simulation,fuzzing:openai:bench@{bench_server.base_url},embedding"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-3000:]
    scores = pl.read_parquet(Path(result.stdout.strip()) / "layer_1.parquet")
    assert {"top_and_random", "fuzzing_balanced_accuracy@similar", "embedding_auc@random"} <= set(scores["metric"])


@pytest.mark.slow
def test_scorers_flag_end_to_end(tmp_path_factory, tiny_llama_dir, prose_corpus, bench_server):
    """explain-layer with --scorers against the loopback server, then rescore with other scorers."""
    home, out = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("scorers") / "out"
    url = bench_server.base_url
    result = cli(home, "explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layer", "1",
                 "--units", "0-1", "--tokens", "20000", "--k", "1", "--bootstrap", "50", "--window-len", "8",
                 "--top-k", "8", "--random", "6", "--out", str(out),
                 "--scorers", f"simulation,detection:openai:bench@{url},intruder:openai:bench@{url},embedding")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "detection_balanced_accuracy@random" in result.stderr and "intruder_accuracy@random" in result.stderr
    run = read_run(out, 1)
    scores = pl.concat([pl.read_parquet(r["path"]) for r in run["scores"]])
    assert {s.partition(":")[0] for s in scores["simulator"]} >= {"detection", "intruder", "embedding"}
    assert run["params"]["scorers"].startswith("simulation,detection")
    assert (out / "site" / "layer_1" / "agreement.png").is_file() and (out / "site" / "layer_1" / "agreement.html").is_file()
    site = json.loads((out / "site" / "layer_1" / "data" / "site.js").read_text().split("]=", 1)[1].rstrip(";\n"))
    assert ["agreement.html", "Agreement between scorers"] in site["pages"], "the overview links the agreement page"
    again = cli(home, "rescore", "--out", str(out), "--layer", "1", "--bootstrap", "50",
                "--scorers", f"fuzzing:openai:bench@{url}")
    assert again.returncode == 0, again.stderr[-3000:]
    rescored = pl.concat([pl.read_parquet(r["path"]) for r in read_run(out, 1)["scores"]])
    assert set(rescored["simulator"]) == {f"fuzzing:openai:bench@{url}"}


@pytest.mark.parametrize("value, said", [("simulation,detectoin", "unknown scorer 'detectoin'"),
                                         ("embedding:local", "takes no LLM"),
                                         ("detection:nosuch:x", "unknown LLM")])
def test_a_bad_scorers_value_is_one_line_before_any_work(tmp_path, tiny_llama_dir, prose_corpus, value, said):
    out = tmp_path / "out"
    result = subprocess.run([*EXE, "explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus),
                             "--layer", "1", "--tokens", "20000", "--window-len", "8", "--top-k", "8", "--random", "6",
                             "--out", str(out), "--scorers", value], capture_output=True, text=True,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": prefect_home(tmp_path / "home")})
    line = _one_error_line(result)
    assert "--scorers" in line and said in line
    assert not out.exists()  # nothing started


def test_the_default_scorers_submit_the_score_task_as_before():
    """With `scorers` left at its default the flow submits the simulation score task alone, with the
    same arguments as before the classifier scorers existed (so its cache keys are unchanged)."""
    import inspect

    from autoexplain.flows.explain_layer import explain_layer, rescore
    from autoexplain.flows.steps import score_shard

    assert inspect.signature(explain_layer.fn).parameters["scorers"].default == "simulation"
    assert inspect.signature(rescore.fn).parameters["scorers"].default == "simulation"

    class Recorder:
        def __init__(self):
            self.calls = []

        def submit(self, *args):
            self.calls.append(args)
            return "future"

    score = Recorder()
    assert score_shard("records", "sims", "simulation", "model", 100, "out", score, None) == ("future", [])
    assert score.calls == [("records", "sims", 100, "out")]
