"""Units whose LLM answers failed (retries ran out, blank answers, some simulations lost): recorded
as failed with the reason, never simulated or scored as if they had an answer, and asked again by
the next run. Real loopback servers: tests/llama_server.py's FaultServer in front of
bench/llm_server.py's BenchServer."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from autoexplain import pipeline
from autoexplain.explain import ENDING
from autoexplain.llm import OpenAILLM
from autoexplain.simulate import AllAtOnceSimulator
from tests.llama_server import bench_server, fault_server  # noqa: F401  (fixtures)


def fast(url: str, **kw) -> OpenAILLM:
    kw = {"max_retries": 0, "backoff_base": 0.01, "backoff_cap": 0.05, "api_key": "test", "max_concurrency": 1, **kw}
    return OpenAILLM("test-model", url, **kw)


def _stages(records_dir, out, explainer, simulator, units=(0, 1, 2)):
    from autoexplain.layer import run_explain, run_score, run_simulate

    x = run_explain(records_dir, 1, out, list(units), explainer=f"openai:test-model@{explainer.base_url}", llm=explainer,
                    cfg=pipeline.ExplainConfig(k=2))
    s = run_simulate(records_dir, x, out, sim=simulator)
    return x, s, run_score(records_dir, s, out, n_boot=20)


def test_a_failed_explanation_is_not_simulated_lends_no_control_and_is_asked_again(
        fault_server, bench_server, tiny_records, tmp_path):
    """The explainer's first request gets a 500 and no retry: that unit's explanation fails. The
    simulate stage seals (its contracts hold): the failed unit's explanation is not simulated (its
    rows carry the reason and cost nothing), the control that would borrow its empty text is failed
    too, and their scores are undefined with the reason. The run is not final (one result got no
    answer, counted once); the next run asks only that unit's explanation, and everything is defined."""
    from autoexplain.storage import unanswered

    records_dir, _ = tiny_records
    out = tmp_path / "out"
    explainer_srv = fault_server(fail_with=[500], upstream=bench_server.base_url)
    simulator_srv = fault_server(upstream=bench_server.base_url)
    explainer = fast(explainer_srv.base_url)
    sim = AllAtOnceSimulator(fast(simulator_srv.base_url, max_concurrency=4))
    x, s, scored = _stages(records_dir, out, explainer, sim)

    table = pl.read_parquet(x.path)
    failed = table.filter(pl.col("failure").is_not_null())
    assert failed.height == 1 and "HTTP 500" in failed["failure"][0]
    unit, polarity = failed["unit"][0], failed["polarity"][0]
    assert unanswered(x.directory) == 1
    assert unanswered(scored.directory) == 1, "the failed explanation is one result without an answer, counted once"

    sims = pl.read_parquet(s.path)
    mine = sims.filter((pl.col("unit") == unit) & (pl.col("polarity") == polarity) & (pl.col("method") == "explainer"))
    assert mine.height and mine["expected"].null_count() == mine.height, "a failed explanation is not simulated"
    assert mine["tokens"].sum() == 0 and all("HTTP 500" in f for f in mine["failure"])
    prompts = [str(r["json"].get("prompt", "")) for r in simulator_srv.requests]
    assert prompts and not any(f"{ENDING} .\nActivations" in p for p in prompts), "the empty text was simulated"
    chosen = pl.read_parquet(s.directory / "chosen.parquet")
    controls = chosen.filter(pl.col("method") == "shuffled")
    assert controls.filter(pl.col("text").str.strip_chars() == "")["failure"].null_count() == 0
    borrowed = controls.filter(pl.col("failure").is_not_null())
    assert borrowed.height == 1, "exactly one unit's control would have borrowed the failed explanation"
    b_unit, b_pol = borrowed["unit"][0], borrowed["polarity"][0]
    b_sims = sims.filter((pl.col("unit") == b_unit) & (pl.col("polarity") == b_pol) & (pl.col("method") == "shuffled"))
    assert b_sims.height and b_sims["expected"].null_count() == b_sims.height and b_sims["tokens"].sum() == 0

    scores = pl.read_parquet(scored.path)
    undefined = scores.filter(((pl.col("unit") == unit) & (pl.col("polarity") == polarity) & (pl.col("method") == "explainer"))
                              | ((pl.col("unit") == b_unit) & (pl.col("polarity") == b_pol) & (pl.col("method") == "shuffled")))
    assert undefined.height and undefined["value"].null_count() == undefined.height
    reasons = dict(zip(undefined["method"], undefined["undefined_reason"]))
    assert "HTTP 500" in reasons["explainer"] and "borrows" in reasons["shuffled"]

    from autoexplain.layer import run_revise, run_simulate

    revised = run_simulate(records_dir, run_revise(x, {(unit, polarity): "the word cats"}, out), out, sim=sim)
    human = pl.read_parquet(revised.path).filter((pl.col("unit") == unit) & (pl.col("polarity") == polarity)
                                                 & (pl.col("method") == "explainer"))
    assert human.height and human["expected"].null_count() == 0, "a revised failed unit has a text, and is simulated"

    sent = len(explainer_srv.requests)
    x2, s2, scored2 = _stages(records_dir, out, explainer, sim)
    assert len(explainer_srv.requests) - sent == 1, "only the failed unit's explanation is asked again"
    assert x2.directory == x.directory and unanswered(scored2.directory) == 0
    assert pl.read_parquet(x2.path)["failure"].null_count() == table.height
    again = pl.read_parquet(scored2.path).filter(pl.col("undefined_reason").is_not_null())
    assert not any("HTTP 500" in r for r in again["undefined_reason"])


def test_blank_explainer_answers_fail_the_unit_are_not_cached_and_a_fixed_server_is_asked_again(
        fault_server, bench_server, tiny_records, tmp_path, monkeypatch):
    """An explainer that answers blank text for every sample: each unit's explanation fails with the
    reason (the explanations contract holds), the run goes on and is not final, and the blank
    answers are not kept in the response cache: once the server answers, the same run asks again
    and gets explanations."""
    from autoexplain.llm_cache import CACHE_ENV
    from autoexplain.storage import unanswered

    monkeypatch.delenv(CACHE_ENV, raising=False)  # the cache as shipped: on, under the output root
    records_dir, _ = tiny_records
    out = tmp_path / "out"
    blank = fault_server(text="\n", varied=True)
    sim = AllAtOnceSimulator(fast(bench_server.base_url, max_concurrency=4))
    x, s, scored = _stages(records_dir, out, fast(blank.base_url), sim, units=(0,))
    mine = pl.read_parquet(x.path).filter(pl.col("method") == "explainer")
    assert mine.height == 2 and all("no usable explanation in 2 samples" in f for f in mine["failure"])
    assert all(f.startswith("request failed") for f in mine["failure"]), "a rerun asks it again"
    assert unanswered(scored.directory) == 2
    assert pl.read_parquet(scored.path).filter(pl.col("method") == "explainer")["value"].null_count() > 0

    sent = len(blank.requests)
    blank.text = None  # the server is fixed
    x2, _, scored2 = _stages(records_dir, out, fast(blank.base_url), sim, units=(0,))
    assert len(blank.requests) > sent, "the blank answers were not kept: the fixed server is asked"
    assert x2.directory == x.directory and unanswered(scored2.directory) == 0
    again = pl.read_parquet(x2.path)
    assert again["failure"].null_count() == again.height and again["text"].str.contains("canned").sum() == 2


def test_a_blank_chat_reply_is_not_cached(fault_server, tmp_path):
    """Nothing usable in it: the next run asks again rather than read the blank back for ever."""
    from autoexplain.llm_cache import ResponseCache

    replies = iter(["", "cats"])
    srv = fault_server(chat=lambda messages: next(replies))
    llm = fast(srv.base_url)
    llm.cache = ResponseCache(tmp_path / "c")
    ask = [[{"role": "user", "content": "what does it find?"}]]
    assert llm.chat(ask)[0].text == ""
    assert llm.chat(ask)[0].text == "cats" and len(srv.requests) == 2
    assert llm.chat(ask)[0].text == "cats" and len(srv.requests) == 2, "a usable answer is kept"


def test_a_unit_with_some_unanswered_simulations_is_undefined_until_the_rerun(
        fault_server, bench_server, tiny_records, tmp_path):
    """The simulator's server stops answering part way (no retries): a method of a unit with some of
    its simulations unanswered is not scored on the rest (dropping top records biases the score):
    every metric of it is undefined, saying how many got no answer, so the layer's means cover
    fully simulated units only. The next run asks those again, and the unit is scored."""
    from autoexplain.layer import run_explain, run_score, run_simulate
    from autoexplain.summary import layer_summary

    records_dir, _ = tiny_records
    out = tmp_path / "out"
    x = run_explain(records_dir, 1, out, [0, 1], explainer="embedding")
    srv = fault_server(fail_with=[200] * 30 + [500] * 10, upstream=bench_server.base_url)
    sim = AllAtOnceSimulator(fast(srv.base_url))
    s = run_simulate(records_dir, x, out, sim=sim)
    sims = pl.read_parquet(s.path).with_columns(lost=pl.col("failure").str.starts_with("request failed").fill_null(False))
    per = sims.group_by("unit", "polarity", "method").agg(pl.col("lost").sum().alias("lost"), pl.len().alias("n"))
    partly = per.filter((pl.col("lost") > 0) & (pl.col("lost") < pl.col("n")))
    assert partly.height, "some unit's method lost only some of its simulations"
    scores = pl.read_parquet(run_score(records_dir, s, out, n_boot=20).path).join(per, on=["unit", "polarity", "method"])
    hit = scores.filter(pl.col("lost") > 0)
    assert hit["value"].null_count() == hit.height, "no score from what is left of a method that lost simulations"
    assert all(f"{lost} of {n} simulations got no LLM answer" in r
               for lost, n, r in hit.select("lost", "n", "undefined_reason").iter_rows())
    summary = layer_summary(scores.drop("lost", "n"))
    whole = scores.filter((pl.col("lost") == 0) & pl.col("value").is_not_null())
    for row in summary.iter_rows(named=True):  # the means cover fully simulated units only
        values = whole.filter((pl.col("method") == row["method"]) & (pl.col("metric") == row["metric"]))["value"]
        assert row["units"] - row["undefined"] == values.len()

    again = pl.read_parquet(run_score(records_dir, run_simulate(records_dir, x, out, sim=sim), out, n_boot=20).path)
    back = again.join(partly, on=["unit", "polarity", "method"]).filter(pl.col("metric") == "top_and_random")
    assert back.height and not any("no LLM answer" in (r or "") for r in back["undefined_reason"])


def test_a_best_of_k_choice_with_unanswered_checks_waits_for_the_rerun(fault_server, bench_server, tiny_records, tmp_path):
    """The simulator's first request, a best-of-2 check on the valid split, gets a 500 and no retry.
    Ranked on the checks that were answered, which candidate wins would depend on the server's
    faults: the explanation is not simulated or scored (its rows are results without an answer, the
    run is not final); the rerun asks the lost check again and scores the unit."""
    from autoexplain.storage import unanswered

    records_dir, _ = tiny_records
    out = tmp_path / "out"
    explainer = fast(fault_server(varied=True).base_url)  # two different candidates per unit
    srv = fault_server(fail_with=[500], upstream=bench_server.base_url)
    sim = AllAtOnceSimulator(fast(srv.base_url))  # one request at a time: the first is unit 0's first check
    x, s, scored = _stages(records_dir, out, explainer, sim)
    assert all(len(c) == 2 for c in pl.read_parquet(x.path).filter(pl.col("method") == "explainer")["candidates"])
    sims = pl.read_parquet(s.path)
    unsure = sims.filter(pl.col("failure").str.contains(r"best-of-2 got no answer for \d+ of its \d+ checks").fill_null(False))
    assert unsure.height and set(unsure["method"]) == {"explainer"} and unsure["expected"].null_count() == unsure.height
    (unit, polarity), = set(zip(unsure["unit"], unsure["polarity"]))
    mine = sims.filter((pl.col("unit") == unit) & (pl.col("polarity") == polarity))
    assert mine.filter(pl.col("method") == "explainer").height == unsure.height, "none of its explanation's rows simulated"
    assert mine.filter(pl.col("method") == "token-lookup")["expected"].null_count() == 0, "its baselines are"
    assert unanswered(s.directory) == unsure.height and unanswered(scored.directory) >= unsure.height
    hit = pl.read_parquet(scored.path).filter((pl.col("unit") == unit) & (pl.col("polarity") == polarity)
                                              & (pl.col("method") == "explainer"))
    assert hit["value"].null_count() == hit.height and all("got no LLM answer" in r for r in hit["undefined_reason"])

    sent = len(srv.requests)
    _, s2, scored2 = _stages(records_dir, out, explainer, sim)
    assert len(srv.requests) > sent and unanswered(s2.directory) == 0 and unanswered(scored2.directory) == 0
    back = pl.read_parquet(scored2.path).filter((pl.col("unit") == unit) & (pl.col("polarity") == polarity)
                                                & (pl.col("method") == "explainer") & (pl.col("metric") == "top_and_random"))
    assert back.height == 1 and back["value"][0] is not None, back


@pytest.mark.slow
def test_explain_layer_whose_every_explanation_fails_exits_4_and_the_rerun_asks_only_them(
        fault_server, bench_server, tiny_llama_dir, prose_corpus, tmp_path):
    """The reviewer's run: the explainer's server fails both of the unit's requests (no retries).
    The command goes on to the end and says `incomplete` with exit 4 (was: the simulate stage broke
    the explanations contract, exit 2); the same command, the server answering, asks exactly those
    two again and exits 0."""
    from tests.test_llm_cache import _cli

    explainer = fault_server(fail_with=[500, 500], upstream=bench_server.base_url)
    args = ["explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layer", "1", "--units", "0",
            "--tokens", "20000", "--k", "1", "--bootstrap", "20", "--window-len", "8", "--top-k", "8", "--random", "6",
            "--explainer", f"openai:bench@{explainer.base_url}",
            "--simulator", f"all-at-once:openai:bench@{bench_server.base_url}", "--retries", "0",
            "--out", str(tmp_path / "out")]
    first = _cli(tmp_path / "home", *args)
    assert first.returncode == 4, first.stderr[-3000:]
    assert re.search(r"incomplete: 2 results got no LLM answer", first.stderr), first.stderr[-3000:]
    failed = [json.dumps(r["json"], sort_keys=True) for r in explainer.requests[:2]]

    again = _cli(tmp_path / "home", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(json.dumps(r["json"], sort_keys=True) for r in explainer.requests[2:]) == sorted(failed)
